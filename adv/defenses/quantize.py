"""Bit-depth reduction (Xu et al. 2018, "Feature Squeezing"): round each pixel to 2**bits levels.

Threat model: a preprocessing defense against small perturbations. The
rounding has zero gradient almost everywhere, so ``differentiable = False``:
the adaptive evaluation attacks it with BPDA (Athalye et al. 2018, §4.1).
"""

from __future__ import annotations

import torch
from pydantic import Field

from adv.defenses.registry import register_defense
from adv.defenses.stage import Stage, StageInfo, StageParams


class QuantizeParams(StageParams):
    bits: int = Field(4, ge=1, le=16, description="bits per channel; the image keeps 2**bits levels")


class Quantize(Stage):
    """``round(x · (2^b - 1)) / (2^b - 1)``.

    Shape: (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1]
    """

    differentiable = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.params.bits - 1
        return torch.round(x * levels) / levels


@register_defense("quantize", params=QuantizeParams, kind="preprocess",
                  description="bit-depth reduction (feature squeezing, Xu et al. 2018)")
def quantize(params: QuantizeParams, classifier=None, data=None, info: StageInfo | None = None) -> Quantize:
    return Quantize(params, info)
