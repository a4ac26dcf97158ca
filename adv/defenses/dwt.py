"""Discrete-wavelet-transform input reconstruction (Kaminskyi, DWT study, "Input Reconstruction").

Each image is decomposed with a 2-D DWT, its detail coefficients are
shrunk (soft or hard thresholding) and the image is reconstructed: the
small, high-frequency adversarial noise sits mostly in those coefficients.
The work is done by ``skimage.restoration.denoise_wavelet`` (BayesShrink or
VisuShrink thresholds), or by ``pywt`` with a fixed threshold.

Threat model: a preprocessing defense against small L∞/L2 perturbations. It
is a numpy stage (``differentiable = False``): evaluated adaptively it is
attacked through BPDA (:mod:`adv.evaluate.adaptive`), against which it is known to
give little (Athalye et al. 2018).
"""

from __future__ import annotations

import itertools
import warnings
from typing import ClassVar, Iterable, Literal

import numpy as np
import pywt
import torch
from pydantic import Field, field_validator
from skimage.restoration import denoise_wavelet

from adv.defenses.registry import register_defense
from adv.defenses.stage import Stage, StageInfo, StageParams


class DWTParams(StageParams):
    wavelet: str = Field("haar", description="pywt discrete wavelet: haar, db2-db38, symN, coifN, biorX.Y, ...")
    level: int = Field(1, ge=1, description="decomposition levels (at most pywt.dwt_max_level for the image)")
    mode: Literal["soft", "hard"] = Field("soft", description="thresholding of the detail coefficients")
    method: Literal["BayesShrink", "VisuShrink", "fixed"] = Field(
        "BayesShrink", description="threshold rule; 'fixed' uses `threshold` on every detail band")
    threshold: float = Field(0.05, gt=0, description="the threshold of method=fixed (pixel units, [0,1] images)")
    noise_sigma: float | None = Field(None, gt=0, description="noise std for Bayes/VisuShrink; None estimates it")
    per_channel: bool = Field(True, description="denoise RGB channels separately; False denoises in YCbCr")

    renamed_keys: ClassVar[dict[str, str]] = {"sigma": "noise_sigma"}

    @field_validator("wavelet")
    @classmethod
    def _known_wavelet(cls, value: str) -> str:
        if value not in pywt.wavelist(kind="discrete"):
            raise ValueError(f"unknown discrete wavelet {value!r}; e.g. haar, db4, sym4, coif2 "
                             "(pywt.wavelist(kind='discrete') lists all)")
        return value


def denoise_image(img: np.ndarray, p: DWTParams) -> np.ndarray:
    """DWT-denoise one image.

    Shape: (H, W, C) float64 in [0, 1] -> (H, W, C) float64 in [0, 1]
    """
    if p.method == "fixed":
        out = np.stack([_fixed_threshold(img[..., c], p) for c in range(img.shape[-1])], axis=-1)
    else:
        ycbcr = not p.per_channel and img.shape[-1] == 3
        out = denoise_wavelet(
            img, sigma=p.noise_sigma, wavelet=p.wavelet, mode=p.mode, wavelet_levels=p.level,
            method=p.method, rescale_sigma=True, channel_axis=-1, convert2ycbcr=ycbcr,
        )
        out = _flat_channels_unchanged(img, out, ycbcr)
    return np.clip(out, 0.0, 1.0)


def _flat_channels_unchanged(img: np.ndarray, out: np.ndarray, ycbcr: bool) -> np.ndarray:
    """Where skimage returned NaN, the input. Its estimated noise level is 0 on a flat channel (a blank
    image), and the BayesShrink/VisuShrink thresholds then divide 0 by 0; a zero noise level means
    nothing to shrink, so the channel passes through unchanged (``np.clip`` would keep the NaN)."""
    bad = ~np.isfinite(out).all(axis=(0, 1))
    if not bad.any():
        return out
    if ycbcr:  # the channels were mixed by the colour transform: keep the whole image
        return img.copy()
    return np.where(bad[None, None, :], img, out)


def _fixed_threshold(channel: np.ndarray, p: DWTParams) -> np.ndarray:
    """Threshold every detail band at ``p.threshold`` (pywt does the transform and the shrinkage)."""
    coeffs = pywt.wavedec2(channel, p.wavelet, level=p.level)
    coeffs = [coeffs[0]] + [tuple(pywt.threshold(d, p.threshold, mode=p.mode) for d in band) for band in coeffs[1:]]
    out = pywt.waverec2(coeffs, p.wavelet)
    return out[: channel.shape[0], : channel.shape[1]]  # odd sizes come back one pixel larger


def check_level(p: DWTParams, size: tuple[int, int]) -> None:
    """Refuse levels the image is too small for (pywt would only warn and return boundary effects)."""
    max_level = pywt.dwt_max_level(min(size), pywt.Wavelet(p.wavelet).dec_len)
    if p.level > max_level:
        raise ValueError(f"level={p.level} is too deep for {size[0]}x{size[1]} images with wavelet "
                         f"{p.wavelet!r}: at most {max_level}")


def dwt_transform(x: torch.Tensor, p: DWTParams) -> torch.Tensor:
    """DWT reconstruction of a batch (numpy, image by image; no gradient).

    Shape: (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1], same dtype and device
    """
    if x.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    check_level(p, tuple(x.shape[-2:]))
    arr = x.detach().cpu().double().numpy().transpose(0, 2, 3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # skimage's sigma-estimate warnings on flat images
        warnings.simplefilter("ignore", RuntimeWarning)  # its 0/0 there, replaced by _flat_channels_unchanged
        out = np.stack([denoise_image(img, p) for img in arr])
    return torch.from_numpy(out.transpose(0, 3, 1, 2)).to(device=x.device, dtype=x.dtype)


class DWTDenoise(Stage):
    """Input reconstruction by wavelet denoising (Kaminskyi, DWT study).

    Shape: (N, C, H, W) in [0, 1] -> (N, C, H, W) in [0, 1]
    """

    differentiable = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dwt_transform(x, self.params)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.model_dump().items())


@register_defense("dwt", params=DWTParams, kind="preprocess",
                  description="DWT wavelet-denoising input reconstruction (skimage/pywt), Kaminskyi, DWT study")
def dwt(params: DWTParams, classifier=None, data=None, info: StageInfo | None = None) -> DWTDenoise:
    return DWTDenoise(params, info)


# --- parameter selection (Kaminskyi, DWT study: "images must visually look the same, PSNR high") ---------
DEFAULT_GRID = {
    "wavelet": ["haar", "db2", "db4", "sym4", "coif1"],
    "level": [1, 2, 3],
    "mode": ["soft", "hard"],
    "method": ["BayesShrink", "VisuShrink"],
}


def select_dwt_params(
    x: torch.Tensor,
    *,
    grid: dict[str, Iterable] | None = None,
    psnr_min: float = 30.0,
    mse_max: float = 1e-3,
) -> tuple[DWTParams | None, list[dict]]:
    """Search DWT parameters on a small sample ``x`` as Kaminskyi, DWT study does (PSNR/MSE between x and DWT(x)).

    A candidate is admissible when its mean PSNR >= ``psnr_min`` and mean MSE
    <= ``mse_max``. Among admissible candidates the one that changes the
    image most (lowest PSNR) is returned: the strongest denoising that still
    looks the same removes the most perturbation. Returns ``(best or None,
    table)``; the table has one row per candidate, in search order.

    Shape: x (N, C, H, W) in [0, 1]
    """
    from adv.metrics import image_quality

    grid = {**DEFAULT_GRID, **(grid or {})}
    unknown = set(grid) - set(DWTParams.model_fields)
    if unknown:
        raise ValueError(f"grid has unknown DWT parameters {sorted(unknown)}")
    rows, best = [], None
    for values in itertools.product(*grid.values()):
        params = DWTParams(**dict(zip(grid, values)))
        try:
            check_level(params, tuple(x.shape[-2:]))
        except ValueError:
            continue  # level too deep for this wavelet and size: not a candidate
        q = image_quality(x, dwt_transform(x, params))
        row = {**dict(zip(grid, values)), "psnr": float(np.mean(np.minimum(q["psnr"], 100.0))),
               "mse": float(q["mse"].mean()), "ssim": float(q["ssim"].mean())}
        row["admissible"] = row["psnr"] >= psnr_min and row["mse"] <= mse_max
        rows.append(row)
        if row["admissible"] and (best is None or row["psnr"] < best[1]):
            best = (params, row["psnr"])
    return (best[0] if best else None), rows
