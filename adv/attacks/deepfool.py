"""DeepFool (Moosavi-Dezfooli et al. 2016), batched over images.

Linearise the classifier around ``x_t`` and step onto the nearest linearised
decision boundary among the ``candidates`` most likely classes of the clean
input; repeat until the label flips, then push ``overshoot`` further. The
loops run over iterations and candidate classes only, never over images.
Threat model: white-box, minimal L2 (or L∞) perturbation; a finite ``eps``
is a budget the result is projected onto.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adv.attacks.core import NORMS, check_inputs, check_positive, flat_norm, frozen, labels, project
from adv.attacks.registry import register_attack


@register_attack("deepfool", family="whitebox", norms=NORMS, targeted=False, minimal=True, iterative=True,
                 description="DeepFool: steps onto the nearest linearised boundary (top-k classes)")
def deepfool(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float = math.inf,
    norm: str = "l2",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    steps: int = 50,
    candidates: int = 10,
    overshoot: float = 0.02,
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1]; y (N,) -> x_adv like x."""
    if targeted:
        raise ValueError(f"DeepFool is untargeted, got targeted={targeted!r}")
    check_inputs(x, y, eps, norm, allow_inf=True)
    check_positive(steps=steps)
    if not isinstance(candidates, int) or candidates < 2:
        raise ValueError(f"candidates must be an int >= 2, got {candidates!r}")
    if not overshoot >= 0:
        raise ValueError(f"overshoot must be >= 0, got {overshoot!r}")
    if eps == 0:
        return x.clone()
    with frozen(model):
        y = labels(model, x, y)
        with torch.no_grad():
            logits = model(x)
        k = min(candidates, logits.shape[1])
        others = logits.scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices
        classes = torch.cat([y[:, None], others], 1)
        r_total = torch.zeros_like(x)
        x_adv = x.clone()
        active = torch.arange(len(x), device=x.device)
        for _ in range(steps):
            xa = x_adv[active].requires_grad_(True)
            logits = model(xa)
            alive = logits.argmax(1) == y[active]
            if not alive.any():
                break
            step = _nearest_boundary_step(logits, xa, classes[active], norm)
            active, step = active[alive], step[alive]
            r_total[active] += step
            x_adv[active] = (x[active] + (1 + overshoot) * r_total[active]).clamp(0.0, 1.0)
        return project(x_adv, x, eps, norm)


def _nearest_boundary_step(logits, xa, classes, norm) -> torch.Tensor:
    """Per example, the step onto the closest linearised boundary ``z_j - z_y = 0``."""
    z0 = logits.gather(1, classes[:, :1])[:, 0]
    best_dist = torch.full_like(z0, float("inf"))
    best_step = torch.zeros_like(xa)
    k = classes.shape[1]
    for j in range(1, k):
        f = logits.gather(1, classes[:, j : j + 1])[:, 0] - z0  # < 0 while y still wins
        (w,) = torch.autograd.grad(f.sum(), xa, retain_graph=j < k - 1)
        f = f.detach().abs()
        if norm == "l2":
            wn = flat_norm(w)
            dist = f / (wn + 1e-8)
            step = ((dist + 1e-4) / (wn + 1e-8)).view(-1, 1, 1, 1) * w
        else:
            dist = f / (flat_norm(w, p=1) + 1e-8)
            step = (dist + 1e-4).view(-1, 1, 1, 1) * w.sign()
        closer = dist < best_dist
        best_dist = torch.where(closer, dist, best_dist)
        best_step[closer] = step[closer]
    return best_step
