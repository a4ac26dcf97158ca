"""Registry of training losses: ``adv train --defense NAME:k=v,...``, independent of the stage registry.

This module holds the registration (``register_loss``) and the checkpoint keys; the lookups (``get_loss``,
``training_loss``, ...) are in :mod:`adv.train.losses`, whose import registers every loss first. (The losses build
on the defenses, which train their stages with :mod:`adv.train.loop`: were the lookups here or in
:mod:`adv.train`, the package would import its losses and the import graph would close into a cycle.)

A training-time defense changes *how* a classifier is trained (DWT-augmented
training, adversarial training, TRADES, ALP, AAD). Each registers a builder
``fn(params) -> BatchLoss`` with a pydantic model of its hyperparameters, the
same spec-string grammar as the stages (:mod:`adv.specs`), and optionally the
inference-time stage specs it needs in front of the classifier (DWT-augmented
training is evaluated behind the same DWT). ``adv train`` records both in the
checkpoint, so ``adv eval`` and the report show how a model was trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel

from adv.registry import Registry

#: Keys of a checkpoint's ``extra`` metadata: the inference stages to re-create, and the training loss spec.
STAGES_KEY = "defenses"
LOSS_KEY = "training_loss"


@dataclass(frozen=True)
class LossEntry:
    name: str
    build: Callable[[BaseModel], Any] = field(repr=False)
    params: type[BaseModel]
    description: str
    #: ``fn(params) -> [stage spec, ...]``: inference stages the trained classifier expects in front of it.
    inference_stages: Callable[[BaseModel], list[str]] = field(default=lambda params: [], repr=False)


@dataclass(frozen=True)
class TrainingLoss:
    """What ``adv train --defense SPEC`` resolves to."""

    loss_fn: Any
    spec: str
    stages: list[str]

    def checkpoint_meta(self) -> dict[str, Any]:
        return {LOSS_KEY: self.spec, STAGES_KEY: list(self.stages)}


#: Every training loss by name; importing :mod:`adv.train.losses` registers them all (and holds the lookups).
LOSSES: Registry[LossEntry] = Registry(
    "training defense", known="`adv train --defense` takes {names} (train learned stages with `adv defend train`)")


def register_loss(name: str, *, params: type[BaseModel], description: str,
                  inference_stages: Callable[[BaseModel], list[str]] | None = None):
    """Register ``build(params) -> BatchLoss`` under ``name``."""

    def wrap(fn: Callable) -> Callable:
        LOSSES.add(name, LossEntry(name, fn, params, description, inference_stages or (lambda p: [])))
        return fn

    return wrap


def checkpoint_defenses(meta: dict) -> list[str]:
    """The inference-time stage specs a checkpoint's metadata records (empty when none)."""
    specs = (meta.get("extra") or {}).get(STAGES_KEY) or []
    return [specs] if isinstance(specs, str) else list(specs)


def checkpoint_training(meta: dict) -> str | None:
    """The training-loss spec a checkpoint was trained with (None for plain cross-entropy)."""
    return (meta.get("extra") or {}).get(LOSS_KEY)
