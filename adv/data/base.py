"""The in-memory dataset every loader returns, and the dataset registry."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from adv.registry import Registry


@dataclass
class ImageData(torch.utils.data.Dataset):
    """Images and integer labels, held in memory.

    ``images`` are uint8 (decoded files, compact) or float32 in [0, 1];
    indexing and ``batches`` always yield float32 in [0, 1].

    Shape:
        images: (N, C, H, W); labels: (N,) int64
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str
    split: str
    source: str = ""
    #: Files that could not be decoded: (path, reason). Never silently dropped.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: Optional per-dataset extras (e.g. the ImageNet-A logit mask).
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return _to_float(self.images[i]), self.labels[i]

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as float32 [0, 1] and the labels."""
        return _to_float(self.images), self.labels

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self), batch_size):
            yield _to_float(self.images[start : start + batch_size]), self.labels[start : start + batch_size]

    def subset(self, n: int | None = None, seed: int = 0) -> "ImageData":
        """A deterministic random subset of ``n`` examples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        idx = subset_indices(len(self), n, seed)
        return ImageData(
            self.images[idx], self.labels[idx], self.classes, self.name, self.split,
            self.source, self.skipped, self.extras,
        )


def subset_indices(total: int, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded random subset (sorted keeps files read in order)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.sort(rng.choice(total, size=n, replace=False)))


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


# --- registry ----------------------------------------------------------------
Loader = Callable[..., ImageData]


@dataclass(frozen=True)
class DatasetEntry:
    load: Loader
    description: str


#: Every dataset loader by name; importing :mod:`adv.data` registers them all.
DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(name: str, description: str):
    def wrap(fn: Loader) -> Loader:
        DATASETS.add(name, DatasetEntry(fn, description))
        return fn

    return wrap


def list_datasets(pattern: str = "*") -> list[str]:
    return DATASETS.names(pattern)


def describe_dataset(name: str) -> str:
    return DATASETS.get(name).description


SPLITS = ("train", "test")


def load_dataset(name: str, split: str = "test", n: int | None = None, seed: int = 0, **kwargs) -> ImageData:
    """Load a registered dataset, optionally a seeded subset of ``n`` examples.

    Common keyword arguments: ``root`` (a folder to search first; ``data_dir`` is the same, as in
    ``adv.benchmark`` and ``--data-dir``; ``~`` is expanded) and ``download`` (allow torchvision downloads).
    Loaders document their own. An ``n`` above the dataset's size warns once and returns all of it.
    """
    entry = DATASETS.get(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n is not None and n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    kwargs = _root_kwarg(kwargs)
    data = entry.load(split=split, n=n, seed=seed, **kwargs)
    if n is not None and n > len(data):
        warnings.warn(f"n={n} is more than the {len(data)} examples of {name} {split} ({data.source or 'bundled'}); "
                      f"using all {len(data)}", UserWarning, stacklevel=2)
    return data


def _root_kwarg(kwargs: dict) -> dict:
    """``data_dir=`` accepted as ``root=`` (one name per place a user meets: CLI, benchmark, config), ``~``
    expanded."""
    kwargs = dict(kwargs)
    if "data_dir" in kwargs:
        data_dir = kwargs.pop("data_dir")
        if kwargs.get("root") is not None and data_dir is not None and kwargs["root"] != data_dir:
            raise ValueError(f"give root= or data_dir= (the same folder), not both: {kwargs['root']!r} vs {data_dir!r}")
        kwargs["root"] = kwargs.get("root") if kwargs.get("root") is not None else data_dir
    if isinstance(kwargs.get("root"), (str, os.PathLike)):
        kwargs["root"] = os.path.expanduser(os.fspath(kwargs["root"]))
    return kwargs
