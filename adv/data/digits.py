"""scikit-learn's bundled 8x8 digits, upsampled: the tiny offline dataset for tests."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from adv.data.base import ImageData, register_dataset

#: Fraction of the 1797 digits held out as the test split (fixed permutation, seed 0).
TEST_FRACTION = 0.2


@register_dataset("digits", "scikit-learn 8x8 digits upsampled to 1xSxS (default 28), 10 classes, offline")
def load_digits(split, n=None, seed=0, root=None, download=False, size: int = 28) -> ImageData:
    from sklearn.datasets import load_digits as sk_digits

    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    bunch = sk_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    order = np.random.default_rng(0).permutation(len(images))
    n_test = int(round(TEST_FRACTION * len(images)))
    idx = order[:n_test] if split == "test" else order[n_test:]
    idx = torch.from_numpy(np.sort(idx))
    data = ImageData(
        images[idx], torch.from_numpy(bunch.target[idx.numpy()]).long(),
        tuple(str(i) for i in range(10)), "digits", split, source="sklearn.datasets.load_digits",
    )
    return data.subset(n, seed)
