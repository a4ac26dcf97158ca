"""Decorator registry of defenses, their typed hyperparameters, spec strings and stage files.

Every defense is registered with a pydantic model of its hyperparameters
(the values a Ray Tune sweep varies) and one of three *kinds*:

* ``preprocess``: an ``nn.Module`` mapping images to images (DWT, AEs, U-Net);
* ``classifier``: wraps the classifier into a new one (middle AE, encoder variant);
* ``detector``: flags inputs; ``forward(x) -> (N,) bool`` (encoder disagreement).

A spec string ``NAME:k=v,k=v`` (``dwt:wavelet=haar,level=1``) names a defense
and its parameters on the command line and in YAML; list values are joined
with ``+`` (``unet:attacks=fgsm+pgd``).

Stage files are plain dicts of tensors and primitives (loadable with
``torch.load(weights_only=True)``), like the classifier checkpoints::

    {"format": "adv-stage/1", "name", "params", "meta", "state_dict"}
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from pydantic import BaseModel
from torch import nn

from adv.defenses.stage import Stage, StageInfo, frozen_classifier
from adv.errors import CheckpointError, ConfigError
from adv.io import atomic_output
from adv.registry import Registry
from adv.specs import StageSpec, build_params, format_spec, params_schema

KINDS = ("preprocess", "classifier", "detector")
STAGE_FORMAT = "adv-stage/1"

#: ``build(params, classifier=None, data=None, info=None) -> Stage``
Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    build: Builder = field(repr=False)
    params: type[BaseModel]
    kind: str
    description: str
    #: Needs a classifier to be built (feature-space stages, detectors, U-Net's training loss).
    needs_classifier: bool = False
    #: Has weights that must be trained (``checkpoint=`` or ``data=``).
    learned: bool = False


#: Every stage and per-input detector by name; importing :mod:`adv.defenses` registers them all.
DEFENSES: Registry[DefenseSpec] = Registry("defense")


def register_defense(
    name: str,
    *,
    params: type[BaseModel],
    kind: Literal["preprocess", "classifier", "detector"],
    description: str,
    needs_classifier: bool = False,
    learned: bool = False,
):
    """Register ``build(params, classifier=None, data=None, info=None) -> Stage`` under ``name``.

    ``info`` is the ``StageInfo`` the builder passes to the stage's constructor.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def wrap(fn: Builder) -> Builder:
        DEFENSES.add(name, DefenseSpec(name, fn, params, kind, description, needs_classifier, learned))
        return fn

    return wrap


def get_defense(name: str) -> DefenseSpec:
    """The registered defense (ConfigError naming the closest one when there is none)."""
    return DEFENSES.get(name)


def list_defenses(pattern: str = "*", *, kind: str | None = None) -> list[str]:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return DEFENSES.names(pattern, where=lambda s: kind in (None, s.kind))


def describe_defense(name: str) -> str:
    """One line: kind, whether it is learned, and what it is (what ``adv info`` prints)."""
    spec = get_defense(name)
    return f"[{spec.kind}{', learned' if spec.learned else ''}] {spec.description}"


def defense_schema(name: str) -> dict[str, Any]:
    """Metadata and every hyperparameter with its type, default and meaning (``adv defend describe``)."""
    spec = get_defense(name)
    return {
        "name": spec.name, "kind": spec.kind, "description": spec.description,
        "learned": spec.learned, "needs_classifier": spec.needs_classifier,
        "params": params_schema(spec.params),
    }


# --- spec strings (grammar shared with the training-loss registry: adv.specs) ----------------
def parse_defense_spec(text: str) -> tuple[str, dict[str, str]]:
    """``"dwt:wavelet=haar,level=1"`` -> ``("dwt", {"wavelet": "haar", "level": "1"})``."""
    spec = StageSpec.parse(text)
    return spec.name, dict(spec.params)


def validate_params(name: str, params: dict[str, Any] | BaseModel | None) -> BaseModel:
    """The defense's params model built from ``params``; errors name the defense and key."""
    return build_params(get_defense(name).params, params, f"defense {name!r}")


def format_defense_spec(name: str, params: BaseModel | dict[str, Any] | None = None) -> str:
    """The canonical spec string: only the values that differ from the defaults."""
    return format_spec(name, validate_params(name, params))


def resolve(spec: str | StageSpec | tuple[str, Any] | None) -> tuple[str, BaseModel]:
    """A spec string, a parsed :class:`adv.specs.StageSpec` or a ``(name, params)`` pair -> ``(name, validated
    params)``."""
    if isinstance(spec, StageSpec):
        return spec.name, validate_params(spec.name, dict(spec.params))
    if isinstance(spec, str):
        return resolve(StageSpec.parse(spec))
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str):
        return spec[0], validate_params(spec[0], spec[1])
    raise ConfigError(f"a defense is a spec string or a (name, params) pair, got {spec!r}")


def create_defense(spec: str | StageSpec | tuple[str, Any], classifier: nn.Module | None = None,
                   data=None) -> nn.Module:
    """Build one defense stage from ``"NAME:k=v,..."``, its parsed :class:`adv.specs.StageSpec` or
    ``(name, params)``.

    Learned stages load ``checkpoint=PATH`` when given (the file's
    architecture parameters are used), are trained on ``data`` (an
    ``ImageData``) when given, and are otherwise returned untrained with
    ``stage.trained == False`` (``Defended`` refuses those for evaluation).
    ``classifier`` is required by feature-space stages and detectors and by
    the U-Net's classification loss.
    """
    name, params = resolve(spec)
    entry = get_defense(name)
    if entry.needs_classifier and classifier is None:
        raise ConfigError(f"defense {name!r} needs the classifier it defends (classifier=...)")
    path = getattr(params, "checkpoint", None)
    payload = read_stage(path) if path else None
    if payload is not None:
        params = _merge_file_params(entry, params, payload, path)
    elif data is not None and hasattr(params, "seed"):
        torch.manual_seed(params.seed)  # the initial weights of a stage trained here are part of the run's seed
    info = StageInfo(name, format_defense_spec(name, params), entry.kind, entry.learned,
                     payload["meta"] if payload is not None else {})
    # a stage trained here holds the caller's classifier fixed and gives it back as it was
    with frozen_classifier(classifier):
        stage = entry.build(params, classifier=classifier, data=None if payload else data, info=info)
    if payload is not None:
        load_stage_weights(stage, payload["state_dict"], path)
        stage.eval()
    return stage


def _merge_file_params(entry: DefenseSpec, params: BaseModel, payload: dict, path) -> BaseModel:
    """The stage file's parameters, plus ``checkpoint``; a conflicting explicit value is an error."""
    accepted = (entry.name, *getattr(entry.params, "accepts_files_of", ()))
    if payload["name"] not in accepted:
        raise CheckpointError(f"{path} holds a {payload['name']!r} stage, not {' or '.join(map(repr, accepted))}")
    known = entry.params.model_fields
    from_file = {k: v for k, v in payload["params"].items() if k in known}
    defaults = entry.params()
    for key in known:
        given = getattr(params, key)
        if key in from_file and given != getattr(defaults, key) and given != from_file[key]:
            raise ConfigError(f"defense {entry.name!r}: {path} was trained with {key}={from_file[key]!r}, "
                              f"the spec says {key}={given!r}")
    return validate_params(entry.name, {**from_file, "checkpoint": str(path)})


# --- stage files -----------------------------------------------------------------------
def save_stage(path: str | os.PathLike, stage: nn.Module, *, meta: dict[str, Any] | None = None) -> Path:
    """Write a learned stage (its spec and state_dict) atomically; frozen classifiers are not saved."""
    name = getattr(stage, "defense_name", None)
    if name is None:
        raise ValueError("save_stage needs a stage built by create_defense (it has no defense_name)")
    params = validate_params(name, getattr(stage, "params", None)).model_dump()
    params.pop("checkpoint", None)
    state = stage.stage_state_dict()
    path = Path(path)
    payload = {
        "format": STAGE_FORMAT, "name": name, "params": params, "meta": meta or {},
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
    }
    with atomic_output(path) as f:
        torch.save(payload, f)
    return path


def read_stage(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of a stage file, checked (``weights_only=True``: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"stage file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickle with code, not a torch file
        raise CheckpointError(f"cannot read stage file {path}: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != STAGE_FORMAT:
        raise CheckpointError(f"{path} is not an adv stage file (no format {STAGE_FORMAT!r})")
    return payload


def load_stage(path: str | os.PathLike, classifier: nn.Module | None = None) -> nn.Module:
    """Rebuild a stage written by ``save_stage`` (pass the classifier it was trained with)."""
    return create_defense((read_stage(path)["name"], {"checkpoint": str(path)}), classifier=classifier)


def load_stage_weights(stage: Stage, state_dict: dict[str, torch.Tensor], path) -> None:
    try:
        stage.load_trained(state_dict)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match stage {stage.defense_spec!r}: "
                              f"{' '.join(str(exc).splitlines()[:3])[:400]}") from None
