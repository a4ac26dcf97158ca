"""No tuning on the test set: the validation subset is drawn from what the test subset leaves.

The *test* subset is the ordinary seeded subset ``load_dataset(name, split, n,
seed)`` (the one ``adv eval --n N --seed S`` and ``jobs.evaluate`` use), so
the bundle's final numbers are reproducible with ``adv eval --bundle``. The
*validation* subset is a seeded draw from the remaining indices of the same
split: disjoint by construction, and checked again before any trial runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from adv.data.base import ImageData, subset_indices
from adv.errors import ConfigError


@dataclass(frozen=True)
class Split:
    dataset: str
    split: str
    total: int
    test: np.ndarray
    validation: np.ndarray
    test_seed: int
    validation_seed: int

    def describe(self, which: str) -> str:
        """``fashion-mnist test[n=300,seed=0]`` / ``... validation[n=200,seed=1, disjoint from test]``."""
        if which == "test":
            return f"{self.dataset} {self.split}[n={len(self.test)},seed={self.test_seed}]"
        return (f"{self.dataset} {self.split} validation[n={len(self.validation)},seed={self.validation_seed}, "
                f"disjoint from {self.describe('test')}]")

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "split": self.split, "total": self.total,
                "test": {"n": len(self.test), "seed": self.test_seed, "sha256": index_digest(self.test)},
                "validation": {"n": len(self.validation), "seed": self.validation_seed,
                               "sha256": index_digest(self.validation), "indices": self.validation.tolist()}}


def index_digest(idx: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(idx, np.int64).tobytes()).hexdigest()


def make_split(dataset: str, split: str, total: int, n_test: int, test_seed: int, n_val: int, val_seed: int) -> Split:
    """Disjoint test and validation indices of a split of ``total`` examples."""
    if n_test + n_val > total:
        raise ConfigError(f"data: test n={n_test} + validation n={n_val} exceed the {total} examples of "
                          f"{dataset}/{split}")
    test = subset_indices(total, n_test, test_seed).numpy() if n_test < total else np.arange(total)
    rest = np.setdiff1d(np.arange(total), test)
    pick = np.random.default_rng(val_seed).choice(len(rest), size=n_val, replace=False)
    validation = np.sort(rest[pick])
    check_disjoint(test, validation)
    return Split(dataset, split, total, test, validation, test_seed, val_seed)


def check_disjoint(test: np.ndarray, validation: np.ndarray) -> None:
    shared = np.intersect1d(test, validation)
    if len(shared):
        raise ConfigError(f"data: the validation subset shares {len(shared)} images with the test subset "
                          f"(e.g. index {int(shared[0])}); tuning on test images is refused")


def take(data: ImageData, idx: np.ndarray) -> ImageData:
    """The examples ``idx`` of a full split, as a new ``ImageData``."""
    import torch

    i = torch.as_tensor(np.asarray(idx, np.int64))
    return ImageData(data.images[i], data.labels[i], data.classes, data.name, data.split, data.source,
                     data.skipped, data.extras)


def load_split(d, store) -> tuple[ImageData, Split]:
    """The full split of the sweep's ``data`` config and its disjoint subsets, recorded in ``store``'s split.json
    (checked against a resumed run's)."""
    from adv.data import load_dataset

    full = load_dataset(d.name, split=d.split, root=d.root, download=d.download)
    split = make_split(d.name, d.split, len(full), d.test.n, d.test.seed, d.validation.n, d.validation.seed)
    if store.exists("split.json") and store.read_json("split.json") != split.to_json():
        raise ConfigError(f"data: {store.uri} was run with other subsets (split.json differs); use another name")
    store.write_json("split.json", split.to_json())
    return full, split
