"""Projected Gradient Descent (Madry et al. 2018): FGM in a loop plus a projection.

``x_{t+1} = Π_{B(x, eps) ∩ [0,1]}(x_t + α · dir(∇ L(x_t)))`` from a random
start in the ball, with restarts and a choice of loss: ``ce``, ``cw``
(the margin loss; PGD on it is the "CW-k" column of Wu et al. 2022 (AAD)'s tables) or
``dlr`` (Croce & Hein 2020). Threat model: white-box, L∞ or L2.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from adv.attacks.core import (
    NORMS, Objective, ball_bounds, check_inputs, check_positive, default_step_size, fgm_step, frozen, input_grad,
    is_success, labels, make_generator, objective, project, random_start, take,
)
from adv.attacks.registry import register_attack
from adv.attacks.seeding import subset

#: ``stop(logits, rows) -> (n,) bool``: examples that are done (early exit).
Stop = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pgd_loop(
    obj: Objective,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    *,
    eps: float,
    norm: str,
    steps: int,
    step_size: float,
    rows: torch.Tensor | None = None,
    stop: Stop | None = None,
) -> torch.Tensor:
    """``steps`` projected FGM steps from ``x_adv``; returns the last iterate.

    With ``stop``, an example is frozen at the first iterate where ``stop``
    holds and dropped from the batch, so later steps cost less.
    """
    if stop is None:  # the lean path: nothing but the step and the projection
        lo, hi = ball_bounds(x, eps) if norm == "linf" else (None, None)
        for _ in range(steps):
            grad, _, _ = input_grad(obj, x_adv, rows)
            x_adv = fgm_step(x_adv, grad, step_size, norm)
            x_adv = torch.clamp(x_adv, lo, hi) if norm == "linf" else project(x_adv, x, eps, norm)
        return x_adv.detach()
    out = x_adv.detach().clone()
    active = torch.arange(len(x), device=x.device)
    rows = active if rows is None else rows
    for _ in range(steps):
        grad, _, logits = input_grad(obj, x_adv, rows)
        done = stop(logits, rows)
        if done.any():
            out[active[done]] = x_adv[done].detach()
            keep = ~done
            active, rows, x, x_adv, grad = active[keep], rows[keep], x[keep], x_adv[keep], grad[keep]
            if len(active) == 0:
                return out
        x_adv = project(fgm_step(x_adv, grad, step_size, norm), x, eps, norm)
    out[active] = x_adv.detach()
    return out


def run_pgd(
    obj: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str,
    steps: int,
    step_size: float | None,
    rand_init: bool,
    restarts: int,
    early_stop: bool,
    targeted: bool,
    y_target: torch.Tensor | None,
    seed,
) -> torch.Tensor:
    """PGD driver shared by ``pgd``, ``bim``, Iter-StepLL and A3Attack."""
    check_positive(steps=steps, restarts=restarts)
    if step_size is None:
        step_size = default_step_size(eps, steps)
    check_positive(step_size=step_size)
    gen = make_generator(seed, x.device, len(x)) if rand_init else None
    stop = (lambda logits, rows: is_success(logits, y[rows], targeted, take(y_target, rows))) if early_stop else None
    best, best_val, best_ok = None, None, None
    for _ in range(int(restarts) if rand_init else 1):
        rows = None if best is None else (~best_ok).nonzero()[:, 0]
        if rows is not None and len(rows) == 0:
            break
        xs = x if rows is None else x[rows]
        # a restart continues the streams of the examples it reruns (RowSeeds), whatever else still stands
        start = random_start(xs, eps, norm, gen if rows is None else subset(gen, rows)) if rand_init else xs
        xr = pgd_loop(obj, xs, start, eps=eps, norm=norm, steps=int(steps), step_size=step_size,
                      rows=rows, stop=stop)
        if restarts == 1 or not rand_init:
            return xr
        with torch.no_grad():
            val, logits = obj(xr, rows)
        ok = is_success(logits, take(y, rows), targeted, take(y_target, rows))
        if best is None:
            best, best_val, best_ok = xr, val, ok
            continue
        # a restart replaces a failed example's point when it succeeds or has a higher loss
        better = ok | (val > best_val[rows])
        idx = rows[better]
        best[idx], best_val[idx], best_ok[idx] = xr[better], val[better], ok[better]
    return best


@register_attack("pgd", family="whitebox", norms=NORMS, targeted=True, iterative=True, detector_aware=True,
                 training=True, a3_base=True,
                 description="Projected Gradient Descent with random start (Madry et al. 2018)",
                 variants={"pgd_cw": {"loss": "cw"}, "pgd_dlr": {"loss": "dlr"}},
                 # the joint loss, U-Net training and A3 replace the loss, so the loss variants add nothing there
                 variant_meta={v: {"detector_aware": False, "training": False, "a3_base": False}
                               for v in ("pgd_cw", "pgd_dlr")})
def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    steps: int = 40,
    step_size: float | None = None,
    rand_init: bool = True,
    restarts: int = 1,
    loss: str = "ce",
    early_stop: bool = False,
    seed: int | torch.Generator | None = None,
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1]; y, y_target (N,) -> x_adv like x.

    ``step_size`` defaults to ``2.5 * eps / steps``. ``early_stop`` freezes an
    example at its first successful iterate (never weaker for accuracy, much
    faster on weak models); restarts only rerun the examples not yet fooled.
    """
    check_inputs(x, y, eps, norm, targeted=targeted, y_target=y_target)
    if eps == 0:
        return x.clone()
    with frozen(model):
        y = labels(model, x, y)
        obj = objective(model, y, loss=loss, targeted=targeted, y_target=y_target)
        return run_pgd(obj, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size,
                       rand_init=rand_init, restarts=restarts, early_stop=early_stop,
                       targeted=targeted, y_target=y_target, seed=seed)
