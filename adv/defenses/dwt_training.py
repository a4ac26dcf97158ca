"""DWT-augmented proactive training (seed 001, "Adversarial (Re)training" with a transform).

Every batch is trained on the originals *and* their DWT reconstructions, so
the classifier learns to classify denoised images; at inference the same DWT
reconstruction runs in front of it (seed 001 Tables 2.1-2.2: the combined
defense beats either half). ``adv train --defense dwt:...`` uses this loss
and records the spec in the checkpoint, so evaluation re-creates the
inference-time stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adv.defenses.dwt import DWTParams, dwt_transform
from adv.defenses.registry import register_training_loss
from adv.train import LossOutput

#: Key of the checkpoint's ``extra`` metadata that holds the defense spec strings.
META_KEY = "defenses"


class DWTAugmentedLoss:
    """``BatchLoss``: mean cross-entropy over ``x`` and ``DWT(x)`` (equal weight, as in seed 001).

    Shape: x (N, C, H, W) in [0, 1], y (N,) -> LossOutput(loss, logits on clean x (N, K))
    """

    def __init__(self, params: DWTParams):
        self.params = params

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
        x_dwt = dwt_transform(x, self.params)
        logits = model(torch.cat([x, x_dwt]))
        clean, transformed = logits[: len(x)], logits[len(x):]
        loss = 0.5 * (F.cross_entropy(clean, y) + F.cross_entropy(transformed, y))
        acc_dwt = (transformed.argmax(1) == y).float().mean().item()
        return LossOutput(loss, clean.detach(), {"dwt_acc": acc_dwt})


@register_training_loss("dwt")
def dwt_training_loss(params: DWTParams) -> DWTAugmentedLoss:
    return DWTAugmentedLoss(params)


def training_loss(spec: str):
    """The ``BatchLoss`` for ``adv train --defense SPEC`` and the canonical spec to record.

    Returns ``(loss_fn, canonical_spec)``; only defenses with a training-time
    loss qualify (``describe_defense(name)["trainable_with_adv_train"]``).
    """
    from adv.defenses.registry import format_defense_spec, get_defense, list_defenses, resolve
    from adv.errors import ConfigError

    name, params = resolve(spec)
    entry = get_defense(name)
    if entry.training_loss is None:
        usable = [n for n in list_defenses() if get_defense(n).training_loss is not None]
        raise ConfigError(f"defense {name!r} has no training-time loss; `adv train --defense` takes "
                          f"{', '.join(usable)} (train learned stages with `adv defend train`)")
    return entry.training_loss(params), format_defense_spec(name, params)


def checkpoint_defenses(meta: dict) -> list[str]:
    """The inference-time defense specs a checkpoint's metadata records (empty when none)."""
    specs = (meta.get("extra") or {}).get(META_KEY) or []
    return [specs] if isinstance(specs, str) else list(specs)
