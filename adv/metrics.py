"""Metrics every report uses: accuracy, attack success, perturbation norms,
image quality (MSE/PSNR/SSIM via skimage.metrics) and detector quality
(TPR/FPR/AUROC via sklearn).

Shape:
    images: (N, C, H, W) float in [0, 1]; labels/predictions: (N,)
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from adv.attacks.core import SIZES, perturbation_norm


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return (pred == y).float().mean().item() if len(y) else float("nan")


def attack_success_rate(
    pred_clean: torch.Tensor, pred_adv: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor | None = None
) -> float:
    """Among points classified correctly before the attack, the fraction the attack turned.

    Untargeted: the prediction left the true class. Targeted: it hit ``y_target``.
    """
    was_correct = pred_clean == y
    if not was_correct.any():
        return float("nan")
    hit = (pred_adv == y_target) if y_target is not None else (pred_adv != y)
    return hit[was_correct].float().mean().item()


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example L0 (changed values, tolerance 1e-6), L2 and Linf of ``x_adv - x``."""
    return {k: perturbation_norm(x, x_adv, k) for k in SIZES}


def _hwc(img: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if arr.ndim != 3:
        raise ValueError(f"expected one (C, H, W) image, got shape {arr.shape}")
    return arr.transpose(1, 2, 0).astype(np.float64)


def image_quality(x: torch.Tensor, x_other: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-example MSE, PSNR (dB, data range 1; inf when identical) and SSIM (skimage)."""
    if x.shape != x_other.shape or x.ndim != 4:
        raise ValueError(f"need two (N, C, H, W) batches of equal shape, "
                         f"got {tuple(x.shape)} and {tuple(x_other.shape)}")
    mse, psnr, ssim = [], [], []
    for a, b in zip(x, x_other):
        a, b = _hwc(a), _hwc(b)
        m = mean_squared_error(a, b)
        mse.append(m)
        psnr.append(float("inf") if m == 0 else peak_signal_noise_ratio(a, b, data_range=1.0))
        # win_size must be odd and no larger than the image; 7 is skimage's default.
        win = min(7, a.shape[0], a.shape[1])
        win -= 1 - win % 2
        ssim.append(structural_similarity(a, b, data_range=1.0, channel_axis=2, win_size=win))
    return {"mse": np.array(mse), "psnr": np.array(psnr), "ssim": np.array(ssim)}


def detection_metrics(scores: np.ndarray, is_adversarial: np.ndarray,
                      flags: np.ndarray | None = None) -> dict[str, float]:
    """TPR/FPR of hard ``flags`` (if given) and AUROC of continuous ``scores`` (sklearn)."""
    from sklearn.metrics import roc_auc_score

    scores, is_adv = np.asarray(scores, dtype=float), np.asarray(is_adversarial, dtype=bool)
    out: dict[str, float] = {}
    out["auroc"] = float(roc_auc_score(is_adv, scores)) if 0 < is_adv.sum() < len(is_adv) else float("nan")
    if flags is not None:
        flags = np.asarray(flags, dtype=bool)
        out["tpr"] = float(flags[is_adv].mean()) if is_adv.any() else float("nan")
        out["fpr"] = float(flags[~is_adv].mean()) if (~is_adv).any() else float("nan")
    return out


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``correct / n`` (scipy's binomtest); ``(0, 1)`` when ``n == 0``."""
    from scipy.stats import binomtest

    if n <= 0:
        return 0.0, 1.0
    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)
