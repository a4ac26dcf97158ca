"""Atomic writes to a local path or any pyarrow filesystem URI: a reader never sees half a file.

Where the filesystem renames atomically (a local disk, HDFS) the bytes go to
a temporary name in the target's folder, are fsync'ed when local, and are
renamed over the target. Object stores (``s3://``, ``gs://``, ...) have no
atomic rename, but an object appears whole or not at all, so there the
bytes are buffered and written in one PUT. Either way the target is left as
it was when the writing fails.

    with atomic_output("runs/x/model.pt") as f:
        torch.save(payload, f)
    atomic_write_json("s3://bucket/run/checks.json", {"flags": []})
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import uuid
from typing import Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from adv.errors import ConfigError

#: Filesystems (pyarrow ``type_name``) whose rename is atomic.
RENAMES = ("local", "hdfs")


def open_filesystem(location: str | os.PathLike, setting: str | None = None,
                    error: type[Exception] = ConfigError) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path (made absolute) or a URI such as ``s3://bucket/x``: the one place
    the project opens a location.

    A URI pyarrow cannot open raises ``error`` naming ``setting`` (one line) when ``setting`` is given, else
    pyarrow's own ``ArrowInvalid``/``OSError``.
    """
    location = os.fspath(location)
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as exc:
        if setting is None:
            raise
        raise error(f"{setting}: cannot open {location!r}: {exc}") from None


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None) -> Iterator[BinaryIO]:
    """A binary stream whose bytes replace ``target`` only if the block finishes without an error.

    ``target`` is a local path or a URI; with ``filesystem`` it is a path inside that filesystem.
    Missing parent folders are created.
    """
    fs, path = (filesystem, os.fspath(target)) if filesystem is not None else open_filesystem(target)
    parent = path.rpartition("/")[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    if fs.type_name not in RENAMES:
        buffer = io.BytesIO()
        yield buffer
        with fs.open_output_stream(path) as f:  # one PUT, after the block succeeded
            f.write(buffer.getvalue())
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as f:
            yield f
        if fs.type_name == "local":
            fsync(tmp)  # the rename must not reach the disk before the bytes do
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def fsync(path: str) -> None:
    """Flush a local file's bytes to the disk (before a rename, or after an append)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(target: str | os.PathLike, data: bytes, *, filesystem: pafs.FileSystem | None = None) -> None:
    """Write ``data`` to ``target`` atomically (see :func:`atomic_output`)."""
    with atomic_output(target, filesystem=filesystem) as f:
        f.write(data)


def atomic_write_text(target: str | os.PathLike, text: str, *, filesystem: pafs.FileSystem | None = None) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"), filesystem=filesystem)


def atomic_write_json(target: str | os.PathLike, obj: Any, *, filesystem: pafs.FileSystem | None = None,
                      **dumps: Any) -> None:
    """Write ``json.dumps(obj, **dumps)`` to ``target`` atomically; values JSON lacks are written as ``str``."""
    atomic_write_text(target, json.dumps(obj, **{"default": str, **dumps}), filesystem=filesystem)
