"""The driver's check before an evaluation starts: build the models once and score a few inputs.

A config error (a missing stage file, a dataset the model does not fit, a defense that cannot produce the asked
features) surfaces here as one ``ConfigError`` line, before any worker starts; the model checks of
:mod:`adv.evaluate.checks` run on a few real examples.
"""

from __future__ import annotations

import torch

from adv.errors import AdvError, ConfigError
from adv.runs.rows import NONE
from adv.evaluate.worker import Plan


def preflight(loader, plan: Plan, data=None, size=None) -> tuple[tuple[int, ...], list[dict]]:
    """Build the models once and score a few inputs, so config errors surface here, clearly.

    ``size``: the images' (C, H, W) when the source knows it without ``data`` (a Parquet set).
    Returns the model's input size and the model checks of :mod:`adv.evaluate.checks` (softmax
    outputs, randomness, zero input gradients of the attacked model) on up to 16 real examples.
    """
    from adv.evaluate.checks import check_outputs, check_zero_gradients
    from adv.evaluate.worker import Scorer

    try:
        scorer = Scorer(loader, plan, device="cpu")
    except (AdvError, ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"model/defenses: {exc}") from None
    model_size = input_size(scorer.classifier, data, size)
    if data is not None:
        if tuple(data.input_size) != model_size:
            raise ConfigError(f"dataset: images are {'x'.join(map(str, data.input_size))} but the model expects "
                              f"{'x'.join(map(str, model_size))}")
        k = getattr(scorer.classifier, "num_classes", None) or count_outputs(scorer.classifier, data)
        if data.num_classes > k:
            raise ConfigError(f"dataset: {data.num_classes} classes but the model has {k}")
        x, y = data.tensors()
        x, y = x[:16], y[:16]
    else:
        x, y = torch.rand(2, *model_size), torch.zeros(2, dtype=torch.long)
    checks = []
    for label in scorer.labels():
        try:
            scorer.score(label, x, y, None)
        except (AdvError, ValueError, NotImplementedError, AttributeError) as exc:
            raise ConfigError(f"defenses: {label!r} cannot be evaluated with features {list(plan.features)}: "
                              f"{exc}") from None
        if data is None:
            continue
        target = scorer.classifier if label == NONE else scorer.defenses[label].attack_target
        flags = check_outputs(scorer.model(label), x) + check_zero_gradients(target, x, y)
        checks += [{"flag": f.code, "where": label, "detail": f.message} for f in flags]
    return model_size, checks


def input_size(classifier, data, stored=None) -> tuple[int, ...]:
    """The registry's input size; a factory's module without one takes the in-memory dataset's, or a Parquet
    set's stored image shape (``stored``)."""
    size = getattr(classifier, "input_size", None)
    if size is not None:
        return tuple(size)
    if data is None and stored is not None:
        return tuple(stored)
    if data is None:
        raise ConfigError("model.factory: the module has no input_size attribute (C, H, W), which file datasets "
                          "need to size the images; set one on the module or use a registered dataset")
    return tuple(data.input_size)


def count_outputs(classifier, data) -> int:
    """The classifier's number of outputs, from two of ``data``'s images (checked: logits, not probabilities)."""
    from adv.evaluate.inputs import check_model

    x, y = next(data.batches(2))
    try:
        check_model(classifier, x, y)
    except AdvError as exc:
        raise ConfigError(f"model.factory: {exc}") from None
    with torch.no_grad():
        return int(classifier(x).shape[1])
