"""Square Attack, L2 (Andriushchenko et al. 2020, §3.2 and Algorithm 3): score-based random search.

Start from a grid of "pseudo-Gaussian" blocks with random signs, scaled to
``||δ||_2 = eps``. Each iteration picks two windows of side ``s``: the first
gets a fresh centred perturbation added to its old content, the second is
zeroed, and the first's new content is rescaled so that the total stays on
the sphere of radius ``eps`` (the mass of both windows moves into the
first). A change is kept when the margin loss drops. ``s`` follows the
same p-schedule as the L∞ version. Windows are shared by the batch, as in
the reference implementation. Threat model: black-box, scores only, L2.
"""

from __future__ import annotations

import math

import torch

from adv.attacks.core import check_inputs, check_positive, flat_norm, make_generator, take
from adv.attacks.oracle import QueryOracle, as_oracle
from adv.attacks.registry import register_attack
from adv.attacks.square import _margin_and_loss, _signs, p_selection

_V = (-1, 1, 1, 1)


def _rectangle(h: int, w: int) -> torch.Tensor:
    """Nested rectangles with weights 1/(k+1)^2 around the centre, unit L2 norm (the paper's building block)."""
    out = torch.zeros(h, w)
    ch, cw = h // 2, w // 2
    for k in range(max(ch, cw) + 1):
        out[max(ch - k, 0) : min(ch + k + 1, h), max(cw - k, 0) : min(cw + k + 1, w)] += 1.0 / (k + 1) ** 2
    return out / out.norm()


def block(s: int, gen: torch.Generator) -> torch.Tensor:
    """A (s, s) block: a positive and a negative half, randomly transposed, unit L2 norm."""
    out = torch.cat([_rectangle(s // 2, s), -_rectangle(s - s // 2, s)]) if s > 1 else torch.ones(1, 1)
    out = out / out.norm()
    return out.t() if _randint(2, gen) else out


def _randint(high: int, gen: torch.Generator) -> int:
    return int(torch.randint(0, high, (1,), generator=gen, device=gen.device))


def _init_delta(n, c, h, w, eps, gen, like):
    s = max(h // 5, 1)
    delta = torch.zeros(n, c, h, w, device=like.device, dtype=like.dtype)
    start_h, start_w = (h - 5 * s) // 2, (w - 5 * s) // 2
    pattern = block(s, gen).to(like)
    for i in range(start_h, h - s + 1, s):
        for j in range(start_w, w - s + 1, s):
            delta[:, :, i : i + s, j : j + s] += pattern * _signs((n, c, 1, 1), gen, like)
    return delta * (eps / flat_norm(delta).clamp_min(1e-12)).view(_V)


def _window(h: int, w: int, s: int, gen: torch.Generator) -> tuple[int, int]:
    return _randint(h - s + 1, gen), _randint(w - s + 1, gen)


def _candidate(xc, xb, eps, s, gen):
    """Move the mass of a zeroed second window into a fresh first window, staying on the eps-sphere."""
    n, c, h, w = xc.shape
    delta = xb - xc
    (h1, w1), (h2, w2) = _window(h, w, s, gen), _window(h, w, s, gen)
    both = torch.zeros(1, 1, h, w, device=xc.device, dtype=xc.dtype)
    both[..., h1 : h1 + s, w1 : w1 + s] = 1
    both[..., h2 : h2 + s, w2 : w2 + s] = 1
    old = delta[..., h1 : h1 + s, w1 : w1 + s]
    norm_old = old.pow(2).sum((2, 3), keepdim=True).sqrt()
    norm_windows = (delta * both).pow(2).sum((2, 3), keepdim=True)
    room = (eps**2 - flat_norm(delta).pow(2)).clamp_min(0).view(_V) / c
    new = block(s, gen).to(xc) * _signs((n, c, 1, 1), gen, xc) + old / (norm_old + 1e-10)
    new = new / new.pow(2).sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) * (room + norm_windows).sqrt()
    delta = delta.clone()
    delta[..., h2 : h2 + s, w2 : w2 + s] = 0
    delta[..., h1 : h1 + s, w1 : w1 + s] = new
    return (xc + delta * (eps / flat_norm(delta).clamp_min(1e-12)).view(_V)).clamp(0.0, 1.0)


@register_attack("square_l2", family="query", norms=("l2",), targeted=True, oracle="probs", iterative=True,
                 description="Square Attack: score-based random search over squares (L2)")
def square_l2(
    oracle: QueryOracle,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float,
    norm: str = "l2",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    queries: int = 5000,
    p_init: float = 0.8,
    seed: int | torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape: x (N, C, H, W) in [0, 1]; y (N,) -> (x_adv like x, n_queries (N,) int64)."""
    check_inputs(x, y, eps, norm, norms=("l2",), targeted=targeted, y_target=y_target)
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
    x_best = (x + _init_delta(n, c, h, w, eps, gen, x)).clamp(0.0, 1.0)
    margin, loss = _margin_and_loss(oracle(x_best, rows), y, targeted, y_target)
    for it in range(int(queries) - 1):
        todo = (margin > 0).nonzero()[:, 0]
        if len(todo) == 0:
            break
        s = max(int(round(math.sqrt(p_selection(p_init, it, queries) * h * w))), 3)
        s = min(s + (s % 2 == 0), h, w)  # odd, as in the reference implementation
        x_new = _candidate(x[todo], x_best[todo], eps, s, gen)
        m_new, l_new = _margin_and_loss(oracle(x_new, todo), take(y, todo), targeted, take(y_target, todo))
        better = (l_new < loss[todo]) | (m_new <= 0)
        idx = todo[better]
        x_best[idx], margin[idx], loss[idx] = x_new[better], m_new[better], l_new[better]
    return x_best, oracle.used(n) - start
