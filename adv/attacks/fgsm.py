"""Fast Gradient Sign Method (Goodfellow et al. 2015), Himbitski et al. 2024 eq. 5-6.

Untargeted: ``x + eps * sign(grad_x L(x, y))`` (eq. 5); targeted:
``x - eps * sign(grad_x L(x, y_target))`` (eq. 6). With ``norm="l2"`` the
step is along the normalised gradient (the fast gradient method).
Threat model: white-box, L∞ or L2 ball of radius ``eps``.
"""

from __future__ import annotations

import torch
from torch import nn

from adv.attacks.core import NORMS, Objective, check_inputs, fgm_step, frozen, input_grad, labels, objective, project
from adv.attacks.registry import register_attack


def fast_gradient_step(obj: Objective, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """One FGM step of length ``eps`` from ``x`` on ``obj``, projected (shared with StepLL, A3)."""
    grad, _, _ = input_grad(obj, x)
    return project(fgm_step(x, grad, eps, norm), x, eps, norm)


@register_attack("fgsm", family="whitebox", norms=NORMS, targeted=True, detector_aware=True,
                 training=True, a3_base=True,
                 description="Fast Gradient Sign Method, one step (Goodfellow et al. 2015)")
def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    loss: str = "ce",
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1]; y, y_target (N,) -> x_adv like x."""
    check_inputs(x, y, eps, norm, targeted=targeted, y_target=y_target)
    if eps == 0:
        return x.clone()
    with frozen(model):
        obj = objective(model, labels(model, x, y), loss=loss, targeted=targeted, y_target=y_target)
        return fast_gradient_step(obj, x, eps, norm).detach()
