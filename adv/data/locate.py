"""Where dataset files are looked for, in order, and the error when none has them.

1. the explicit ``root`` argument (``--data-dir`` on the CLI);
2. ``$ADV_DATA_DIR``;
3. known system locations (Debian's ``dataset-fashion-mnist`` package);
4. a torchvision download into ``$ADV_CACHE_DIR`` (default ``~/.cache/adv``),
   only when the caller allows downloads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from adv.errors import DataNotFoundError

SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist",),
    "mnist": ("/usr/share/datasets/mnist",),
    "cifar10": (),
    "fashion-mnist-a": (),
}

#: Sub-folders tried under each search root, so one data dir can hold every set.
SUBDIRS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("", "fashion-mnist", "FashionMNIST/raw", "fashion_mnist"),
    "mnist": ("", "mnist", "MNIST/raw"),
    "cifar10": ("", "cifar10", "cifar-10"),
    "fashion-mnist-a": ("fashion-mnist-a", ""),
}

FIXES: dict[str, str] = {
    "fashion-mnist": "apt-get install -y dataset-fashion-mnist, or pass --download (needs internet)",
    "mnist": "pass --data-dir DIR with the four MNIST IDX .gz files, or pass --download (needs internet)",
    "cifar10": "pass --data-dir DIR holding cifar-10-batches-py/, or pass --download (needs internet)",
    "fashion-mnist-a": ("build it with `adv data filter --dataset fashion-mnist --split test --checkpoint M1 "
                        "--checkpoint M2 --out $ADV_DATA_DIR/fashion-mnist-a` (models not the one you evaluate)"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("ADV_CACHE_DIR", Path.home() / ".cache" / "adv"))


def candidate_dirs(name: str, root: str | os.PathLike | None) -> list[Path]:
    roots: list[Path] = []
    if root:
        roots.append(Path(root))
    if os.environ.get("ADV_DATA_DIR"):
        roots.append(Path(os.environ["ADV_DATA_DIR"]))
    roots.extend(Path(p) for p in SYSTEM_DIRS.get(name, ()))
    roots.append(cache_dir())
    out: list[Path] = []
    for r in roots:
        for sub in SUBDIRS.get(name, ("",)):
            d = r / sub if sub else r
            if d not in out:
                out.append(d)
    return out


def locate(
    name: str,
    root: str | os.PathLike | None,
    has_files: Callable[[Path], bool],
    download: Callable[[Path], Path] | None,
    allow_download: bool,
) -> Path:
    """The first candidate folder for which ``has_files`` is true, else download, else a clear error."""
    if root is not None and not Path(root).exists():
        raise DataNotFoundError(f"data dir {root} does not exist")
    searched = candidate_dirs(name, root)
    for d in searched:
        if d.is_dir() and has_files(d):
            return d
    if allow_download and download is not None:
        target = cache_dir()
        try:
            return download(target)
        except Exception as exc:  # URLError, socket errors, checksum failures
            raise DataNotFoundError(
                f"{name}: not found locally and the torchvision download into {target} failed "
                f"({exc.__class__.__name__}: {exc}). Searched: {_fmt(searched)}. Fix: {FIXES[name]}"
            ) from None
    raise DataNotFoundError(
        f"{name}: not found. Searched: {_fmt(searched)}. Fix: {FIXES[name]}"
    )


def _fmt(paths: Iterable[Path]) -> str:
    return ", ".join(str(p) for p in paths)
