"""Square Attack, L2 (Andriushchenko et al. 2020, §3.2 and Algorithm 3): score-based random search.

Start from a grid of "pseudo-Gaussian" blocks with random signs, scaled to
``||δ||_2 = eps``. Each iteration picks two windows of side ``s``: the first
gets a fresh centred perturbation added to its old content, the second is
zeroed, and the first's new content is rescaled so that the total stays on
the sphere of radius ``eps`` (the mass of both windows moves into the
first). A change is kept when the margin loss drops. ``s`` follows the
same p-schedule as the L∞ version. Each example draws its own windows,
block orientations and signs (the paper's per-image algorithm; the reference
implementation shares the windows across its batch for speed, which would
make an example's result depend on the rest of the batch).
Threat model: black-box, scores only, L2.
"""

from __future__ import annotations

import functools
import math

import torch

from adv.attacks.core import flat_norm
from adv.attacks.oracle import QueryOracle
from adv.attacks.registry import register_attack
from adv.attacks.seeding import signs, uniform
from adv.attacks.square import square_search, windows

_V = (-1, 1, 1, 1)


def _rectangle(h: int, w: int) -> torch.Tensor:
    """Nested rectangles with weights 1/(k+1)^2 around the centre, unit L2 norm (the paper's building block)."""
    out = torch.zeros(h, w)
    ch, cw = h // 2, w // 2
    for k in range(max(ch, cw) + 1):
        out[max(ch - k, 0) : min(ch + k + 1, h), max(cw - k, 0) : min(cw + k + 1, w)] += 1.0 / (k + 1) ** 2
    return out / out.norm()


@functools.lru_cache(maxsize=64)
def _block(s: int) -> torch.Tensor:
    """The (s, s) block: a positive and a negative half, unit L2 norm (never modified: it is cached)."""
    out = torch.cat([_rectangle(s // 2, s), -_rectangle(s - s // 2, s)]) if s > 1 else torch.ones(1, 1)
    return out / out.norm()


def blocks(s: int, u: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One block per example, transposed where its uniform ``u`` (m,) is below 1/2 (the paper's coin flip).

    Shape: -> (m, 1, s, s)
    """
    b = _block(s).to(like)
    return torch.where((u < 0.5).to(like.device).view(_V), b.t(), b)


def _init_delta(x, eps, rows, gen):
    """A 5 x 5 grid of blocks, each with its own orientation and signs per example, scaled to ||δ|| = eps."""
    n, c, h, w = x.shape
    s = max(h // 5, 1)
    delta = torch.zeros_like(x)
    start_h, start_w = (h - 5 * s) // 2, (w - 5 * s) // 2
    for i in range(start_h, h - s + 1, s):
        for j in range(start_w, w - s + 1, s):
            flip = uniform(gen, 1, rows)[:, 0]
            delta[:, :, i : i + s, j : j + s] += blocks(s, flip, x) * signs(gen, (c, 1, 1), rows, x)
    return delta * (eps / flat_norm(delta).clamp_min(1e-12)).view(_V)


def _candidate(xc, xb, eps, s, rows, gen):
    """Move the mass of a zeroed second window into a fresh first window, staying on the eps-sphere."""
    m, c, h, w = xc.shape
    delta = xb - xc
    u = uniform(gen, 5, rows).to(xc.device)  # two windows and the block's orientation, per example
    win1, top, left = windows(u[:, 0:2], h, w, s)
    win2 = windows(u[:, 2:4], h, w, s)[0]
    # window 1 of each example, gathered at its own position: (m, c, s, s)
    ar = torch.arange(s, device=xc.device)
    at = (torch.arange(c, device=xc.device).view(1, -1, 1, 1) * (h * w) + (top[:, None] + ar).view(m, 1, s, 1) * w
          + (left[:, None] + ar).view(m, 1, 1, s)).flatten(1)
    old = delta.flatten(1).gather(1, at).view(m, c, s, s)
    norm_old = old.pow(2).sum((2, 3), keepdim=True).sqrt()
    norm_windows = (delta * (win1 | win2)).pow(2).sum((2, 3), keepdim=True)
    room = (eps**2 - flat_norm(delta).pow(2)).clamp_min(0).view(_V) / c
    new = blocks(s, u[:, 4], xc) * signs(gen, (c, 1, 1), rows, xc) + old / (norm_old + 1e-10)
    new = new / new.pow(2).sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12) * (room + norm_windows).sqrt()
    delta = (delta * ~win2).flatten(1).scatter(1, at, new.flatten(1)).view_as(delta)
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

    def init(x, rows, gen):
        return (x + _init_delta(x, eps, rows, gen)).clamp(0.0, 1.0)

    def propose(xc, xb, p, rows, gen):
        h, w = xc.shape[2:]
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s = min(s + (s % 2 == 0), h, w)  # odd, as in the reference implementation
        return _candidate(xc, xb, eps, s, rows, gen)

    return square_search(oracle, x, y, eps=eps, norm=norm, norms=("l2",), targeted=targeted, y_target=y_target,
                         queries=queries, p_init=p_init, seed=seed, init=init, propose=propose)
