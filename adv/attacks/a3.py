"""Attention-Augmented Adversarial Attack, A3Attack (Wu et al. 2022; Wu et al. 2022 (AAD) §4.3, eq. 11-13).

Adds the attention-deviation term ``sigma · ||Att(x) - g(x_adv)||_1`` to the
loss a base attack ascends (FGSM, StepLL, PGD or Iter-StepLL): ``Att(x)`` is
the binarised Grad-CAM area of the clean input (eq. 3, threshold ``kappa``),
``g(x_adv)`` the differentiable Grad-CAM map of the current iterate scaled to
max 1, both for the true class. The paper's sigma is ``attention_weight``
here and its kappa ``attention_threshold``. Eq. 12 writes the StepLL loss as
``L(f(x), y_LL) - sigma·||.||_1`` and descends it; here every loss is
ascended, so the same attack reads ``-L(f(x), y_LL) + sigma·||.||_1``. The
L1 norm is averaged over map cells so the weight does not depend on the map's
size. Threat model: white-box, L∞ or L2; needs a convolutional layer.
"""

from __future__ import annotations

import torch
from torch import nn

from adv.attacks.core import (
    NORMS, check_choice, check_inputs, frozen, labels, loss_values, take,
)
from adv.attacks.fgsm import fast_gradient_step
from adv.attacks.pgd import run_pgd
from adv.attacks.registry import list_attacks, register_attack
from adv.attacks.stepll import least_likely
from adv.explain.cam import attention_area, cam_layer, grad_cam, grad_cam_and_logits, normalize_cam

@register_attack("a3", family="whitebox", norms=NORMS, targeted=False, needs_conv=True, iterative=True,
                 description="A3Attack: base attack loss + attention_weight * Grad-CAM attention deviation",
                 renamed={"sigma": "attention_weight", "kappa": "attention_threshold"},
                 variants={"a3_fgsm": {"base": "fgsm"}, "a3_stepll": {"base": "stepll"},
                           "a3_iter_stepll": {"base": "iter_stepll"}},
                 variant_meta={"a3_fgsm": {"randomized": False, "iterative": False},
                               "a3_stepll": {"randomized": False, "iterative": False},
                               "a3_iter_stepll": {"randomized": False}})
def a3(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    base: str = "pgd",
    attention_weight: float = 10.0,
    attention_threshold: str | float = "mean",
    layer: nn.Module | None = None,
    steps: int = 10,
    step_size: float | None = None,
    seed: int | torch.Generator | None = None,
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1]; y (N,) -> x_adv like x.

    ``steps``/``step_size``/``seed`` apply to the iterative bases;
    ``layer`` defaults to ``model.cam_layer``.
    """
    if targeted:
        raise ValueError(f"A3Attack is untargeted here, got targeted={targeted!r}")
    check_inputs(x, y, eps, norm)
    check_choice("base", base, list_attacks(a3_base=True))
    if not attention_weight >= 0:
        raise ValueError(f"attention_weight must be >= 0, got {attention_weight!r}")
    layer = cam_layer(model, layer)
    attention_area(torch.zeros(1, 1, 1), attention_threshold)  # validate the threshold before any work
    if eps == 0:
        return x.clone()
    with frozen(model):
        y = labels(model, x, y)
        att = attention_area(grad_cam(model, x, class_idx=y, layer=layer, create_graph=False), attention_threshold)
        if base in ("stepll", "iter_stepll"):
            target, values = least_likely(model, x), loss_values("ce", targeted=True)
        else:
            target, values = None, loss_values("ce")

        def obj(x_adv: torch.Tensor, rows: torch.Tensor | None = None):
            cam, logits = grad_cam_and_logits(model, x_adv, take(y, rows), layer, create_graph=True)
            deviation = (take(att, rows) - normalize_cam(cam)).abs().flatten(1).mean(1)
            return values(logits, take(y, rows), take(target, rows)) + attention_weight * deviation, logits

        if base in ("fgsm", "stepll"):
            return fast_gradient_step(obj, x, eps, norm).detach()
        return run_pgd(obj, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size,
                       rand_init=base == "pgd", restarts=1, early_stop=False, targeted=False,
                       y_target=None, seed=seed)
