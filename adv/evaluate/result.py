"""Typed results of a robust-accuracy evaluation."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


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

    @property
    def success_rate(self) -> float:
        return self.n_fooled / self.n_attacked if self.n_attacked else 0.0


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

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for rep, d in zip(self.attacks, out["attacks"]):
            d["success_rate"] = rep.success_rate
        return out

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), default=str, **kw)

    def __str__(self) -> str:
        lines = [f"n={self.n} eps={self.eps:g} ({self.norm}): clean {self.clean_acc:.2%}, "
                 f"robust {self.robust_acc:.2%} in {self.time_s:.1f}s"]
        lines += [f"  after {a.label:<20} {a.robust_acc_after:7.2%}  fooled {a.n_fooled}/{a.n_attacked}"
                  f"  {a.time_s:.1f}s" for a in self.attacks]
        lines += [f"  ! {f.code}: {f.message}" for f in self.flags]
        return "\n".join(lines)
