"""Where dataset files are looked for, in order, and the error when none has them.

1. the explicit ``root`` argument (``--data-dir`` on the CLI);
2. ``$ADV_DATA_DIR``;
3. known system locations (Debian's ``dataset-fashion-mnist`` package);
4. a torchvision download into ``$ADV_CACHE_DIR`` (default ``~/.cache/adv``),
   only when the caller allows downloads.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

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

#: The fix for each dataset; ``{root}`` and ``{download}`` are spelled for the caller (:func:`spelled`).
FIXES: dict[str, str] = {
    "fashion-mnist": "apt-get install -y dataset-fashion-mnist, or pass {download} (needs internet)",
    "mnist": "pass {root} with the four MNIST IDX .gz files, or pass {download} (needs internet)",
    "cifar10": "pass {root} holding cifar-10-batches-py/, or pass {download} (needs internet)",
    "fashion-mnist-a": ("build it with `adv data filter --dataset fashion-mnist --split test --checkpoint M1 "
                        "--checkpoint M2 --out $ADV_DATA_DIR/fashion-mnist-a` (models not the one you evaluate)"),
}


#: How the caller names the data folder and the download switch: Python keywords unless a front end says.
_SPELLING: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "adv_data_spelling", default=("root=DIR (or data_dir=DIR)", "download=True"))


@contextlib.contextmanager
def spelled(root: str, download: str) -> Iterator[None]:
    """Inside the block, errors name the data folder and downloads as ``root`` / ``download`` (the CLI says
    ``--data-dir DIR`` / ``--download``, a job config ``dataset.root``); Python keywords elsewhere."""
    token = _SPELLING.set((root, download))
    try:
        yield
    finally:
        _SPELLING.reset(token)


def root_option() -> str:
    """How the caller names the data folder (``--data-dir DIR`` on the CLI, ``root=DIR`` in Python)."""
    return _SPELLING.get()[0]


def fix(name: str) -> str:
    """The fix for a missing ``name``, in the caller's spelling."""
    root, download = _SPELLING.get()
    return FIXES[name].format(root=root, download=download)


def cache_dir() -> Path:
    return Path(os.environ.get("ADV_CACHE_DIR", Path.home() / ".cache" / "adv")).expanduser()


def candidate_dirs(name: str, root: str | os.PathLike | None) -> list[Path]:
    roots: list[Path] = []
    if root:
        roots.append(Path(root).expanduser())
    if os.environ.get("ADV_DATA_DIR"):
        roots.append(Path(os.environ["ADV_DATA_DIR"]).expanduser())
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
    if root is not None and not Path(root).expanduser().exists():
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
                f"({exc.__class__.__name__}: {exc}). Searched: {_fmt(searched)}. Fix: {fix(name)}"
            ) from None
    raise DataNotFoundError(
        f"{name}: not found. Searched: {_fmt(searched)}. Fix: {fix(name)}"
    )


def _fmt(paths: Iterable[Path]) -> str:
    return ", ".join(str(p) for p in paths)
