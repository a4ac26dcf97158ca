"""Random Gaussian noise in front of the classifier (a randomized input transformation).

Threat model: a randomized preprocessing defense; its point here is to be
the stage EOT is for (Athalye et al. 2018, §4.3): an adaptive attacker
averages gradients over the randomness (:class:`adv.evaluate.adaptive.EOT`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from adv.defenses.registry import register_defense
from adv.defenses.stage import Stage, StageInfo, StageParams


class NoiseParams(StageParams):
    noise_std: float = Field(0.05, gt=0, le=1, description="std of the Gaussian noise, pixel units")

    renamed_keys: ClassVar[dict[str, str]] = {"sigma": "noise_std"}


class GaussianNoise(Stage):
    """``clip(x + N(0, noise_std²), 0, 1)``, fresh noise on every call (global torch RNG).

    Shape: (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1]
    """

    randomized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.params.noise_std * torch.randn_like(x)).clamp(0.0, 1.0)


@register_defense("noise", params=NoiseParams, kind="preprocess",
                  description="additive Gaussian noise, a randomized stage (attack it with EOT)")
def noise(params: NoiseParams, classifier=None, data=None, info: StageInfo | None = None) -> GaussianNoise:
    return GaussianNoise(params, info)
