"""Auto-PGD (Croce & Hein 2020, Algorithm 1), with the CE or DLR loss.

PGD with momentum 0.75 and a step size that starts at ``2·eps`` and is
halved at checkpoints ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j -
p_{j-1} - 0.03, 0.06)`` (as fractions of ``steps``) when the loss went up in
at most ``rho`` of the steps since the last checkpoint, or when neither the
step size was reduced nor the best loss improved at the last checkpoint;
after a halving the iterate restarts from the best point. Threat model:
white-box, L∞ or L2. Targeted runs use the targeted DLR loss.
"""

from __future__ import annotations

import torch
from torch import nn

from adv.attacks.core import (
    NORMS, check_inputs, check_positive, fgm_step, frozen, input_grad, is_success, labels, make_generator,
    objective, project, random_start, take,
)
from adv.attacks.registry import register_attack
from adv.attacks.seeding import subset


@register_attack("apgd", family="whitebox", norms=NORMS, targeted=True, iterative=True,
                 description="Auto-PGD: PGD with momentum and an adaptive step size (Croce & Hein 2020)",
                 variants={"apgd_ce": {"loss": "ce"}, "apgd_dlr": {"loss": "dlr"}})
def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    steps: int = 100,
    loss: str = "ce",
    restarts: int = 1,
    rho: float = 0.75,
    seed: int | torch.Generator | None = None,
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1]; y, y_target (N,) -> x_adv like x.

    Returns, per example, the first iterate that fools the model, else the
    highest-loss one. Restarts only rerun the examples not yet fooled.
    """
    check_inputs(x, y, eps, norm, targeted=targeted, y_target=y_target)
    check_positive(steps=steps, restarts=restarts, rho=rho)
    if eps == 0:
        return x.clone()
    with frozen(model):
        y = labels(model, x, y)
        obj = objective(model, y, loss=loss, targeted=targeted, y_target=y_target)
        gen = make_generator(seed, x.device, len(x))
        out = x.clone()
        todo = torch.arange(len(x), device=x.device)
        for _ in range(int(restarts)):
            xr, ok = _apgd_run(obj, x[todo], todo, y, targeted, y_target, eps, norm, int(steps), rho,
                               subset(gen, todo))  # a restart continues its examples' own streams
            out[todo] = xr
            todo = todo[~ok]
            if len(todo) == 0:
                break
        return out


def checkpoints(steps: int) -> list[int]:
    """Iterations after which the step size is checked (the p_j above, times ``steps``).

    Intervals start at 0.22·steps and shrink by 0.03·steps down to 0.06·steps,
    rounded down as in the reference implementation.
    """
    first, smallest, decrease = (max(int(f * steps), 1) for f in (0.22, 0.06, 0.03))
    out, k = [first], first
    while True:
        k = max(k - decrease, smallest)
        if out[-1] + k > steps:
            return out
        out.append(out[-1] + k)


def _apgd_run(obj, x, rows, y, targeted, y_target, eps, norm, steps, rho, gen):
    n = len(x)
    check_at = checkpoints(steps)
    x_adv = random_start(x, eps, norm, gen)
    grad, loss, logits = input_grad(obj, x_adv, rows)
    fooled = is_success(logits, y[rows], targeted, take(y_target, rows))
    x_fooled = x_adv.clone()
    x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
    step = torch.full((n,), 2.0 * eps, device=x.device)
    losses = [loss]  # loss at every iterate, for the oscillation test
    last_check = 0
    best_at_check = loss_best.clone()
    reduced_at_check = torch.ones(n, dtype=torch.bool, device=x.device)
    x_prev = x_adv
    for i in range(steps):
        with torch.no_grad():
            momentum = 0.75 if i > 0 else 1.0
            z = project(fgm_step(x_adv, grad, step, norm), x, eps, norm)
            x_new = project(x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_prev), x, eps, norm)
            x_prev, x_adv = x_adv, x_new
        grad, loss, logits = input_grad(obj, x_adv, rows)
        ok = is_success(logits, y[rows], targeted, take(y_target, rows))
        x_fooled[ok & ~fooled] = x_adv[ok & ~fooled]
        fooled |= ok
        losses.append(loss)
        better = loss > loss_best
        x_best[better], grad_best[better], loss_best[better] = x_adv[better], grad[better], loss[better]
        if i + 1 in check_at:
            k = i + 1 - last_check
            recent = torch.stack(losses[-k - 1 :])
            increases = (recent[1:] > recent[:-1]).sum(0)
            reduce = (increases <= k * rho) | (~reduced_at_check & (best_at_check >= loss_best))
            reduced_at_check, best_at_check = reduce, loss_best.clone()
            if reduce.any():
                step[reduce] /= 2.0
                x_adv = x_adv.clone()
                x_adv[reduce], grad[reduce] = x_best[reduce], grad_best[reduce]
            last_check = i + 1
    return torch.where(fooled.view(-1, 1, 1, 1), x_fooled, x_best), fooled
