"""HopSkipJump (Chen, Jordan & Wainwright 2020): decision-based, L2 and L∞.

From an adversarial starting point (uniform noise, then a binary search
towards ``x``), repeat: binary-search to the decision boundary, estimate the
boundary's normal by Monte-Carlo sign queries, take a geometric step along
it, and search back to the boundary. Examples leave the batch once within
``eps``. Targeted runs (``y_target``) start from ``x_init``, an image of
the target class per example (the paper's targeted setting); without it,
from an image of the batch that the oracle labels as the target, else from
uniform noise. The noise trials and the directions of the gradient
estimate are drawn per example (its own stream with a
:class:`~adv.attacks.seeding.RowSeeds`; the rows passed to the oracle say
whose stream). Threat model: black-box, hard labels only; minimal
perturbation (``eps=inf``) or a budget the result is projected onto.
"""

from __future__ import annotations

import math

import torch

from adv.attacks.core import check_inputs, check_positive, flat_norm, make_generator, perturbation_norm, project
from adv.attacks.oracle import QueryOracle, as_oracle, oracle_labels
from adv.attacks.registry import register_attack
from adv.attacks.seeding import draw

_V = (-1, 1, 1, 1)


def _toward(x, x_adv, alpha, norm):
    """Points between ``x`` (alpha=0) and ``x_adv``: a blend for L2, a box clip for L∞."""
    a = alpha.view(_V)
    return (1 - a) * x + a * x_adv if norm == "l2" else torch.minimum(torch.maximum(x_adv, x - a), x + a)


@register_attack("hopskipjump", family="query", norms=("l2", "linf"), targeted=True, minimal=True, iterative=True,
                 oracle="labels", description="HopSkipJump: decision-based boundary walk (Chen et al. 2020)")
def hopskipjump(
    oracle: QueryOracle,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float = math.inf,
    norm: str = "l2",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    steps: int = 40,
    init_evals: int = 100,
    max_evals: int = 10000,
    gamma: float = 1.0,
    init_trials: int = 100,
    x_init: torch.Tensor | None = None,
    seed: int | torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape: x, x_init (N, C, H, W) in [0, 1]; y, y_target (N,) -> (x_adv like x, n_queries (N,) int64)."""
    check_inputs(x, y, eps, norm, norms=("l2", "linf"), targeted=targeted, y_target=y_target, allow_inf=True)
    if x_init is not None and (x_init.shape != x.shape or x_init.numel() and (x_init.min() < 0 or x_init.max() > 1)):
        raise ValueError(f"x_init must be shaped like x {tuple(x.shape)} and lie in [0, 1], got {tuple(x_init.shape)}")
    check_positive(steps=steps, init_evals=init_evals, max_evals=max_evals, gamma=gamma, init_trials=init_trials)
    oracle = as_oracle(oracle, "labels")
    n, d = len(x), x[0].numel()
    start = oracle.used(n)
    if eps == 0 or n == 0:
        return x.clone(), oracle.used(n) - start
    gen = make_generator(seed, x.device, n)
    all_rows = torch.arange(n, device=x.device)
    pred = oracle_labels(oracle, x, all_rows).to(x.device) if y is None or (targeted and x_init is None) else None
    y = pred if y is None else y

    def is_adv(xq, rows):
        out = oracle_labels(oracle, xq, rows).to(x.device)
        return out == y_target[rows] if targeted else out != y[rows]

    theta = gamma / (math.sqrt(d) * d) if norm == "l2" else gamma / d**2
    if targeted and x_init is None:
        x_init = _batch_starts(x, pred, y_target)
    x_adv, alive = _initialise(is_adv, x, all_rows, init_trials, gen, x_init)
    rows = all_rows[alive]
    dist = x.new_zeros(0)  # no example found a start: nothing to refine (eps finite or not)
    if len(rows):
        x_adv[rows], dist = _boundary(is_adv, x[rows], x_adv[rows], rows, norm, theta)
    for t in range(1, int(steps) + 1):
        if math.isfinite(eps):  # examples already within the budget are done
            keep = dist > eps
            rows, dist = rows[keep], dist[keep]
        if len(rows) == 0:
            break
        xr, xb = x[rows], x_adv[rows]
        delta = torch.full_like(dist, 0.1) if t == 1 else (math.sqrt(d) if norm == "l2" else d) * theta * dist
        evals = int(min(init_evals * math.sqrt(t), max_evals))
        grad = _estimate_gradient(is_adv, xb, rows, delta, evals, norm, gen)
        update = grad.sign() if norm == "linf" else grad
        step = _geometric_step(is_adv, xb, update, rows, dist / math.sqrt(t))
        x_new = (xb + step.view(_V) * update).clamp(0.0, 1.0)
        x_adv[rows], dist = _boundary(is_adv, xr, x_new, rows, norm, theta)
    return project(x_adv, x, eps, norm), oracle.used(n) - start


def _batch_starts(x, pred, y_target):
    """Per example, an image of the batch predicted as its target (NaN rows where the batch has none)."""
    match = pred[None, :] == y_target[:, None]
    first = match.float().argmax(1)
    return torch.where(match.any(1).view(_V), x[first], torch.full_like(x, math.nan))


def _initialise(is_adv, x, rows, trials, gen, start=None):
    """From ``start`` where it is adversarial (finite), else uniform noise until it is; then a coarse L2
    binary search towards ``x``."""
    x_adv = x.clone()
    found = is_adv(x, rows)  # already adversarial: nothing to do
    done = found.clone()
    noise = torch.zeros_like(x)
    if start is not None:
        usable = (~done & start.flatten(1).isfinite().all(1)).nonzero()[:, 0]
        ok = is_adv(start[usable], rows[usable]) if len(usable) else usable.bool()
        noise[usable[ok]] = start[usable[ok]]
        found[usable[ok]] = True
    for _ in range(int(trials)):
        todo = (~found).nonzero()[:, 0]
        if len(todo) == 0:
            break
        cand = draw(gen, torch.rand, x.shape[1:], rows[todo], x.dtype).to(x.device)
        ok = is_adv(cand, rows[todo])
        noise[todo[ok]] = cand[ok]
        found[todo[ok]] = True
    todo = (found & ~done).nonzero()[:, 0]
    low = torch.zeros(len(todo), device=x.device)
    high = torch.ones(len(todo), device=x.device)
    while len(todo) and (high - low).max() > 1e-3:
        mid = (low + high) / 2
        ok = is_adv(_toward(x[todo], noise[todo], mid, "l2"), rows[todo])
        low, high = torch.where(ok, low, mid), torch.where(ok, mid, high)
    if len(todo):
        x_adv[todo] = _toward(x[todo], noise[todo], high, "l2")
    return x_adv, found & ~done


def _boundary(is_adv, x, x_adv, rows, norm, theta, max_iter: int = 64):
    """Batched binary search between ``x`` and adversarial ``x_adv``; returns (points, distances)."""
    dist = perturbation_norm(x, x_adv, norm)
    if norm == "linf":
        high, thresh = dist.clone(), torch.clamp(dist * theta, max=theta)
    else:
        high, thresh = torch.ones_like(dist), torch.full_like(dist, theta)
    low = torch.zeros_like(dist)
    for _ in range(max_iter):
        todo = ((high - low) / thresh.clamp_min(1e-20) > 1).nonzero()[:, 0]
        if len(todo) == 0:
            break
        mid = (high[todo] + low[todo]) / 2
        ok = is_adv(_toward(x[todo], x_adv[todo], mid, norm), rows[todo])
        high[todo] = torch.where(ok, mid, high[todo])
        low[todo] = torch.where(ok, low[todo], mid)
    out = _toward(x, x_adv, high, norm)
    return out, perturbation_norm(x, out, norm)


def _estimate_gradient(is_adv, xb, rows, delta, evals, norm, gen, max_elems: int = 2**25):
    """Monte-Carlo estimate of the boundary normal at ``xb`` (eq. 9, with the baseline of eq. 16)."""
    grads = []
    chunk = max(1, max_elems // (evals * xb[0].numel()))
    for i in range(0, len(xb), chunk):
        xc, rc, dc = xb[i : i + chunk], rows[i : i + chunk], delta[i : i + chunk]
        m = len(xc)
        shape = (m, evals, *xc.shape[1:])
        u = draw(gen, torch.randn if norm == "l2" else torch.rand, shape[1:], rc, xc.dtype).to(xc.device)
        if norm == "linf":
            u.mul_(2).sub_(1)
        u /= flat_norm(u.flatten(0, 1)).view(m, evals, 1, 1, 1)
        dv = dc.view(-1, 1, 1, 1, 1)
        perturbed = (xc[:, None] + dv * u).clamp(0.0, 1.0)
        u = (perturbed - xc[:, None]) / dv
        fval = is_adv(perturbed.flatten(0, 1), rc.repeat_interleave(evals)).view(m, evals).to(xc.dtype) * 2 - 1
        mean = fval.mean(1, keepdim=True)
        fval = torch.where(mean.abs() == 1, fval, fval - mean)
        g = (fval.view(m, evals, 1, 1, 1) * u).mean(1)
        grads.append(g / flat_norm(g).clamp_min(1e-12).view(_V))
    return torch.cat(grads)


def _geometric_step(is_adv, xb, update, rows, step, max_halvings: int = 25):
    """Halve each example's step until ``xb + step * update`` is still adversarial."""
    step = step.clone()
    todo = torch.arange(len(xb), device=xb.device)
    for _ in range(max_halvings):
        cand = (xb[todo] + step[todo].view(_V) * update[todo]).clamp(0.0, 1.0)
        ok = is_adv(cand, rows[todo])
        todo = todo[~ok]
        if len(todo) == 0:
            break
        step[todo] /= 2
    step[todo] = 0.0
    return step
