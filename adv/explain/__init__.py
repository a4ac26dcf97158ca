"""Explanations: attention maps of classifiers."""

from adv.explain.cam import attention_area, grad_cam, grad_cam_and_logits, normalize_cam
from adv.explain.heatmaps import before_after, gradcam_heatmaps, overlay, save_before_after
from adv.explain.iou import attention_iou, attention_iou_table, topn_mask

__all__ = ["attention_area", "grad_cam", "grad_cam_and_logits", "normalize_cam",
           "attention_iou", "attention_iou_table", "before_after", "gradcam_heatmaps", "overlay",
           "save_before_after", "topn_mask"]
