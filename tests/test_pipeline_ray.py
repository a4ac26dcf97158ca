"""The Ray Data pipeline end to end on tiny data, on the session's shared local cluster."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from adv.runs.rows import ROW_SCHEMA
from jobs.config import parse_config
from jobs.evaluate import run
from adv.runs.store import RunStore
from tests.pipeline_helpers import REPO, tiny_config, train_tiny

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def clean_run(ray_cluster, ckpt, tmp_path_factory):
    """One uninterrupted run, shared by the tests below; what reached the driver is recorded in ``DRIVER``."""
    import ray
    import ray.data

    out = tmp_path_factory.mktemp("runs")
    cfg = parse_config(tiny_config(ckpt, out))
    real_iter, real_get = ray.data.Dataset.iter_batches, ray.get

    def iter_batches(self, *args, **kwargs):  # every block the driver pulls from a Ray Dataset
        for batch in real_iter(self, *args, **kwargs):
            DRIVER["batches"].append({k: np.asarray(v) for k, v in batch.items()})
            yield batch

    def get(refs, *args, **kwargs):  # every object the job's own code fetches (Ray Data's blocks are above)
        value = real_get(refs, *args, **kwargs)
        if sys._getframe(1).f_globals.get("__name__", "").startswith("jobs."):
            DRIVER["gets"].append(value)
        return value

    with pytest.MonkeyPatch.context() as m:
        m.setattr(ray.data.Dataset, "iter_batches", iter_batches)
        m.setattr(ray, "get", get)
        result = run(cfg)
    return cfg, result


DRIVER: dict[str, list] = {"batches": [], "gets": []}


def _table(run_dir: str, drop=("gen_seconds",)) -> dict[str, np.ndarray]:
    import ray.data  # noqa: F401  (tensor extension types)

    store = RunStore(run_dir)
    layout = json.loads(store.read_bytes("layout.json"))
    shards = sorted(set(layout["chunk_shard"]))
    table = store.read_table(shards).sort_by([(c, "ascending") for c in ("index", "track", "defense", "grid")])
    out = {}
    for name in table.column_names:
        if name in drop:
            continue
        col = table.column(name).combine_chunks()
        out[name] = col.to_numpy() if hasattr(col.type, "shape") else col.to_numpy(zero_copy_only=False)
    return out


def test_end_to_end_writes_every_shard_and_the_report(clean_run):
    cfg, result = clean_run
    run_dir = Path(result.run_dir)
    assert result.computed and sorted(result.computed) == [0, 1, 2] and result.skipped == []
    assert all((run_dir / f"shards/shard-{k:05d}.done").is_file() for k in range(3))
    for name in ("report.md", "results.json", "accuracy_vs_eps.png", "examples.png", "gradcam.png"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["examples"] == 18
    assert set(results["clean_acc"]) == {"none", "dwt:wavelet=haar,level=1"}
    tracks = {(e["defense"], e["track"]) for e in results["attacks"]}
    assert ("dwt:wavelet=haar,level=1", "adaptive") in tracks and ("none", "adaptive") not in tracks
    assert results["versions"]["ray"] == "2.60.0"
    report = (run_dir / "report.md").read_text()
    for section in ("## Robust accuracy", "## Attention IoU", "## Gradient-masking flags", "## Throughput",
                    "skipped (corrupt or unreadable) images: 0", "worst case"):
        assert section in report


def test_the_driver_receives_part_metadata_never_result_rows(clean_run):
    from adv.evaluate.tally import PART_COLUMNS

    _, result = clean_run
    batches = DRIVER["batches"]
    assert batches, "the instrumentation saw nothing"
    for batch in batches:
        assert set(batch) == set(PART_COLUMNS)  # no image, prediction, logits or any other result column
        assert all(v.ndim == 1 for v in batch.values())  # one scalar per part: no tensor column
        assert all(isinstance(x, str) and len(x) < 200 for c in ("part", "node") for x in batch[c])
    parts = np.concatenate([b["part"] for b in batches])
    rows = int(sum(b["rows"].sum() for b in batches))
    assert rows == 18 * 14  # every result row is accounted for, by count only
    assert len(parts) == len(set(parts.tolist())) <= 18 / 4 + 3  # one metadata row per part (a batch per shard)
    assert all(isinstance(v, float) for v in DRIVER["gets"])  # the commit tasks return their duration only


def test_parquet_schema_matches_the_documented_one(clean_run):
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401
    from ray.data.extensions import ArrowTensorTypeV2

    _, result = clean_run
    schema = pq.read_schema(Path(result.run_dir) / "shards/shard-00000.parquet")
    assert set(schema.names) <= set(ROW_SCHEMA)
    for name in schema.names:
        if ROW_SCHEMA[name].startswith("tensor"):
            assert isinstance(schema.field(name).type, ArrowTensorTypeV2), name
        else:
            assert str(schema.field(name).type) == ROW_SCHEMA[name], name
    assert schema.field("image").type.shape == (1, 28, 28)
    assert schema.field("logits").type.shape == (10,)
    doc = (REPO / "docs/parquet-schema.md").read_text()
    for name in ROW_SCHEMA:
        assert re.search(rf"`{name}`", doc), f"{name} undocumented"


class InjectedFault(RuntimeError):
    """The driver crashing as it starts its second shard commit (injected from the test, not the job)."""


def test_resume_computes_only_the_missing_shards_and_matches_a_clean_run(clean_run, tmp_path, monkeypatch):
    import jobs.evaluate

    cfg, clean = clean_run
    out = str(tmp_path / "resumed")
    real_submit, calls = jobs.evaluate.submit_commit, []

    def crash_on_second_commit(store, k, parts, info):
        calls.append(k)
        if len(calls) > 1:
            raise InjectedFault(f"injected fault after {len(calls) - 1} shard(s)")
        return real_submit(store, k, parts, info)

    with monkeypatch.context() as m:  # the driver starts the commits, so patching it reaches them
        m.setattr(jobs.evaluate, "submit_commit", crash_on_second_commit)
        with pytest.raises(InjectedFault):
            run(cfg, out=out, report=False)
    store = RunStore(out)
    first = store.finished(3)
    assert len(first) == 1
    # the shard whose commit crashed was written by the workers but never committed: a half-written shard,
    # made worse by a truncated shard file and a stray part the next attempt must not count
    half = calls[1]
    assert not store.is_done(half) and store.exists(store.parts_dir(half))
    store.write_bytes(store.shard_name(half), b"PAR1 truncated")
    store.write_bytes(f"{store.parts_dir(half)}/a0001-i99999999.parquet", b"not parquet")
    resumed = run(cfg, out=out)
    assert resumed.skipped == first
    assert sorted(resumed.computed) == sorted(set(range(3)) - set(first))
    assert not store.exists("shards/parts") or not any(store.exists(store.parts_dir(k)) for k in range(3))
    a, b = _table(clean.run_dir), _table(out)
    assert a.keys() == b.keys()
    for col in a:
        assert np.array_equal(a[col], b[col]), col
    attempts = json.loads((Path(out) / "results.json").read_text())["attempts"]
    assert [len(x["shards"]) for x in attempts] == [1, 2]
    for attempt in attempts:  # start-up and steady throughput are recorded apart
        assert 0 < attempt["first_result_seconds"] <= attempt["wall_seconds"]
    assert attempts[1]["steady_images_per_second"] > 0  # two shards: results arrived after the first block
    assert "| first result s |" in (Path(out) / "report.md").read_text()


def test_a_folder_of_another_config_is_refused(clean_run):
    from adv.errors import ConfigError

    cfg, result = clean_run
    other = parse_config({**cfg.model_dump(mode="json"), "seed": 7})
    with pytest.raises(ConfigError, match="another config"):
        run(other, out=result.run_dir)


def test_stored_adversarials_are_reused_without_regenerating(clean_run, tmp_path):
    _, clean = clean_run
    cfg = parse_config({"reuse_from": clean.run_dir, "adaptive": False, "defenses": ["quantize"],
                        "shards": 3, "resources": {"actors": 1, "batch_size": 4}, "output": {"path": str(tmp_path)}})
    result = run(cfg)
    rows = _table(result.run_dir, drop=())
    new = rows["defense"] == "quantize"
    assert new.any() and (rows["gen_seconds"][new] == 0).all()
    assert set(rows["track"][new]) == {"clean", "non-adaptive"}
    stored = _table(clean.run_dir)
    none_stored = (stored["defense"] == "none") & (stored["track"] != "adaptive")
    none_new = rows["defense"] == "none"
    for col in ("index", "track", "grid", "pred", "image"):  # the undefended rows are carried over as stored
        assert np.array_equal(stored[col][none_stored], rows[col][none_new]), col
    # the same adversarial images went through the new defense
    for col in ("index", "grid", "track"):
        assert np.array_equal(rows[col][new], rows[col][none_new])
    assert np.array_equal(rows["image"][new], rows["image"][none_new])
    summary = json.loads((Path(result.run_dir) / "results.json").read_text())
    assert "quantize" in summary["clean_acc"] and summary["reuse_from"] == clean.run_dir


def _folder_with_a_corrupt_jpeg(root: Path) -> Path:
    from PIL import Image

    from adv.data import load_dataset

    data = load_dataset("digits", n=6, seed=0)
    for i, (img, label) in enumerate(zip(data.images, data.labels)):
        d = root / f"class{int(label) % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).astype(np.uint8)).save(d / f"{i}.jpg", quality=95)
    good = (root / "class0").glob("*.jpg").__next__().read_bytes() if (root / "class0").is_dir() else b""
    bad = root / "class1" / "truncated.jpg"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(good[: len(good) // 3])
    return bad


def test_a_corrupt_image_is_skipped_and_counted(ray_cluster, ckpt, tmp_path):
    bad = _folder_with_a_corrupt_jpeg(tmp_path / "images")
    cfg = parse_config({
        "name": "folder", "dataset": {"name": "imagefolder", "root": str(tmp_path / "images")},
        "model": {"checkpoint": str(ckpt)}, "attacks": [{"name": "fgsm", "eps": [0.1]}],
        "adaptive": False, "features": [], "shards": 2,
        "resources": {"actors": 1, "batch_size": 2}, "output": {"path": str(tmp_path / "runs")},
    })
    result = run(cfg)
    results = json.loads((Path(result.run_dir) / "results.json").read_text())
    assert results["skipped"]["count"] == 1
    assert results["skipped"]["files"][0][0].endswith("truncated.jpg")
    assert results["examples"] == 6
    report = (Path(result.run_dir) / "report.md").read_text()
    assert "skipped (corrupt or unreadable) images: 1" in report and bad.name in report
    rows = _table(result.run_dir)
    assert sorted(set(rows["index"])) == list(range(6))
    assert set(rows["label"]) <= {0, 1} and rows["image"].shape[1:] == (1, 28, 28)


def test_a_stored_parquet_set_is_read_with_read_parquet(ray_cluster, tmp_path):
    from adv.data import load_dataset
    from jobs.config import DatasetConfig
    from jobs.sources import ParquetSource, export_dataset

    data = load_dataset("digits", n=10, seed=0)
    export_dataset(data, str(tmp_path / "set"), rows_per_file=4)  # three files
    source = ParquetSource(DatasetConfig(name="parquet", root=str(tmp_path / "set"), n=7, seed=1))
    layout = source.layout(shards=2, chunk_size=3)
    assert layout.n == 7 and layout.shards == 2
    rows = source.dataset(layout, [1], (1, 28, 28)).take_all()
    index = sorted(r["index"] for r in rows)
    assert index == layout.indices([1]).tolist()
    for r in rows:  # the stored example behind each row is the one the layout names
        stored = layout.keys[r["index"]]
        assert np.array_equal(r["image"], data.images[stored].numpy()) and r["label"] == data.labels[stored]
        assert r["chunk"] == r["index"] // 3 and r["shard"] == 1
