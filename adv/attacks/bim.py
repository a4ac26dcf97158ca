"""Basic Iterative Method / I-FGSM (Kurakin et al. 2017), Himbitski et al. 2024 eq. 7-10.

``x_{t+1} = clip_eps(x_t ± α · sign(∇ L(x_t, y)))`` from ``x_0 = x``: PGD
without the random start. Threat model: white-box, L∞ (or L2).
"""

from __future__ import annotations

import torch
from torch import nn

from adv.attacks.core import NORMS, check_inputs, frozen, labels, objective
from adv.attacks.pgd import run_pgd
from adv.attacks.registry import register_attack


@register_attack("bim", family="whitebox", norms=NORMS, targeted=True, iterative=True,
                 detector_aware=True, training=True,
                 description="Basic Iterative Method / I-FGSM: PGD without random start")
def bim(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    steps: int = 10,
    step_size: float | None = None,
    loss: str = "ce",
    early_stop: bool = False,
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1]; y, y_target (N,) -> x_adv like x.

    ``step_size`` defaults to ``2.5 * eps / steps``.
    """
    check_inputs(x, y, eps, norm, targeted=targeted, y_target=y_target)
    if eps == 0:
        return x.clone()
    with frozen(model):
        y = labels(model, x, y)
        obj = objective(model, y, loss=loss, targeted=targeted, y_target=y_target)
        return run_pgd(obj, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size,
                       rand_init=False, restarts=1, early_stop=early_stop,
                       targeted=targeted, y_target=y_target, seed=None)
