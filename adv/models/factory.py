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
    """``factory(**kwargs)`` with ``weights`` (a state_dict file) loaded strictly, in eval mode."""
    model = import_factory(spec)(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise AdvError(f"model factory {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        state_dict = read_state_dict(weights)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).splitlines()[:3])[:400]
            raise CheckpointError(f"{weights} does not match the module {spec!r} builds: {first}") from None
    return model.eval()
