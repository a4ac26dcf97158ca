"""The pieces every attack shares, one copy each.

* argument checks (``ValueError`` naming the bad value, cleverhans style);
* ``frozen(model)``: the model's ``requires_grad`` flags are switched off for
  the duration of an attack and restored after; train/eval mode is never
  touched (pass an eval-mode model: an attack must not change the model it
  evaluates, and BatchNorm statistics are the caller's business);
* the losses attacks ascend (CE, CW margin, DLR), as per-example values;
* the gradient of such a loss with respect to the input;
* one FGM step and the projection onto the L∞/L2 ball intersected with [0, 1].

Shape:
    x: (N, C, H, W) float in [0, 1]; y, y_target: (N,) int64; losses: (N,)
"""

from __future__ import annotations

import contextlib
import math
import secrets
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from adv.attacks.seeding import RowSeeds, draw

NORMS = ("linf", "l2")

#: ``objective(x_adv, rows) -> (values, logits)``: per-example values to *ascend*.
#: ``rows`` (an index tensor, or None for all) says which examples of the
#: attacked batch ``x_adv`` holds, so attacks can drop finished examples.
Objective = Callable[[torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


# --- argument checks -----------------------------------------------------------
def check_inputs(
    x: torch.Tensor,
    y: torch.Tensor | None,
    eps: float,
    norm: str,
    *,
    norms: tuple[str, ...] = NORMS,
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    allow_inf: bool = False,
) -> None:
    """Raise ``ValueError`` for arguments no attack can work with."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float (N, C, H, W) tensor, got {shape}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x must lie in [0, 1], got range [{x.min().item():.4g}, {x.max().item():.4g}]")
    if norm not in norms:
        raise ValueError(f"norm must be one of {norms}, got {norm!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or math.isnan(eps) or eps < 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    if math.isinf(eps) and not allow_inf:
        raise ValueError(f"eps must be finite for this attack, got {eps!r}")
    for name, labels in (("y", y), ("y_target", y_target)):
        if labels is not None and (labels.shape != (len(x),) or labels.is_floating_point()):
            raise ValueError(f"{name} must be an integer tensor of shape ({len(x)},), got {tuple(labels.shape)}")
    if targeted and y_target is None:
        raise ValueError("targeted=True needs y_target, got None")
    if not targeted and y_target is not None:
        raise ValueError("y_target given but targeted=False; pass targeted=True")


def check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


# --- model state -----------------------------------------------------------------
@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Switch off parameter gradients (faster input gradients) and restore the flags.

    Gradients are enabled inside, so attacks also work under ``torch.no_grad()``.
    """
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield model
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def labels(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """``y``, or the model's predictions when ``y`` is None (avoids label leaking, cleverhans)."""
    return predict(model, x) if y is None else y


def make_generator(seed: int | torch.Generator | None, device: torch.device, n: int | None = None) -> torch.Generator:
    """A private generator: attacks never read or reseed the global RNG.

    A :class:`RowSeeds` (one stream per example) must hold exactly the ``n`` examples of the batch.
    """
    if isinstance(seed, RowSeeds) and n is not None and len(seed) != n:
        raise ValueError(f"seed holds streams for {len(seed)} examples, the batch has {n}; "
                         "pass RowSeeds.take(rows) for a subset")
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else int(seed))
    return gen


# --- losses (values to ascend) ------------------------------------------------------
def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Largest logit over the classes other than ``y``."""
    return logits.scatter(1, y[:, None], float("-inf")).amax(1)


def cw_loss(logits: torch.Tensor, y: torch.Tensor, margin_cap: float = math.inf) -> torch.Tensor:
    """Carlini-Wagner margin ``max_{j!=y} z_j - z_y``, capped at ``margin_cap`` (Madry's CW-k loss, k the cap)."""
    return (_other_max(logits, y) - logits.gather(1, y[:, None])[:, 0]).clamp(max=margin_cap)


def _need_classes(logits: torch.Tensor, k: int) -> None:
    if logits.shape[1] < k:
        raise ValueError(f"the DLR loss needs at least {k} classes, got {logits.shape[1]}")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, eq. 4): shift- and scale-invariant."""
    _need_classes(logits, 3)
    top = logits.sort(1, descending=True).values
    z_y = logits.gather(1, y[:, None])[:, 0]
    return -(z_y - _other_max(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020, eq. 5)."""
    _need_classes(logits, 4)
    top = logits.sort(1, descending=True).values
    z_y = logits.gather(1, y[:, None])[:, 0]
    z_t = logits.gather(1, y_target[:, None])[:, 0]
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


LOSSES = ("ce", "cw", "dlr")


def loss_values(loss: str = "ce", targeted: bool = False) -> Callable:
    """``fn(logits, y, y_target) -> (N,)`` values to ascend.

    Untargeted losses push the true class down; targeted ones pull
    ``y_target`` up (``-CE(t)``, the margin of ``t`` over the rest, or
    targeted DLR).
    """
    check_choice("loss", loss, LOSSES)
    if loss == "dlr" and targeted:
        return dlr_targeted_loss
    if targeted:
        fn = {"ce": ce_loss, "cw": cw_loss}[loss]
        return lambda z, _y, t: -fn(z, t)
    fn = {"ce": ce_loss, "cw": cw_loss, "dlr": dlr_loss}[loss]
    return lambda z, y, _t: fn(z, y)


def objective(
    model: nn.Module,
    y: torch.Tensor,
    *,
    loss: str = "ce",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
) -> Objective:
    """The standard objective: ``loss_values`` of the model's logits."""
    values = loss_values(loss, targeted)

    def obj(x_adv: torch.Tensor, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x_adv)
        return values(logits, take(y, rows), take(y_target, rows)), logits

    return obj


def take(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or rows is None else t[rows]


# --- gradient, step, projection ---------------------------------------------------------
def input_grad(
    obj: Objective, x_adv: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient of ``sum(obj(x_adv))`` w.r.t. ``x_adv``; returns (grad, values, logits)."""
    x_adv = x_adv.detach().requires_grad_(True)
    values, logits = obj(x_adv, rows)
    (grad,) = torch.autograd.grad(values.sum(), x_adv)
    return grad, values.detach(), logits.detach()


def flat_norm(t: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Per-example norm, shape (N,)."""
    return t.flatten(1).norm(p=p, dim=1)


#: Perturbation sizes :func:`perturbation_norm` measures; an L0 change is one above this tolerance.
SIZES = ("l0", "l2", "linf")
L0_TOLERANCE = 1e-6


def perturbation_norm(x: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example size of ``x_adv - x``: "l0" (values changed), "l2" or "linf"; the one copy every module uses.

    Shape: x, x_adv (N, ...) -> (N,)
    """
    delta = (x_adv - x).flatten(1)
    if norm == "l0":
        return (delta.abs() > L0_TOLERANCE).sum(1).float()
    if norm == "l2":
        return delta.norm(p=2, dim=1)
    if norm == "linf":
        return delta.abs().amax(1) if delta.shape[1] else delta.new_zeros(len(delta))
    raise ValueError(f"norm must be one of {SIZES}, got {norm!r}")


def _view(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def fgm_step(x_adv: torch.Tensor, grad: torch.Tensor, step_size, norm: str) -> torch.Tensor:
    """One steepest-ascent step: ``sign(grad)`` for L∞, ``grad/||grad||_2`` for L2.

    ``step_size`` is a float or a per-example (N,) tensor.
    """
    direction = grad.sign() if norm == "linf" else grad / _view(flat_norm(grad).clamp_min(1e-12))
    if isinstance(step_size, torch.Tensor):
        return x_adv + _view(step_size) * direction
    return x_adv.add(direction, alpha=step_size)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps, norm: str) -> torch.Tensor:
    """Nearest point to ``x_adv`` in the ``eps``-ball around ``x`` (then clipped to [0, 1]).

    Clipping after the ball projection keeps the point inside the ball for
    both norms, because [0, 1] clipping only moves coordinates towards ``x``.
    """
    if norm == "linf":
        if isinstance(eps, torch.Tensor):
            eps = _view(eps)
            return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
        return torch.clamp(x_adv, min=x - eps, max=x + eps).clamp_(0.0, 1.0)
    delta = x_adv - x
    if not isinstance(eps, torch.Tensor) and math.isinf(eps):
        return x_adv.clamp(0.0, 1.0)
    norms = flat_norm(delta)
    factor = (eps / norms.clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta * _view(factor)).clamp_(0.0, 1.0)


def ball_bounds(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel bounds of the L∞ ball intersected with [0, 1]: one ``clamp`` then projects."""
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


def random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """Uniform point of the L∞ ball, or uniform point of the L2 ball, clipped to [0, 1].

    With a :class:`RowSeeds` generator (for exactly these rows), each example's start
    comes from its own stream, whatever else shares the batch.
    """
    rows = torch.arange(len(x))
    if isinstance(gen, RowSeeds) and len(gen) != len(x):
        raise ValueError(f"gen holds streams for {len(gen)} examples, x has {len(x)}; pass RowSeeds.take(rows)")
    if norm == "linf":
        noise = draw(gen, torch.rand, x.shape[1:], rows, x.dtype).to(x.device).mul_(2).sub_(1).mul_(eps)
        return (x + noise).clamp_(0.0, 1.0)
    direction = draw(gen, torch.randn, x.shape[1:], rows, x.dtype).to(x.device)
    direction /= _view(flat_norm(direction).clamp_min(1e-12))
    d = x[0].numel()
    radius = draw(gen, torch.rand, (), rows, x.dtype).to(x.device).pow(1.0 / d) * eps
    return (x + direction * _view(radius)).clamp_(0.0, 1.0)


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s rule: 2.5 * eps / steps lets a step sequence cross the ball and back."""
    return 2.5 * eps / steps


def is_success(logits: torch.Tensor, y: torch.Tensor, targeted: bool, y_target) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred == y_target if targeted else pred != y
