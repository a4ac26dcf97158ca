"""What every defense stage shares: flags the adaptive layer reads, the frozen
classifier inside feature-space stages, the training hyperparameters of
learned stages, and padding to the size a conv stage needs.

Flags (class attributes, read by :mod:`adv.evaluate.adaptive`):

* ``differentiable`` – False for numpy/rounding stages: BPDA replaces their backward;
* ``randomized`` – True for stages that draw random numbers: EOT averages them;
* ``trained`` – False for a learned stage nobody trained or loaded yet.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class StageParams(BaseModel):
    """Base of every defense's hyperparameters: unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid")


class LearnedParams(StageParams):
    """Hyperparameters shared by learned stages: where the weights are, or how to train them."""

    checkpoint: str | None = Field(None, description="stage file written by `adv defend train`")
    epochs: int = Field(3, ge=1, description="training epochs when trained from data")
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    seed: int = 0


class DelegatesToClassifier:
    """The classifier interface (num_classes, input_size, cam_layer) read from ``self.classifier``,
    so a wrapped or defended classifier can be attacked, wrapped again or explained."""

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.classifier.input_size

    @property
    def cam_layer(self) -> nn.Module:
        return self.classifier.cam_layer


class Stage(nn.Module):
    """Base of the defense stages: carries the flags and the validated params."""

    differentiable = True
    randomized = False

    def __init__(self, params: BaseModel | None = None):
        super().__init__()
        self.params = params
        self.trained = True


def freeze(classifier: nn.Module) -> nn.Module:
    """Freeze the original weights (Echeberria-Barrio et al. 2020 §4.2 keeps them): eval mode, no parameter grads."""
    classifier.eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    return classifier


class ClassifierStage(DelegatesToClassifier, Stage):
    """A stage that holds the frozen original classifier as ``self.classifier``.

    The classifier stays in eval mode when the stage is put in train mode (so
    BatchNorm statistics of the original never move), and it is left out of
    the stage's own state_dict: a stage file holds only what was trained.
    """

    def __init__(self, classifier: nn.Module, params: BaseModel | None = None):
        super().__init__(params)
        self.classifier = freeze(classifier)

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()
        return self

    def stage_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("classifier.")}

    def load_stage_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")



def train_stage(
    model: nn.Module, loss_fn: Callable, params: LearnedParams, data, test=None, show_progress: bool = False,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` with the foundation's ``fit`` loop.

    Shape: ``loss_fn(model, x, y) -> LossOutput`` on batches of ``data`` (an ``ImageData``).
    """
    from adv.train.loop import TrainConfig, fit

    config = TrainConfig(epochs=params.epochs, lr=params.lr, batch_size=params.batch_size, seed=params.seed)
    return fit(model, data, test, config, loss_fn=loss_fn, out_dir=None, resume=False, show_progress=show_progress,
               on_epoch_end=on_epoch_end)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad H and W up to a multiple of ``multiple``; returns the padded batch and (H, W).

    Shape: (N, C, H, W) -> (N, C, H', W') with H', W' multiples of ``multiple``.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    # replicate (not zero) padding: a black border would be a feature the network has to unlearn
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), mode="replicate"), (h, w)


def crop_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Undo ``pad_to_multiple``: the centre (H, W) window."""
    h, w = size
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]
