"""APGD-T (Croce & Hein 2020, §4): Auto-PGD with the targeted DLR loss, cycling over the top classes.

The untargeted use (AutoAttack's ``apgd-t``) runs one targeted APGD per
target class, the 2nd, 3rd, ... most likely class of the clean input, up to
``n_target_classes`` of them, each only on the examples no earlier target
has fooled; an example counts as fooled when it is misclassified. Given
``targeted=True`` and ``y_target``, it is a single targeted-DLR APGD
towards that class. Threat model: white-box, L∞ or L2.
"""

from __future__ import annotations

import torch
from torch import nn

from adv.attacks.apgd import apgd
from adv.attacks.core import NORMS, check_inputs, check_positive, frozen, labels, make_generator, predict
from adv.attacks.registry import register_attack
from adv.attacks.seeding import subset


def ranked_targets(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` likeliest classes other than ``y``, most likely first: shape (N, k)."""
    return logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, :k]


@register_attack("apgd_t", family="whitebox", norms=NORMS, targeted=True, iterative=True,
                 description="APGD-T: targeted-DLR Auto-PGD over the top classes (Croce & Hein 2020)")
def apgd_t(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
    y_target: torch.Tensor | None = None,
    steps: int = 100,
    n_target_classes: int = 9,
    rho: float = 0.75,
    seed: int | torch.Generator | None = None,
) -> torch.Tensor:
    """Shape: x (N, C, H, W) in [0, 1]; y, y_target (N,) -> x_adv like x."""
    check_inputs(x, y, eps, norm, targeted=targeted, y_target=y_target)
    check_positive(steps=steps, n_target_classes=n_target_classes, rho=rho)
    common = dict(eps=eps, norm=norm, steps=steps, loss="dlr", rho=rho)
    if eps == 0:
        return x.clone()
    if targeted:
        return apgd(model, x, y, targeted=True, y_target=y_target, seed=seed, **common)
    gen = make_generator(seed, x.device, len(x))
    with frozen(model):
        y = labels(model, x, y)
        with torch.no_grad():
            logits = model(x)
        targets = ranked_targets(logits, y, min(int(n_target_classes), logits.shape[1] - 1))
        out, todo = x.clone(), torch.arange(len(x), device=x.device)
        for k in range(targets.shape[1]):
            # each example continues its own stream (RowSeeds), whichever others are still standing
            xs = apgd(model, x[todo], y[todo], targeted=True, y_target=targets[todo, k], seed=subset(gen, todo),
                      **common)
            out[todo] = xs
            todo = todo[predict(model, xs) == y[todo]]
            if len(todo) == 0:
                break
        return out
