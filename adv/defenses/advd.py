"""AdvD: the adversarial-example detector of salient feature extraction (Khoshbakht et al. 2024 §3.2,
after Chen et al. 2021).

Five fully connected layers read ``concat(SF, TF)``, the outputs of the SFE's
positive and negative generators on the frozen classifier's penultimate
features; output 0 is benign, 1 adversarial. The rationale: SF and TF agree
on benign inputs (both reconstruct the features) and differ on adversarial
ones (SF is pulled to the benign counterpart, TF keeps the input's features).
AdvD is trained after the SFE, in the same run (:func:`adv.defenses.sfe.fit_sfe`),
so one stage file serves ``--defense sfe:checkpoint=F`` and
``--detector advd:checkpoint=F``.

Threat model: detection of adversarial inputs (synthetic or natural) to a
fixed target model. An adaptive attacker who knows AdvD pushes its logit
below the threshold while fooling the classifier
(:func:`adv.evaluate.adaptive.detector_aware_attack` reads :meth:`AdvDDetector.evasion_margin`).

Shape:
    x: (N, C, H, W) in [0, 1] -> flags (N,) bool; score (N,) = P(adversarial) in [0, 1]
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from adv.defenses.registry import register_defense
from adv.defenses.sfe import SFEParams, SFEStage, build_sfe_stage
from adv.defenses.stage import StageInfo


class AdvDParams(SFEParams):
    #: An ``sfe`` stage file holds AdvD's weights too.
    accepts_files_of: ClassVar[tuple[str, ...]] = ("sfe",)


class AdvDDetector(SFEStage):
    """Flags ``sigmoid(AdvD(concat(PG(f), NG(f)))) > threshold`` with ``f = features(x)``."""

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        return self.sfe.advd_logit(self.classifier.features(x))

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x) > self.params.threshold

    def evasion_margin(self, x: torch.Tensor) -> torch.Tensor:
        """``logit(threshold) - AdvD logit``: positive exactly when ``x`` is not flagged (differentiable)."""
        t = self.params.threshold
        return math.log(t / (1 - t)) - self.logit(x)


@register_defense("advd", params=AdvDParams, kind="detector", learned=True, needs_classifier=True,
                  description="AdvD: five FC layers on concat(SF, TF) of salient feature extraction "
                              "(Khoshbakht et al. 2024 after Chen et al. 2021)")
def advd(params: AdvDParams, classifier=None, data=None, info: StageInfo | None = None) -> AdvDDetector:
    return build_sfe_stage(AdvDDetector, params, classifier, data, info)
