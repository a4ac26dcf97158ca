"""Optional fast paths: autocast (bf16/fp16) and channels_last, as a model wrapper.

Both trade exactness for speed on accelerators; attacks see an ordinary
model returning float32 logits. The wrapper works on a copy when converting
to channels_last, so the caller's model is never modified.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FastModel(nn.Module):
    """``model`` run under ``torch.autocast(dtype)`` and/or in channels_last memory format."""

    def __init__(self, model: nn.Module, amp: str | None = None, channels_last: bool = False):
        super().__init__()
        if amp is not None and amp not in DTYPES:
            raise ValueError(f"amp must be one of {tuple(DTYPES)} or None, got {amp!r}")
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last) if channels_last else model
        self.dtype = DTYPES.get(amp)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return self.model(x).float()

    @property
    def cam_layer(self) -> nn.Module:
        return self.model.cam_layer


def fast_model(model: nn.Module, amp: str | None = None, channels_last: bool = False) -> nn.Module:
    """``model`` itself when no fast path is asked for."""
    return model if amp is None and not channels_last else FastModel(model, amp, channels_last)
