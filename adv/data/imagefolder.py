"""ImageNet-style image folders (``<wnid>/*.jpg``) or a CSV of ``file,label``.

Corrupt or unreadable files are skipped and *counted*: they end up in
``ImageData.skipped`` with the reason, never fatal, never silently dropped.

ImageNet-A / ImageNet-O hold 200 of the 1000 ImageNet classes. With
``label_space="imagenet-a"`` (or ``"imagenet-o"``) labels are ImageNet-1k
indices and ``extras["logit_mask"]`` is a boolean (1000,) mask; evaluating a
1000-class model on those sets the standard way (Hendrycks et al. 2021) means
taking the argmax over the masked logits (``mask_logits``).
"""

from __future__ import annotations

import csv
import warnings
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from adv.data.base import ImageData, register_dataset, subset_indices
from adv.errors import DataNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
LABEL_SPACES = ("folder", "imagenet1k", "imagenet-a", "imagenet-o")


@lru_cache(maxsize=None)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in torchvision's class-index order."""
    text = resources.files("adv.data").joinpath("wnids/imagenet1k.tsv").read_text()
    return tuple(line.split("\t", 1)[0] for line in text.splitlines() if line)


@lru_cache(maxsize=None)
def subset_wnids(label_space: str) -> tuple[str, ...]:
    """The 200 WordNet ids of ImageNet-A or ImageNet-O."""
    fname = {"imagenet-a": "imagenet_a.txt", "imagenet-o": "imagenet_o.txt"}[label_space]
    return tuple(resources.files("adv.data").joinpath(f"wnids/{fname}").read_text().split())


def subset_to_1k(label_space: str) -> list[int]:
    """ImageNet-1k index of each of the 200 subset classes, in sorted-wnid order."""
    index = {w: i for i, w in enumerate(imagenet_wnids())}
    return [index[w] for w in sorted(subset_wnids(label_space))]


def logit_mask(label_space: str) -> torch.Tensor:
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[subset_to_1k(label_space)] = True
    return mask


def mask_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits with classes outside ``mask`` set to -inf, so argmax stays in the subset."""
    return logits.masked_fill(~mask.to(logits.device), float("-inf"))


def _list_folder(root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataNotFoundError(f"{root} has no class sub-folders (expected <class>/<image> files)")
    items = [
        (p, c)
        for c in classes
        for p in sorted((root / c).iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    return items, classes


def _list_csv(csv_path: Path) -> list[tuple[Path, str]]:
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"file", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path} needs a header with 'file' and 'label' columns, got {reader.fieldnames}")
        rows = list(reader)
    base = csv_path.parent
    images_dir = base / "images"
    items = []
    for row in rows:
        p = Path(row["file"])
        if not p.is_absolute():
            p = (images_dir / p) if (images_dir / p).exists() or not (base / p).exists() else base / p
        items.append((p, row["label"].strip()))
    return items


def decode_image(path: Path, size: int, resize: int | None) -> np.ndarray:
    """Decode, convert to RGB, resize the short side to ``resize`` and center-crop ``size``.

    Returns uint8 (3, size, size). Raises OSError/ValueError on corrupt files.
    """
    from torchvision.transforms import functional as TF

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.load()
    img = TF.resize(img, resize or size, antialias=True)
    img = TF.center_crop(img, [size, size])
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


@register_dataset(
    "imagefolder",
    "image folder <class>/<img> or a CSV file,label (root=...); size/resize center-crop; "
    "label_space=imagenet-a|imagenet-o for the 200-class subsets",
)
def load_imagefolder(
    split, n=None, seed=0, root=None, download=False, size: int = 224, resize: int | None = 256,
    label_space: str = "folder", csv_file: str | None = None,
) -> ImageData:
    if root is None:
        from adv.data.locate import root_option

        raise ValueError(f"imagefolder needs {root_option()} (a folder of class folders, or a folder with labels.csv)")
    if label_space not in LABEL_SPACES:
        raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {label_space!r}")
    if size < 1 or (resize is not None and resize < size):
        raise ValueError(f"need 1 <= size <= resize, got size={size}, resize={resize}")
    root = Path(root)
    if not root.exists():
        raise DataNotFoundError(f"image folder {root} does not exist")
    csv_path = Path(csv_file) if csv_file else (root if root.suffix == ".csv" else root / "labels.csv")
    if csv_path.is_file():
        items = _list_csv(csv_path)
        classes, labels = _csv_labels(items, label_space)
    else:
        items, folder_classes = _list_folder(root)
        classes, labels = _folder_labels(items, folder_classes, label_space)
    if not items:
        raise DataNotFoundError(f"no images found under {root}")
    order = subset_indices(len(items), n, seed).tolist() if n is not None and n < len(items) else range(len(items))
    images, kept, skipped = [], [], []
    for i in order:
        path = items[i][0]
        try:
            images.append(decode_image(path, size, resize))
            kept.append(labels[i])
        except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombWarning) as exc:
            skipped.append((str(path), f"{exc.__class__.__name__}: {exc}"))
    if skipped:
        warnings.warn(f"imagefolder: skipped {len(skipped)} unreadable image(s) under {root}, first: {skipped[0]}")
    if not images:
        raise DataNotFoundError(f"none of the {len(order)} images under {root} could be decoded")
    extras = {"label_space": label_space}
    if label_space in ("imagenet-a", "imagenet-o"):
        extras["logit_mask"] = logit_mask(label_space)
    return ImageData(
        torch.from_numpy(np.stack(images)), torch.tensor(kept, dtype=torch.long), tuple(classes),
        "imagefolder", split, source=str(root), skipped=skipped, extras=extras,
    )


def _folder_labels(items, folder_classes, label_space):
    if label_space == "folder":
        index = {c: i for i, c in enumerate(folder_classes)}
        return folder_classes, [index[c] for _, c in items]
    wnids = imagenet_wnids()
    index = {w: i for i, w in enumerate(wnids)}
    allowed = set(wnids) if label_space == "imagenet1k" else set(subset_wnids(label_space))
    unknown = sorted(set(folder_classes) - allowed)
    if unknown:
        raise ValueError(f"folders {unknown[:5]} are not {label_space} WordNet ids")
    return list(wnids), [index[c] for _, c in items]


def _csv_labels(items, label_space):
    raw = [lbl for _, lbl in items]
    if all(lbl.lstrip("-").isdigit() for lbl in raw):
        labels = [int(lbl) for lbl in raw]
        if label_space == "folder":
            k = max(labels) + 1
            return [str(i) for i in range(k)], labels
        return list(imagenet_wnids()), labels
    names = sorted(set(raw))
    return _folder_labels(items, names, label_space)
