"""Clean/adversarial pairs read back from a ``jobs.evaluate`` run (docs/parquet-schema.md).

Read with pyarrow alone (``adv`` never imports Ray): without Ray's extension
types registered, a tensor column arrives as its storage, a list of values,
and its shape is in the field's extension metadata.

Shape: x, x_adv (N, C, H, W) float32 in [0, 1]; y (N,) int64
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from adv.errors import DataNotFoundError

COLUMNS = ["index", "label", "defense", "track", "attack_key", "image"]


def _tensor_column(table, name: str) -> np.ndarray:
    field = table.schema.field(name)
    col = table.column(name).combine_chunks()
    if hasattr(col, "storage"):  # Ray registered the extension type in this process
        col = col.storage
    meta = field.metadata or {}
    raw = meta.get(b"ARROW:extension:metadata")
    shape = json.loads(raw) if raw else list(field.type.shape)
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False)).reshape(len(col), *shape)


def read_stored_pairs(run_dir: str, attack_key: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clean images and the non-adaptive adversarials of one grid point (``attack_key``; default the first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = sorted((Path(run_dir) / "shards").glob("shard-*.parquet"))
    if not shards:
        raise DataNotFoundError(f"{run_dir} holds no shards/shard-*.parquet (a jobs.evaluate run folder)")
    table = pa.concat_tables([pq.read_table(s) for s in shards])
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DataNotFoundError(f"{run_dir}: the stored rows lack {missing} (run with store_images: true)")
    cols = {c: np.asarray(table.column(c).to_pylist()) for c in COLUMNS if c != "image"}
    undefended = cols["defense"] == "none"
    keys = sorted(set(cols["attack_key"][undefended & (cols["track"] == "non-adaptive")].tolist()))
    if not keys:
        raise DataNotFoundError(f"{run_dir} has no non-adaptive adversarial rows")
    key = attack_key or keys[0]
    if key not in keys:
        raise DataNotFoundError(f"{run_dir} has no attack_key {key!r}; it has {keys}")
    images = _tensor_column(table, "image")
    clean_rows = {int(i): r for r, i in enumerate(cols["index"]) if undefended[r] and cols["track"][r] == "clean"}
    adv_rows = [r for r in np.flatnonzero(undefended & (cols["attack_key"] == key))
                if int(cols["index"][r]) in clean_rows]
    clean = [clean_rows[int(cols["index"][r])] for r in adv_rows]
    return _float(images[clean]), _float(images[adv_rows]), torch.from_numpy(cols["label"][adv_rows].astype(np.int64))


def _float(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0))
