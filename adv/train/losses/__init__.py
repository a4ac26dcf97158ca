"""Training losses, one module each, and the lookups of their registry (:mod:`adv.train.registry`).

Importing this package registers every loss, so a lookup made through it always sees all of them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from adv.specs import StageSpec, build_params, format_spec, params_schema
from adv.train.losses import aad, alp, at, dwt, ensemble_at, finetune_at, trades  # noqa: F401  (registers them)
from adv.train.registry import LOSSES, LossEntry, TrainingLoss


def get_loss(name: str) -> LossEntry:
    """The registered training loss (ConfigError naming the closest one when there is none)."""
    return LOSSES.get(name)


def list_losses(pattern: str = "*") -> list[str]:
    return LOSSES.names(pattern)


def describe_loss(name: str) -> str:
    """One line for listings: the description and the keys."""
    entry = get_loss(name)
    return f"{entry.description} [keys: {', '.join(entry.params.model_fields)}]"


def loss_schema(name: str) -> dict[str, Any]:
    entry = get_loss(name)
    return {"name": name, "description": entry.description, "params": params_schema(entry.params)}


def resolve_loss(spec: str | tuple[str, Any]) -> tuple[str, BaseModel]:
    """A spec string or ``(name, params)`` -> ``(name, validated params)``."""
    if isinstance(spec, str):
        parsed = StageSpec.parse(spec, "training defense")
        spec = parsed.name, dict(parsed.params)
    name, raw = spec
    return name, build_params(get_loss(name).params, raw, f"training defense {name!r}")


def training_loss(spec: str | tuple[str, Any]) -> TrainingLoss:
    """The ``BatchLoss`` for ``SPEC``, its canonical spec, and the inference stages it needs."""
    name, params = resolve_loss(spec)
    entry = get_loss(name)
    return TrainingLoss(entry.build(params), format_spec(name, params), list(entry.inference_stages(params)))


__all__ = ["describe_loss", "get_loss", "list_losses", "loss_schema", "resolve_loss", "training_loss"]
