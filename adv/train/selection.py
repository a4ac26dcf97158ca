"""Checkpoint selection by robust accuracy on a held-out validation subset.

Adversarially trained models overfit robustly: robust test accuracy peaks
and then falls while training continues (Rice et al. 2020, "Overfitting in
adversarially robust deep learning"). The standard remedy is to score each
epoch with PGD on a few hundred held-out images and keep the best epoch;
:func:`adv.train.fit` does so with ``validate=RobustValidation(...)`` and
``select="val_robust_acc"``.
"""

from __future__ import annotations

import torch

from adv.attacks import pgd
from adv.data.base import ImageData
from adv.train.losses.at import eval_mode


def holdout(data: ImageData, n: int) -> tuple[ImageData, ImageData]:
    """``(data without its last n images, those n images)``: a validation split disjoint from training."""
    if not 0 < n < len(data):
        raise ValueError(f"the validation holdout must be between 1 and {len(data) - 1} images, got {n}")
    part = lambda sl, split: ImageData(data.images[sl], data.labels[sl], data.classes, data.name,  # noqa: E731
                                        split, data.source, data.skipped, data.extras)
    return part(slice(None, -n), data.split), part(slice(-n, None), f"{data.split}-holdout")


class RobustValidation:
    """``validate(model) -> {"val_acc", "val_robust_acc"}``: clean and PGD accuracy on ``data`` (L∞, ``eps``).

    The PGD seed is fixed, so every epoch faces the same attack randomness.
    """

    def __init__(self, data: ImageData, *, eps: float, steps: int = 10, step_size: float | None = None,
                 batch_size: int = 500, seed: int = 0):
        self.data, self.eps, self.steps, self.step_size = data, eps, steps, step_size
        self.batch_size, self.seed = batch_size, seed

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        clean = robust = 0
        with eval_mode(model):
            for b, (x, y) in enumerate(self.data.batches(self.batch_size)):
                x, y = x.to(device), y.to(device)
                x_adv = pgd(model, x, y, eps=self.eps, steps=self.steps, step_size=self.step_size, seed=self.seed + b)
                with torch.no_grad():
                    clean += int((model(x).argmax(1) == y).sum())
                    robust += int((model(x_adv).argmax(1) == y).sum())
        n = max(len(self.data), 1)
        return {"val_acc": clean / n, "val_robust_acc": robust / n}
