"""Encoder-disagreement detector (Echeberria-Barrio et al. 2020 §4.2, Fig. 8).

The original classifier and its encoder variant (middle-AE encoder + new
head, :mod:`adv.defenses.autoencoders`) predict in parallel; an input is
flagged as adversarial when their predicted classes differ. The continuous
score (for AUROC) is the total-variation distance between their softmax
outputs.

Threat model: detection of perturbations crafted against the original
classifier. An adaptive attacker who knows the detector makes both models
agree on a wrong class (:func:`adv.evaluate.adaptive.detector_aware_attack`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from adv.defenses.autoencoders import EncoderClassifier, EncoderParams, train_encoder_variant
from adv.defenses.registry import register_defense
from adv.defenses.stage import ClassifierStage, StageInfo


class DisagreementParams(EncoderParams):
    #: An ``encoder`` stage file is this detector's weights too.
    accepts_files_of: ClassVar[tuple[str, ...]] = ("encoder",)


class DisagreementDetector(ClassifierStage):
    """Flags ``argmax f(x) != argmax f_enc(x)``.

    Shape: x (N, C, H, W) in [0, 1] -> flags (N,) bool; score (N,) in [0, 1]
    """

    def __init__(self, classifier: nn.Module, variant: EncoderClassifier, params: DisagreementParams,
                 info: StageInfo | None = None):
        super().__init__(classifier, params, info)
        self.variant = variant

    def logits_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the original and of the encoder variant; the CNN features are computed once."""
        f = self.classifier.features(x)
        return self.classifier.head(f), self.variant.head(self.variant.encoder(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, z_enc = self.logits_pair(x)
        return z.argmax(1) != z_enc.argmax(1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        z, z_enc = self.logits_pair(x)
        return 0.5 * (z.softmax(1) - z_enc.softmax(1)).abs().sum(1)

    # the stage file is the encoder variant's, so `encoder` and `disagreement` files are interchangeable
    def stage_state_dict(self) -> dict[str, torch.Tensor]:
        return self.variant.stage_state_dict()

    def load_stage_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.variant.load_stage_state_dict(state_dict)


@register_defense("disagreement", params=DisagreementParams, kind="detector", learned=True, needs_classifier=True,
                  description="flags inputs where the classifier and its encoder variant disagree "
                              "(Echeberria-Barrio et al. 2020 Fig. 8)")
def disagreement(params: DisagreementParams, classifier=None, data=None,
                 info: StageInfo | None = None) -> DisagreementDetector:
    variant = EncoderClassifier(classifier, params)
    detector = DisagreementDetector(classifier, variant, params, info)
    if data is not None:
        detector.finish_training(train_encoder_variant(variant, data))
    return detector
