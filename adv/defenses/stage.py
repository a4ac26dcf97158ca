"""What every defense stage shares: flags the adaptive layer reads, the frozen
classifier inside feature-space stages, the training hyperparameters of
learned stages, and padding to the size a conv stage needs.

Flags (class attributes, read by :mod:`adv.evaluate.adaptive`):

* ``differentiable`` – False for numpy/rounding stages: BPDA replaces their backward;
* ``randomized`` – True for stages that draw random numbers: EOT averages them;
* ``trained`` – False for a learned stage nobody trained or loaded yet.

What the registry knows about a stage (its name, spec string, kind, stage-file
metadata) is a frozen :class:`StageInfo` handed to the constructor, never set
on the module afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from adv.models.base import eval_mode


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


@dataclass(frozen=True)
class StageInfo:
    """What the registry knows about a stage before it is built; builders pass it to the constructor.

    ``spec`` is the canonical spec string, ``meta`` the stage file's metadata
    (empty unless the stage was loaded from a file), ``learned`` whether the
    stage has weights that must be trained or loaded before it is used.
    """

    name: str
    spec: str
    kind: str
    learned: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)


class Stage(nn.Module):
    """Base of the defense stages: carries the flags, the validated params and the registry's ``StageInfo``.

    A stage built outside the registry (``info=None``) has no defense name and
    counts as trained.
    """

    differentiable = True
    randomized = False

    def __init__(self, params: BaseModel | None = None, info: StageInfo | None = None):
        super().__init__()
        self.params = params
        self.info = info
        self.trained = not (info is not None and info.learned)
        #: What the last training run reported (``adv defend train`` prints it); empty when loaded.
        self.train_metrics: dict[str, Any] = {}

    @property
    def defense_name(self) -> str | None:
        return self.info.name if self.info else None

    @property
    def defense_spec(self) -> str:
        return self.info.spec if self.info else type(self).__name__

    @property
    def defense_kind(self) -> str | None:
        return self.info.kind if self.info else None

    @property
    def stage_meta(self) -> dict[str, Any]:
        return dict(self.info.meta) if self.info else {}

    def finish_training(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Record a finished training run: the stage is trained from now on; returns ``metrics``."""
        self.train_metrics = metrics
        self.trained = True
        return metrics

    def stage_state_dict(self) -> dict[str, torch.Tensor]:
        """What a stage file holds (``ClassifierStage`` leaves out the classifier it wraps)."""
        return self.state_dict()

    def load_stage_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state_dict, strict=True)

    def load_trained(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load trained weights (a stage file's); RuntimeError when they do not fit."""
        self.load_stage_state_dict(state_dict)
        self.trained = True


@contextlib.contextmanager
def frozen_classifier(classifier: nn.Module | None) -> Iterator[nn.Module | None]:
    """Hold the original classifier fixed while a stage trains around it; restore it on exit.

    Echeberria-Barrio et al. 2020 §4.2 keep the original weights: eval mode (its
    BatchNorm statistics never move) and no parameter gradients (the optimizer
    skips them). The classifier is the caller's, so its modes and
    ``requires_grad`` flags are put back afterwards (as the attacks' ``frozen``).
    """
    if classifier is None:
        yield None
        return
    from adv.attacks.core import frozen

    with frozen(classifier), eval_mode(classifier):
        yield classifier


class ClassifierStage(DelegatesToClassifier, Stage):
    """A stage that holds the original classifier as ``self.classifier``, unchanged.

    The classifier is the caller's: putting the stage in train or eval mode
    leaves the classifier's mode alone (training holds it in eval mode through
    :func:`frozen_classifier`, so BatchNorm statistics of the original never
    move), and it is left out of the stage's own state_dict: a stage file
    holds only what was trained.
    """

    def __init__(self, classifier: nn.Module, params: BaseModel | None = None, info: StageInfo | None = None):
        super().__init__(params, info)
        self.classifier = classifier

    def train(self, mode: bool = True):
        self.training = mode
        for name, child in self.named_children():
            if name != "classifier":
                child.train(mode)
        return self

    def stage_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("classifier.")}

    def load_stage_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def train_stage(
    model: Stage, loss_fn: Callable, params: LearnedParams, data, test=None, show_progress: bool = False,
    on_epoch_end: Callable[[int, dict], None] | None = None, classifier: nn.Module | None = None,
) -> dict[str, Any]:
    """Train the trainable parameters of ``model`` with the foundation's ``fit`` loop.

    ``classifier`` (default: the one a ``ClassifierStage`` wraps) is held in
    eval mode without gradients while the stage trains, and restored after.

    Shape: ``loss_fn(model, x, y) -> LossOutput`` on batches of ``data`` (an ``ImageData``).
    """
    from adv.train.loop import TrainConfig, fit

    config = TrainConfig(epochs=params.epochs, lr=params.lr, batch_size=params.batch_size, seed=params.seed)
    with frozen_classifier(classifier if classifier is not None else getattr(model, "classifier", None)):
        return fit(model, data, test, config, loss_fn=loss_fn, out_dir=None, resume=False,
                   show_progress=show_progress, on_epoch_end=on_epoch_end)


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
