"""Grad-CAM heatmaps and overlays before and after a defense (Khoshbakht et al. 2024 (SFE), Figs. 3-4).

The maps come from pytorch-grad-cam (``GradCAM``, ``show_cam_on_image``):
normalised to [0, 1] per image and resized to the input. "Before" explains
the undefended classifier on the input; "after" explains the defended
model's classifier on what the defense hands it, so both maps are aligned
with the same image.

Shape:
    x: (N, C, H, W) in [0, 1] -> maps (N, H, W) float32 in [0, 1]; overlays (N, H, W, 3) uint8
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn


def gradcam_heatmaps(
    model: nn.Module, x: torch.Tensor, targets: torch.Tensor | Sequence[int] | None = None,
    layer: nn.Module | None = None,
) -> np.ndarray:
    """Grad-CAM of ``model`` for ``targets`` (default: the predicted classes) at ``layer`` (default ``cam_layer``)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from adv.explain.cam import cam_layer

    layer = cam_layer(model, layer)
    wanted = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
    was_training = model.training
    try:
        with GradCAM(model=model, target_layers=[layer]) as cam:
            # frozen weights (feature-space defenses) give no activation gradient unless the input asks for one
            cam.compute_input_gradient = True
            maps = cam(input_tensor=x.detach(), targets=wanted)
    finally:
        model.zero_grad(set_to_none=True)  # pytorch-grad-cam backpropagates into parameter .grad
        model.train(was_training)
    return np.asarray(maps, dtype=np.float32)


def overlay(x: torch.Tensor, maps: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """Heatmaps blended onto the images (pytorch-grad-cam's ``show_cam_on_image``, JET colormap)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    imgs = x.detach().cpu().float().numpy().transpose(0, 2, 3, 1)
    if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    return np.stack([show_cam_on_image(img, m, use_rgb=True, image_weight=image_weight) for img, m in zip(imgs, maps)])


def before_after(classifier: nn.Module, defended: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Maps and predictions of the undefended classifier on ``x`` and of the defended model.

    ``defended`` is a ``Defended``; its classifier is explained on ``defended.preprocess(x)``.
    """
    with torch.no_grad():
        x_def = defended.preprocess(x)
        pred_before, pred_after = classifier(x).argmax(1), defended.classifier(x_def).argmax(1)
    return {
        "before": gradcam_heatmaps(classifier, x, pred_before),
        "after": gradcam_heatmaps(defended.classifier, x_def, pred_after),
        "pred_before": pred_before.cpu().numpy(), "pred_after": pred_after.cpu().numpy(),
        "defended_input": x_def.detach(),
    }


def save_before_after(
    path: str | Path, classifier: nn.Module, defended: nn.Module, x: torch.Tensor, y: torch.Tensor,
    class_names: Sequence[str] | None = None, title: str = "",
) -> Path:
    """A PNG grid, one row per image: the input, Grad-CAM before the defense, Grad-CAM after it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = before_after(classifier, defended, x)
    name = (lambda i: class_names[i]) if class_names else str
    over_b, over_a = overlay(x, res["before"]), overlay(x, res["after"])
    imgs = x.detach().cpu().numpy().transpose(0, 2, 3, 1)
    fig, axes = plt.subplots(len(x), 3, figsize=(6.6, 2.2 * len(x)), squeeze=False)
    for i in range(len(x)):
        truth = int(y[i])
        pb, pa = int(res["pred_before"][i]), int(res["pred_after"][i])
        gray = imgs[i].squeeze(-1) if imgs.shape[-1] == 1 else imgs[i]
        panels = [(gray, f"input (true {name(truth)})", True),
                  (over_b[i], f"before: {name(pb)}", pb == truth),
                  (over_a[i], f"after: {name(pa)}", pa == truth)]
        for ax, (img, label, ok) in zip(axes[i], panels):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1) if img.ndim == 2 else ax.imshow(img)
            ax.set_title(label, fontsize=8, color="black" if ok else "red")  # red: misclassified
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
