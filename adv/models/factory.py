"""Users' own architectures: ``"mypkg.nets:make_net"`` builds the module, ``weights`` fills it.

The CLI (``adv eval --model-factory``) and the Ray job (``model.factory``)
both go through :func:`build_from_factory`, so a model evaluates the same way
on a laptop and on a cluster. The factory is any callable that returns an
``nn.Module`` mapping [0, 1] NCHW images to logits (put normalization inside
it, e.g. ``nn.Sequential(adv.models.Normalize(mean, std), net)``).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Callable

from torch import nn

from adv.errors import AdvError, CheckpointError
from adv.models.checkpoint import read_state_dict


#: State-dict entries a module fills in itself when a file lacks them.
OPTIONAL_SUFFIX = "num_batches_tracked"


def parse_factory(spec: str) -> tuple[str, str]:
    """``"pkg.module:function"`` -> ``("pkg.module", "function")``; AdvError names the expected form."""
    module, sep, attr = str(spec).partition(":")
    if not sep or not module.strip() or not attr.strip() or " " in spec:
        raise AdvError(f"a model factory is 'package.module:function', got {spec!r}")
    return module, attr


def import_factory(spec: str) -> Callable[..., Any]:
    """The callable ``spec`` names, imported from the current ``sys.path`` (the working directory first)."""
    module, attr = parse_factory(spec)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise AdvError(f"cannot import {module!r} for the model factory {spec!r} ({exc}); run from the folder "
                       "that holds it or add that folder to PYTHONPATH") from None
    try:
        fn = functools.reduce(getattr, attr.split("."), mod)
    except AttributeError:
        raise AdvError(f"module {module!r} has no {attr!r} (model factory {spec!r})") from None
    if not callable(fn):
        raise AdvError(f"model factory {spec!r} is a {type(fn).__name__}, not a callable")
    return fn


def build_from_factory(spec: str, weights: str | os.PathLike | None = None,
                       kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``factory(**kwargs)`` with ``weights`` (a state_dict file) loaded strictly, in eval mode.

    A factory that wraps the trained network (``nn.Sequential(Normalize(...), net)`` names its keys
    ``1.conv1.weight``) still loads ``net``'s weights: a prefix is added or stripped when that makes every key
    match (:func:`align_keys`); otherwise the error is one line saying what differs.
    """
    model = import_factory(spec)(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise AdvError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        state_dict = read_state_dict(weights)
        aligned = align_keys(state_dict, list(model.state_dict()))
        if aligned is None:
            raise CheckpointError(f"{weights} does not match the module {spec!r} builds: "
                                  f"{key_mismatch(state_dict, model.state_dict())}")
        try:
            model.load_state_dict(aligned, strict=True)
        except RuntimeError as exc:  # same keys, other shapes
            first = " ".join(str(exc).splitlines()[:3])[:300]
            raise CheckpointError(f"{weights} does not match the module {spec!r} builds: {first}") from None
    return model.eval()


def align_keys(state_dict: dict[str, Any], model_keys: list[str]) -> dict[str, Any] | None:
    """``state_dict`` renamed to ``model_keys`` by adding or stripping one common prefix, or None.

    ``{"conv.weight"}`` loads into a model keyed ``{"1.conv.weight"}`` (the network behind a Normalize) and
    the reverse (weights saved from the wrapper, factory returning the bare network); only a rename that
    makes every key match is accepted, so nothing is loaded into the wrong place. BatchNorm's
    ``num_batches_tracked`` may be absent (older files; ``load_state_dict`` fills it in).
    """
    want = set(model_keys)
    required = {k for k in want if not k.endswith(OPTIONAL_SUFFIX)}

    def fits(keys: set[str]) -> bool:
        return required <= keys <= want

    have = set(state_dict)
    if fits(have):
        return state_dict
    if not have or not required:
        return None
    # the shortest key (ties by name) on each side correspond under any one-prefix rename
    probe_want, probe_have = (min(keys, key=lambda k: (len(k), k)) for keys in (required, have))
    if probe_want.endswith(probe_have):  # add a prefix
        prefix = probe_want[: len(probe_want) - len(probe_have)]
        if fits({prefix + k for k in have}):
            return {prefix + k: v for k, v in state_dict.items()}
    if probe_have.endswith(probe_want):  # strip one
        prefix = probe_have[: len(probe_have) - len(probe_want)]
        if all(k.startswith(prefix) for k in have) and fits({k[len(prefix):] for k in have}):
            return {k[len(prefix):]: v for k, v in state_dict.items()}
    return None


def key_mismatch(state_dict: dict[str, Any], model_state: dict[str, Any]) -> str:
    """One short line: how many keys are missing and unexpected, with the first of each and the likely fix."""
    have = set(state_dict)
    want = {k for k in model_state if not k.endswith(OPTIONAL_SUFFIX) or k in have}
    missing, unexpected = sorted(want - have), sorted(have - want)
    parts = []
    if missing:
        parts.append(f"{len(missing)} of its {len(want)} keys missing from the file (first {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys in the file (first {unexpected[0]!r})")
    return ("; ".join(parts) + "; the factory must return the architecture the weights were saved from "
            "(normalization may wrap it: nn.Sequential(adv.models.Normalize(mean, std), net))")
