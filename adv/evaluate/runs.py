"""The attack sequence of an evaluation: ``AttackRun`` entries resolved from names, ``(name, kwargs)``, dicts,
registry specs or white-box functions.

Its own module so that the protocol (:mod:`adv.evaluate.protocol`) and the suites it expands
(:mod:`adv.evaluate.suites`, whose EOT entries are ``AttackRun`` objects) both build on it without importing each
other in a circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from adv.attacks.registry import AttackSpec, get_attack


@dataclass(frozen=True)
class AttackRun:
    """One entry of the attack sequence: a registered attack (or a custom function) and its arguments."""

    label: str
    name: str
    family: str
    fn: Callable = field(repr=False)
    kwargs: dict[str, Any] = field(default_factory=dict)
    spec: AttackSpec | None = field(default=None, repr=False)

    def accepts(self, arg: str) -> bool:
        return self.spec.accepts(arg) if self.spec else False

    @property
    def randomized(self) -> bool:
        """Whether it draws random numbers (takes ``seed=``); a function says so with a ``randomized`` attribute."""
        return self.spec.randomized if self.spec else bool(getattr(self.fn, "randomized", False))


def resolve_attacks(attacks: Sequence, norm: str) -> list[AttackRun]:
    """Names, ``(name, kwargs)``, ``{"name": ..., **kwargs}``, specs or white-box callables."""
    if isinstance(attacks, (str, AttackSpec)) or callable(attacks):
        attacks = [attacks]
    if not attacks:
        raise ValueError("attacks must name at least one attack, got none")
    runs, seen = [], {}
    for item in attacks:
        run = _resolve(item, norm)
        seen[run.label] = seen.get(run.label, 0) + 1
        if seen[run.label] > 1:
            run = AttackRun(f"{run.label}#{seen[run.label]}", run.name, run.family, run.fn, run.kwargs, run.spec)
        runs.append(run)
    return runs


def _resolve(item, norm: str) -> AttackRun:
    if isinstance(item, AttackRun):  # built by a caller, e.g. a suite's EOT entries
        return item
    kwargs: dict[str, Any] = {}
    if isinstance(item, tuple) and len(item) == 2:
        item, kwargs = item
    elif isinstance(item, dict):
        kwargs = {k: v for k, v in item.items() if k != "name"}
        item = item.get("name")
    if isinstance(item, str):
        item = get_attack(item)
    if isinstance(item, AttackSpec):
        if norm not in item.norms:
            raise ValueError(f"attack {item.name!r} supports norms {item.norms}, got {norm!r}")
        item.check_renamed(kwargs)
        bad = [k for k in kwargs if not item.accepts(k) or k in ("eps", "norm")]
        if bad:
            raise ValueError(f"attack {item.name!r} does not take {sorted(bad)}; it takes {sorted(item.defaults)}")
        label = item.name + (f"({', '.join(f'{k}={v}' for k, v in sorted(kwargs.items()))})" if kwargs else "")
        return AttackRun(label, item.name, item.family, item, dict(kwargs), item)
    if callable(item):
        name = getattr(item, "__name__", type(item).__name__)
        return AttackRun(name, name, "whitebox", item, dict(kwargs))
    raise ValueError(f"cannot use {item!r} as an attack: give a registered name, (name, kwargs) or a function")
