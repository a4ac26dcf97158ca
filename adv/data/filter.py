"""Adversarial filtration: a natural-adversarial set built from real, unmodified images.

Hendrycks et al. 2021 ("Natural Adversarial Examples") built ImageNet-A by
keeping the real photos that fixed classifiers get wrong. ``adv data filter``
does the same for any dataset: from a pool of images it keeps those that
**every** given model misclassifies with confidence (softmax probability of
its wrong prediction) at or above ``threshold``. The result is an image
folder with labels and a manifest::

    OUT/images/00000.png ...      the kept images, unmodified (PNG, lossless)
    OUT/labels.csv                file,label (class indices of the source dataset)
    OUT/manifest.json             source, models, threshold, counts, classes, input size

``load_dataset("filtered", root=OUT)`` reads it back; ``fashion-mnist-a`` is
the filtered Fashion-MNIST test split, found in ``--data-dir``,
``$ADV_DATA_DIR/fashion-mnist-a`` or the cache (the error says how to build it).

Shape: images (N, C, H, W) uint8; labels (N,) int64
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from adv.data.base import ImageData, register_dataset
from adv.errors import ConfigError, DataNotFoundError
from adv.progress import progress

MANIFEST = "manifest.json"
FORMAT = "adv-filtered/1"


@dataclass
class FilterResult:
    """Which pool images every model gets wrong, confidently.

    Shape: keep (N,) bool; preds, confidence (num_models, N)
    """

    keep: torch.Tensor
    preds: torch.Tensor
    confidence: torch.Tensor


@torch.no_grad()
def filter_misclassified(models: Sequence[nn.Module], data: ImageData, threshold: float = 0.0,
                         batch_size: int = 256) -> FilterResult:
    """Keep the images that every model misclassifies with P(predicted class) >= ``threshold``."""
    if not models:
        raise ConfigError("adversarial filtration needs at least one model")
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(f"threshold must lie in [0, 1), got {threshold}")
    preds, confs = [], []
    for model in models:
        device = next(model.parameters()).device
        p, c = [], []
        for x, _ in progress(data.batches(batch_size), desc="filtering", total=-(-len(data) // batch_size)):
            prob = model(x.to(device)).softmax(1).cpu()
            c.append(prob.max(1).values)
            p.append(prob.argmax(1))
        preds.append(torch.cat(p))
        confs.append(torch.cat(c))
    preds, confs = torch.stack(preds), torch.stack(confs)
    keep = ((preds != data.labels) & (confs >= threshold)).all(0)
    return FilterResult(keep, preds, confs)


def write_filtered_set(out: str | os.PathLike, data: ImageData, result: FilterResult, *, models: Sequence[str],
                       threshold: float, source: dict | None = None) -> dict:
    """Write the kept images, ``labels.csv`` and ``manifest.json`` into ``out``; returns the manifest."""
    from PIL import Image

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    idx = result.keep.nonzero().flatten().tolist()
    rows = []
    for j, i in enumerate(idx):
        img = data.images[i]
        arr = (img if img.dtype == torch.uint8 else (img.clamp(0, 1) * 255).round().byte()).numpy()
        arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
        name = f"{j:05d}.png"
        Image.fromarray(arr).save(out / "images" / name)
        rows.append((name, int(data.labels[i])))
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "label"])
        writer.writerows(rows)
    kept_labels = data.labels[result.keep]
    manifest = {
        "format": FORMAT, "source": {"dataset": data.name, "split": data.split, **(source or {})},
        "models": list(models), "threshold": threshold, "classes": list(data.classes),
        "input_size": list(data.input_size),
        "counts": {"pool": len(data), "kept": len(idx),
                   "misclassified_per_model": (result.preds != data.labels).sum(1).tolist(),
                   "per_class": torch.bincount(kept_labels, minlength=len(data.classes)).tolist()},
        "pool_index": idx,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def load_filtered_folder(root: str | os.PathLike, n: int | None = None, seed: int = 0) -> ImageData:
    """Read a folder written by :func:`write_filtered_set` (images in their own size and channels)."""
    from PIL import Image

    root = Path(root)
    if not (root / MANIFEST).is_file():
        raise DataNotFoundError(f"{root} has no {MANIFEST}: not a folder written by `adv data filter`")
    manifest = json.loads((root / MANIFEST).read_text())
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise DataNotFoundError(f"{root} holds no images (the filter kept none)")
    images = []
    for row in rows:
        with Image.open(root / "images" / row["file"]) as img:
            arr = np.asarray(img, dtype=np.uint8)
        images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    data = ImageData(torch.from_numpy(np.stack(images)), torch.tensor([int(r["label"]) for r in rows]),
                     tuple(manifest["classes"]), "filtered", "test", source=str(root), extras={"manifest": manifest})
    return data.subset(n, seed)


def load_natural_set(root: str | os.PathLike, label_space: str = "folder",
                     input_size: tuple[int, int, int] | None = None) -> ImageData:
    """A natural-adversarial set: a filtered folder, or an image folder such as ImageNet-A.

    Image folders are resized the standard way for ``input_size`` (short side
    to size/0.875, centre crop), with the 200-class ``logit_mask`` for
    ``label_space="imagenet-a"``/``"imagenet-o"``.
    """
    if (Path(root) / MANIFEST).is_file():
        return load_filtered_folder(root)
    from adv.data.imagefolder import load_imagefolder

    size = int(input_size[-1]) if input_size else 224
    return load_imagefolder("test", root=root, size=size, resize=round(size / 0.875), label_space=label_space)


def _only_test(name: str, split: str) -> None:
    if split != "test":
        raise ConfigError(f"{name} has a single part (filtered from a test pool); use split='test'")


@register_dataset("filtered", "a natural-adversarial set written by `adv data filter` (root=DIR)")
def load_filtered(split, n=None, seed=0, root=None, download=False) -> ImageData:
    _only_test("filtered", split)
    if root is None:
        from adv.data.locate import root_option

        raise DataNotFoundError(f"filtered needs {root_option()}, a folder written by `adv data filter`")
    return load_filtered_folder(root, n, seed)


@register_dataset("fashion-mnist-a", "natural adversarials of the Fashion-MNIST test split "
                                     "(adv data filter output; --data-dir or $ADV_DATA_DIR/fashion-mnist-a)")
def load_fashion_mnist_a(split, n=None, seed=0, root=None, download=False) -> ImageData:
    from adv.data.locate import locate

    _only_test("fashion-mnist-a", split)
    folder = locate("fashion-mnist-a", root, lambda d: (d / MANIFEST).is_file(), None, False)
    data = load_filtered_folder(folder, n, seed)
    data.name = "fashion-mnist-a"
    return data
