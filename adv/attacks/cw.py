"""Carlini-Wagner L2 attack (Carlini & Wagner 2017).

Minimise ``||x' - x||_2^2 + c · max(z_y - max_{j!=y} z_j + confidence, 0)`` over
``x' = (tanh(w) + 1) / 2`` (the change of variables keeps ``x'`` in [0, 1])
with Adam, and binary-search the constant ``c`` per example, for the whole
batch at once. ``confidence`` is the paper's kappa. Threat model: white-box, minimal L2 perturbation; a finite
``eps`` is a budget the result is projected onto.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adv.attacks.core import (
    _other_max, check_inputs, check_positive, frozen, is_success, labels, project,
)
from adv.attacks.registry import register_attack


@register_attack("cw", family="whitebox", norms=("l2",), targeted=True, minimal=True, iterative=True,
                 description="Carlini-Wagner L2: Adam in tanh space, binary search over c",
                 renamed={"kappa": "confidence"})
def cw(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float = math.inf,
    norm: str = "l2",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    steps: int = 100,
    binary_steps: int = 6,
    initial_const: float = 1.0,
    confidence: float = 0.0,
    lr: float = 0.01,
    abort_early: bool = True,
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1]; y, y_target (N,) -> x_adv like x."""
    check_inputs(x, y, eps, norm, norms=("l2",), targeted=targeted, y_target=y_target, allow_inf=True)
    check_positive(steps=steps, binary_steps=binary_steps, initial_const=initial_const, lr=lr)
    if not confidence >= 0:
        raise ValueError(f"confidence must be >= 0, got {confidence!r}")
    if eps == 0:
        return x.clone()
    with frozen(model):
        y = labels(model, x, y)
        n = len(x)
        const = torch.full((n,), float(initial_const), device=x.device)
        lower, upper = torch.zeros_like(const), torch.full_like(const, 1e10)
        best_l2 = torch.full_like(const, float("inf"))
        best_adv = x.clone()
        w0 = torch.atanh((x * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        for _ in range(binary_steps):
            found = _optimise(model, x, w0, y, y_target, targeted, const, confidence, steps, lr, abort_early,
                              best_l2, best_adv)
            # success: try a smaller c; failure: a larger one (x10 until an upper bound is known)
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
        return project(best_adv, x, eps, norm)


def _optimise(model, x, w0, y, y_target, targeted, const, confidence, steps, lr, abort_early, best_l2, best_adv):
    """One Adam run at fixed ``const``; updates ``best_l2``/``best_adv`` in place."""
    modifier = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([modifier], lr=lr)
    found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    prev = math.inf
    check_every = max(steps // 10, 1)
    for it in range(steps):
        x_new = (torch.tanh(w0 + modifier) + 1) / 2
        l2sq = (x_new - x).pow(2).flatten(1).sum(1)
        logits = model(x_new)
        if targeted:
            margin = _other_max(logits, y_target) - logits.gather(1, y_target[:, None])[:, 0]
        else:
            margin = logits.gather(1, y[:, None])[:, 0] - _other_max(logits, y)
        f = (margin + confidence).clamp(min=0)
        loss = (l2sq + const * f).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            ok = (f <= 0) & is_success(logits, y, targeted, y_target)
            l2 = l2sq.sqrt()
            better = ok & (l2 < best_l2)
            best_l2[better] = l2[better]
            best_adv[better] = x_new[better].detach()
            found |= ok
        if abort_early and it % check_every == 0:
            if loss.item() > prev * 0.9999:
                break
            prev = loss.item()
    return found
