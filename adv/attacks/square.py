"""Square Attack, L∞ (Andriushchenko et al. 2020): score-based random search.

Start from vertical stripes of ±eps; at each iteration, in every image still
standing, set a random square window of side ``s`` to ±eps per channel and
keep the change when the margin loss drops. The square's area fraction
``p`` follows the paper's schedule: ``p_init`` halved at 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 of 10,000 queries (rescaled to ``queries``).
:func:`square_search` is the random search both norms share; every random
draw (stripes, windows, signs) comes from the example's own stream when the
seed is a :class:`~adv.attacks.seeding.RowSeeds`.
Threat model: black-box, scores only (a probability oracle), L∞.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from adv.attacks.core import check_inputs, check_positive, make_generator, take
from adv.attacks.oracle import QueryOracle, as_oracle
from adv.attacks.registry import register_attack
from adv.attacks.seeding import RowSeeds, randint, signs, uniform

#: Schedule of p (Andriushchenko et al. 2020, §A): breakpoints out of 10,000 queries.
P_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)

_V = (-1, 1, 1, 1)


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


def square_search(oracle, x, y, *, eps: float, norm: str, norms: tuple[str, ...], targeted: bool, y_target,
                  queries: int, p_init: float, seed, init: Callable, propose: Callable
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The random search both Square attacks share (Andriushchenko et al. 2020, Algorithm 1).

    ``init(x, rows, gen) -> x_0``; ``propose(x, x_best, p, rows, gen) -> candidates`` for the examples at
    ``rows`` still standing (``p`` the schedule's area fraction). A candidate replaces the best point when
    the margin loss drops or the example is fooled; each example draws from ``gen`` at its own row.
    """
    check_inputs(x, y, eps, norm, norms=norms, targeted=targeted, y_target=y_target)
    check_positive(queries=queries, p_init=p_init)
    if p_init > 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
    oracle = as_oracle(oracle, "probs")
    n = len(x)
    start = oracle.used(n)
    if eps == 0 or n == 0:
        return x.clone(), oracle.used(n) - start
    gen = make_generator(seed, x.device, n)
    rows = torch.arange(n, device=x.device)
    if y is None:
        y = oracle(x, rows).argmax(1)
    x_best = init(x, rows, gen)
    margin, loss = _margin_and_loss(oracle(x_best, rows), y, targeted, y_target)
    # the standing examples' copies, gathered again only when one falls (not at every query)
    todo = (margin > 0).nonzero()[:, 0]
    xs, xb, ys, ts, ms, ls = (take(v, todo) for v in (x, x_best, y, y_target, margin, loss))
    for it in range(int(queries) - 1):
        if len(todo) == 0:
            break
        x_new = propose(xs, xb, p_selection(p_init, it, queries), todo, gen)
        m_new, l_new = _margin_and_loss(oracle(x_new, todo), ys, targeted, ts)
        better = (l_new < ls) | (m_new <= 0)
        xb = torch.where(better.view(_V), x_new, xb)
        ms, ls = torch.where(better, m_new, ms), torch.where(better, l_new, ls)
        fell = m_new <= 0
        if fell.any():
            x_best[todo], margin[todo], loss[todo] = xb, ms, ls
            keep = (~fell).nonzero()[:, 0]
            todo, xs, xb, ys, ts, ms, ls = (take(v, keep) for v in (todo, xs, xb, ys, ts, ms, ls))
    x_best[todo] = xb
    return x_best, oracle.used(n) - start


def windows(u: torch.Tensor, h: int, w: int, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example, an (s, s) window at a position drawn from uniforms ``u`` (m, 2): (mask (m, 1, h, w), top, left)."""
    top, left = randint(u[:, 0], h - s + 1), randint(u[:, 1], w - s + 1)
    ar_h, ar_w = torch.arange(h, device=u.device), torch.arange(w, device=u.device)
    in_h = (ar_h >= top[:, None]) & (ar_h < top[:, None] + s)
    in_w = (ar_w >= left[:, None]) & (ar_w < left[:, None] + s)
    return in_h[:, None, :, None] & in_w[:, None, None, :], top, left


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

    def init(x, rows, gen):  # vertical stripes: one sign per example, channel and column
        return (x + eps * signs(gen, (x.shape[1], 1, x.shape[3]), rows, x)).clamp(0.0, 1.0)

    def propose(xc, xb, p, rows, gen):
        h, w = xc.shape[2:]
        s = max(int(round(math.sqrt(p * h * w))), 1)
        s = min(s, h - 1, w - 1) if min(h, w) > 1 else 1
        window = windows(uniform(gen, 2, rows).to(xc.device), h, w, s)[0]
        return _new_candidate(xc, xb, window, eps, rows, gen)

    return square_search(oracle, x, y, eps=eps, norm=norm, norms=("linf",), targeted=targeted, y_target=y_target,
                         queries=queries, p_init=p_init, seed=seed, init=init, propose=propose)


def _new_candidate(xc, xb, window, eps, rows, gen, tries: int = 10):
    """Set each example's window to ±eps per channel; redraw an example's signs while that changes nothing
    (the reference implementation's loop, capped at ``tries``).

    Whether a sign leaves a channel's window as it is depends on that channel and sign only, so both answers are
    computed once and the redraws test signs against them, not whole candidate images.
    """
    delta = xb - xc
    up, down = _unchanged(xc + eps, xb, window), _unchanged(xc - eps, xb, window)
    sign = _changing_signs(gen, up, down, rows, xc, tries)
    return (xc + torch.where(window, eps * sign, delta)).clamp(0.0, 1.0)


def _changing_signs(gen, up, down, rows, like, tries: int) -> torch.Tensor:
    """±1 per example and channel (m, c, 1, 1), drawn until they change the window (``up``/``down`` (m, c): the
    channels a +/- sign leaves unchanged), at most ``tries`` draws. With a :class:`RowSeeds`, the rows whose next
    ``tries`` draws are buffered judge them all at once (:meth:`RowSeeds.tries`: the same draws, the same
    streams); the loop below is for the others, and for a joint generator."""
    m, c = up.shape
    sign = like.new_empty((m, c, 1, 1))
    todo = torch.arange(m, device=up.device)
    if isinstance(gen, RowSeeds):
        def changes(u, fits):
            fits = fits.to(up.device)
            return ~torch.where(u.to(up.device) < 0.5, down[fits][:, None], up[fits][:, None]).all(2)

        u, fits = gen.tries(c, tries, rows, changes)
        fits = fits.to(up.device)
        sign[fits] = torch.where(u < 0.5, -1.0, 1.0).to(like).view(-1, c, 1, 1)
        todo = todo[~fits]
    if len(todo) == 0:
        return sign
    sign[todo] = signs(gen, (c, 1, 1), rows[todo], like)
    redo = todo[torch.where(sign[todo].view(-1, c) > 0, up[todo], down[todo]).all(1)]
    for _ in range(tries - 1):
        if len(redo) == 0:
            break
        again = signs(gen, (c, 1, 1), rows[redo], like)
        sign[redo] = again
        redo = redo[torch.where(again.view(-1, c) > 0, up[redo], down[redo]).all(1)]
    return sign


def _unchanged(x_window, xb, window):
    """Per example and channel (m, c): whether ``x_window`` (clipped to [0, 1]) equals ``xb`` on the window."""
    return (((x_window.clamp(0.0, 1.0) - xb).abs() < 1e-7) | ~window).flatten(2).all(2)
