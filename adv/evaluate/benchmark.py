"""``adv.benchmark``: one call from a user's model and data to a worst-case robust accuracy.

RobustBench's ``benchmark()`` (Croce et al. 2021) for any model and any data:

    import adv
    result = adv.benchmark(model, "cifar10", eps=8/255, n=1000, data_dir="~/data")
    result = adv.benchmark(model, (x, y), eps=8/255)            # tensors or numpy arrays
    result = adv.benchmark(model, loader, eps=0.5, norm="l2")   # a DataLoader (shuffle=False)

It checks the inputs (:mod:`adv.evaluate.inputs`: one-line errors that name
the fix), runs the AutoAttack-style suite on the points still standing
(:mod:`adv.evaluate.suites`), and returns the :class:`EvalResult` with its
95% intervals, per-example masks and sanity flags.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from adv.errors import InputError
from adv.evaluate.inputs import check_data
from adv.evaluate.result import EvalResult


def benchmark(
    model: nn.Module,
    data: Any,
    *,
    eps: float,
    norm: str = "linf",
    n: int | None = None,
    suite: str | None = "standard",
    attacks: Any = (),
    split: str = "test",
    data_dir: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    return_adversarials: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Clean and worst-case robust accuracy of ``model`` on ``data`` under ``suite``.

    ``data``: a registered dataset name (``"mnist"``, ``"cifar10"``; with
    ``split`` and ``data_dir``; ``n`` draws a seeded random subset), an
    ``(x, y)`` pair of tensors or arrays, or a ``DataLoader`` (``n`` takes
    the first n examples of those). ``suite="standard"`` is AutoAttack's
    standard version at ``norm`` (its L2 attacks under ``norm="l2"``);
    ``attacks`` run before the suite, ``suite=None`` runs only them. The
    model must be in eval mode (``model.eval()``): the benchmark never
    changes it. ``return_adversarials`` keeps the final adversarial images
    in ``result.per_example.x_adv`` (memory: one copy of the data).

    Shape: images (N, C, H, W) float in [0, 1]; labels (N,) integers
    """
    from adv.evaluate.protocol import robust_accuracy

    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise InputError("the model is in training mode (dropout and batch-norm statistics would change the "
                         "answers); call model.eval() first")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
        raise InputError(f"n must be a positive integer or None, got {n!r}")
    if suite == "standard" and norm == "l2":
        suite = "l2"  # RobustBench's "standard" threat model under L2
    data = _data(data, n, split, data_dir, seed)
    _warn_normalization(model, data)
    return robust_accuracy(model, data, attacks, eps=eps, norm=norm, suite=suite,
                           batch_size=batch_size, device=device, seed=seed, progress=progress,
                           return_adversarials=return_adversarials)


def _data(data: Any, n: int | None, split: str, data_dir: str | None, seed: int) -> Any:
    """A registered name loaded (a seeded subset of n); other data checked and cut to its first n examples."""
    if isinstance(data, str):
        from adv.data import list_datasets, load_dataset

        if data not in list_datasets():
            raise InputError(f"unknown dataset {data!r}; registered: {', '.join(list_datasets())} (or pass "
                             "(x, y) tensors, numpy arrays or a DataLoader)")
        return load_dataset(data, split=split, n=n, seed=seed, root=data_dir)
    data = check_data(data)
    if n is None:
        return data
    size = len(data[1]) if isinstance(data, tuple) else len(data) if hasattr(data, "subset") else None
    if size is not None and n > size:
        warnings.warn(f"n={n} is more than the {size} examples passed; using all {size}",
                      UserWarning, stacklevel=4)  # -> _data -> benchmark -> the user's call
    if hasattr(data, "subset"):
        return data.subset(n, seed)
    if isinstance(data, tuple):
        return data[0][:n], data[1][:n]
    return _first(data, n)


def _warn_normalization(model: nn.Module, data: Any) -> None:
    """A user's own module that looks like it lacks its input normalization gets a warning at their call."""
    from adv.evaluate.inputs import HINT_EXAMPLES, normalization_hint
    from adv.models.base import ImageClassifier

    if isinstance(model, ImageClassifier):  # adv's own architectures carry their normalization
        return
    if hasattr(data, "batches"):
        first = next(data.batches(HINT_EXAMPLES), None)
    elif isinstance(data, tuple):
        first = data
    else:  # a stream is not read twice
        return
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    hint = first and normalization_hint(model, first[0][:HINT_EXAMPLES].to(device), first[1][:HINT_EXAMPLES].to(device))
    if hint:
        warnings.warn(hint, UserWarning, stacklevel=3)  # -> benchmark -> the user's call


def _first(batches, n: int):
    """The first ``n`` examples of a stream of batches (the last batch cut)."""
    left = n
    for x, y in batches:
        if left <= 0:
            return
        yield x[:left], y[:left]
        left -= len(x)
