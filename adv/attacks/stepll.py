"""StepLL and Iter-StepLL (Kurakin et al. 2017; Tramèr et al. 2018), Wu et al. 2022 (AAD) eq. 4.

``x_adv = x - eps · sign(∇_x L(f(x), y_LL))``: a targeted FGSM step towards
the least-likely class ``y_LL`` of the clean input. Iter-StepLL iterates it
(BIM towards ``y_LL``). Threat model: white-box, L∞ (or L2).
"""

from __future__ import annotations

import torch
from torch import nn

from adv.attacks.core import NORMS, check_inputs, frozen, objective
from adv.attacks.fgsm import fast_gradient_step
from adv.attacks.pgd import run_pgd
from adv.attacks.registry import register_attack


@torch.no_grad()
def least_likely(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmin(1)


@register_attack("stepll", family="whitebox", norms=NORMS, targeted=False, a3_base=True,
                 description="StepLL: one targeted step towards the least-likely class")
def stepll(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1] -> x_adv like x. ``y`` is not used (the target is y_LL)."""
    _check(x, y, eps, norm, targeted, y_target)
    if eps == 0:
        return x.clone()
    with frozen(model):
        y_ll = least_likely(model, x)
        obj = objective(model, y_ll, targeted=True, y_target=y_ll)
        return fast_gradient_step(obj, x, eps, norm).detach()


@register_attack("iter_stepll", family="whitebox", norms=NORMS, targeted=False, iterative=True, a3_base=True,
                 description="Iter-StepLL: BIM towards the least-likely class")
def iter_stepll(
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
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1] -> x_adv like x. ``step_size`` defaults to ``2.5 * eps / steps``."""
    _check(x, y, eps, norm, targeted, y_target)
    if eps == 0:
        return x.clone()
    with frozen(model):
        y_ll = least_likely(model, x)
        obj = objective(model, y_ll, targeted=True, y_target=y_ll)
        return run_pgd(obj, x, y_ll, eps=eps, norm=norm, steps=steps, step_size=step_size,
                       rand_init=False, restarts=1, early_stop=False, targeted=True, y_target=y_ll,
                       seed=None)


def _check(x, y, eps, norm, targeted, y_target) -> None:
    if targeted or y_target is not None:
        raise ValueError(f"StepLL chooses its own target (the least-likely class); got targeted={targeted!r}")
    check_inputs(x, y, eps, norm)
