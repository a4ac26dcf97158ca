"""The sweep's checks on the driver before any trial: the user's model, its outputs, a reused stored set.

Each is one ``ConfigError`` line naming the key. ``cfg`` is ``jobs.tune``'s validated ``TuneConfig``.
"""

from __future__ import annotations

import os

import numpy as np

from adv.errors import AdvError, ConfigError
from adv.evaluate.preflight import count_outputs
from adv.runs.store import RunStore
from adv.runs.stored import StoredRun
from adv.evaluate.worker import ModelLoader
from adv.specs import absolute_path
from adv.tuning.splits import Split, check_disjoint


def classifier_kwargs(cfg) -> dict:
    """The undefended classifier as ``ModelLoader`` keywords: the adv checkpoint, or the user's factory."""
    if cfg.model is None:
        return {"checkpoint": absolute_path(cfg.checkpoint)}
    return {"factory": cfg.model.factory, "weights": absolute_path(cfg.model.weights) if cfg.model.weights else None}


def check_model(cfg) -> None:
    """A factory model is imported and built once on the driver before Ray starts: an unknown module, a
    missing weights file or weights of another architecture is one line naming the key."""
    from adv.cli.common import factory_on_path
    from adv.models.factory import build_from_factory

    if cfg.model is None:
        return
    weights = cfg.model.weights
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(f"model.weights: file not found: {weights}")
    try:
        factory_on_path(cfg.model.factory)  # trials import it from the driver's sys.path (or the job's working dir)
        build_from_factory(cfg.model.factory, weights)
    except AdvError as exc:
        raise ConfigError(f"model.factory: {exc}") from None


def check_outputs(cfg, data) -> None:
    """A factory model's logits cover the dataset's classes (two images through it, before any trial)."""
    if cfg.model is None:
        return
    k = count_outputs(ModelLoader(**classifier_kwargs(cfg)).classifier()[0], data)
    if data.num_classes > k:
        raise ConfigError(f"model.factory: the module has {k} outputs but {cfg.data.name} has "
                          f"{data.num_classes} classes")


def check_stored(run: str, split: Split) -> None:
    """A reused ``jobs.evaluate`` run must have been made on this sweep's validation subset."""
    stored = StoredRun(run)
    if not stored.store.exists("run.json"):
        raise ConfigError(f"stored.run: {run} is not a jobs.evaluate run folder (no run.json)")
    dataset = stored.config.get("dataset") or {}
    root = dataset.get("root") if dataset.get("name") == "parquet" else None
    marker = RunStore(root.rstrip("/").rsplit("/", 1)[0]) if root and root.rstrip("/").endswith("/validation") else None
    if marker is None or not marker.exists("validation.json"):
        raise ConfigError(f"stored.run: {run} was not made on a validation subset written by jobs.tune; "
                          "tuning on its images could tune on the test set")
    made = marker.read_json("validation.json")
    if made["validation"]["sha256"] != split.to_json()["validation"]["sha256"]:
        raise ConfigError(f"stored.run: {run} was made on another validation subset than data.validation")
    check_disjoint(split.test, np.asarray(made["validation"]["indices"]))
