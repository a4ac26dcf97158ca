"""AutoAttack-style worst-case suites (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks").

A suite is a fixed attack sequence that the robust-mask protocol
(:func:`adv.evaluate.robust_accuracy`) runs in order, each attack only on
the points still standing, reporting the worst case:

* ``standard`` (L∞): APGD-CE, APGD-T (targeted DLR over the top 9 classes),
  FAB-T (top 9 classes) and Square with 5000 queries, AutoAttack's
  ``standard`` version;
* ``l2``: the L2 versions of the same four (Square L2 for the last);
* ``rand``: APGD-CE and APGD-DLR, each on the mean output of 20 draws
  (EOT), AutoAttack's ``rand`` version for randomized defenses such as
  the noise stage.

The suites are data, so reports can say exactly what ran. The protocol's early
exits (APGD leaving an example at its first fooling iterate, FAB-T's
``early_stop``, Square dropping fooled points) never change an example's
verdict; docs/benchmarks.md compares the standard suite with the original
AutoAttack code (``python -m bench.attacks --suite``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Mapping

from adv.attacks.registry import get_attack
from adv.evaluate.adaptive import EOT
from adv.evaluate.runs import AttackRun

_TOP9 = {"steps": 100, "n_target_classes": 9}


@dataclass(frozen=True)
class Suite:
    name: str
    norms: tuple[str, ...]
    #: ``(attack name, hyperparameters)`` in the order they run.
    attacks: tuple[tuple[str, Mapping[str, Any]], ...]
    description: str
    #: Draws per forward pass (EOT); 1 means the attacks see the model as it is.
    eot_samples: int = 1
    notes: str = field(default="", repr=False)


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("standard", ("linf",), (("apgd_ce", {"steps": 100}), ("apgd_t", _TOP9), ("fab_t", _TOP9),
                                  ("square", {"queries": 5000})),
          "AutoAttack standard (L-inf): APGD-CE, APGD-T, FAB-T, Square-5000"),
    Suite("l2", ("l2",), (("apgd_ce", {"steps": 100}), ("apgd_t", _TOP9), ("fab_t", _TOP9),
                          ("square_l2", {"queries": 5000})),
          "AutoAttack standard, L2 attacks: APGD-CE, APGD-T, FAB-T, Square-L2-5000"),
    Suite("rand", ("linf", "l2"), (("apgd_ce", {"steps": 100}), ("apgd_dlr", {"steps": 100})),
          "AutoAttack rand: APGD-CE and APGD-DLR with EOT over 20 draws, for randomized defenses", eot_samples=20),
)}


def list_suites() -> list[str]:
    return sorted(SUITES)


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(list_suites())}")
    return SUITES[name]


def _with_eot(spec, samples: int, model, x, y, **kw):
    return spec(EOT(model, samples), x, y, **kw)


def suite_attacks(name: str, norm: str, *, eot: bool = True) -> list:
    """The suite's attack sequence for :func:`adv.evaluate.robust_accuracy` at ``norm``.

    ``(name, kwargs)`` pairs; with EOT (``rand``), :class:`AttackRun` entries
    that attack the mean of ``eot_samples`` draws and are scored on the
    model itself. ``eot=False`` gives the plain pairs (for callers whose
    model already averages draws, e.g. an adaptive defended pipeline).
    """
    suite = get_suite(name)
    if norm not in suite.norms:
        other = [s.name for s in SUITES.values() if norm in s.norms]
        raise ValueError(f"suite {name!r} is for norm {'/'.join(suite.norms)}, got {norm!r}; "
                         f"suites for {norm}: {', '.join(other)}")
    if suite.eot_samples == 1 or not eot:
        return [(n, dict(kw)) for n, kw in suite.attacks]
    runs = []
    for n, kw in suite.attacks:
        spec = get_attack(n)
        runs.append(AttackRun(f"{n}(eot={suite.eot_samples})", n, spec.family,
                              partial(_with_eot, spec, suite.eot_samples), dict(kw), spec))
    return runs


def describe_suite(name: str) -> str:
    """One line for listings."""
    s = get_suite(name)
    attacks = ", ".join(n + (f"({', '.join(f'{k}={v}' for k, v in kw.items())})" if kw else "") for n, kw in s.attacks)
    eot = f"; EOT x{s.eot_samples}" if s.eot_samples > 1 else ""
    return f"{s.description} [{'/'.join(s.norms)}{eot}: {attacks}]"
