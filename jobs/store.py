"""The Parquet store of a run: a local folder or any pyarrow filesystem URI (``s3://...``).

Layout (docs/parquet-schema.md)::

    RUN/run.json                    config, its hash (the run key), versions
    RUN/layout.json                 examples, shards, chunks, skipped files (fixed at the first attempt)
    RUN/shards/shard-00003.parquet  one file per finished shard
    RUN/shards/shard-00003.done     commit marker, written after the file (JSON: rows, attempt)
    RUN/attempts/<n>.json           wall time and shards of each attempt
    RUN/report.md, results.json, *.png

A shard counts as finished only when its marker exists; the Parquet file is
written atomically first (:mod:`adv.io`: a temporary name moved into place,
or one PUT on object stores), so an interrupted attempt leaves either nothing
or a file the next attempt overwrites.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import adv.io
from adv.errors import AdvError, ConfigError
from adv.io import atomic_output, atomic_write_bytes


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path (relative is fine) or a URI such as ``s3://bucket/x``."""
    try:
        return adv.io.open_filesystem(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise ConfigError(f"output.path: cannot open {uri!r}: {exc}") from None


class RunStore:
    """Files of one run under ``uri``."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = open_filesystem(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    # --- small files ------------------------------------------------------------------
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically (:func:`adv.io.atomic_write_bytes`)."""
        atomic_write_bytes(self.path(name), data, filesystem=self.fs)

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_bytes(name))
        except (FileNotFoundError, OSError) as exc:
            raise AdvError(f"{self.path(name)}: cannot read ({exc})") from None
        except json.JSONDecodeError as exc:
            raise AdvError(f"{self.path(name)}: not valid JSON ({exc})") from None

    # --- shards -------------------------------------------------------------------------
    @staticmethod
    def shard_name(k: int) -> str:
        return f"shards/shard-{k:05d}.parquet"

    def is_done(self, k: int) -> bool:
        return self.exists(f"shards/shard-{k:05d}.done")

    def finished(self, shards: int) -> list[int]:
        return [k for k in range(shards) if self.is_done(k)]

    def commit_shard(self, k: int, table: pa.Table, info: dict[str, Any]) -> None:
        """Write shard ``k``'s rows, then its marker: the marker is the commit point."""
        with atomic_output(self.path(self.shard_name(k)), filesystem=self.fs) as f:
            pq.write_table(table, f, compression="zstd")
        self.write_json(f"shards/shard-{k:05d}.done", {"shard": k, "rows": table.num_rows, **info})

    def shard_paths(self, shards: list[int]) -> list[str]:
        return [self.path(self.shard_name(k)) for k in shards]

    def read_table(self, shards: list[int], columns: list[str] | None = None, filters=None) -> pa.Table:
        """Rows of the given finished shards (``import ray.data`` first to get tensor columns back)."""
        tables = [pq.read_table(p, filesystem=self.fs, columns=columns, filters=filters)
                  for p in self.shard_paths(shards)]
        return pa.concat_tables(tables) if tables else pa.table({})

    def schema(self, k: int) -> pa.Schema:
        return pq.read_schema(self.path(self.shard_name(k)), filesystem=self.fs)

    def put_folder(self, local_dir: str | Path) -> None:
        """Copy the files of a local folder (the report) into the run."""
        for p in sorted(Path(local_dir).iterdir()):
            if p.is_file():
                self.write_bytes(p.name, p.read_bytes())

    def local_dir(self) -> Path | None:
        return Path(self.root) if self.local else None
