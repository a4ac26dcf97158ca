"""Attention IoU between clean and adversarial Grad-CAM maps (Wu et al. 2022 (AAD), eq. 6 and Table 3).

The attention area of each map keeps its ``#cell`` highest grid cells of
the raw Grad-CAM grid (Wu et al. 2022 (AAD): "keeping the same number of grid cells with
the highest attention score", #cell = 5, 10, 20, 30); the IoU of the clean
and adversarial areas is averaged separately over the images the attack
turned (I_succeed) and those it did not (I_fail), among images classified
correctly before the attack (I_att). The thresholded area of eq. 3 (the
paper's kappa, ``threshold=`` here) is available too.

Shape:
    cam: (N, h, w) raw Grad-CAM grid; masks (N, h, w) bool; iou (N,)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

CELLS = (5, 10, 20, 30)


def topn_mask(cam: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` highest cells of each map, among its cells with positive attention.

    Grad-CAM maps are ReLU'd and small CNNs give many exact zeros; a zero
    cell is not "high attention", and letting ``topk`` break ties among zeros
    by index would make two unrelated maps share those cells (inflating IoU).
    """
    if cam.ndim != 3:
        raise ValueError(f"cam must be (N, h, w), got shape {tuple(cam.shape)}")
    cells = cam.shape[1] * cam.shape[2]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= cells:
        raise ValueError(f"n must be an integer in 1..{cells} (the grid has {cells} cells), got {n!r}")
    flat = cam.flatten(1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, flat.topk(n, dim=1).indices, True)
    return (mask & (flat > 0)).view_as(cam)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example ``|a ∩ b| / |a ∪ b|`` of boolean masks; NaN when both are empty (undefined)."""
    # hand-written: sklearn's jaccard_score scores one flat pair per call; this is the batched form
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def attention_iou(cam_a: torch.Tensor, cam_b: torch.Tensor, *, cells: int | None = None,
                  threshold: str | float | None = None) -> torch.Tensor:
    """IoU of two maps' attention areas: top-``cells`` (Table 3) or ``g >= threshold`` (eq. 3's kappa)."""
    if cam_a.shape != cam_b.shape:
        raise ValueError(f"maps differ in shape: {tuple(cam_a.shape)} vs {tuple(cam_b.shape)}")
    if (cells is None) == (threshold is None):
        raise ValueError("give exactly one of cells= (top-N cells) or threshold= (eq. 3 area)")
    if cells is not None:
        return mask_iou(topn_mask(cam_a, cells), topn_mask(cam_b, cells))
    from adv.explain.cam import attention_area

    return mask_iou(attention_area(cam_a, threshold) > 0, attention_area(cam_b, threshold) > 0)


def attention_iou_table(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
    cells: Sequence[int] = CELLS, layer: nn.Module | None = None,
) -> dict:
    """Wu et al. 2022 (AAD) Table 3 for ``model``: mean clean-vs-adversarial attention IoU, split by attack outcome.

    Each map explains its own predicted class. Pairs whose maps are both
    all-zero have no attention area and are left out of the means (counted in
    ``n_no_attention``). Returns ``{"rows": [{cells, iou_succeed, iou_fail}],
    "n_succeed", "n_fail", "n_no_attention", "grid"}``; a mean over an empty
    group is NaN.
    """
    from adv.explain.cam import grad_cam_and_logits

    cam_x, logits = grad_cam_and_logits(model, x, layer=layer, create_graph=False)
    cam_adv, logits_adv = grad_cam_and_logits(model, x_adv, layer=layer, create_graph=False)
    correct = logits.argmax(1) == y
    succeed = correct & (logits_adv.argmax(1) != y)
    fail = correct & ~succeed
    rows = []
    for n in cells:
        iou = attention_iou(cam_x, cam_adv, cells=n)
        rows.append({"cells": n, "iou_succeed": iou[succeed].nanmean().item(), "iou_fail": iou[fail].nanmean().item()})
    empty = (cam_x.flatten(1).amax(1) <= 0) & (cam_adv.flatten(1).amax(1) <= 0)
    return {"rows": rows, "n_succeed": int(succeed.sum()), "n_fail": int(fail.sum()),
            "n_no_attention": int((empty & correct).sum()), "grid": tuple(cam_x.shape[1:])}
