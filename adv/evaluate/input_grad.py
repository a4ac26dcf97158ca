"""A cheaper input gradient for convolutions with few input channels (an image model's first layer), on CPU.

Attacks need the gradient of the loss with respect to the image. oneDNN computes a convolution's
input gradient with kernels tuned for many channels; for 1 to 3 input channels it takes 3-7x
the time of the forward pass (1 -> 32 channels, 3x3, 100 MNIST images: 6.5 ms against 1.3 ms
on x86), more than the rest of a LeNet's backward pass together. For such a layer the input
gradient is one small matrix product, ``(C*kh*kw, O) @ (O, N*H*W)``, followed by the sum of
the ``kh*kw`` shifted planes it holds: 1.8 ms for the same batch. The forward pass stays
oneDNN's. The result is the same gradient up to float rounding (~1e-5 relative).

:func:`cheap_input_grad` returns a copy of a model with its eligible convolutions swapped;
:class:`adv.evaluate.FastModel` applies it to CPU evaluations. The swap only acts while the
layer's weights are frozen (as attacks hold them) and the input is on the CPU; training or a
GPU takes PyTorch's own path.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

#: Input channels up to which the swap pays (measured: 1 channel 3.7x, 3 channels 1.3-2.2x faster).
MAX_IN_CHANNELS = 3


def _shifted_sum(cols: torch.Tensor, padding: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``cols`` (C, kh, kw, N, Ho, Wo): each tap's contribution at its offset, summed and cropped to ``size``."""
    c, kh, kw, n, ho, wo = cols.shape
    (ph, pw), (h, w) = padding, size
    out = cols.new_zeros(c, n, ho + kh - 1, wo + kw - 1)
    for i in range(kh):  # kh*kw adds of whole planes: no Python work per pixel or per example
        for j in range(kw):
            out[:, :, i:i + ho, j:j + wo] += cols[:, i, j]
    return out[:, :, ph:ph + h, pw:pw + w].permute(1, 0, 2, 3)


class _ConvInputGrad(torch.autograd.Function):
    """``conv2d`` (stride 1, no dilation, one group) whose backward gives the input gradient only."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(weight)
        ctx.padding, ctx.size = padding, tuple(x.shape[2:])
        return F.conv2d(x, weight, bias, 1, padding)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        o, c, kh, kw = weight.shape
        n, _, ho, wo = grad_out.shape
        # the products in backward's ops are recorded under create_graph, so a second derivative still works
        cols = weight.to(grad_out.dtype).reshape(o, -1).t() @ grad_out.transpose(0, 1).reshape(o, -1)
        grad = _shifted_sum(cols.view(c, kh, kw, n, ho, wo), ctx.padding, ctx.size)
        return grad, None, None, None


class FewChannelConv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` with the cheap input gradient while its weights are frozen and it runs on a CPU."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> "FewChannelConv2d":
        """The same layer, sharing ``conv``'s parameters."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding,
                  bias=conv.bias is not None, device="meta")
        new.weight, new.bias = conv.weight, conv.bias  # shared, not copied: the meta ones were placeholders
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if frozen and x.requires_grad and x.device.type == "cpu" and torch.is_grad_enabled():
            return _ConvInputGrad.apply(x, self.weight, self.bias, self.padding)
        return super().forward(x)


def eligible(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.in_channels <= MAX_IN_CHANNELS and module.groups == 1
            and module.stride == (1, 1) and module.dilation == (1, 1) and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple))


def has_eligible(model: nn.Module) -> bool:
    return any(eligible(m) for m in model.modules())


def cheap_input_grad(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules with each eligible convolution a :class:`FewChannelConv2d`; parameters and
    buffers are ``model``'s own (shared, not copied: no second copy of the weights in memory), and ``model``
    itself is left as it is. State kept in modules' Python attributes (a counter, say) is the copy's."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    net = copy.deepcopy(model, memo=shared)
    swaps = [(parent, name, child) for parent in net.modules() for name, child in parent.named_children()
             if eligible(child)]
    for parent, name, child in swaps:  # on the copy's module tree, never the caller's
        setattr(parent, name, FewChannelConv2d.of(child))
    return net
