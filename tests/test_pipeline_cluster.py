"""The evaluation job on a simulated multi-node cluster (``ray.cluster_utils.Cluster``), with a node lost mid-run.

Such a cluster cannot share a process with the suite's local cluster, so these
tests carry the ``multinode`` marker, which the default run leaves out; `make
test` runs them in a pytest process of their own:

    .venv/bin/python -m pytest -q -m multinode tests/test_pipeline_cluster.py

One head (1 CPU, the driver's node) and two worker nodes (1 CPU each, and the
custom resource ``evaluator``, which every actor asks for, so the actor pool
lives on the worker nodes and losing one loses actors, not the driver).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.config import parse_config
from adv.runs.store import RunStore
from tests.pipeline_helpers import SlowLoader, tiny_config, train_tiny

pytestmark = pytest.mark.multinode

KEYS = ("index", "defense", "track", "grid")

# moto's S3 server takes any credentials; the cluster's workers inherit these (set before it starts)
for _k, _v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true",
               "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if pytest.importorskip("ray").is_initialized():
        pytest.skip("a Ray cluster is already running in this process; run with -m multinode on its own")
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 * 2**20,
                                                      "include_dashboard": False})
    workers = [c.add_node(num_cpus=1, resources={"evaluator": 2}, object_store_memory=100 * 2**20)
               for _ in range(2)]
    ray.init(address=c.address, log_to_driver=False)
    DataContext.get_current().enable_progress_bars = False
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("tiny"))


def _config(ckpt, out: Path, n: int, evaluator: int = 1) -> dict:
    """Two actors of half a CPU each, on worker nodes: either node can take both when the other is lost
    (``evaluator=2``: each actor needs a whole worker node's ``evaluator`` resource, so one per node)."""
    return tiny_config(ckpt, out, dataset={"name": "digits", "n": n, "seed": 1}, defenses=[],
                       attacks=[{"name": "fgsm", "eps": [0.1]}, {"name": "pgd", "eps": [0.3], "steps": [2]}],
                       adaptive=False, features=["logits"], shards=3,
                       resources={"actors": 2, "batch_size": 4, "cpus_per_actor": 0.5,
                                  "custom": {"evaluator": evaluator}})


def _keys(run_dir: str) -> np.ndarray:
    store = RunStore(run_dir)
    table = store.read_table(store.finished(3), columns=list(KEYS))
    return np.rec.fromarrays([table.column(k).to_numpy(zero_copy_only=False) for k in KEYS], names=KEYS)


def _expected_keys(n: int, grid: int) -> set:
    return {(i, "none", "clean", -1) for i in range(n)} | \
        {(i, "none", "non-adaptive", g) for i in range(n) for g in range(grid)}


def _attempt(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "attempts" / "0001.json").read_text())


def test_the_pool_spreads_over_the_nodes_and_every_node_writes(cluster, ckpt, tmp_path):
    from jobs.evaluate import run

    c, workers = cluster
    # Placement and start-up are Ray's: on a loaded machine the first actor can finish all 6 blocks before the
    # second has started, or both could land on one node. One actor per node by resources, and the pool waits
    # for both before the first block, so the test checks what is ours: every node computes, writes its own
    # parts and is named in the attempt record.
    from ray.data import DataContext

    cfg = parse_config(_config(ckpt, tmp_path, n=24, evaluator=2))
    ctx = DataContext.get_current()
    before, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 300
    try:
        result = run(cfg, report=False)
    finally:
        ctx.wait_for_min_actors_s = before
    keys = _keys(result.run_dir)
    assert len(keys) == len(set(keys.tolist())) == len(_expected_keys(24, 2))
    assert set(keys.tolist()) == _expected_keys(24, 2)
    attempt = _attempt(result.run_dir)
    worker_ids = {w.node_id for w in workers}
    assert set(attempt["nodes"]) == worker_ids  # both worker nodes computed and wrote; the head did not
    assert sum(n["examples"] for n in attempt["nodes"].values()) == 24
    assert all(n["examples_per_compute_second"] > 0 for n in attempt["nodes"].values())
    assert attempt["fault_tolerance"]["max_task_retries"] == -1
    assert attempt["fault_tolerance"]["max_errored_blocks"] == 0
    assert attempt["commit_seconds"]["n"] == 3


def test_a_node_lost_mid_run_loses_and_duplicates_nothing(cluster, ckpt, tmp_path):
    from jobs.evaluate import run

    c, workers = cluster
    cfg = parse_config(_config(ckpt, tmp_path, n=48))
    out = str(tmp_path / "lost")
    store = RunStore(out)
    removed: list[str] = []

    def remove_a_node_once_parts_land():
        """The fault, from the test: once the first parts are stored, the second worker node goes away."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            parts = list(Path(out, "shards", "parts").glob("*/*.parquet")) if Path(out).is_dir() else []
            if len(parts) >= 2:
                removed.append(workers[1].node_id)
                c.remove_node(workers[1], allow_graceful=False)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=remove_a_node_once_parts_land, daemon=True)
    killer.start()
    result = run(cfg, out=out, report=False, loader=SlowLoader(str(ckpt), seconds=0.03))
    killer.join(timeout=5)
    assert removed, "the run ended before the node could be removed"
    assert store.finished(3) == [0, 1, 2]
    keys = _keys(result.run_dir)
    assert len(keys) == len(set(keys.tolist())), "duplicate (index, defense, track, grid) keys"
    assert set(keys.tolist()) == _expected_keys(48, 2), "missing keys"
    attempt = _attempt(out)
    assert attempt["finished"] and attempt["examples"] == 48
    assert attempt["node_resources"].get(removed[0], {}).get("alive") in (False, None)
    assert set(attempt["nodes"]) <= {w.node_id for w in workers}


@pytest.fixture(scope="module")
def s3_bucket():
    """A real S3-compatible server (moto's) on 127.0.0.1 and an empty bucket; pyarrow reaches it by URI."""
    server_mod = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    fs, _ = pafs.FileSystem.from_uri(f"s3://runs?{query}&allow_bucket_creation=true")
    fs.create_dir("runs")
    yield "runs", query
    server.stop()


def test_workers_write_to_s3_and_resume_skips_committed_shards(cluster, ckpt, s3_bucket, tmp_path):
    import pyarrow.fs as pafs

    from jobs.evaluate import run

    bucket, query = s3_bucket
    uri = f"s3://{bucket}/eval/tiny?{query}"
    cfg = parse_config(_config(ckpt, tmp_path, n=12))
    result = run(cfg, out=uri, report=True)
    store = RunStore(uri)
    assert isinstance(store.fs, pafs.S3FileSystem) and store.finished(3) == [0, 1, 2]
    assert set(_keys(uri).tolist()) == _expected_keys(12, 2) and len(_keys(uri)) == len(_expected_keys(12, 2))
    assert not store.exists("shards/parts/shard-00000")  # parts are removed once their shard is committed
    assert store.exists("report.md") and store.exists("results.json")
    again = run(cfg, out=uri, report=False)
    assert again.skipped == [0, 1, 2] and again.computed == []
    assert result.summary["examples"] == 12
