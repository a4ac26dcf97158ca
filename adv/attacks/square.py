"""Square Attack, L∞ (Andriushchenko et al. 2020): score-based random search.

Start from vertical stripes of ±eps; at each iteration, in every image still
standing, set a random square window of side ``s`` to ±eps per channel and
keep the change when the margin loss drops. The square's area fraction
``p`` follows the paper's schedule: ``p_init`` halved at 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 of 10,000 queries (rescaled to ``queries``).
Threat model: black-box, scores only (a probability oracle), L∞.
"""

from __future__ import annotations

import math

import torch

from adv.attacks.core import check_inputs, check_positive, make_generator, take
from adv.attacks.oracle import QueryOracle, as_oracle
from adv.attacks.registry import register_attack

#: Schedule of p (Andriushchenko et al. 2020, §A): breakpoints out of 10,000 queries.
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(p_init: float, it: int, queries: int) -> float:
    it = int(it / queries * 10000)
    return p_init / 2 ** sum(it > b for b in P_SCHEDULE)


def _margin_and_loss(probs, y, targeted, y_target):
    """Margin > 0 while not yet successful (on log-probs = logits up to a shift), and the loss to lower."""
    logp = probs.clamp_min(1e-30).log()
    cls = y_target if targeted else y
    own = logp.gather(1, cls[:, None])[:, 0]
    other = logp.scatter(1, cls[:, None], float("-inf")).amax(1)
    if targeted:
        return other - own, -own  # CE towards the target
    return own - other, own - other


@register_attack("square", family="query", norms=("linf",), targeted=True, oracle="probs", iterative=True,
                 description="Square Attack: score-based random search over squares (L-inf)")
def square(
    oracle: QueryOracle,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    queries: int = 5000,
    p_init: float = 0.8,
    seed: int | torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape: x (N, C, H, W) in [0, 1]; y (N,) -> (x_adv like x, n_queries (N,) int64)."""
    check_inputs(x, y, eps, norm, norms=("linf",), targeted=targeted, y_target=y_target)
    check_positive(queries=queries, p_init=p_init)
    if p_init > 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    oracle = as_oracle(oracle, "probs")
    n, (c, h, w) = len(x), x.shape[1:]
    start = oracle.used(n)
    if eps == 0 or n == 0:
        return x.clone(), oracle.used(n) - start
    gen = make_generator(seed, x.device)
    rows = torch.arange(n, device=x.device)
    if y is None:
        y = oracle(x, rows).argmax(1)
    signs = _signs((n, c, 1, w), gen, x)
    x_best = (x + eps * signs).clamp(0.0, 1.0)
    margin, loss = _margin_and_loss(oracle(x_best, rows), y, targeted, y_target)
    ar_h = torch.arange(h, device=x.device).view(1, 1, h, 1)
    ar_w = torch.arange(w, device=x.device).view(1, 1, 1, w)
    for it in range(int(queries) - 1):
        todo = (margin > 0).nonzero()[:, 0]
        if len(todo) == 0:
            break
        s = max(int(round(math.sqrt(p_selection(p_init, it, queries) * h * w))), 1)
        s = min(s, h - 1, w - 1) if min(h, w) > 1 else 1
        xc, xb = x[todo], x_best[todo]
        vh = torch.randint(0, h - s + 1, (len(todo), 1, 1, 1), generator=gen, device=x.device)
        vw = torch.randint(0, w - s + 1, (len(todo), 1, 1, 1), generator=gen, device=x.device)
        window = (ar_h >= vh) & (ar_h < vh + s) & (ar_w >= vw) & (ar_w < vw + s)
        x_new = _new_candidate(xc, xb, window, eps, gen)
        m_new, l_new = _margin_and_loss(oracle(x_new, todo), take(y, todo), targeted, take(y_target, todo))
        better = (l_new < loss[todo]) | (m_new <= 0)
        idx = todo[better]
        x_best[idx], margin[idx], loss[idx] = x_new[better], m_new[better], l_new[better]
    return x_best, oracle.used(n) - start


def _signs(shape, gen, like):
    return torch.randint(0, 2, shape, generator=gen, device=like.device).to(like.dtype).mul_(2).sub_(1)


def _new_candidate(xc, xb, window, eps, gen, tries: int = 10):
    """Set the window to ±eps per channel; resample where that would change nothing (as in the paper)."""
    delta = xb - xc
    n, c = xc.shape[:2]
    for _ in range(tries):
        signs = _signs((n, c, 1, 1), gen, xc)
        x_new = (xc + torch.where(window, eps * signs, delta)).clamp(0.0, 1.0)
        same = ((x_new - xb).abs() < 1e-7) | ~window
        if not same.flatten(1).all(1).any():
            break
    return x_new
