"""Registry of training losses: ``adv train --defense NAME:k=v,...``, independent of the stage registry.

A training-time defense changes *how* a classifier is trained (DWT-augmented
training, adversarial training, TRADES, ALP, AAD). Each registers a builder
``fn(params) -> BatchLoss`` with a pydantic model of its hyperparameters, the
same spec-string grammar as the stages (:mod:`adv.specs`), and optionally the
inference-time stage specs it needs in front of the classifier (DWT-augmented
training is evaluated behind the same DWT). ``adv train`` records both in the
checkpoint, so ``adv eval`` and the report show how a model was trained.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import BaseModel

from adv.errors import ConfigError
from adv.specs import build_params, format_spec, params_schema, parse_spec

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


_LOSSES: dict[str, LossEntry] = {}


def register_loss(name: str, *, params: type[BaseModel], description: str,
                  inference_stages: Callable[[BaseModel], list[str]] | None = None):
    """Register ``build(params) -> BatchLoss`` under ``name``."""

    def wrap(fn: Callable) -> Callable:
        if name in _LOSSES:
            raise ValueError(f"training loss {name!r} registered twice")
        _LOSSES[name] = LossEntry(name, fn, params, description, inference_stages or (lambda p: []))
        return fn

    return wrap


def _load_all() -> None:
    import adv.train.losses  # noqa: F401  (importing the package registers every loss)


def get_loss(name: str) -> LossEntry:
    _load_all()
    if name not in _LOSSES:
        raise ConfigError(f"unknown training defense {name!r}; `adv train --defense` takes "
                          f"{', '.join(list_losses())} (train learned stages with `adv defend train`)")
    return _LOSSES[name]


def list_losses(pattern: str = "*") -> list[str]:
    _load_all()
    return sorted(n for n in _LOSSES if fnmatch.fnmatch(n, pattern))


def describe_loss(name: str) -> str:
    """One line for listings: the description and the keys."""
    entry = get_loss(name)
    return f"{entry.description} [keys: {', '.join(entry.params.model_fields)}]"


def loss_schema(name: str) -> dict[str, Any]:
    entry = get_loss(name)
    return {"name": name, "description": entry.description, "params": params_schema(entry.params)}


def resolve_loss(spec: str | tuple[str, Any]) -> tuple[str, BaseModel]:
    """A spec string or ``(name, params)`` -> ``(name, validated params)``."""
    name, raw = parse_spec(spec, "training defense") if isinstance(spec, str) else spec
    return name, build_params(get_loss(name).params, raw, f"training defense {name!r}")


def training_loss(spec: str | tuple[str, Any]) -> TrainingLoss:
    """The ``BatchLoss`` for ``SPEC``, its canonical spec, and the inference stages it needs."""
    name, params = resolve_loss(spec)
    entry = get_loss(name)
    return TrainingLoss(entry.build(params), format_spec(name, params), list(entry.inference_stages(params)))


def checkpoint_defenses(meta: dict) -> list[str]:
    """The inference-time stage specs a checkpoint's metadata records (empty when none)."""
    specs = (meta.get("extra") or {}).get(STAGES_KEY) or []
    return [specs] if isinstance(specs, str) else list(specs)


def checkpoint_training(meta: dict) -> str | None:
    """The training-loss spec a checkpoint was trained with (None for plain cross-entropy)."""
    return (meta.get("extra") or {}).get(LOSS_KEY)
