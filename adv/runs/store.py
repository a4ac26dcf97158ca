"""The files of an evaluation run: a local folder or any pyarrow filesystem URI (``s3://...``).

Layout (docs/parquet-schema.md)::

    RUN/run.json                    config, its hash (the run key), versions
    RUN/layout.json                 examples, shards, chunks, skipped files (fixed at the first attempt)
    RUN/shards/shard-00003.parquet  one file per finished shard
    RUN/shards/shard-00003.done     commit marker, written after the file (JSON: rows, attempt, parts)
    RUN/shards/parts/shard-00003/a0002-i00000120.parquet
                                    a worker's part of an unfinished shard (attempt 2, first example 120)
    RUN/attempts/<n>.json           wall time and shards of each attempt
    RUN/report.md, results.json, *.png

The workers write their rows as *parts* (:meth:`RunStore.write_part`), each
atomically (:mod:`adv.io`: a temporary name moved into place, or one PUT on
object stores) under a name fixed by its content, so a retried task rewrites
the same part instead of adding a second one. When every example of a shard
has a part, a commit task (:meth:`RunStore.commit_parts`) streams the parts
the driver listed into the shard file, writes it atomically, then the marker,
then removes the parts. A shard counts as finished only when its marker
exists, so an interrupted attempt leaves parts (and perhaps a shard file) that
the next attempt ignores and overwrites. Every part is checked against the row
schema (:func:`adv.runs.rows.check_schema`) before it is written.
:class:`adv.runs.stored.StoredRun` reads a finished run back.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.fs as pafs
import pyarrow.parquet as pq

import adv.io
from adv.errors import AdvError, ConfigError
from adv.runs.layout import Layout
from adv.runs.rows import check_schema
from adv.io import atomic_output, atomic_write_bytes


def open_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path (relative is fine) or a URI such as ``s3://bucket/x``."""
    return adv.io.open_filesystem(uri, "output.path")


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

    # --- the run ---------------------------------------------------------------------------
    def claim(self, key: str, record: dict[str, Any]) -> None:
        """Make this folder the run of config ``key`` (``run.json``: the key, ``record``, the time), or check
        that it is: a folder of another config is refused (``--out``)."""
        if self.exists("run.json"):
            found = self.read_json("run.json").get("key")
            if found != key:
                raise ConfigError(f"--out: {self.uri} holds a run of another config (key {str(found)[:12]}, this "
                                  f"config {key[:12]}); choose another folder")
        else:
            self.write_json("run.json", {"key": key, **record, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    def layout(self, make: Callable[[], Layout]) -> Layout:
        """The run's layout: ``layout.json`` once written, else ``make()``'s, written now (fixed from here on)."""
        if self.exists("layout.json"):
            return Layout(**self.read_json("layout.json"))
        layout = make()
        self.write_json("layout.json", layout.to_json())
        return layout

    # --- shards -------------------------------------------------------------------------
    @staticmethod
    def shard_name(k: int) -> str:
        return f"shards/shard-{k:05d}.parquet"

    def is_done(self, k: int) -> bool:
        return self.exists(f"shards/shard-{k:05d}.done")

    def finished(self, shards: int) -> list[int]:
        return [k for k in range(shards) if self.is_done(k)]

    @staticmethod
    def parts_dir(k: int) -> str:
        return f"shards/parts/shard-{k:05d}"

    def write_part(self, k: int, table: pa.Table, attempt: int) -> str:
        """Write a worker's rows of shard ``k`` atomically; returns the part's name (its first example and
        the attempt name it, so a retried task overwrites its own part and never adds a second one)."""
        first = int(pa.compute.min(table.column("index")).as_py())
        name = f"{self.parts_dir(k)}/a{attempt:04d}-i{first:08d}.parquet"
        check_schema(table.schema, self.path(name))
        with atomic_output(self.path(name), filesystem=self.fs) as f:
            pq.write_table(table, f, compression="zstd")
        return name

    def commit_parts(self, k: int, parts: list[str], info: dict[str, Any]) -> dict[str, Any]:
        """Stream the listed ``parts`` (in order) into shard ``k``'s file, then write its marker: the marker
        is the commit point. Idempotent, so a retried commit task is harmless. Needs ``import ray.data``
        first when the rows hold tensor columns (their types must survive the rewrite)."""
        if self.is_done(k):
            return self.read_json(f"shards/shard-{k:05d}.done")
        rows = 0
        with atomic_output(self.path(self.shard_name(k)), filesystem=self.fs) as f:
            writer = None
            for name in parts:  # one part in memory at a time
                table = pq.read_table(self.path(name), filesystem=self.fs)
                writer = writer or pq.ParquetWriter(f, table.schema, compression="zstd")
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:
                raise AdvError(f"shard {k}: no parts to commit")
            writer.close()
        marker = {"shard": k, "rows": rows, "parts": len(parts), **info}
        self.write_json(f"shards/shard-{k:05d}.done", marker)
        self.drop_parts(k)
        return marker

    def drop_parts(self, k: int) -> None:
        """Remove shard ``k``'s parts (after its commit, or stale ones before it is redone)."""
        if self.exists(self.parts_dir(k)):
            self.fs.delete_dir(self.path(self.parts_dir(k)))

    def attempts(self) -> list[dict]:
        """The record of every attempt so far (``attempts/<n>.json``), in order."""
        if not self.exists("attempts"):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path("attempts")))
        return [self.read_json(f"attempts/{n}") for n in sorted(i.base_name for i in infos
                                                                 if i.base_name.endswith(".json"))]

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
