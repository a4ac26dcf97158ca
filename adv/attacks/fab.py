"""FAB-T (Croce & Hein 2020, "Minimally distorted adversarial examples with a Fast Adaptive Boundary attack").

Each step linearises the margin ``g = z_y - z_t`` towards a target class
``t`` at the current point, projects both the current point and the
original onto the hyperplane ``g = 0`` within the [0, 1] box, and moves to
the convex combination ``(1-α)(x_i + η δ_i) + α(x + η δ_orig)`` with ``α =
min(|δ_i| / (|δ_i| + |δ_orig|), α_max)`` (their eq. 9-10); once past the
boundary it steps back towards the original (``β``), which keeps the
perturbation small. The untargeted use (AutoAttack's ``fab-t``) cycles over
the ``n_target_classes`` likeliest wrong classes, each only on the examples
still standing. Threat model: white-box, L∞ or L2; minimal perturbation
(``eps=inf``) or a budget the result is projected onto.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adv.attacks.apgd_t import ranked_targets
from adv.attacks.core import NORMS, check_inputs, check_positive, frozen, labels, predict, project, take
from adv.attacks.registry import register_attack

_V = (-1, 1, 1, 1)


def _size(d: torch.Tensor, norm: str) -> torch.Tensor:
    d = d.flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


def hyperplane_step(w, c, lo, hi, norm: str, iters: int = 30) -> torch.Tensor:
    """Smallest ``δ`` (L∞ or L2) with ``w·δ >= c`` and ``lo <= δ <= hi`` (per example; ``δ = 0`` when ``c <= 0``).

    Both problems have the solution ``δ(s) = clip(s·dir, lo, hi)`` with
    ``dir = sign(w)`` (L∞) or ``w`` (L2) and the smallest ``s`` reaching
    ``c`` (KKT); ``w·δ(s)`` grows with ``s``, so ``s`` is found by bisection.
    Unreachable ``c`` gives the box corner that gets closest. Needs
    ``lo <= 0 <= hi``: under L∞, ``w·δ(s) = Σ |w|·min(s, room)`` with ``room``
    the box's room along ``sign(w)``, two operations per bisection step
    instead of four (the same numbers, bit for bit).
    """
    direction = w.sign() if norm == "linf" else w
    if norm == "linf":
        weight, room = w.abs(), torch.where(w > 0, hi, -lo)
        reach = lambda s: (weight * torch.minimum(s.view(_V), room)).flatten(1).sum(1)  # noqa: E731
    else:
        weight = w * direction
        reach = lambda s: (w * torch.minimum(torch.maximum(s.view(_V) * w, lo), hi)).flatten(1).sum(1)  # noqa: E731
    c = c.clamp_min(0)
    low = c / weight.flatten(1).sum(1).clamp_min(1e-12)  # the answer without the box
    high = low.clone()
    for _ in range(20):  # the box only makes s larger: grow until c is reached (or the box is saturated)
        short = reach(high) < c
        if not short.any():
            break
        high = torch.where(short, high * 4, high)
    for _ in range(iters):
        mid = (low + high) / 2
        ok = reach(mid) >= c
        low, high = torch.where(ok, low, mid), torch.where(ok, mid, high)
    return torch.minimum(torch.maximum(high.view(_V) * direction, lo), hi)


def _margin_grad(model, x_i, y, t):
    """``(g, ∇g)`` for ``g = z_y - z_t`` (positive while ``t`` is below ``y``); ``y=None``: the likeliest class
    other than ``t`` at ``x_i`` (positive until ``t`` is predicted, for hitting a given target)."""
    x_i = x_i.detach().requires_grad_(True)
    z = model(x_i)
    if y is None:
        y = z.detach().scatter(1, t[:, None], float("-inf")).argmax(1)
    g = z.gather(1, y[:, None])[:, 0] - z.gather(1, t[:, None])[:, 0]
    (grad,) = torch.autograd.grad(g.sum(), x_i)
    return g.detach(), grad


def _fab_step(x_i, x, g, w, norm, alpha_max, eta):
    """One FAB step (their eq. 9-10): both projections onto the linearised boundary in one batch of 2n rows."""
    n = len(x)
    c_orig = g + (w * (x - x_i)).flatten(1).sum(1)  # the same hyperplane, seen from the original
    d = hyperplane_step(torch.cat([-w, -w]), torch.cat([g, c_orig]), torch.cat([-x_i, -x]),
                        torch.cat([1 - x_i, 1 - x]), norm)
    d_cur, d_orig = d[:n], d[n:]
    n_cur, n_orig = _size(d_cur, norm), _size(d_orig, norm)
    a = (n_cur / (n_cur + n_orig).clamp_min(1e-12)).clamp(0, alpha_max).view(_V)
    return ((1 - a) * (x_i + eta * d_cur) + a * (x + eta * d_orig)).clamp(0, 1)


def _fab_run(model, x, y, t, norm, steps, alpha_max, eta, beta, stop_size=math.inf):
    """Minimal adversarials towards ``t`` found in ``steps`` FAB steps: (best points, their sizes; inf if none).

    ``y=None`` hits the target ``t``, else any class but ``y``. A step costs one forward-backward pass (the
    linearisation at the current point) and one forward (did the step hit?), as in the reference code: on a
    robust model over half the rows hit at every step, and each of those steps back towards ``x`` (``β``),
    so taking the prediction from the next gradient pass would cost them a second gradient pass. A row stops
    once it has a point of size ``<= stop_size`` (an early exit when only success within the budget counts).
    """
    best, best_size = x.clone(), torch.full((len(x),), math.inf, device=x.device)
    live = torch.arange(len(x), device=x.device)  # the rows still iterating
    x0, x_i, yl, tl = x, x.clone(), y, t
    mine, mine_size = best.clone(), best_size.clone()  # the live rows' best so far
    for k in range(steps):
        g, w = _margin_grad(model, x_i, yl, tl)
        with torch.no_grad():
            x_i = _fab_step(x_i, x0, g, w, norm, alpha_max, eta)
            p = model(x_i).argmax(1)
            ok = p == tl if yl is None else p != yl
            size = _size(x_i - x0, norm)
            better = ok & (size < mine_size)
            mine, mine_size = torch.where(better.view(_V), x_i, mine), torch.where(better, size, mine_size)
            if k + 1 == steps:
                break
            x_i = torch.where(ok.view(_V), (1 - beta) * x0 + beta * x_i, x_i)
            done = mine_size <= stop_size
            if stop_size < math.inf and done.any():
                best[live[done]], best_size[live[done]] = mine[done], mine_size[done]
                keep = (~done).nonzero()[:, 0]
                live, x0, x_i, tl, mine, mine_size = (v[keep] for v in (live, x0, x_i, tl, mine, mine_size))
                yl = take(yl, keep)
                if len(live) == 0:
                    return best, best_size
    best[live], best_size[live] = mine, mine_size
    return best, best_size


@register_attack("fab_t", family="whitebox", norms=NORMS, targeted=True, minimal=True, iterative=True,
                 description="FAB-T: targeted fast adaptive boundary attack over the top classes (Croce & Hein 2020)")
def fab_t(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float = math.inf,
    norm: str = "linf",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    steps: int = 100,
    n_target_classes: int = 9,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    early_stop: bool = False,
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1]; y, y_target (N,) -> x_adv like x (projected onto the eps-ball).

    ``early_stop`` (with a finite ``eps``) stops a point once it has an adversarial within ``eps``, as the
    worst-case protocol only asks whether one exists; without it the rest of the run shrinks it further.
    """
    check_inputs(x, y, eps, norm, targeted=targeted, y_target=y_target, allow_inf=True)
    check_positive(steps=steps, n_target_classes=n_target_classes, alpha_max=alpha_max, eta=eta, beta=beta)
    if eps == 0:
        return x.clone()
    run = dict(norm=norm, steps=int(steps), alpha_max=alpha_max, eta=eta, beta=beta,
               stop_size=eps if early_stop else math.inf)
    with frozen(model):
        y = labels(model, x, y)
        if targeted:
            best, _ = _fab_run(model, x, None, y_target, **run)
            return project(best, x, eps, norm)
        with torch.no_grad():
            logits = model(x)
        targets = ranked_targets(logits, y, min(int(n_target_classes), logits.shape[1] - 1))
        out, todo = x.clone(), torch.arange(len(x), device=x.device)
        for k in range(targets.shape[1]):
            yk = y[todo]
            best, size = _fab_run(model, x[todo], yk, targets[todo, k], **run)
            found = size <= eps
            out[todo] = torch.where(found.view(_V), best, project(best, x[todo], eps, norm))
            todo = todo[predict(model, out[todo]) == yk]
            if len(todo) == 0:
                break
        return project(out, x, eps, norm)
