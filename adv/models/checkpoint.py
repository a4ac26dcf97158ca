"""Checkpoints with metadata, and loading of foreign state_dicts.

An ``adv`` checkpoint is a plain dict of tensors and primitives, so it loads
with ``torch.load(..., weights_only=True)`` (no pickled code runs):

    {"format": "adv-checkpoint/1", "arch", "num_classes", "input_size",
     "mean", "std", "dataset", "metrics", "train_config", "extra", "state_dict"}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from adv.errors import CheckpointError
from adv.io import atomic_output
from adv.models.base import ImageClassifier
from adv.models.registry import create_model

FORMAT = "adv-checkpoint/1"


def save_checkpoint(
    path: str | os.PathLike,
    model: ImageClassifier,
    *,
    dataset: str = "",
    metrics: dict[str, Any] | None = None,
    train_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` and its metadata atomically (:func:`adv.io.atomic_output`)."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "arch": model.arch,
        "num_classes": int(model.num_classes),
        "input_size": list(model.input_size),
        "mean": model.normalize.mean.flatten().tolist(),
        "std": model.normalize.std.flatten().tolist(),
        "dataset": dataset,
        "metrics": metrics or {},
        "train_config": train_config or {},
        "extra": extra or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_output(path) as f:
        torch.save(payload, f)
    return path


def _read(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickle with code, not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.__class__.__name__}: {exc}") from None


def load_checkpoint(path: str | os.PathLike, **model_kw) -> tuple[ImageClassifier, dict[str, Any]]:
    """Rebuild the model a checkpoint was saved from; returns ``(model, metadata)``."""
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an adv checkpoint (no format {FORMAT!r}); "
            "for foreign weights use load_external(name, path) or --weights"
        )
    model = create_model(
        payload["arch"],
        num_classes=payload["num_classes"],
        input_size=tuple(payload["input_size"]),
        mean=tuple(payload["mean"]),
        std=tuple(payload["std"]),
        **model_kw,
    )
    _load_into(model, payload["state_dict"], path)
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model.eval(), meta


def load_external(name: str, path: str | os.PathLike, **model_kw) -> ImageClassifier:
    """Load a foreign state_dict (advertorch, convex_adversarial, akamaster, torchvision).

    Accepts a bare state_dict or ``{"state_dict": ...}`` and strips the
    ``module.`` prefix that ``nn.DataParallel`` adds.
    """
    payload = _read(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return load_checkpoint(path, **model_kw)[0]
    state_dict = state_dict_of(payload, path)
    model = create_model(name, **model_kw)
    _load_into(model, state_dict, path, external=True)
    return model.eval()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: a bare state_dict, ``{"state_dict": ...}`` or an adv checkpoint."""
    return state_dict_of(_read(path), path)


def state_dict_of(payload: Any, path) -> dict[str, torch.Tensor]:
    state_dict = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}  # nn.DataParallel's prefix


def _load_into(model: ImageClassifier, state_dict: dict, path, external: bool = False) -> None:
    try:
        if external:
            model.load_external_state_dict(state_dict)
        else:
            model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:3]
        raise CheckpointError(
            f"{path} does not match model {model.arch!r}: {' '.join(first)[:400]}"
        ) from None
