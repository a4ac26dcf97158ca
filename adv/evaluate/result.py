"""Typed results of a robust-accuracy evaluation."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from adv.evaluate.stats import fmt_ci


@dataclass
class Flag:
    """A sanity warning (gradient masking and friends, after AutoAttack's ``checks.py``)."""

    code: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackReport:
    """One attack of the worst-case sequence; it ran only on the points still standing."""

    label: str
    attack: str
    family: str
    params: dict[str, Any]
    n_attacked: int = 0
    n_fooled: int = 0
    #: Worst-case robust accuracy after this attack (cumulative, over all n points).
    robust_acc_after: float = 0.0
    time_s: float = 0.0
    #: Mean perturbation size of the points this attack fooled.
    mean_l0: float | None = None
    mean_l2: float | None = None
    mean_linf: float | None = None
    #: Query attacks: mean queries per attacked point.
    mean_queries: float | None = None
    #: 95% Wilson interval of ``robust_acc_after``.
    robust_acc_after_ci: tuple[float, float] | None = None

    @property
    def success_rate(self) -> float:
        return self.n_fooled / self.n_attacked if self.n_attacked else 0.0


#: Per-example marks of one attack in the resume state: not attacked, attacked and survived, fooled.
NOT_ATTACKED, SURVIVED, FOOLED = "-", "0", "1"


@dataclass
class PerExample:
    """Each example's fate, in data order (the order of the data the evaluation read).

    Shape: clean, robust and every mask (N,) bool; x_adv (N, C, H, W) float in [0, 1]
    """

    #: Correct on the clean image.
    clean: torch.Tensor
    #: Still correct after every attack (``robust.float().mean() == robust_acc``).
    robust: torch.Tensor
    #: Per attack label: the attack ran on the example (it was still standing).
    attacked: dict[str, torch.Tensor]
    #: Per attack label: the attack broke the example.
    fooled: dict[str, torch.Tensor]
    #: Only when asked for (``return_adversarials=True``): the adversarial of the attack that broke each
    #: example, the clean image elsewhere.
    x_adv: torch.Tensor | None = None

    @classmethod
    def from_marks(cls, clean: str, robust: str, marks: dict[str, str], x_adv=None) -> "PerExample":
        def mask(text: str, char: str = "1") -> torch.Tensor:
            return torch.tensor([c == char for c in text], dtype=torch.bool)

        return cls(mask(clean), mask(robust), {k: ~mask(m, NOT_ATTACKED) for k, m in marks.items()},
                   {k: mask(m, FOOLED) for k, m in marks.items()}, x_adv)

    def to_dict(self) -> dict[str, Any]:
        """Compact strings, one character per example (the adversarial images are left out)."""
        def text(m: torch.Tensor) -> str:
            return "".join("1" if v else "0" for v in m.tolist())

        marks = {k: "".join(FOOLED if f else SURVIVED if a else NOT_ATTACKED
                            for a, f in zip(self.attacked[k].tolist(), self.fooled[k].tolist()))
                 for k in self.fooled}
        return {"clean": text(self.clean), "robust": text(self.robust), "attacks": marks}


@dataclass
class EvalResult:
    n: int
    eps: float
    norm: str
    clean_acc: float
    robust_acc: float
    attacks: list[AttackReport]
    flags: list[Flag] = field(default_factory=list)
    time_s: float = 0.0
    #: 95% Wilson intervals of ``clean_acc`` and ``robust_acc``.
    clean_acc_ci: tuple[float, float] | None = None
    robust_acc_ci: tuple[float, float] | None = None
    per_example: PerExample | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        # field by field: asdict would deep-copy the per-example tensors and adversarial images
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "per_example"}
        out["attacks"] = [{**asdict(a), "success_rate": a.success_rate} for a in self.attacks]
        out["flags"] = [asdict(f) for f in self.flags]
        out["per_example"] = self.per_example.to_dict() if self.per_example is not None else None
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def to_pandas(self, per: str = "attack"):
        """A ``pandas.DataFrame``: one row per attack (``per="attack"``) or per example (``per="example"``).

        Per attack: ``label``, ``attack``, ``family``, ``n_attacked``, ``n_fooled``, ``success_rate``,
        ``robust_acc_after`` with ``robust_acc_after_lo``/``_hi`` (its 95% interval), ``time_s``, the mean
        perturbation sizes and queries, ``params``. Per example, indexed by the example's position in the data:
        ``clean`` and ``robust`` (bool) and, for each attack label, ``fooled``, ``survived`` or ``not attacked``
        (an ordered categorical: the attack did not run where an earlier one had already broken the example).
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("EvalResult.to_pandas needs pandas: pip install pandas "
                              "(or use to_dict(), which needs nothing)") from None
        if per == "attack":
            return pd.DataFrame([_attack_row(a) for a in self.attacks], columns=ATTACK_COLUMNS)
        if per == "example":
            if self.per_example is None:
                raise ValueError("this result has no per-example masks (per_example is None)")
            return _example_frame(pd, self.per_example)
        raise ValueError(f"per must be 'attack' or 'example', got {per!r}")

    def __str__(self) -> str:
        lines = [f"n={self.n} eps={self.eps:g} ({self.norm}): clean {fmt_ci(self.clean_acc, self.clean_acc_ci)}, "
                 f"robust {fmt_ci(self.robust_acc, self.robust_acc_ci)} in {self.time_s:.1f}s (95% intervals)"]
        width = max([20, *(len(a.label) for a in self.attacks)])
        lines += [f"  after {a.label:<{width}} {fmt_ci(a.robust_acc_after, a.robust_acc_after_ci):>22}  "
                  f"fooled {a.n_fooled}/{a.n_attacked}  {a.time_s:.1f}s" for a in self.attacks]
        lines += [f"  ! {f.code}: {f.message}" for f in self.flags]
        return "\n".join(lines)


ATTACK_COLUMNS = ["label", "attack", "family", "n_attacked", "n_fooled", "success_rate", "robust_acc_after",
                  "robust_acc_after_lo", "robust_acc_after_hi", "time_s", "mean_l0", "mean_l2", "mean_linf",
                  "mean_queries", "params"]
#: An example's fate under one attack, in :meth:`EvalResult.to_pandas` (``per="example"``).
EXAMPLE_STATES = ["not attacked", "survived", "fooled"]


def _attack_row(a: AttackReport) -> dict[str, Any]:
    lo, hi = a.robust_acc_after_ci or (None, None)
    return {**{k: v for k, v in asdict(a).items() if k != "robust_acc_after_ci"}, "success_rate": a.success_rate,
            "robust_acc_after_lo": lo, "robust_acc_after_hi": hi}


def _example_frame(pd, ex: PerExample):
    frame = pd.DataFrame({"clean": ex.clean.numpy(), "robust": ex.robust.numpy()})
    for label in ex.fooled:
        state = ex.attacked[label].long() + ex.fooled[label].long()  # 0 not attacked, 1 survived, 2 fooled
        frame[label] = pd.Categorical.from_codes(state.numpy(), categories=EXAMPLE_STATES, ordered=True)
    frame.index.name = "example"
    return frame
