"""A finished ``jobs.evaluate`` run read back: its config, layout, rows, and the stored adversarial set.

The one reader of the run folder (:mod:`adv.runs.store` writes it,
docs/parquet-schema.md describes it). Every file read is checked against the
row schema (:func:`adv.runs.rows.check_schema`). The stored adversarial
set is the undefended classifier's clean and non-adaptive rows
(:data:`REUSABLE`): what a new defense is scored on without attacking again.

Read with pyarrow alone: ``adv`` never imports Ray, so a tensor column arrives
as its list storage with the shape in the field's extension metadata (or as
Ray's extension type, when the process imported Ray).

Shape: images (N, C, H, W) float32 in [0, 1] (uint8 scaled); labels (N,) int64
"""

from __future__ import annotations

import io
import json
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from adv.errors import ConfigError, DataNotFoundError
from adv.runs.layout import Layout
from adv.runs.rows import NONE, SCALAR_COLUMNS, check_schema
from adv.runs.store import RunStore


def reusable(col=pc.field):
    """The stored adversarial set's predicate: rows of the undefended classifier on the clean and non-adaptive
    tracks. ``col``: the column constructor of the expression language (pyarrow's by default; Ray Data's
    ``ray.data.expressions.col`` for a Ray filter)."""
    return (col("defense") == NONE) & (col("track") != "adaptive")


REUSABLE = reusable()
#: The file a stored set generated in one process is kept in (:func:`adv.tuning.trials.save_rows`).
IN_PROCESS_ROWS = "rows.npz"


def to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Every column as numpy; tensor columns as (N, *shape) arrays."""
    return {name: _column(table, name) for name in table.column_names}


def _column(table: pa.Table, name: str) -> np.ndarray:
    field, col = table.schema.field(name), table.column(name).combine_chunks()
    storage = col.storage if isinstance(col, pa.ExtensionArray) else col
    if not (pa.types.is_list(storage.type) or pa.types.is_large_list(storage.type)
            or pa.types.is_fixed_size_list(storage.type)):
        return col.to_numpy(zero_copy_only=False)
    # hand-decoded: Ray's tensor type is registered only where Ray is imported, which adv never does
    raw = (field.metadata or {}).get(b"ARROW:extension:metadata")
    shape = json.loads(raw) if raw else list(field.type.shape)
    return np.asarray(storage.flatten().to_numpy(zero_copy_only=False)).reshape(len(storage), *shape)


class StoredRun:
    """The run folder at ``uri`` (a local path or a pyarrow URI), read only."""

    def __init__(self, uri: str):
        self.store = RunStore(uri)
        self.uri = uri

    # --- what the run is -------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The run's config as stored in ``run.json`` (validated by the job that reads it)."""
        return self.store.read_json("run.json")["config"]

    def base_config(self) -> dict[str, Any]:
        """The config that generated the stored adversarials (a reuse run's is its source run's)."""
        config = self.config
        return StoredRun(config["reuse_from"]).base_config() if config.get("reuse_from") else config

    @property
    def layout(self) -> Layout:
        return Layout(**self.store.read_json("layout.json"))

    def check_reusable(self, key: str = "reuse_from") -> None:
        """A finished run with stored images, else one line naming ``key``."""
        if not self.store.exists("run.json") or not self.store.exists("layout.json"):
            raise ConfigError(f"{key}: {self.uri} is not a run folder (no run.json/layout.json)")
        layout = self.layout
        done = self.store.finished(layout.shards)
        if len(done) < layout.shards:
            raise ConfigError(f"{key}: {self.uri} is unfinished ({len(done)}/{layout.shards} shards); "
                              "rerun it to completion first")
        if not self.base_config().get("store_images", True):
            raise ConfigError(f"{key}: {self.uri} was run with store_images: false; it has no images to reuse")

    def shard_paths(self, shards: list[int] | None = None) -> list[str]:
        """The shard files (of ``shards``, default every shard file in the folder)."""
        if shards is not None:
            return self.store.shard_paths(shards)
        if not self.store.exists("shards"):
            return []
        infos = self.store.fs.get_file_info(pafs.FileSelector(self.store.path("shards")))
        return sorted(i.path for i in infos if i.base_name.startswith("shard-") and i.base_name.endswith(".parquet"))

    # --- rows --------------------------------------------------------------------------------
    def read(self, shards: list[int] | None = None, columns: list[str] | None = None,
             where: pc.Expression | None = None) -> dict[str, np.ndarray]:
        """The rows of ``shards`` (default all), ``columns`` (default all), kept where ``where`` holds."""
        tables = []
        for path in self.shard_paths(shards):
            check_schema(pq.read_schema(path, filesystem=self.store.fs), path, required=tuple(columns or ()))
            table = pq.read_table(path, filesystem=self.store.fs, columns=columns)
            tables.append(table if where is None else table.filter(where))
        if not tables:
            raise DataNotFoundError(f"{self.uri} holds no shards/shard-*.parquet (a jobs.evaluate run folder)")
        return to_numpy(pa.concat_tables(tables))

    def report_rows(self, examples: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """What the report reads: every row's scalar columns (+ Grad-CAM maps), and every column of the
        first ``examples`` examples."""
        shards = list(range(self.layout.shards))
        names = self.store.schema(shards[0]).names
        rows = self.read(shards, [c for c in (*SCALAR_COLUMNS, "cam") if c in names])
        return rows, self.read([0], where=pc.field("index") < examples)

    def reusable_chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """The stored adversarial set (:data:`REUSABLE`), one chunk at a time, one shard in memory at a time."""
        if self.store.exists(IN_PROCESS_ROWS):  # generated in one process (adv.tuning.trials.generate_stored)
            yield from reusable_chunks(load_rows(self.store.read_bytes(IN_PROCESS_ROWS)))
            return
        for k in range(self.layout.shards):
            yield from reusable_chunks(self.read([k], where=REUSABLE))

    def pairs(self, attack_key: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The clean images and the non-adaptive adversarials of one grid point (``attack_key``; default the
        first), paired by example."""
        columns = ["index", "label", "defense", "track", "attack_key", "image"]
        paths = self.shard_paths()
        missing = [c for c in columns if paths and c not in pq.read_schema(paths[0], filesystem=self.store.fs).names]
        if missing:
            raise DataNotFoundError(f"{self.uri}: the stored rows lack {missing} (run with store_images: true)")
        cols = self.read(columns=columns, where=pc.field("defense") == NONE)
        attacked = cols["track"] == "non-adaptive"
        keys = sorted(set(cols["attack_key"][attacked].tolist()))
        if not keys:
            raise DataNotFoundError(f"{self.uri} has no non-adaptive adversarial rows")
        key = attack_key or keys[0]
        if key not in keys:
            raise DataNotFoundError(f"{self.uri} has no attack_key {key!r}; it has {keys}")
        clean_row = {int(i): r for r, i in enumerate(cols["index"]) if cols["track"][r] == "clean"}
        adv_rows = [r for r in np.flatnonzero(attacked & (cols["attack_key"] == key))
                    if int(cols["index"][r]) in clean_row]
        clean = [clean_row[int(cols["index"][r])] for r in adv_rows]
        images, labels = cols["image"], cols["label"][adv_rows].astype(np.int64)
        return _float(images[clean]), _float(images[adv_rows]), torch.from_numpy(labels)


def reusable_chunks(rows: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """The :data:`REUSABLE` rows of ``rows``, one chunk at a time (what a stored trial scores)."""
    keep = (rows["defense"] == NONE) & (rows["track"] != "adaptive")
    rows = {k: v[keep] for k, v in rows.items()}
    for c in np.unique(rows["chunk"]):
        sel = rows["chunk"] == c
        yield {k: v[sel] for k, v in rows.items()}


def save_rows(rows: dict[str, np.ndarray]) -> bytes:
    """``.npz`` bytes of result rows (string columns as fixed-width unicode: no pickles), the in-process set."""
    buf = io.BytesIO()
    np.savez(buf, **{k: v.astype(str) if v.dtype == object else v for k, v in rows.items()})
    return buf.getvalue()


def load_rows(data: bytes) -> dict[str, np.ndarray]:
    """The rows of :func:`save_rows` bytes."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_stored_pairs(run_dir: str, attack_key: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:meth:`StoredRun.pairs` of the run at ``run_dir`` (the stored set learned stages and losses train on)."""
    return StoredRun(run_dir).pairs(attack_key)


def _float(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0))
