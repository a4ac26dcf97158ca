"""Explanations: attention maps of classifiers."""

from adv.explain.cam import attention_area, grad_cam, grad_cam_and_logits, normalize_cam

__all__ = ["attention_area", "grad_cam", "grad_cam_and_logits", "normalize_cam"]
