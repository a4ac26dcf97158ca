"""Robust accuracy as a function of the budget, and its sanity check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from adv.evaluate.checks import check_sweep, warn
from adv.evaluate.protocol import iter_batches, robust_accuracy
from adv.evaluate.result import EvalResult, Flag


@dataclass
class SweepResult:
    norm: str
    eps: list[float]
    robust_acc: list[float]
    clean_acc: float
    results: list[EvalResult] = field(repr=False, default_factory=list)
    flags: list[Flag] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["results"] = [r.to_dict() for r in self.results]
        return out


def eps_sweep(model: nn.Module, data, attacks: Sequence, eps_values: Sequence[float], *, norm: str = "linf",
              **kwargs) -> SweepResult:
    """``robust_accuracy`` at each eps (ascending); flags non-monotone curves and ones that stay up.

    ``kwargs`` go to ``robust_accuracy`` (its own checks are off by default here).
    """
    eps_values = [float(e) for e in eps_values]
    if not eps_values or eps_values != sorted(eps_values):
        raise ValueError(f"eps_values must be a non-empty ascending list, got {eps_values}")
    if not (hasattr(data, "batches") or isinstance(data, (tuple, list))):
        batches = list(iter_batches(data, 2**31)[0])  # a one-shot iterable is read once
        data = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    kwargs.setdefault("checks", ())
    kwargs.setdefault("progress", False)
    results = [robust_accuracy(model, data, attacks, eps=e, norm=norm, **kwargs) for e in eps_values]
    accs = [r.robust_acc for r in results]
    first = next(iter(iter_batches(data, 1)[0]))[0]
    flags = check_sweep(eps_values, accs, norm, first.shape[1:], results[0].n)
    warn(flags)
    return SweepResult(norm, eps_values, accs, results[0].clean_acc, results, flags)
