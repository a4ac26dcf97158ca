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
   *parts* (atomically, under names fixed by their content) and returns one
   metadata row per part; the driver, which never sees a result row, tallies
   the parts and, the moment a shard has all its examples, starts a commit
   task that streams the parts into the shard's file and writes its done
   marker (:mod:`jobs.store`), so an interrupted run resumes where it stopped
   and a node lost mid-run costs only its in-flight batches, which Ray retries;
4. :func:`adv.evaluate.report.write_report` turns the stored rows into report.md,
   results.json and figures.

``--reuse RUN_DIR`` (or ``reuse_from:``) evaluates new defenses on the stored
non-adaptive adversarials of a finished run without regenerating them;
:func:`evaluate_stored` is the same for a Ray Tune trainable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from adv.errors import AdvError, ConfigError
from adv.evaluate.rows import NONE, SCALAR_COLUMNS
from adv.evaluate.worker import BatchEvaluator, GridPoint, ModelLoader, Plan, StoredEvaluator
from jobs import common
from jobs.common import guarded, versions
from jobs.config import AttackConfig, EvalConfig, load_config, parse_config
from jobs.sources import Layout, make_source
from jobs.store import RunStore



log = common.logger("evaluate")


# --- config -> plan, loader --------------------------------------------------------------------
def build_plan(cfg: EvalConfig) -> Plan:
    from adv.attacks import get_attack

    grid = []
    for a in cfg.attacks:
        budget = AttackConfig.budget_param(get_attack(a.name))
        for eps in a.eps:
            for steps in (a.steps or [None]):
                grid.append(GridPoint(a.name, eps, a.norm, steps, budget if steps is not None else None,
                                      tuple(sorted(a.params.items()))))
    return Plan(tuple(grid), adaptive=cfg.adaptive, features=tuple(cfg.features),
                store_images=cfg.store_images, seed=cfg.seed)


def _abs(path: str | None) -> str | None:
    """Local paths made absolute on the driver: actors need not share its working directory."""
    return path if path is None or "://" in path else os.path.abspath(path)


def _abs_spec(spec: str | None) -> str | None:
    """A stage spec with its ``checkpoint=`` made absolute (other values untouched)."""
    if spec is None or "checkpoint=" not in spec:
        return spec
    from adv.defenses import parse_defense_spec

    name, params = parse_defense_spec(spec)
    params["checkpoint"] = _abs(params["checkpoint"])
    return name + ":" + ",".join(f"{k}={v}" for k, v in params.items())


def make_loader(model, defenses) -> ModelLoader:
    return ModelLoader(checkpoint=_abs(model.checkpoint), arch=model.arch, weights=_abs(model.weights),
                       factory=model.factory,
                       defenses=tuple((d.label, tuple(_abs_spec(s) for s in d.stages), _abs_spec(d.detector))
                                      + ((_abs(d.classifier),) if d.classifier else ()) for d in defenses))


def build_loader(cfg: EvalConfig) -> ModelLoader:
    return make_loader(cfg.model, cfg.defenses)


def rows_per_example(plan: Plan, n_defenses: int) -> int:
    models = 1 + n_defenses
    return models + len(plan.grid) * models + (len(plan.grid) * n_defenses if plan.adaptive else 0)


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


#: The sort order of a shard's rows (each part is sorted; parts are committed in order of their first example).
ROW_ORDER = [("index", "ascending"), ("track", "ascending"), ("defense", "ascending"), ("grid", "ascending")]
#: What an actor returns per part written: metadata only, never result rows.
PART_COLUMNS = ("shard", "part", "rows", "examples", "node", "compute_seconds", "write_seconds")


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

    table = BlockAccessor.batch_to_block(rows)  # the same Arrow types Ray Data would store
    shard_col = table.column("shard").to_numpy()
    meta: dict[str, list] = {c: [] for c in PART_COLUMNS}
    for k in np.unique(shard_col).tolist():
        part = table.filter(pa.array(shard_col == k)).sort_by(ROW_ORDER)
        t0 = time.perf_counter()
        name = store.write_part(k, part, attempt)
        meta["write_seconds"].append(time.perf_counter() - t0)
        meta["shard"].append(k)
        meta["part"].append(name)
        meta["rows"].append(part.num_rows)
        meta["examples"].append(len(np.unique(part.column("index").to_numpy())))
        meta["node"].append(node)
        meta["compute_seconds"].append(seconds * part.num_rows / table.num_rows)
    return {c: np.asarray(v) for c, v in meta.items()}


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
    uri = _abs(out or f"{cfg.output.path.rstrip('/')}/{cfg.name}-{key[:12]}")
    store = RunStore(uri)
    if store.exists("run.json"):
        found = store.read_json("run.json").get("key")
        if found != key:
            raise ConfigError(f"--out: {uri} holds a run of another config (key {str(found)[:12]}, this config "
                              f"{key[:12]}); choose another folder")
    else:
        store.write_json("run.json", {"key": key, "config": cfg.model_dump(mode="json"), "versions": versions(),
                                      "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return store


def get_layout(store: RunStore, make) -> Layout:
    if store.exists("layout.json"):
        return Layout(**store.read_json("layout.json"))
    layout = make()
    store.write_json("layout.json", layout.to_json())
    return layout


def preflight(loader, plan: Plan, data=None, size=None) -> tuple[tuple[int, ...], list[dict]]:
    """Build the models once on the driver and score a few inputs, so config errors surface here, clearly.

    ``size``: the images' (C, H, W) when the source knows it without ``data`` (a Parquet set).
    Returns the model's input size and the model checks of :mod:`adv.evaluate.checks` (softmax
    outputs, randomness, zero input gradients of the attacked model) on up to 16 real examples.
    """
    import torch

    from adv.evaluate.checks import check_outputs, check_zero_gradients
    from adv.evaluate.worker import Scorer

    try:
        scorer = Scorer(loader, plan, device="cpu")
    except (AdvError, ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"model/defenses: {exc}") from None
    model_size = _input_size(scorer.classifier, data, size)
    if data is not None:
        if tuple(data.input_size) != model_size:
            raise ConfigError(f"dataset: images are {'x'.join(map(str, data.input_size))} but the model expects "
                              f"{'x'.join(map(str, model_size))}")
        k = getattr(scorer.classifier, "num_classes", None) or _outputs(scorer.classifier, data)
        if data.num_classes > k:
            raise ConfigError(f"dataset: {data.num_classes} classes but the model has {k}")
        x, y = data.tensors()
        x, y = x[:16], y[:16]
    else:
        x, y = torch.rand(2, *model_size), torch.zeros(2, dtype=torch.long)
    checks = []
    for label in scorer.labels():
        try:
            scorer.score(label, x, y, None)
        except (AdvError, ValueError, NotImplementedError, AttributeError) as exc:
            raise ConfigError(f"defenses: {label!r} cannot be evaluated with features {list(plan.features)}: "
                              f"{exc}") from None
        if data is None:
            continue
        target = scorer.classifier if label == NONE else scorer.defenses[label].attack_target
        flags = check_outputs(scorer.model(label), x) + check_zero_gradients(target, x, y)
        checks += [{"flag": f.code, "where": label, "detail": f.message} for f in flags]
    return model_size, checks


def _input_size(classifier, data, stored=None) -> tuple[int, ...]:
    """The registry's input size; a factory's module without one takes the in-memory dataset's, or a Parquet
    set's stored image shape (``stored``)."""
    size = getattr(classifier, "input_size", None)
    if size is not None:
        return tuple(size)
    if data is None and stored is not None:
        return tuple(stored)
    if data is None:
        raise ConfigError("model.factory: the module has no input_size attribute (C, H, W), which file datasets "
                          "need to size the images; set one on the module or use a registered dataset")
    return tuple(data.input_size)


def _outputs(classifier, data) -> int:
    import torch

    from adv.evaluate.inputs import check_model

    x, y = next(data.batches(2))
    try:
        check_model(classifier, x, y)
    except AdvError as exc:
        raise ConfigError(f"model.factory: {exc}") from None
    with torch.no_grad():
        return int(classifier(x).shape[1])


@dataclass
class Arrivals:
    """When result rows reached the driver, to separate the pool's start-up from its steady throughput."""

    t0: float
    first: float | None = None  # seconds from the stage start to the first result block
    last: float | None = None
    rows_after_first: int = 0  # rows that arrived after the first block

    def add(self, rows: int) -> None:
        now = time.perf_counter() - self.t0
        if self.first is None:
            self.first = now
        else:
            self.rows_after_first += rows
        self.last = now

    def record(self, per_example: int) -> dict[str, float | None]:
        steady = None
        if self.first is not None and self.last > self.first:
            steady = self.rows_after_first / per_example / (self.last - self.first)
        return {"first_result_seconds": self.first, "steady_images_per_second": steady}


@dataclass
class Tally:
    """The driver's view of an attempt: part metadata per shard, commit tasks, per-node work. Never rows."""

    store: RunStore
    layout: Layout
    per_example: int
    attempt: int
    arrivals: Arrivals
    parts: dict[int, list[str]] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)
    nodes: dict[str, dict[str, float]] = field(default_factory=dict)
    commits: dict[int, Any] = field(default_factory=dict)  # shard -> commit task (ObjectRef)
    committed: list[int] = field(default_factory=list)
    commit_seconds: list[float] = field(default_factory=list)
    write_seconds: list[float] = field(default_factory=list)

    def add(self, meta: dict[str, np.ndarray]) -> None:
        """One block of part metadata (:data:`PART_COLUMNS`); starts the commit of every shard it completes."""
        expected = self.layout.examples_per_shard()
        self.arrivals.add(int(np.sum(meta["rows"])))
        for i, k in enumerate(meta["shard"].tolist()):
            self.parts.setdefault(k, []).append(str(meta["part"][i]))
            self.examples[k] = self.examples.get(k, 0) + int(meta["examples"][i])
            self.rows[k] = self.rows.get(k, 0) + int(meta["rows"][i])
            self.write_seconds.append(float(meta["write_seconds"][i]))
            node = self.nodes.setdefault(str(meta["node"][i]), {"parts": 0, "examples": 0, "compute_seconds": 0.0})
            node["parts"] += 1
            node["examples"] += int(meta["examples"][i])
            node["compute_seconds"] += float(meta["compute_seconds"][i])
            if self.examples[k] > expected[k] or len(set(self.parts[k])) < len(self.parts[k]):
                raise RuntimeError(f"shard {k}: {self.examples[k]} examples in {len(self.parts[k])} parts, "
                                   f"expected {expected[k]} (duplicate batches?)")
            if self.examples[k] == expected[k]:
                if self.rows[k] != expected[k] * self.per_example:
                    raise RuntimeError(f"shard {k}: {self.rows[k]} rows, expected {expected[k] * self.per_example}")
                self.commits[k] = submit_commit(self.store, k, sorted(self.parts.pop(k)), {"attempt": self.attempt})

    def settle(self, raise_errors: bool = True) -> None:
        """Wait for the commit tasks started so far; the shards they committed join ``committed``."""
        import ray

        for k, ref in sorted(self.commits.items()):
            try:
                seconds = ray.get(ref)
            except Exception:
                if raise_errors:
                    raise
                continue
            self.committed.append(k)
            self.commit_seconds.append(seconds)
            log(f"shard {k} committed ({len(self.committed)} this attempt, "
                f"{time.perf_counter() - self.arrivals.t0:.1f} s, commit {seconds:.2f} s)")
        self.commits.clear()

    def check_complete(self, pending: list[int]) -> None:
        incomplete = {k: (self.examples.get(k, 0), self.layout.examples_per_shard()[k])
                      for k in pending if k not in self.committed}
        if incomplete:
            raise RuntimeError(f"shards {sorted(incomplete)} did not receive all examples (got, expected): "
                               f"{incomplete}; rerun to resume")

    def record(self) -> dict[str, Any]:
        nodes = {}
        for node, n in self.nodes.items():
            rate = n["examples"] / n["compute_seconds"] if n["compute_seconds"] > 0 else None
            nodes[node] = {**n, "examples_per_compute_second": rate}
        return {"nodes": nodes, "node_resources": _node_resources(list(nodes)),
                "commit_seconds": _stats(self.commit_seconds), "part_write_seconds": _stats(self.write_seconds)}


def _stats(xs: list[float]) -> dict[str, float] | None:
    return {"n": len(xs), "median": float(np.median(xs)), "max": float(np.max(xs)), "total": float(np.sum(xs))} \
        if xs else None


def _node_resources(node_ids: list[str]) -> dict[str, dict]:
    """Each node's resources and whether it is still alive (a removed node stays listed, dead)."""
    import ray

    known = {n["NodeID"]: n for n in ray.nodes()}
    return {i: {"alive": known[i]["Alive"], "resources": known[i].get("Resources", {})} if i in known else {}
            for i in node_ids}


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

    layout = get_layout(store, make_layout)
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
    attempt = len(_attempts(store)) + 1
    result = RunResult(store.uri, cfg.run_key(), skipped=done)
    if done:
        log(f"resuming: {len(done)}/{layout.shards} shards already finished, {len(pending)} to go")
    t0 = time.perf_counter()
    tally = Tally(store, layout, per_example, attempt, Arrivals(t0))
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
            "fault_tolerance": settings, **(tally.record() if pending else {}),
        })
    result.computed = committed
    if report:
        result.report, result.summary = write_run_report(store, cfg, layout)
    return result


def _attempts(store: RunStore) -> list[dict]:
    import pyarrow.fs as pafs

    if not store.exists("attempts"):
        return []
    infos = store.fs.get_file_info(pafs.FileSelector(store.path("attempts")))
    names = sorted(i.base_name for i in infos if i.base_name.endswith(".json"))
    return [store.read_json(f"attempts/{n}") for n in names]


# --- reuse of stored adversarial sets ------------------------------------------------------------
def _stored_run(uri: str) -> tuple[RunStore, EvalConfig, Layout]:
    stored = RunStore(_abs(uri))
    if not stored.exists("run.json") or not stored.exists("layout.json"):
        raise ConfigError(f"reuse_from: {uri} is not a run folder (no run.json/layout.json)")
    cfg = parse_config(stored.read_json("run.json")["config"], f"{uri}/run.json")
    if cfg.reuse_from:
        cfg = _stored_run(cfg.reuse_from)[1]
    layout = Layout(**stored.read_json("layout.json"))
    done = stored.finished(layout.shards)
    if len(done) < layout.shards:
        raise ConfigError(f"reuse_from: {uri} is unfinished ({len(done)}/{layout.shards} shards); "
                          "rerun it to completion first")
    if not cfg.store_images:
        raise ConfigError(f"reuse_from: {uri} was run with store_images: false; it has no images to reuse")
    return stored, cfg, layout


def _run_reuse(cfg: EvalConfig, out, *, loader, report) -> RunResult:
    import ray

    stored, base, layout = _stored_run(cfg.reuse_from)
    store = open_run(cfg, out)
    log(f"run {store.uri}: {len(cfg.defenses)} defense(s) on the stored adversarials of {stored.uri}")
    plan = Plan((), adaptive=False, features=tuple(base.features), store_images=True, seed=base.seed)
    loader = loader or make_loader(base.model, cfg.defenses)
    input_size, _ = preflight(loader, plan)
    store.write_json("checks.json", {"input_shape": list(input_size), "flags": []})
    store.write_json("layout.json", layout.to_json())
    per_example = (1 + len(build_plan(base).grid)) * (1 + len(cfg.defenses))
    kwargs = {"loader": loader, "plan": plan, "device": "auto"}

    def make_ds(pending, writer):
        from ray.data.expressions import col

        ds = ray.data.read_parquet(stored.shard_paths(pending), filesystem=stored.fs)
        ds = ds.filter(expr=(col("defense") == NONE) & (col("track") != "adaptive"))
        return attack_stage(ds, True, StoredActor, {**kwargs, **writer}, cfg)

    result = _execute(cfg, store, layout, per_example, report, make_ds)
    return result


def evaluate_stored(run_dir: str, defenses: list, out: str | None = None, **cfg_overrides) -> dict[str, Any]:
    """Evaluate ``defenses`` (spec strings or ``{stages, detector, name}``) on a finished run's stored
    non-adaptive adversarials; returns the summary (``results.json``). For Ray Tune trainables."""
    cfg = parse_config({"reuse_from": run_dir, "adaptive": False, "defenses": defenses, **cfg_overrides})
    return run(cfg, out=out).summary


# --- report ---------------------------------------------------------------------------------------------
def _to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if hasattr(column, "to_numpy_ndarray"):
            out[name] = column.to_numpy_ndarray()
        elif hasattr(column.type, "shape"):  # ray tensor extension
            out[name] = column.to_numpy()
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def load_rows(store: RunStore, layout: Layout, examples: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """All rows' scalar columns (+ Grad-CAM maps), and every column of the first ``examples`` examples."""
    import pyarrow.compute as pc

    import ray.data  # noqa: F401  (registers the tensor extension types with pyarrow)

    shards = list(range(layout.shards))
    names = store.schema(shards[0]).names
    cols = [c for c in (*SCALAR_COLUMNS, "cam") if c in names]
    table = store.read_table(shards, columns=cols)
    first = store.read_table([0])
    first = first.filter(pc.less(first.column("index"), examples))
    return _to_numpy(table), _to_numpy(first)


def write_run_report(store: RunStore, cfg: EvalConfig, layout: Layout) -> tuple[str, dict]:
    from adv.evaluate.report import write_report

    log("writing the report")
    rows, examples = load_rows(store, layout, cfg.report.examples)
    run_info = store.read_json("run.json")
    checks = store.read_json("checks.json") if store.exists("checks.json") else {}
    meta = {
        "name": cfg.name, "key": run_info["key"], "run_dir": store.uri, "config": run_info["config"],
        "versions": versions(), "seeds": {"dataset": cfg.dataset.seed if cfg.dataset else None, "attacks": cfg.seed},
        "attempts": _attempts(store),
        "layout": {"n": layout.n, "shards": layout.shards, "chunk_size": layout.chunk_size, "source": layout.source,
                   "classes": layout.classes},
        "skipped": layout.skipped, "reuse_from": cfg.reuse_from, "defenses": [d.label for d in cfg.defenses],
        "input_shape": checks.get("input_shape"), "model_checks": checks.get("flags", []),
        "report": cfg.report.model_dump(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = store.local_dir() or Path(tmp)
        summary = write_report(rows, examples, meta, local)
        if store.local_dir() is None:
            store.put_folder(tmp)
    path = store.path("report.md") if store.local else f"{store.uri.rstrip('/')}/report.md"
    return path, summary


# --- entrypoint ----------------------------------------------------------------------------------------
def _spec_checkpoint(spec: str | None) -> str | None:
    if spec is None or "checkpoint=" not in spec:
        return None
    from adv.defenses import parse_defense_spec

    return parse_defense_spec(spec)[1].get("checkpoint")


def job_paths(cfg: EvalConfig, out: str | None) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """The config's input and output paths, by the key that sets them (for :func:`common.check_job_paths`)."""
    inputs: dict[str, str | None] = {"reuse_from": cfg.reuse_from}
    if cfg.model is not None:
        inputs.update({"model.checkpoint": cfg.model.checkpoint, "model.weights": cfg.model.weights})
    if cfg.dataset is not None:
        inputs["dataset.root"] = cfg.dataset.root
    for i, d in enumerate(cfg.defenses):
        inputs.update({f"defenses[{i}].stages[{j}]": _spec_checkpoint(s) for j, s in enumerate(d.stages)})
        inputs[f"defenses[{i}].detector"] = _spec_checkpoint(d.detector)
    return inputs, ({"--out": out} if out else {"output.path": cfg.output.path})


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
                common.check_job_paths(*job_paths(cfg, args.out))
            print(run(cfg, out=args.out).report)
        return 0

    return guarded("evaluate", body, "rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
