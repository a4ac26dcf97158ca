"""Differentiable Grad-CAM (Selvaraju et al. 2017; Wu et al. 2022 (AAD) eq. 2) and the attention area (eq. 3).

``L^c = ReLU(sum_k alpha_k^c A^k)`` with ``alpha_k^c`` the spatial mean of
``d z_c / d A^k``. With ``create_graph=True`` the map is a differentiable
function of the input and the weights, which A3Attack (Wu et al. 2022 (AAD) §4.3) and the
AAD defense (eq. 9) need.
"""

# Hand-written because pytorch-grad-cam computes its maps with numpy and detaches
# them, so no gradient could flow back for attacks or training.

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def capture_activation(layer: nn.Module) -> Iterator[dict]:
    """Record ``layer``'s output in ``store["A"]`` while inside; the hook is always removed."""
    store: dict = {}

    def hook(module, inputs, output):
        if not output.requires_grad:  # frozen weights and a constant input: still differentiate w.r.t. A
            output = output.detach().requires_grad_(True)
        store["A"] = output
        return output

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def cam_layer(model: nn.Module, layer: nn.Module | None = None) -> nn.Module:
    """``layer``, else the model's ``cam_layer``; ValueError when there is neither."""
    if layer is not None:
        if not isinstance(layer, nn.Module):
            raise ValueError(f"layer must be an nn.Module, got {type(layer).__name__}")
        return layer
    try:
        return model.cam_layer
    except (AttributeError, NotImplementedError):
        raise ValueError(
            f"{type(model).__name__} has no cam_layer; pass layer= (a convolutional layer of the model)"
        ) from None


def grad_cam_and_logits(
    model: nn.Module,
    x: torch.Tensor,
    class_idx: int | torch.Tensor | None = None,
    layer: nn.Module | None = None,
    create_graph: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM maps and the logits of the same forward pass.

    Shape: x (N, C, H, W) -> cam (N, h, w) at the layer's resolution, logits (N, K)
    """
    layer = cam_layer(model, layer)
    with torch.enable_grad():
        with capture_activation(layer) as store:
            logits = model(x)
        if "A" not in store:
            raise ValueError(f"layer {layer!r} was not called in the model's forward pass")
        acts = store["A"]
        if acts.ndim != 4:
            raise ValueError(f"Grad-CAM needs a convolutional layer with (N, K, h, w) output, got {tuple(acts.shape)}")
        if class_idx is None:
            class_idx = logits.argmax(1)
        elif not isinstance(class_idx, torch.Tensor):
            class_idx = torch.full((len(x),), int(class_idx), device=logits.device, dtype=torch.long)
        score = logits.gather(1, class_idx.view(-1, 1).to(logits.device)).sum()
        (grads,) = torch.autograd.grad(score, acts, create_graph=create_graph)
        cam = torch.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1))
    if not create_graph:
        return cam.detach(), logits.detach()
    return cam, logits


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    class_idx: int | torch.Tensor | None = None,
    layer: nn.Module | None = None,
    create_graph: bool = True,
) -> torch.Tensor:
    """Grad-CAM maps for ``class_idx`` (default: the predicted class), shape (N, h, w)."""
    return grad_cam_and_logits(model, x, class_idx, layer, create_graph)[0]


def normalize_cam(cam: torch.Tensor) -> torch.Tensor:
    """Scale each map to max 1 (differentiable), so maps compare with binary areas."""
    return cam / cam.amax((-2, -1), keepdim=True).clamp_min(1e-12)


def attention_area(cam: torch.Tensor, threshold: str | float = "mean", soft: bool | float = False) -> torch.Tensor:
    """``Att(x) = g(x) >= kappa`` (Wu et al. 2022 (AAD) eq. 3); ``threshold`` (the paper's kappa) is the map's
    mean or a fixed value.

    ``soft=True`` (or a temperature) returns ``sigmoid((g - threshold) / T)``
    instead, a differentiable stand-in; ``T`` defaults to a tenth of the map's max.
    """
    if isinstance(threshold, str):
        if threshold != "mean":
            raise ValueError(f"threshold must be 'mean' or a number, got {threshold!r}")
        level = cam.mean((-2, -1), keepdim=True)
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        level = torch.as_tensor(float(threshold), dtype=cam.dtype, device=cam.device)
    else:
        raise ValueError(f"threshold must be 'mean' or a number, got {threshold!r}")
    if soft is False:
        return (cam >= level).to(cam.dtype)
    if soft is True:
        temperature = 0.1 * cam.detach().amax((-2, -1), keepdim=True).clamp_min(1e-12)
    elif isinstance(soft, (int, float)) and soft > 0:
        temperature = float(soft)
    else:
        raise ValueError(f"soft must be a bool or a temperature > 0, got {soft!r}")
    return torch.sigmoid((cam - level) / temperature)
