"""Adapters for users' own models: the attacks need one logits tensor per call."""

from __future__ import annotations

import torch
from torch import nn


class SelectOutput(nn.Module):
    """``model(x)[index]``: the logits of a model that returns several outputs.

    Models such as ``(logits, features)`` or a dict with a ``"logits"`` key
    (Hugging Face) break every attack, which needs a tensor. Wrapping keeps the
    original module untouched: its parameters, mode and device are shared.

        net = SelectOutput(model, 0)          # (logits, features) -> logits
        net = SelectOutput(model, "logits")   # {"logits": ..., ...} or an object with .logits

    Shape:
        x: (N, C, H, W) in [0, 1]; returns (N, num_classes)
    """

    def __init__(self, model: nn.Module, index: int | str = 0):
        super().__init__()
        if not isinstance(index, (int, str)) or isinstance(index, bool):
            raise ValueError(f"index must be an int position or a str key, got {index!r}")
        self.model = model
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(self.index, str) and not isinstance(out, dict):
            return getattr(out, self.index)
        return out[self.index]

    def extra_repr(self) -> str:
        return f"index={self.index!r}"
