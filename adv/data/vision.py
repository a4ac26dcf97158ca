"""MNIST, Fashion-MNIST and CIFAR-10, found locally or downloaded via torchvision."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch

from adv.data.base import ImageData, register_dataset
from adv.data.locate import locate

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not).

    Hand-written because torchvision's MNIST reader wants its own folder
    layout and extracts into it; Debian's files are read-only and gzipped.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    expected = int(np.prod(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != expected:
        raise ValueError(f"{path} is truncated: {body.size} bytes of {expected}")
    return body.reshape(tuple(dims))


def _mnist_like(name, tv_class, classes, split, n, seed, root=None, download=False) -> ImageData:
    img_stem, lbl_stem = _IDX_FILES[split]

    def has_files(d: Path) -> bool:
        return _idx_path(d, img_stem) is not None and _idx_path(d, lbl_stem) is not None

    def fetch(target: Path) -> Path:
        import torchvision

        ds = getattr(torchvision.datasets, tv_class)(str(target), train=split == "train", download=True)
        return Path(ds.raw_folder)

    folder = locate(name, root, has_files, fetch, download)
    images = read_idx(_idx_path(folder, img_stem))
    labels = read_idx(_idx_path(folder, lbl_stem))
    data = ImageData(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        classes, name, split, source=str(folder),
    )
    return data.subset(n, seed)


@register_dataset("mnist", "MNIST digits, 1x28x28, 10 classes (IDX files or torchvision download)")
def load_mnist(split, n=None, seed=0, root=None, download=False) -> ImageData:
    return _mnist_like("mnist", "MNIST", MNIST_CLASSES, split, n, seed, root, download)


@register_dataset(
    "fashion-mnist", "Fashion-MNIST, 1x28x28, 10 classes (Debian dataset-fashion-mnist or torchvision download)"
)
def load_fashion_mnist(split, n=None, seed=0, root=None, download=False) -> ImageData:
    return _mnist_like("fashion-mnist", "FashionMNIST", FASHION_CLASSES, split, n, seed, root, download)


def _cifar_npz(folder: Path, split: str) -> Path | None:
    found = sorted(folder.glob(f"{split}*.npz"))
    return found[0] if found else None


@register_dataset(
    "cifar10",
    "CIFAR-10, 3x32x32, 10 classes (torchvision's cifar-10-batches-py, a {split}*.npz with images/labels, "
    "or torchvision download)",
)
def load_cifar10(split, n=None, seed=0, root=None, download=False) -> ImageData:
    batches = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]

    def has_files(d: Path) -> bool:
        pickled = d / "cifar-10-batches-py"
        return all((pickled / b).is_file() for b in batches) or _cifar_npz(d, split) is not None

    def fetch(target: Path) -> Path:
        import torchvision

        torchvision.datasets.CIFAR10(str(target), train=split == "train", download=True)
        return target

    folder = locate("cifar10", root, has_files, fetch, download)
    npz = _cifar_npz(folder, split)
    if all((folder / "cifar-10-batches-py" / b).is_file() for b in batches):
        xs, ys = [], []
        for b in batches:
            with open(folder / "cifar-10-batches-py" / b, "rb") as f:
                entry = pickle.load(f, encoding="latin1")  # torchvision's format; written by the CIFAR authors
            xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
        images, labels, source = np.concatenate(xs), np.concatenate(ys), folder / "cifar-10-batches-py"
    else:
        with np.load(npz) as z:
            if "images" not in z or "labels" not in z:
                raise ValueError(f"{npz} must hold 'images' (N,32,32,3 uint8) and 'labels'")
            images = np.ascontiguousarray(z["images"].astype(np.uint8).transpose(0, 3, 1, 2))
            labels = z["labels"].astype(np.int64)
        source = npz
    data = ImageData(torch.from_numpy(images), torch.from_numpy(labels), CIFAR10_CLASSES, "cifar10", split, str(source))
    return data.subset(n, seed)
