"""Atomic writes (adv.io): the target holds the old bytes or the new ones, never part of them, on a local
disk (temporary name + rename) and on an object store (one PUT after the block succeeded)."""

from __future__ import annotations

import json

import pyarrow.fs as pafs
import pytest
import torch

from adv.io import atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_local_writes_create_folders_and_leave_no_temporary_files(tmp_path):
    target = tmp_path / "a" / "b" / "x.json"
    atomic_write_json(target, {"n": 1, "path": tmp_path}, indent=2)
    assert json.loads(target.read_text()) == {"n": 1, "path": str(tmp_path)}  # default=str for what JSON lacks
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    atomic_write_bytes(f"file://{tmp_path}/c.bin", b"\x00\x01")  # a URI works as well as a path
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    with atomic_output(tmp_path / "m.pt") as f:
        torch.save({"w": torch.arange(3)}, f)
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.arange(3))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["c.bin", "m.pt", "x.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_object_stores_get_one_put_after_the_block():
    fs = pafs._MockFileSystem()  # type_name "mock": no atomic rename, like S3
    with pytest.raises(RuntimeError):
        with atomic_output("bucket/run/x.bin", filesystem=fs) as f:
            f.write(b"partial")
            raise RuntimeError("interrupted")
    assert fs.get_file_info("bucket/run/x.bin").type == pafs.FileType.NotFound
    atomic_write_bytes("bucket/run/x.bin", b"whole", filesystem=fs)
    with fs.open_input_stream("bucket/run/x.bin") as f:
        assert f.read() == b"whole"
    assert [i.path for i in fs.get_file_info(pafs.FileSelector("bucket", recursive=True)) if i.is_file] == [
        "bucket/run/x.bin"]


def test_one_opener_names_the_setting_of_a_location_it_cannot_open(tmp_path):
    from adv.bundle import BundleError, load_bundle
    from adv.detectors.state import StateError, resolve
    from adv.errors import ConfigError
    from adv.io import open_filesystem

    fs, path = open_filesystem(tmp_path / "x")
    assert fs.type_name == "local" and path == str(tmp_path / "x")
    with pytest.raises(ConfigError, match=r"^output\.path: cannot open 'nosuch://b/x'"):
        open_filesystem("nosuch://b/x", "output.path")
    with pytest.raises(StateError, match=r"^state location: cannot open"):
        resolve("nosuch://b/state")
    with pytest.raises(BundleError, match=r"bundle location: cannot open"):
        load_bundle("nosuch://b/bundle")
