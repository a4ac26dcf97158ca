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
    """One APGD run; each example leaves the run at its first fooling iterate (what it returns for it), so
    the iterations cost only the examples still standing, and every other example's numbers stay the same."""
    n = len(x)
    check_at = checkpoints(steps)
    x_adv = random_start(x, eps, norm, gen)
    grad, loss, logits = input_grad(obj, x_adv, rows)
    fooled = is_success(logits, y[rows], targeted, take(y_target, rows))
    out = torch.where(fooled.view(-1, 1, 1, 1), x_adv, x)  # the answer of each example that has left
    s = _State(x, x_adv, x_adv, grad, loss, torch.arange(n, device=x.device), rows, steps, eps)
    s = s.keep((~fooled).nonzero()[:, 0])
    for i in range(steps):
        if len(s.live) == 0:
            break
        with torch.no_grad():
            momentum = 0.75 if i > 0 else 1.0
            z = project(fgm_step(s.x_adv, s.grad, s.step, norm), s.x, eps, norm)
            x_new = project(s.x_adv + momentum * (z - s.x_adv) + (1 - momentum) * (s.x_adv - s.x_prev), s.x, eps, norm)
            s.x_prev, s.x_adv = s.x_adv, x_new
        s.grad, loss, logits = input_grad(obj, s.x_adv, s.rows)
        ok = is_success(logits, y[s.rows], targeted, take(y_target, s.rows))
        hit = ok.any()
        if hit:
            out[s.live[ok]] = s.x_adv[ok]
            fooled[s.live[ok]] = True
        s.losses[i + 1] = loss
        better = loss > s.loss_best
        s.x_best = torch.where(better.view(-1, 1, 1, 1), s.x_adv, s.x_best)
        s.grad_best = torch.where(better.view(-1, 1, 1, 1), s.grad, s.grad_best)
        s.loss_best = torch.where(better, loss, s.loss_best)
        if i + 1 in check_at:
            s.check(i + 1, rho)
        if hit:
            s = s.keep((~ok).nonzero()[:, 0])
    out[s.live] = s.x_best
    return out, fooled


class _State:
    """The per-example state of the examples still in an APGD run (``live``: their positions in the run)."""

    def __init__(self, x, x_adv, x_prev, grad, loss, live, rows, steps, eps):
        n = len(x)
        self.x, self.x_adv, self.x_prev, self.grad, self.live, self.rows = x, x_adv, x_prev, grad, live, rows
        self.x_best, self.grad_best, self.loss_best = x_adv.clone(), grad.clone(), loss.clone()
        self.step = torch.full((n,), 2.0 * eps, device=x.device)
        self.losses = loss.new_full((steps + 1, n), float("nan"))  # loss at every iterate, for the oscillation test
        self.losses[0] = loss
        self.last_check = 0
        self.best_at_check = loss.clone()
        self.reduced_at_check = torch.ones(n, dtype=torch.bool, device=x.device)

    def keep(self, idx: torch.Tensor) -> "_State":
        """The same state for the examples at ``idx`` only."""
        if len(idx) == len(self.live):
            return self
        for name in ("x", "x_adv", "x_prev", "grad", "live", "rows", "x_best", "grad_best", "loss_best", "step",
                     "best_at_check", "reduced_at_check"):
            setattr(self, name, getattr(self, name)[idx])
        self.losses = self.losses[:, idx]
        return self

    def check(self, at: int, rho: float) -> None:
        """The step-size checkpoint (Croce & Hein 2020, conditions 1 and 2): halve and restart from the best."""
        k = at - self.last_check
        recent = self.losses[at - k : at + 1]
        increases = (recent[1:] > recent[:-1]).sum(0)
        reduce = (increases <= k * rho) | (~self.reduced_at_check & (self.best_at_check >= self.loss_best))
        self.reduced_at_check, self.best_at_check = reduce, self.loss_best.clone()
        self.step = torch.where(reduce, self.step / 2.0, self.step)
        self.x_adv = torch.where(reduce.view(-1, 1, 1, 1), self.x_best, self.x_adv)
        self.grad = torch.where(reduce.view(-1, 1, 1, 1), self.grad_best, self.grad)
        self.last_check = at
