"""Distributed adversarial evaluation on Ray Data: attacks in an actor pool, a Parquet store, the report.

    python -m jobs.evaluate --config jobs/configs/default.yaml [--out DIR] [--reuse RUN_DIR]
    ray job submit --working-dir . -- python -m jobs.evaluate --config jobs/configs/gpu-cluster.yaml
    ray job submit --working-dir . -- python -m jobs.evaluate --config jobs/configs/default.yaml --base-dir "$PWD"

A submitted job runs in Ray's temporary copy of the working dir, which lacks
``runs/`` (ignored by git, so not uploaded) and is deleted afterwards: its
relative paths resolve against ``--base-dir`` (the submitting folder, for a
cluster on the same machine), else a missing relative input or any relative
output is refused with one line; a remote cluster needs shared storage.

The same job runs on an embedded local Ray (laptop) and on a cluster (set
``RAY_ADDRESS`` or ``resources.address``); only the config changes. Stages:

1. the dataset becomes a ``ray.data.Dataset`` of the shards not yet finished
   (:mod:`jobs.sources`);
2. ``map_batches`` (in-memory sets) or ``groupby("chunk").map_groups`` (file
   sources) runs :class:`adv.evaluate.worker.BatchEvaluator` in an
   ``ActorPoolStrategy(size=N)`` pool; each actor builds its models once
   through the injected ``loader``;
3. each actor writes its own result rows to the run's storage as Parquet
   *parts* and returns one metadata row per part; the driver, which never
   sees a result row, tallies them (:mod:`adv.evaluate.tally`) and starts a
   shard's commit task (:mod:`adv.runs.store`) the moment the shard has
   all its examples, so an interrupted run resumes where it stopped and a
   node lost mid-run costs only its in-flight batches, which Ray retries;
4. :mod:`adv.evaluate.report` turns the stored rows into report.md, results.json and figures.

``--reuse RUN_DIR`` (or ``reuse_from:``) evaluates new defenses on the stored
non-adaptive adversarials of a finished run without regenerating them;
:func:`evaluate_stored` is the same for a Ray Tune trainable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adv.runs.layout import Layout
from adv.evaluate.plan import build_plan as plan_of, model_loader, rows_per_example
from adv.evaluate.preflight import preflight
from adv.evaluate.report.run import run_meta, write_run_report as report_run
from adv.runs.store import RunStore
from adv.runs.stored import StoredRun, reusable
from adv.evaluate.tally import Arrivals, Tally, write_parts as write_table_parts
from adv.evaluate.worker import BatchEvaluator, ModelLoader, Plan, StoredEvaluator
from adv.specs import absolute_path
from jobs import common
from jobs.common import guarded, versions
from jobs.config import EvalConfig, load_config, parse_config
from jobs.sources import make_source

log = common.logger("evaluate")


def build_plan(cfg: EvalConfig) -> Plan:
    return plan_of(cfg.attacks, adaptive=cfg.adaptive, features=cfg.features, store_images=cfg.store_images,
                   seed=cfg.seed)


def build_loader(cfg: EvalConfig) -> ModelLoader:
    return model_loader(cfg.model, cfg.defenses)


# --- Ray ------------------------------------------------------------------------------------------
def init_ray(cfg: EvalConfig) -> None:
    """Connect to ``resources.address`` / ``$RAY_ADDRESS``, else start a local cluster the actor pool fits in."""
    res = cfg.resources
    need = int(np.ceil(res.actors * res.cpus_per_actor)) + 1  # + 1: other stages (Ray issue #44687)
    common.init_ray(res.address, num_cpus=res.local_cpus or max(os.cpu_count() or 1, need),
                    object_store_memory=res.object_store_memory, log=log)


class _ActorThreads:
    """An actor owns its process, so it sets the process-wide torch thread count (the library leaves it alone)."""

    def __init__(self, *args, threads: int = 1, **kwargs):
        import torch

        torch.set_num_threads(threads)
        super().__init__(*args, **kwargs)


class _WritesParts:
    """The actor writes its result rows to the run's storage itself and returns one metadata row per part."""

    def __init__(self, *args, store: str, attempt: int, **kwargs):
        import ray

        super().__init__(*args, **kwargs)
        self._store, self._attempt = RunStore(store), attempt
        self._node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        t0 = time.perf_counter()
        rows = super().__call__(batch)
        return write_parts(self._store, rows, self._attempt, self._node, time.perf_counter() - t0)


def write_parts(store: RunStore, rows: dict[str, np.ndarray], attempt: int, node: str,
                seconds: float) -> dict[str, np.ndarray]:
    """Write ``rows`` as one part per shard they belong to; the metadata rows (:data:`PART_COLUMNS`)."""
    from ray.data.block import BlockAccessor

    # the same Arrow types Ray Data would store
    return write_table_parts(store, BlockAccessor.batch_to_block(rows), attempt, node, seconds)


class BatchActor(_ActorThreads, _WritesParts, BatchEvaluator):
    """:class:`BatchEvaluator` as a Ray Data actor running ``threads`` torch threads, writing its own parts."""


class StoredActor(_ActorThreads, _WritesParts, StoredEvaluator):
    """:class:`StoredEvaluator` as a Ray Data actor running ``threads`` torch threads, writing its own parts."""


def attack_stage(ds, grouped: bool, udf, kwargs: dict, cfg: EvalConfig):
    """The actor-pool stage; GPU requests stay configurable down to 0 (resources.gpus_per_actor)."""
    import ray

    res = cfg.resources
    common = dict(
        compute=ray.data.ActorPoolStrategy(size=res.actors),
        fn_constructor_kwargs={**kwargs, "threads": max(1, int(res.cpus_per_actor))},
        num_cpus=res.cpus_per_actor,
        num_gpus=res.gpus_per_actor,
        resources=res.custom or None,
    )
    if grouped:
        return ds.groupby("chunk").map_groups(udf, batch_format="numpy", **common)
    return ds.map_batches(udf, batch_size=res.batch_size, batch_format="numpy", **common)


# --- the run ----------------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_dir: str
    key: str
    #: Shards this invocation computed, and those a previous one had finished.
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    report: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def open_run(cfg: EvalConfig, out: str | None) -> RunStore:
    """The run folder: ``out``, or ``output.path/<name>-<key>``; a folder of another config is refused."""
    key = cfg.run_key()
    # absolute: the actors and commit tasks that write here need not share the driver's working directory
    store = RunStore(absolute_path(out or f"{cfg.output.path.rstrip('/')}/{cfg.name}-{key[:12]}"))
    store.claim(key, {"config": cfg.model_dump(mode="json"), "versions": versions()})
    return store


def attempt_record(tally: Tally) -> dict[str, Any]:
    """The tally's record, with each node's resources and whether it is still alive (a removed node stays listed,
    dead)."""
    import ray

    record, known = tally.record(), {n["NodeID"]: n for n in ray.nodes()}
    return {**record, "node_resources": {i: {"alive": known[i]["Alive"], "resources": known[i].get("Resources", {})}
                                         if i in known else {} for i in record["nodes"]}}


def ray_get(ref):
    import ray

    return ray.get(ref)


def _commit_task(uri: str, k: int, parts: list[str], info: dict) -> float:
    import ray.data  # noqa: F401  (tensor column types survive the rewrite)

    t0 = time.perf_counter()
    RunStore(uri).commit_parts(k, parts, info)
    return time.perf_counter() - t0


def submit_commit(store: RunStore, k: int, parts: list[str], info: dict):
    """Start shard ``k``'s commit as a Ray task (it reads and writes the rows; the driver only names them).
    No CPU is reserved: the actors may hold every CPU (Ray issue #44687); a retried commit is idempotent."""
    import ray

    return ray.remote(num_cpus=0, max_retries=3)(_commit_task).remote(store.uri, k, parts, info)


#: Ray Data's actor-pool defaults in Ray 2.60 (ActorPoolMapOperator): dead actors restart, their tasks retry.
ACTOR_POOL_RETRIES = {"max_restarts": -1, "max_task_retries": -1}


def fault_tolerance() -> dict[str, Any]:
    """Set and return the run's retry settings: node loss is retried; application errors and skipped blocks
    are not (an error in a model or an attack is deterministic, and a skipped block is lost data)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.actor_task_retry_on_errors = False  # with max_task_retries -1, a retried deterministic error never ends
    ctx.max_errored_blocks = 0
    return {**ACTOR_POOL_RETRIES, "actor_task_retry_on_errors": ctx.actor_task_retry_on_errors,
            "max_errored_blocks": ctx.max_errored_blocks, "commit_task_max_retries": 3}


def collect(ds, tally: Tally) -> None:
    """Stream the part metadata of the attack stage into ``tally`` (no result row reaches the driver)."""
    for block in ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=1):
        tally.add(block)

def run(cfg: EvalConfig, out: str | None = None, *, loader=None, report: bool = True) -> RunResult:
    """Run (or resume) the evaluation ``cfg`` describes; ``loader`` replaces the config's model loader."""
    if cfg.reuse_from:
        return _run_reuse(cfg, out, loader=loader, report=report)
    store = open_run(cfg, out)
    log(f"run {store.uri} (key {cfg.run_key()[:12]})")
    plan = build_plan(cfg)
    loader = loader or build_loader(cfg)
    source = make_source(cfg.dataset)
    input_size, checks = preflight(loader, plan, getattr(source, "data", None), getattr(source, "input_size", None))
    store.write_json("checks.json", {"input_shape": list(input_size), "flags": checks})

    def make_layout() -> Layout:
        init_ray(cfg)  # image folders are checked with Ray
        return source.layout(cfg.shards, cfg.resources.batch_size)

    layout = store.layout(make_layout)
    per_example = rows_per_example(plan, len(cfg.defenses))
    kwargs = {"loader": loader, "plan": plan, "device": "auto"}
    return _execute(cfg, store, layout, per_example, report,
                    lambda pending, writer: attack_stage(source.dataset(layout, pending, input_size),
                                                         source.grouped, BatchActor, {**kwargs, **writer}, cfg))


def _execute(cfg, store: RunStore, layout: Layout, per_example: int, report: bool, make_ds) -> RunResult:
    """Compute the shards without a done marker; ``make_ds(pending, writer)`` builds the attack stage, whose
    actors take ``writer`` (the run's URI and the attempt) to write their parts."""
    done = store.finished(layout.shards)
    pending = [k for k in range(layout.shards) if k not in done]
    attempt = len(store.attempts()) + 1
    result = RunResult(store.uri, cfg.run_key(), skipped=done)
    if done:
        log(f"resuming: {len(done)}/{layout.shards} shards already finished, {len(pending)} to go")
    t0 = time.perf_counter()
    tally = Tally(layout, per_example, attempt, Arrivals(t0), submit=lambda k, parts, info: submit_commit(
        store, k, parts, info), wait=ray_get, log=log)
    settings: dict[str, Any] = {}
    try:
        if pending:
            n_pending = int(sum(layout.examples_per_shard()[k] for k in pending))
            log(f"evaluating {n_pending} examples in {len(pending)} shard(s) on {cfg.resources.actors} actor(s)")
            init_ray(cfg)
            settings = fault_tolerance()
            for k in pending:  # parts an interrupted attempt left behind are never counted
                store.drop_parts(k)
            collect(make_ds(pending, {"store": store.uri, "attempt": attempt}), tally)
            tally.settle()
            tally.check_complete(pending)
    finally:
        tally.settle(raise_errors=False)  # commits already started still land (and are recorded) on a failure
        wall = time.perf_counter() - t0
        committed = sorted(tally.committed)
        examples = int(sum(layout.examples_per_shard()[k] for k in committed))
        store.write_json(f"attempts/{attempt:04d}.json", {
            "attempt": attempt, "shards": committed, "examples": examples, "wall_seconds": wall,
            "images_per_second": examples / wall if wall > 0 and examples else None,
            **tally.arrivals.record(per_example),
            "finished": sorted(set(done) | set(committed)) == list(range(layout.shards)),
            "actors": cfg.resources.actors, "gpus_per_actor": cfg.resources.gpus_per_actor,
            "fault_tolerance": settings, **(attempt_record(tally) if pending else {}),
        })
    result.computed = committed
    if report:
        result.report, result.summary = write_run_report(store, cfg, layout)
    return result


# --- reuse of stored adversarial sets ------------------------------------------------------------
def _run_reuse(cfg: EvalConfig, out, *, loader, report) -> RunResult:
    import ray

    stored = StoredRun(absolute_path(cfg.reuse_from))
    stored.check_reusable()
    base, layout = parse_config(stored.base_config(), f"{cfg.reuse_from}/run.json"), stored.layout
    store = open_run(cfg, out)
    log(f"run {store.uri}: {len(cfg.defenses)} defense(s) on the stored adversarials of {stored.uri}")
    plan = Plan((), adaptive=False, features=tuple(base.features), store_images=True, seed=base.seed)
    loader = loader or model_loader(base.model, cfg.defenses)
    input_size, _ = preflight(loader, plan)
    store.write_json("checks.json", {"input_shape": list(input_size), "flags": []})
    store.write_json("layout.json", layout.to_json())
    per_example = (1 + len(build_plan(base).grid)) * (1 + len(cfg.defenses))
    kwargs = {"loader": loader, "plan": plan, "device": "auto"}

    def make_ds(pending, writer):
        from ray.data.expressions import col

        ds = ray.data.read_parquet(stored.shard_paths(pending), filesystem=stored.store.fs)
        return attack_stage(ds.filter(expr=reusable(col)), True, StoredActor, {**kwargs, **writer}, cfg)

    return _execute(cfg, store, layout, per_example, report, make_ds)


def evaluate_stored(run_dir: str, defenses: list, out: str | None = None, **cfg_overrides) -> dict[str, Any]:
    """Evaluate ``defenses`` (spec strings or ``{stages, detector, name}``) on a finished run's stored
    non-adaptive adversarials; returns the summary (``results.json``). For Ray Tune trainables."""
    cfg = parse_config({"reuse_from": run_dir, "adaptive": False, "defenses": defenses, **cfg_overrides})
    return run(cfg, out=out).summary


# --- report ---------------------------------------------------------------------------------------------
def write_run_report(store: RunStore, cfg: EvalConfig, layout: Layout) -> tuple[str, dict]:
    log("writing the report")
    return report_run(StoredRun(store.uri), run_meta(store, cfg, layout, versions()), cfg.report.examples)


# --- entrypoint ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config (docs/pipeline.md lists the keys)")
    parser.add_argument("--out", help="run folder or URI (default: output.path/<name>-<config hash>)")
    parser.add_argument("--reuse", metavar="RUN_DIR", help="evaluate the config's defenses on this finished run's "
                                                           "stored adversarials (same as reuse_from:)")
    common.add_base_dir(parser, "jobs.evaluate")
    args = parser.parse_args(argv)

    def body() -> int:
        with common.run_from(args.base_dir):
            if args.base_dir is None:
                common.check_job_paths({"--config": args.config, "--reuse": args.reuse}, {})
            if args.reuse:  # the stored run's dataset, model and attacks are reused
                cfg = load_config(args.config, {"reuse_from": args.reuse, "adaptive": False},
                                  drop=("dataset", "model", "attacks"))
            else:
                cfg = load_config(args.config)
            if args.base_dir is None:
                common.check_job_paths(*cfg.job_paths(args.out))
            print(run(cfg, out=args.out).report)
        return 0

    return guarded("evaluate", body, "rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
