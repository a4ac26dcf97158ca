"""Multi-model (ensemble) adversarial training (Tramèr et al. 2018, "Ensemble Adversarial Training";
Himbitski et al., adversarial training against FGSM on medical images).

The adversarials of each batch come, in turn, from the model being trained
or from one of the fixed, pre-trained ``sources`` (adv checkpoints), so the
model also learns perturbations it did not make itself: single-step
training on its own adversarials alone tends to mask its gradients instead.
The ``at`` keys set the attack and its budget.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, field_validator

from adv.errors import ConfigError
from adv.train.losses.at import AdversarialTraining, ATParams, craft
from adv.train.registry import register_loss


class EnsembleParams(ATParams):
    sources: list[str] = Field(default_factory=list, description="pre-trained adv checkpoints, joined with +")

    @field_validator("sources")
    @classmethod
    def _exist(cls, paths: list[str]) -> list[str]:
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise ValueError(f"source checkpoints not found: {missing}")
        return paths


class EnsembleAdversarialTraining(AdversarialTraining):
    """Batch ``k`` draws its adversarials from model ``k mod (1 + len(sources))``; 0 is the trained model."""

    def __init__(self, params: EnsembleParams):
        from adv.models import load_checkpoint

        if not params.sources:
            raise ConfigError("ensemble_at needs sources=a.pt[+b.pt...]: the fixed pre-trained models")
        super().__init__(params)
        self.sources = [load_checkpoint(p)[0].eval() for p in params.sources]
        for m in self.sources:
            m.requires_grad_(False)  # our own copies: fixed, never trained
        self.batches = 0

    def craft(self, model, x, y, epoch: float) -> torch.Tensor:
        k = self.batches % (1 + len(self.sources))
        self.batches += 1
        source = model if k == 0 else self.sources[k - 1].to(x.device)
        return craft(source, x, y, self.params, epoch)


@register_loss("ensemble_at", params=EnsembleParams,
               description="ensemble adversarial training (Tramer et al. 2018): adversarials alternate between "
                           "the trained model and fixed sources")
def ensemble_at_loss(params: EnsembleParams) -> EnsembleAdversarialTraining:
    return EnsembleAdversarialTraining(params)
