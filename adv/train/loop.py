"""Supervised training loop with pluggable per-batch losses.

Defenses that change *how* a model is trained (adversarial training, ALP,
AAD, DWT-augmented training) plug in a ``BatchLoss``: a callable
``loss_fn(model, x, y) -> LossOutput``. The loop owns everything else:
optimizer, schedule, seeding, evaluation, progress, checkpoint and resume.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adv.data.base import ImageData
from adv.io import atomic_output, atomic_write_json
from adv.models.base import ImageClassifier
from adv.models.checkpoint import save_checkpoint
from adv.models.device import resolve_device
from adv.progress import progress

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Optimizer, schedule and loop settings; validated at the boundary."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(2, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd", "adamw"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine", "step"] = "constant"
    #: Epochs at which "step" multiplies the learning rate by ``gamma``.
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0, le=1)
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _check(self):
        if self.schedule == "step" and not self.milestones:
            raise ValueError("schedule 'step' needs milestones, e.g. [10, 15]")
        if any(m < 1 or m > self.epochs for m in self.milestones):
            raise ValueError(f"milestones must lie in 1..epochs={self.epochs}, got {self.milestones}")
        return self


@dataclass
class LossOutput:
    loss: torch.Tensor
    #: Logits on the *clean* batch, used for the running train accuracy.
    logits: torch.Tensor
    #: Extra scalars to log (e.g. adversarial accuracy, attention losses).
    logs: dict[str, float] | None = None


class BatchLoss(Protocol):
    """``loss_fn(model, x, y) -> LossOutput``; a loss whose class sets ``takes_epoch = True`` is also passed
    ``epoch=`` (fractional epochs done), for schedules such as an eps ramp that must survive a resume."""

    def __call__(self, model: ImageClassifier, x: torch.Tensor, y: torch.Tensor) -> LossOutput: ...


def cross_entropy_loss(model: ImageClassifier, x: torch.Tensor, y: torch.Tensor) -> LossOutput:
    logits = model(x)
    return LossOutput(F.cross_entropy(logits, y), logits)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, data: ImageData, batch_size: int = 512, device=None) -> float:
    """Top-1 accuracy on ``data`` (model left in the mode it was in)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    correct = 0
    for x, y in data.batches(batch_size):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    model.train(was_training)
    return correct / max(len(data), 1)


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_factor(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    if cfg.schedule == "cosine":
        t = (epoch * steps_per_epoch + step) / (cfg.epochs * steps_per_epoch)
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def fit(
    model: ImageClassifier,
    train: ImageData,
    test: ImageData | None,
    config: TrainConfig,
    loss_fn: BatchLoss = cross_entropy_loss,
    out_dir: str | Path | None = None,
    resume: bool = True,
    show_progress: bool = True,
    extra_meta: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    select: str | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place; returns the final metrics.

    With ``out_dir``, writes ``model.pt`` (adv checkpoint), ``metrics.json``
    and ``train_state.pt`` after every epoch, and resumes from the latter
    when ``resume`` is true. ``validate(model)`` adds metrics after each
    epoch; ``select`` names one of them, and the epoch that maximises it is
    also kept as ``best.pt`` (checkpoint selection against robust overfitting).
    """
    device = resolve_device(config.device)
    seed_everything(config.seed)
    model.to(device)
    opt = _optimizer(model, config)
    out = Path(out_dir) if out_dir else None
    start_epoch, history = _resume(out / "train_state.pt", model, opt, device) if out and resume else (0, [])
    metrics: dict[str, Any] = history[-1] if history else {}
    for epoch in range(start_epoch, config.epochs):
        metrics = _train_epoch(model, train, loss_fn, opt, config, epoch, device, show_progress)
        if test is not None:
            metrics["test_acc"] = evaluate_accuracy(model, test, config.eval_batch_size, device)
        if validate is not None:
            metrics.update(validate(model))
        history.append(metrics)
        log.info(json.dumps(metrics))  # one JSON line per epoch (the ``adv`` command and the jobs show it)
        stalled = stall_warning(metrics, train.num_classes, loss_fn)
        if stalled:
            warnings.warn(stalled, TrainingStallWarning, stacklevel=2)
        if out:
            _save(out, model, opt, epoch + 1, history, train, config, extra_meta)
            if select is not None and _is_best(history, select):
                _save_model(out / "best.pt", model, train, config, {**(extra_meta or {}), "selected_by": select},
                            history[-1])
        if on_epoch_end:
            on_epoch_end(epoch + 1, metrics)
    model.eval()
    final = dict(metrics)
    final["train_seconds"] = sum(h["epoch_seconds"] for h in history)
    final["history"] = history
    return final


#: Training accuracy within this of chance (1 / classes) after an epoch: the model is not learning.
CHANCE_MARGIN = 0.02


class TrainingStallWarning(UserWarning):
    """An epoch ended with training accuracy at chance level; the message names the likely fix."""


def stall_warning(metrics: dict[str, Any], num_classes: int, loss_fn: BatchLoss) -> str | None:
    """One line when the epoch's training accuracy is within :data:`CHANCE_MARGIN` of chance, else None.

    Adversarial training at the full eps from the first step (Madry at eps = 0.3 on MNIST) can sit at
    chance with a loss of ln(10) = 2.30 for every epoch and still exit normally; the ramp is the usual fix.
    For an adversarial loss the accuracy on its adversarials counts too, when the loss is also that of a
    uniform guess (on 6,000 MNIST images such a run reached 20% on clean inputs, 11% on adversarials, loss 2.305).
    """
    if num_classes < 2:
        return None
    chance = 1.0 / num_classes
    clean, adv, loss = metrics["train_acc"], metrics.get("train_adv_acc"), metrics["train_loss"]

    def near(acc) -> bool:
        return acc is not None and abs(acc - chance) <= CHANCE_MARGIN + 1e-9

    if not (near(clean) or (near(adv) and loss >= 0.98 * math.log(num_classes))):
        return None
    p = getattr(loss_fn, "params", None)
    if getattr(p, "eps_ramp", None) == 0 and getattr(p, "eps", 0) > 0:
        fix = (f"adversarial training at the full eps={p.eps:g} from the first step often stalls here; grow eps "
               "from 0 with eps_ramp=1 (e.g. --defense at:...,eps_ramp=1), or lower eps or the learning rate")
    else:
        fix = "lower the learning rate (--lr), or check that labels match images"
    what = f"training accuracy {clean:.1%}" + (f" ({adv:.1%} on its adversarials)" if adv is not None else "")
    return (f"epoch {metrics['epoch']}: {what} is within {CHANCE_MARGIN * 100:.0f} points of chance "
            f"({chance:.1%} for {num_classes} classes), loss {loss:.3f} (uniform guess: {math.log(num_classes):.3f}): "
            f"the model is not learning; {fix}")


def _resume(state_path: Path, model, opt, device) -> tuple[int, list[dict[str, Any]]]:
    """``(epochs done, history)`` from ``train_state.pt``, with the model, optimizer and RNG restored; (0, [])
    when there is none."""
    if not state_path.is_file():
        return 0, []
    state = torch.load(state_path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"].cpu())
    log.info(f"resuming from {state_path} at epoch {state['epoch']}")
    return state["epoch"], json.loads(state["history"])


def _train_epoch(model, train: ImageData, loss_fn: BatchLoss, opt, config: TrainConfig, epoch: int, device,
                 show_progress: bool) -> dict[str, Any]:
    """One pass over ``train``: the epoch's mean loss, accuracy and the loss's extra logs."""
    model.train()
    steps = math.ceil(len(train) / config.batch_size)
    scheduled = getattr(loss_fn, "takes_epoch", False)
    # A per-epoch permutation drawn from a seeded generator keeps runs reproducible across resumes.
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
    t0, seen, correct, loss_sum = time.time(), 0, 0, 0.0
    extra_sums: dict[str, float] = {}
    bar = progress(range(steps), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not show_progress)
    for step in bar:
        idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
        x, y = train[idx]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = config.lr * _lr_factor(config, epoch, step, steps)
        out = loss_fn(model, x, y, epoch=epoch + step / steps) if scheduled else loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        n = len(y)
        seen += n
        loss_sum += out.loss.item() * n
        correct += (out.logits.argmax(1) == y).sum().item()
        for k, v in (out.logs or {}).items():
            extra_sums[k] = extra_sums.get(k, 0.0) + float(v) * n
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.4f}")
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / seen,
        "train_acc": correct / seen,
        "epoch_seconds": time.time() - t0,
        **{f"train_{k}": v / seen for k, v in extra_sums.items()},
    }


def _is_best(history: list[dict[str, Any]], key: str) -> bool:
    if key not in history[-1]:
        raise ValueError(f"select={key!r} is not a metric of this run; it has {sorted(history[-1])}")
    return history[-1][key] >= max(h.get(key, -math.inf) for h in history)


def _save_model(path: Path, model, train: ImageData, config: TrainConfig, extra_meta, last: dict) -> None:
    save_checkpoint(
        path, model, dataset=train.name, metrics={k: v for k, v in last.items() if isinstance(v, (int, float))},
        train_config=config.model_dump(), extra=extra_meta,
    )


def _save(out: Path, model, opt, epoch, history, train: ImageData, config: TrainConfig, extra_meta) -> None:
    out.mkdir(parents=True, exist_ok=True)
    last = history[-1]
    _save_model(out / "model.pt", model, train, config, extra_meta, last)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": epoch,
        "history": json.dumps(history),
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_output(out / "train_state.pt") as f:
        torch.save(state, f)
    summary = {**last, "train_seconds": sum(h["epoch_seconds"] for h in history), "history": history}
    atomic_write_json(out / "metrics.json", summary, indent=2)
