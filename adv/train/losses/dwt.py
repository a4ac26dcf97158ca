"""DWT-augmented proactive training (Kaminskyi, DWT study, "Adversarial (Re)training" with a transform).

Every batch is trained on the originals *and* their DWT reconstructions, so
the classifier learns to classify denoised images; at inference the same DWT
reconstruction runs in front of it (Kaminskyi, DWT study Tables 2.1-2.2: the combined
defense beats either half). ``adv train --defense dwt:...`` uses this loss
and records the spec in the checkpoint, so evaluation re-creates the
inference-time stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adv.defenses.dwt import DWTParams, dwt_transform
from adv.defenses.registry import format_defense_spec
from adv.train.loop import LossOutput
from adv.train.registry import register_loss

class DWTAugmentedLoss:
    """``BatchLoss``: mean cross-entropy over ``x`` and ``DWT(x)`` (equal weight, as in Kaminskyi, DWT study).

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


@register_loss("dwt", params=DWTParams,
               description="DWT-augmented training (Ramachandran et al.): cross-entropy on x and DWT(x); "
                           "evaluated behind the same DWT stage",
               inference_stages=lambda params: [format_defense_spec("dwt", params)])
def dwt_training_loss(params: DWTParams) -> DWTAugmentedLoss:
    return DWTAugmentedLoss(params)
