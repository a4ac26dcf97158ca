"""Fast paths as a model wrapper: autocast (bf16/fp16), channels_last, the cheap input gradient of
first-layer convolutions on CPU (:mod:`adv.evaluate.input_grad`) and cache-sized passes on CPU
(:mod:`adv.evaluate.passes`).

Autocast and channels_last trade exactness for speed on accelerators; the input gradient differs from
PyTorch's only by float rounding, and so do the passes (oneDNN may pick another kernel per batch size).
Attacks see an ordinary model returning float32 logits. The wrapper works on a copy when it converts or
swaps layers, so the caller's model is never modified.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from adv.evaluate.input_grad import cheap_input_grad, has_eligible
from adv.evaluate.passes import in_passes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class FastModel(nn.Module):
    """``model`` run under ``torch.autocast(dtype)`` and/or in channels_last memory format, and/or with the cheap
    input gradient of its first-layer convolutions (``input_grad``), and/or ``rows`` images per forward pass."""

    def __init__(self, model: nn.Module, amp: str | None = None, channels_last: bool = False,
                 input_grad: bool = False, rows: int | None = None):
        super().__init__()
        if amp is not None and amp not in DTYPES:
            raise ValueError(f"amp must be one of {tuple(DTYPES)} or None, got {amp!r}")
        net = copy.deepcopy(model).to(memory_format=torch.channels_last) if channels_last else model
        self.model = cheap_input_grad(net) if input_grad else net
        self.dtype = DTYPES.get(amp)
        self.channels_last = channels_last
        if rows is not None and rows < 1:
            raise ValueError(f"rows must be a positive number of images per pass or None, got {rows!r}")
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            return in_passes(self.model, x, self.rows)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return in_passes(self.model, x, self.rows).float()

    @property
    def cam_layer(self) -> nn.Module:
        return self.model.cam_layer


def fast_model(model: nn.Module, amp: str | None = None, channels_last: bool = False,
               input_grad: bool = False, rows: int | None = None) -> nn.Module:
    """``model`` itself when no fast path is asked for or applies (``input_grad`` on a model without a
    convolution it serves)."""
    input_grad = input_grad and has_eligible(model)
    return model if amp is None and not channels_last and not input_grad and rows is None else FastModel(
        model, amp, channels_last, input_grad, rows)
