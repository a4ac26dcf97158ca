"""Durable detector state on any pyarrow filesystem: an atomic snapshot plus a log of updates.

Layout under the state location (a local path or any URI pyarrow knows,
``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``)::

    manifest.json            which generation is current, and the config (written last, atomically)
    snapshot-000007.arrow    named arrays of generation 7 (Arrow IPC file, zstd, one CRC-32 per array)
    log-000007.log           local/HDFS: framed segments appended by each flush
    log-000007/000000012.seg object stores (no append): one object per flush

A *segment* is ``b"ADVL" | length (u64) | CRC-32 (u32) | Arrow IPC stream``:
a torn or altered one is detected, never replayed. Only an append that was
never acknowledged can leave a *short final* segment (a crash mid-write), so
loading truncates that tail (with a warning naming the bytes dropped) and
starts; a damaged segment anywhere else, or a bad checksum or marker, stays a
hard error naming the file and byte. An append that fails is truncated back
to the last good offset, so a torn frame is never followed by good ones. A snapshot starts a new
generation; the manifest switches to it only once the snapshot is complete,
so a crash at any point leaves the previous generation (snapshot plus its
log) loadable. Writes are atomic: temporary file and rename where the
filesystem renames atomically (local, HDFS), a single PUT on object stores
(an object appears whole or not at all). Local writes are fsync'ed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import struct
import zlib
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from adv.errors import AdvError
from adv.io import RENAMES, atomic_write_bytes, fsync, open_filesystem

FORMAT = "adv-query-detector"
VERSION = 1
_MAGIC = b"ADVL"
_HEADER = struct.Struct("<4sQI")
log = logging.getLogger(__name__)
_ARRAYS = pa.schema([("name", pa.string()), ("dtype", pa.string()), ("shape", pa.list_(pa.int64())),
                     ("crc32", pa.uint32()), ("data", pa.large_binary())])


class StateError(AdvError):
    """Detector state is missing, corrupt or truncated; the message names the file."""


def corrupt(path: str, why: str) -> StateError:
    return StateError(f"{path}: corrupt or truncated detector state ({why}); "
                      "load(..., on_corrupt='empty') starts empty instead")


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it; a plain path is local (made absolute)."""
    return open_filesystem(location, "state location", StateError)


class StateStore:
    """Reads and writes one detector's state at ``location``."""

    def __init__(self, location: str, log_mode: Literal["auto", "append", "objects"] = "auto"):
        if log_mode not in ("auto", "append", "objects"):
            raise StateError(f"log_mode must be 'auto', 'append' or 'objects', got {log_mode!r}")
        self.location = str(location)
        self.fs, self.root = resolve(location)
        self.renames = self.fs.type_name in RENAMES  # rename is atomic there, and append works
        self.append = self.renames if log_mode == "auto" else log_mode == "append"
        self.generation: int | None = None
        self._segments = 0
        self._log_bytes: int | None = None  # the appended log's length after the last good frame

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def snapshot_path(self, gen: int) -> str:
        return self.path(f"snapshot-{gen:06d}.arrow")

    def _log(self, gen: int, append: bool) -> str:
        return self.path(f"log-{gen:06d}" + (".log" if append else ""))

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path("manifest.json")).type == pafs.FileType.File

    # ---- writing -------------------------------------------------------------------------------------------

    def _write(self, path: str, data: bytes) -> None:
        atomic_write_bytes(path, data, filesystem=self.fs)

    def _sync(self, path: str) -> None:
        if self.fs.type_name == "local":
            fsync(path)

    def write_snapshot(self, meta: dict, arrays: dict[str, np.ndarray], *, keep_previous: bool = False) -> None:
        """Start a new generation: snapshot, then manifest; the previous generation is deleted afterwards."""
        self.fs.create_dir(self.root, recursive=True)
        old = self.generation if self.generation is not None else self._current_generation()
        gen = self._last_generation() + 1
        self._write(self.snapshot_path(gen), _encode_arrays(arrays))
        manifest = {"format": FORMAT, "version": VERSION, "generation": gen, **meta}
        self._write(self.path("manifest.json"), json.dumps(manifest, indent=1).encode())
        self.generation, self._segments, self._log_bytes = gen, 0, 0
        if old is not None and not keep_previous:
            self._delete_generation(old)

    def _last_generation(self) -> int:
        """The highest generation with any file here (a new one must not collide with a stale log)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        gens = [int(name[-6:]) for name in (os.path.splitext(i.base_name)[0] for i in infos)
                if name[-6:].isdigit() and name.startswith(("snapshot-", "log-"))]
        return max(gens, default=0)

    def _current_generation(self) -> int | None:
        if not self.exists():
            return None
        try:
            return int(self.read_manifest()["generation"])
        except StateError:
            return None

    def _delete_generation(self, gen: int) -> None:
        for path in (self.snapshot_path(gen), self._log(gen, True), self._log(gen, False)):
            info = self.fs.get_file_info(path)
            if info.type == pafs.FileType.File:
                self.fs.delete_file(path)
            elif info.type == pafs.FileType.Directory:
                self.fs.delete_dir(path)

    def append_log(self, batch: pa.RecordBatch) -> None:
        """Make one batch of updates durable: appended to the log file, or a new log object."""
        if self.generation is None:
            raise StateError(f"{self.location}: no snapshot yet; save() before flush()")
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, batch.schema) as w:
            w.write_batch(batch)
        payload = sink.getvalue()
        frame = _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload
        if self.append:
            self._append(self._log(self.generation, True), frame)
        else:
            self._segments += 1
            folder = self._log(self.generation, False)
            self.fs.create_dir(folder, recursive=True)
            self._write(f"{folder}/{self._segments:09d}.seg", frame)

    def _append(self, path: str, frame: bytes) -> None:
        """Append ``frame``; on failure cut the file back to the last good offset (then re-raise), and cut
        any bytes a failure left there before appending, so the log is always whole frames."""
        info = self.fs.get_file_info(path)
        size = info.size if info.type == pafs.FileType.File else 0
        good = self._log_bytes if self._log_bytes is not None else size
        if size > good:
            self._truncate(path, good, size)
        try:
            with self.fs.open_append_stream(path) as f:
                f.write(frame)
            self._sync(path)
        except BaseException:
            with contextlib.suppress(Exception):  # the original error is the one to report
                self._truncate(path, good, None)
            raise
        self._log_bytes = good + len(frame)

    def _truncate(self, path: str, keep: int, size: int | None) -> None:
        """Cut ``path`` to its first ``keep`` bytes (in place locally, else by an atomic rewrite)."""
        if self.fs.type_name == "local":
            os.truncate(path, keep)
            fsync(path)
        else:
            with self.fs.open_input_stream(path) as f:
                data = f.read(keep)
            self._write(path, data)
        if size is not None:
            log.warning("%s: dropped %d bytes of a torn final log frame (an unacknowledged write)", path,
                        size - keep)

    # ---- reading -------------------------------------------------------------------------------------------

    def read_manifest(self) -> dict:
        path = self.path("manifest.json")
        if not self.exists():
            raise StateError(f"{self.location}: no detector state here (no manifest.json)")
        try:
            with self.fs.open_input_stream(path) as f:
                manifest = json.loads(f.read().decode())
            gen = int(manifest["generation"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise corrupt(path, f"unreadable manifest: {e}") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise corrupt(path, f"not an {FORMAT} v{VERSION} manifest")
        self.generation = gen
        return manifest

    def read(self) -> tuple[dict[str, np.ndarray], list[pa.RecordBatch]]:
        """The snapshot's arrays and the log's batches, in order (after :meth:`read_manifest`); raises
        :class:`StateError` if damaged."""
        gen = self.generation if self.generation is not None else int(self.read_manifest()["generation"])
        arrays = _decode_arrays(self.fs, self.snapshot_path(gen))
        batches = []
        files = self._log_files(gen)
        for i, path in enumerate(files):
            found, good, size = _read_segments(self.fs, path)
            batches += found
            if good < size:  # a short final frame: only the last file can hold an unacknowledged write
                if i != len(files) - 1:
                    raise corrupt(path, f"torn segment at byte {good} before later log files")
                if path.endswith(".seg"):
                    self.fs.delete_file(path)
                    log.warning("%s: removed a torn final log object of %d bytes", path, size)
                else:
                    self._truncate(path, good, size)
            if not path.endswith(".seg"):
                self._log_bytes = good
        self._segments = sum(p.endswith(".seg") for p in self._log_files(gen))
        return arrays, batches

    def _log_files(self, gen: int) -> list[str]:
        """The appended log file and the log objects of ``gen``, in write order."""
        out = []
        if self.fs.get_file_info(self._log(gen, True)).type == pafs.FileType.File:
            out.append(self._log(gen, True))
        folder = self._log(gen, False)
        if self.fs.get_file_info(folder).type == pafs.FileType.Directory:
            files = self.fs.get_file_info(pafs.FileSelector(folder))
            out += sorted(f.path for f in files if f.path.endswith(".seg"))
        return out


def _encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    rows = {"name": [], "dtype": [], "shape": [], "crc32": [], "data": []}
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        data = a.tobytes()
        for key, value in zip(rows, (name, a.dtype.str, list(a.shape), zlib.crc32(data), data)):
            rows[key].append(value)
    sink = io.BytesIO()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, _ARRAYS, options=options) as w:
        w.write_table(pa.table(rows, schema=_ARRAYS))
    return sink.getvalue()


def _decode_arrays(fs: pafs.FileSystem, path: str) -> dict[str, np.ndarray]:
    try:
        with fs.open_input_file(path) as f:
            table = pa.ipc.open_file(f).read_all()
    except FileNotFoundError:
        raise corrupt(path, "the snapshot the manifest names is missing") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise corrupt(path, str(e).splitlines()[0]) from None
    if table.schema != _ARRAYS:
        raise corrupt(path, "unexpected columns")
    out = {}
    meta = table.drop_columns(["data"]).to_pylist()
    data = table.column("data").combine_chunks()
    for i, row in enumerate(meta):
        # the Arrow buffer itself, not a Python bytes copy: a default index is ~70 MB of arrays, and each copy
        # of it is seconds of an owner's restart on a loaded machine
        raw = memoryview(data[i].as_buffer())
        if zlib.crc32(raw) != row["crc32"]:
            raise corrupt(path, f"checksum mismatch in array {row['name']!r}")
        try:
            out[row["name"]] = np.frombuffer(raw, dtype=np.dtype(row["dtype"])).reshape(row["shape"]).copy()
        except (ValueError, TypeError) as e:
            raise corrupt(path, f"array {row['name']!r}: {e}") from None
    return out


def _read_segments(fs: pafs.FileSystem, path: str) -> tuple[list[pa.RecordBatch], int, int]:
    """The batches of the log ``path``, the offset after its last whole frame, and its size. A short final
    frame ends the read there (the caller truncates it); any other damage is a :class:`StateError`."""
    with fs.open_input_stream(path) as f:
        data = f.read()
    batches, pos = [], 0
    while pos < len(data):
        if len(data) - pos < _HEADER.size:
            if data[pos : pos + 4] != _MAGIC[: len(data) - pos]:
                raise corrupt(path, f"bad segment marker at byte {pos}")
            break  # a torn header at the very end
        magic, length, crc = _HEADER.unpack_from(data, pos)
        payload = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if magic != _MAGIC:
            raise corrupt(path, f"bad segment marker at byte {pos}")
        if len(payload) < length:
            if _whole_frame_after(data, pos + 1):  # a bad length in the middle, not a torn tail
                raise corrupt(path, f"segment at byte {pos} claims {length} bytes, past later whole segments")
            break  # a torn payload: the frame runs past the end of the file
        if zlib.crc32(payload) != crc:
            raise corrupt(path, f"checksum mismatch in the segment at byte {pos}")
        try:
            batches += list(pa.ipc.open_stream(payload))
        except pa.ArrowInvalid as e:
            raise corrupt(path, f"segment at byte {pos}: {e}") from None
        pos += _HEADER.size + length
    return batches, pos, len(data)


def _whole_frame_after(data: bytes, start: int) -> bool:
    """Whether a complete frame with a good checksum starts anywhere at or after ``start``."""
    pos = data.find(_MAGIC, start)
    while pos >= 0 and len(data) - pos >= _HEADER.size:
        _, length, crc = _HEADER.unpack_from(data, pos)
        payload = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if len(payload) == length and zlib.crc32(payload) == crc:
            return True
        pos = data.find(_MAGIC, pos + 1)
    return False
