"""Datasets as ``ray.data.Dataset``s, split into deterministic shards and chunks.

* registered ``adv.data`` sets are loaded in memory on the driver and handed
  to Ray with ``from_blocks``, one block per chunk (so every Ray Data batch is
  exactly one chunk, the unit of seeding);
* ``imagefolder`` (``root/<class>/<image>``, any pyarrow filesystem): files are
  first checked in parallel (``read_binary_files``; undecodable ones are
  skipped and *counted*, since ``read_images`` fails the whole run on one bad
  file), then read with ``read_images(size=, mode=)``;
* ``parquet``: a stored set with ``image`` (C, H, W), ``label`` and ``index``
  columns, read with ``read_parquet``.

File sources arrive in no particular order, so the attack stage regroups
them by chunk (``groupby("chunk").map_groups``).

A ``Layout`` fixes, at a run's first attempt, which examples the run holds
(``index`` 0..n-1), which chunk and shard each belongs to, and which files
were skipped; resumed attempts read it back from ``layout.json``.
"""

from __future__ import annotations

import io
import sys
from typing import Any

import numpy as np
import pyarrow as pa

from adv.data.base import subset_indices
from adv.data.imagefolder import IMAGE_EXTENSIONS
from adv.errors import ConfigError, DataNotFoundError
from adv.runs.layout import Layout
from adv.runs.store import open_filesystem
from jobs.config import DatasetConfig

KEY = ("index", "label", "shard", "chunk")


# --- in-memory sets --------------------------------------------------------------------------
class MemorySource:
    grouped = False

    def __init__(self, cfg: DatasetConfig):
        from adv.data import load_dataset

        self.data = load_dataset(cfg.name, split=cfg.split, n=cfg.n, seed=cfg.seed, root=cfg.root,
                                 download=cfg.download)

    def layout(self, shards: int, chunk_size: int) -> Layout:
        d = self.data
        return Layout.build(len(d), shards, chunk_size, classes=list(d.classes),
                            source=f"{d.name}/{d.split} {d.source}".strip(),
                            skipped=[list(s) for s in d.skipped])

    def dataset(self, layout: Layout, shards: list[int], input_size):
        import ray
        from ray.data.extensions import ArrowTensorArray

        idx = layout.indices(shards)
        images, labels = self.data.images.numpy(), self.data.labels.numpy()
        tables = []
        for c in np.unique(layout.chunk_of(idx)):
            sel = idx[layout.chunk_of(idx) == c]
            tables.append(pa.table({
                "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[sel])),
                "label": labels[sel].astype(np.int64), "index": sel.astype(np.int64),
                "shard": layout.shard_of(sel).astype(np.int64), "chunk": layout.chunk_of(sel).astype(np.int64),
            }))
        # from_blocks, not from_arrow: it computes block metadata on the driver instead of in one remote task
        # per block, so it starts no task workers that would compete with the actor pool's start-up (2.4 s of a
        # 2-core node), and it never re-blocks, which keeps one chunk per block.
        return ray.data.from_blocks(tables)


# --- image folders ---------------------------------------------------------------------------
def _list_image_folder(root: str) -> tuple[list[str], list[int], list[str], Any]:
    import pyarrow.fs as pafs

    fs, base = open_filesystem(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise DataNotFoundError(f"dataset.root: image folder {root} does not exist or is not a folder")
    classes = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(base))
                     if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))
    if not classes:
        raise DataNotFoundError(f"dataset.root: {root} has no class sub-folders (expected <class>/<image>)")
    paths, labels = [], []
    for ci, c in enumerate(classes):
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(f"{base}/{c}"))
                       if i.type == pafs.FileType.File and i.path.lower().endswith(IMAGE_EXTENSIONS))
        paths += files
        labels += [ci] * len(files)
    if not paths:
        raise DataNotFoundError(f"dataset.root: no images under {root}")
    return paths, labels, classes, fs


def check_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Which encoded images decode: ``path``, ``ok``, ``reason`` (the bytes are dropped)."""
    from PIL import Image

    ok, reasons = [], []
    for data in batch["bytes"]:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
            ok.append(True)
            reasons.append("")
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            ok.append(False)
            reasons.append(f"{exc.__class__.__name__}: {exc}")
    return {"path": np.asarray(batch["path"]), "ok": np.array(ok), "reason": np.array(reasons, dtype=object)}


def attach_layout(batch: dict[str, np.ndarray], by_key: dict, key_column: str) -> dict[str, np.ndarray]:
    """Task UDF: adds index/label/shard/chunk from the layout, drops rows of other shards, makes images CHW."""
    keys = [_norm(k) if isinstance(k, str) else k.item() if hasattr(k, "item") else k for k in batch[key_column]]
    keep = np.array([k in by_key for k in keys], dtype=bool)
    meta = np.array([by_key[k] for k, kept in zip(keys, keep) if kept], dtype=np.int64).reshape(-1, 4)
    images = np.asarray(batch["image"])[keep]
    if key_column == "path":  # read_images: (N, H, W[, C]) -> (N, C, H, W)
        images = images[..., None] if images.ndim == 3 else images
        images = images.transpose(0, 3, 1, 2)
    return {"image": np.ascontiguousarray(images), **{k: meta[:, i] for i, k in enumerate(KEY)}}


class ImageFolderSource:
    grouped = True

    def __init__(self, cfg: DatasetConfig):
        self.cfg = cfg
        self.paths, self.labels, self.classes, self.fs = _list_image_folder(cfg.root)

    def layout(self, shards: int, chunk_size: int) -> Layout:
        import ray

        order = subset_indices(len(self.paths), self.cfg.n, self.cfg.seed).tolist() \
            if self.cfg.n is not None and self.cfg.n < len(self.paths) else range(len(self.paths))
        chosen = [self.paths[i] for i in order]
        print(f"[evaluate] checking that {len(chosen)} image(s) decode", file=sys.stderr, flush=True)
        checked = ray.data.read_binary_files(chosen, filesystem=self.fs, include_paths=True) \
            .map_batches(check_images, batch_size=64).take_all()
        status = {r["path"]: (bool(r["ok"]), r["reason"]) for r in checked}
        missing = [p for p in chosen if _norm(p) not in status]
        if missing:
            raise DataNotFoundError(f"image check lost {len(missing)} file(s), first {missing[0]}")
        good = [i for i, p in zip(order, chosen) if status[_norm(p)][0]]
        skipped = [[p, status[_norm(p)][1]] for p in chosen if not status[_norm(p)][0]]
        if not good:
            raise DataNotFoundError(f"none of the {len(chosen)} images under {self.cfg.root} could be decoded")
        return Layout.build(len(good), shards, chunk_size, classes=self.classes, source=self.cfg.root,
                            keys=[self.paths[i] for i in good], labels=[self.labels[i] for i in good],
                            skipped=skipped)

    def dataset(self, layout: Layout, shards: list[int], input_size):
        import ray

        idx = layout.indices(shards)
        paths = [layout.keys[i] for i in idx]
        by_key = {_norm(layout.keys[i]): (int(i), layout.labels[i], int(layout.shard_of(i)), int(layout.chunk_of(i)))
                  for i in idx}
        c, h, w = input_size
        size = tuple(self.cfg.image_size or (h, w))
        ds = ray.data.read_images(paths, filesystem=self.fs, size=size, mode="RGB" if c == 3 else "L",
                                  include_paths=True)
        return ds.map_batches(attach_layout, fn_kwargs={"by_key": by_key, "key_column": "path"})


def _norm(path: str) -> str:
    return path.split("://", 1)[-1]


# --- stored Parquet sets ---------------------------------------------------------------------
class ParquetSource:
    grouped = True

    def __init__(self, cfg: DatasetConfig):
        import pyarrow.dataset as pads
        import ray.data  # noqa: F401  (registers the tensor column type, which records the images' shape)

        self.cfg = cfg
        self.fs, self.path = open_filesystem(cfg.root)
        try:
            dataset = pads.dataset(self.path, filesystem=self.fs, format="parquet")
            names = dataset.schema.names
        except (FileNotFoundError, OSError, pa.ArrowInvalid) as exc:
            raise DataNotFoundError(f"dataset.root: cannot read Parquet at {cfg.root}: {exc}") from None
        need = [c for c in ("image", "label", "index") if c not in names]
        if need:
            raise ConfigError(f"dataset.root: {cfg.root} lacks column(s) {need}; a stored set needs "
                              "image (C, H, W), label and index (jobs.sources.export_dataset writes one)")
        #: The stored images' (C, H, W) (a tensor column's type records it), or None.
        self.input_size = _tensor_shape(dataset.schema.field("image").type)
        table = dataset.to_table(columns=["index", "label"])
        order = np.argsort(table.column("index").to_numpy(), kind="stable")
        self.index = table.column("index").to_numpy()[order]
        self.labels = table.column("label").to_numpy()[order]
        if len(np.unique(self.index)) != len(self.index):
            raise ConfigError(f"dataset.root: {cfg.root} has duplicate values in its index column")

    def layout(self, shards: int, chunk_size: int) -> Layout:
        n_all = len(self.index)
        pick = subset_indices(n_all, self.cfg.n, self.cfg.seed).numpy() \
            if self.cfg.n is not None and self.cfg.n < n_all else np.arange(n_all)
        k = int(self.labels.max()) + 1 if len(self.labels) else 0
        return Layout.build(len(pick), shards, chunk_size, classes=[str(i) for i in range(k)],
                            source=self.cfg.root, keys=self.index[pick].tolist(),
                            labels=self.labels[pick].astype(int).tolist())

    def dataset(self, layout: Layout, shards: list[int], input_size):
        import ray

        idx = layout.indices(shards)
        by_key = {layout.keys[i]: (int(i), layout.labels[i], int(layout.shard_of(i)), int(layout.chunk_of(i)))
                  for i in idx}
        ds = ray.data.read_parquet(self.path, filesystem=self.fs).select_columns(["image", "label", "index"])
        return ds.map_batches(attach_layout, fn_kwargs={"by_key": by_key, "key_column": "index"})


def _tensor_shape(arrow_type) -> tuple[int, ...] | None:
    shape = getattr(arrow_type, "shape", None)
    return tuple(int(v) for v in shape) if shape is not None and len(shape) == 3 else None


def make_source(cfg: DatasetConfig):
    if cfg.name == "imagefolder":
        return ImageFolderSource(cfg)
    if cfg.name == "parquet":
        return ParquetSource(cfg)
    return MemorySource(cfg)


def export_dataset(data, uri: str, rows_per_file: int = 10_000) -> None:
    """Write an ``ImageData`` as a stored set (``image`` (C, H, W), ``label``, ``index``) for ``dataset: parquet``."""
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    fs, path = open_filesystem(uri)
    fs.create_dir(path, recursive=True)
    images, labels = data.images.numpy(), data.labels.numpy()
    for start in range(0, len(labels), rows_per_file):
        sl = slice(start, start + rows_per_file)
        table = pa.table({"image": ArrowTensorArray.from_numpy(np.ascontiguousarray(images[sl])),
                          "label": labels[sl].astype(np.int64),
                          "index": np.arange(start, start + len(labels[sl]), dtype=np.int64)})
        pq.write_table(table, f"{path}/part-{start // rows_per_file:05d}.parquet", filesystem=fs)
