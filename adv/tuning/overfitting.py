"""Catastrophic overfitting of single-step adversarial training, detected from a trial's per-epoch history.

Wong et al. 2020 ("Fast is better than free", §5) describe it: within an
epoch, a model trained on FGSM adversarials stops being robust to multi-step
attacks (PGD accuracy collapses to near zero) while its accuracy against FGSM
itself *rises*, because the model has learnt to make the single linear step
useless (gradient masking), not to resist the perturbation. Such a model can
still look robust on an FGSM-only grid, so a sweep must mark it and never
select it.

Two signals, on the accuracies of the attacks crafted on the trained model
itself (the adaptive track), per epoch:

* **collapse**: the multi-step accuracy (the worst over every attack of the grid
  other than FGSM) falls at least ``drop`` below its best earlier epoch while
  the FGSM accuracy has not fallen (it is at least what it was at that epoch);
* **gap**: the FGSM accuracy exceeds the multi-step accuracy by at least
  ``gap`` in one epoch (an ordinary robust model's FGSM and PGD accuracies lie
  a few points apart; a collapsed one's lie tens of points apart), which also
  catches a model that overfits in its first epoch, with no earlier epoch to
  fall from.

The first epoch showing either is reported; the history keeps it, so a mark
never goes away when later epochs look better.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

#: The single-step attack whose accuracy rises under catastrophic overfitting.
SINGLE_STEP = "fgsm"
#: Metric-name prefix of the per-attack accuracies a trial reports (``adaptive_by_attack_pgd``).
BY_ATTACK = "adaptive_by_attack_"


def step_accuracies(metrics: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """``(FGSM accuracy, worst multi-step accuracy)`` of one epoch's metrics (None where the grid lacks it)."""
    single, multi = None, None
    for key, value in metrics.items():
        if not key.startswith(BY_ATTACK) or not isinstance(value, (int, float)) or math.isnan(value):
            continue
        if key[len(BY_ATTACK):] == SINGLE_STEP:
            single = float(value)
        else:
            multi = float(value) if multi is None else min(multi, float(value))
    return single, multi


def catastrophic_overfitting(history: Sequence[Mapping[str, Any]], *, drop: float = 0.2,
                             gap: float = 0.3) -> str | None:
    """A one-line description of the first epoch of ``history`` showing catastrophic overfitting, else None.

    ``history``: per-epoch metrics in order, each with ``epoch`` and the
    ``adaptive_by_attack_<attack>`` accuracies (:data:`BY_ATTACK`); epochs
    lacking FGSM or a multi-step attack are skipped.
    """
    best: tuple[Any, float, float] | None = None  # (epoch, multi-step accuracy, FGSM accuracy at that epoch)
    for i, h in enumerate(history):
        single, multi = step_accuracies(h)
        if single is None or multi is None:
            continue
        epoch = h.get("epoch", i + 1)
        if best is not None and multi <= best[1] - drop and single >= best[2]:
            return (f"catastrophic overfitting at epoch {epoch}: multi-step accuracy fell from {best[1]:.1%} "
                    f"(epoch {best[0]}) to {multi:.1%} while FGSM accuracy rose from {best[2]:.1%} to {single:.1%}")
        if single - multi >= gap:
            return (f"catastrophic overfitting at epoch {epoch}: FGSM accuracy {single:.1%} vs multi-step "
                    f"{multi:.1%} (gap >= {gap:.0%})")
        if best is None or multi > best[1]:
            best = (epoch, multi, single)
    return None
