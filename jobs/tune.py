"""Ray Tune: sweep defense settings on validation data, select on adaptive robustness, export a bundle.

    python -m jobs.tune --config jobs/configs/tune-default.yaml
    ray job submit --working-dir . -- python -m jobs.tune --config jobs/configs/tune-gpu.yaml --base-dir "$PWD"

(``--base-dir``: relative paths resolve against the submitting folder; on a
remote cluster use absolute shared paths or URIs instead, README "Ray clusters").

Stages (the Ray-free logic is :mod:`adv.tuning`):

1. the validation subset is drawn from the split minus the test subset
   (:mod:`adv.tuning.splits`); ``stored`` sweeps generate their stored
   non-adaptive set on it once with the Ray Data job (``jobs.evaluate.run``)
   unless ``stored.run`` names one made on the same subset;
2. Tune runs the trials (grid search when every dimension is discrete, else
   Optuna; ASHA on evaluated examples or epochs) into ``<run>/sweep``;
3. ``stored`` sweeps re-check their best few trials adaptively (``<run>/recheck``);
4. the selected configuration is measured on the disjoint test subset and
   written as a bundle to ``<run>/best``, next to ``<run>/report.md``.

Kill the driver and rerun the same command: each phase resumes with
``Tuner.restore`` and finished trials are not rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from adv.errors import ConfigError
from adv.tuning.objective import TrialRecord, numbers_from_flat, select
from adv.tuning.space import Candidate, SearchSpace
from adv.tuning.splits import Split, check_disjoint, make_split, take
from adv.tuning.trials import Setting
from jobs import common
from jobs.store import RunStore
from jobs.tune_config import AshaConfig, SearchConfig, TrainingConfig, TuneConfig, load_tune_config

log = common.logger("tune")


@dataclass
class TuneResult:
    run_dir: str
    report: str
    bundle: str
    selected: TrialRecord
    records: list[TrialRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Seconds per stage (ray, split, stored_set, sweep, recheck, export, report), also in ``<run>/timings.json``.
    timings: dict[str, float] = field(default_factory=dict)


# --- data, grid, stored set --------------------------------------------------------------------------------
def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _abs_space(space: dict) -> dict:
    """Stage files made absolute on the driver: Tune runs each trial in its own working directory."""
    from jobs.evaluate import _abs_spec

    out = dict(space)
    if isinstance(space.get("pipeline"), list):
        out["pipeline"] = [[_abs_spec(x) for x in ([p] if isinstance(p, str) else p)] if isinstance(p, (str, list))
                           else p for p in space["pipeline"]]
    det = space.get("detector")
    if det is not None:
        out["detector"] = _abs_spec(det) if isinstance(det, str) else [_abs_spec(d) if isinstance(d, str) else d
                                                                      for d in det]
    return out


def run_uri(cfg: TuneConfig) -> str:
    return f"{_abs(cfg.storage_path).rstrip('/')}/{cfg.name}"


def load_split(cfg: TuneConfig, store: RunStore):
    """The full split, the disjoint subsets (checked against a resumed run's split.json) and the grid."""
    from adv.data import load_dataset

    d = cfg.data
    full = load_dataset(d.name, split=d.split, root=d.root, download=d.download)
    split = make_split(d.name, d.split, len(full), d.test.n, d.test.seed, d.validation.n, d.validation.seed)
    if store.exists("split.json") and store.read_json("split.json") != split.to_json():
        raise ConfigError(f"data: {store.uri} was run with other subsets (split.json differs); use another name")
    store.write_json("split.json", split.to_json())
    return full, split, _grid(cfg)


def ensure_stored(cfg: TuneConfig, split: Split, val, uri: str) -> str:
    """The stored non-adaptive set on the validation subset: ``stored.run`` (checked) or generated once."""
    from jobs.evaluate import run as evaluate
    from jobs.sources import export_dataset

    if cfg.stored.run:
        check_stored(cfg.stored.run, split)
        return cfg.stored.run
    if _in_process(cfg, len(val)):
        return stored_in_process(cfg, val, uri)
    vstore, root = RunStore(uri), f"{uri}/validation"
    if not vstore.exists("validation.json"):  # beside the Parquet folder: Parquet readers take every file in it
        export_dataset(val, root)
        vstore.write_json("validation.json", split.to_json())
    ecfg = stored_eval_config(cfg, root, len(val))
    out = f"{uri}/stored"
    log(f"stored set: the {len(val)} validation images attacked once by the Ray Data job (resumed if partial) -> {out}")
    evaluate(ecfg, out=out, report=False)
    return out


def stored_eval_config(cfg: TuneConfig, root: str, n: int):
    """The ``jobs.evaluate`` config that attacks the ``n`` validation images exported to ``root`` once."""
    from jobs.config import parse_config

    return parse_config({
        "name": f"{cfg.name}-validation", "seed": cfg.seed, "dataset": {"name": "parquet", "root": root},
        "model": _eval_model(cfg), "defenses": [], "adaptive": False, "features": [],
        "attacks": [a.model_dump(mode="json") for a in cfg.attacks], "store_images": True,
        "shards": min(4, n), "resources": {"actors": cfg.resources.generate_actors,
                                           "batch_size": cfg.resources.batch_size},
    }, "stored set")


def _in_process(cfg: TuneConfig, n: int) -> bool:
    import ray

    mode = cfg.stored.generate
    if mode == "auto":
        return n <= cfg.stored.in_process_max and len([x for x in ray.nodes() if x.get("Alive")]) == 1
    return mode == "in_process"


def stored_in_process(cfg: TuneConfig, val, uri: str) -> str:
    """The stored set generated in the driver (``adv.tuning.trials.generate_stored``) into
    ``<run>/stored-local/rows.npz``, once: a resumed run reads it back."""
    from adv.evaluate.worker import ModelLoader
    from adv.tuning import trials

    out = f"{uri}/stored-local"
    store = RunStore(out)
    if not store.exists("rows.npz"):
        log(f"stored set: the {len(val)} validation images attacked once in this process -> {out}")
        setting = Setting(tuple(_grid(cfg)), cfg.objective.max_clean_drop, "", cfg.seed, cfg.resources.batch_size)
        rows = trials.generate_stored(ModelLoader(**classifier_kwargs(cfg)), val, setting)
        store.write_bytes("rows.npz", trials.save_rows(rows))
    return out


def classifier_kwargs(cfg: TuneConfig) -> dict:
    """The undefended classifier as ``ModelLoader`` keywords: the adv checkpoint, or the user's factory."""
    if cfg.model is None:
        return {"checkpoint": _abs(cfg.checkpoint)}
    return {"factory": cfg.model.factory, "weights": _abs(cfg.model.weights) if cfg.model.weights else None}


def _eval_model(cfg: TuneConfig) -> dict:
    """The stored set's ``jobs.evaluate`` ``model:`` block (the same spelling as the sweep's)."""
    return {"checkpoint": _abs(cfg.checkpoint)} if cfg.model is None else classifier_kwargs(cfg)


def check_model(cfg: TuneConfig) -> None:
    """A factory model is imported and built once on the driver before Ray starts: an unknown module, a
    missing weights file or weights of another architecture is one line naming the key."""
    from adv.cli.common import factory_on_path
    from adv.errors import AdvError
    from adv.models.factory import build_from_factory

    if cfg.model is None:
        return
    weights = cfg.model.weights
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ConfigError(f"model.weights: file not found: {weights}")
    try:
        factory_on_path(cfg.model.factory)  # trials import it from the driver's sys.path (or the job's working dir)
        build_from_factory(cfg.model.factory, weights)
    except AdvError as exc:
        raise ConfigError(f"model.factory: {exc}") from None


def check_outputs(cfg: TuneConfig, data) -> None:
    """A factory model's logits cover the dataset's classes (two images through it, before any trial)."""
    from adv.evaluate.worker import ModelLoader
    from jobs.evaluate import _outputs

    if cfg.model is None:
        return
    k = _outputs(ModelLoader(**classifier_kwargs(cfg)).classifier()[0], data)
    if data.num_classes > k:
        raise ConfigError(f"model.factory: the module has {k} outputs but {cfg.data.name} has "
                          f"{data.num_classes} classes")


def _grid(cfg: TuneConfig):
    from jobs.evaluate import build_plan

    return build_plan(SimpleNamespace(attacks=cfg.attacks, adaptive=True, features=[], store_images=False,
                                      seed=cfg.seed)).grid


def check_stored(run: str, split: Split) -> None:
    """A reused ``jobs.evaluate`` run must have been made on this sweep's validation subset."""
    import numpy as np

    store = RunStore(run)
    if not store.exists("run.json"):
        raise ConfigError(f"stored.run: {run} is not a jobs.evaluate run folder (no run.json)")
    dataset = store.read_json("run.json")["config"].get("dataset") or {}
    root = dataset.get("root") if dataset.get("name") == "parquet" else None
    marker = RunStore(root.rstrip("/").rsplit("/", 1)[0]) if root and root.rstrip("/").endswith("/validation") else None
    if marker is None or not marker.exists("validation.json"):
        raise ConfigError(f"stored.run: {run} was not made on a validation subset written by jobs.tune; "
                          "tuning on its images could tune on the test set")
    made = marker.read_json("validation.json")
    if made["validation"]["sha256"] != split.to_json()["validation"]["sha256"]:
        raise ConfigError(f"stored.run: {run} was made on another validation subset than data.validation")
    check_disjoint(split.test, np.asarray(made["validation"]["indices"]))


def stored_groups(uri: str):
    """The stored run's clean and non-adaptive rows of the undefended classifier, one chunk at a time."""
    import numpy as np
    import pyarrow.compute as pc
    import ray.data  # noqa: F401  (registers the tensor column types)

    from jobs.evaluate import _to_numpy

    store = RunStore(uri)
    if store.exists("rows.npz"):  # generated in the driver (stored_in_process)
        from adv.tuning.trials import stored_chunks

        yield from stored_chunks(store.read_bytes("rows.npz"))
        return
    shards = len(set(store.read_json("layout.json")["chunk_shard"]))
    for k in range(shards):
        table = store.read_table([k])
        table = table.filter(pc.and_(pc.equal(table["defense"], "none"), pc.not_equal(table["track"], "adaptive")))
        cols = _to_numpy(table)
        for c in np.unique(cols["chunk"]):
            sel = cols["chunk"] == c
            yield {name: v[sel] for name, v in cols.items()}


# --- the trainable ------------------------------------------------------------------------------------------
def trainable(config: dict, ctx: dict) -> None:
    """One trial: resolve its candidate, run the trial body of its kind, report through ``tune.report``."""
    import torch
    from ray import tune

    from adv.tuning import trials

    torch.set_num_threads(ctx["threads"])
    space: SearchSpace = ctx["space"]
    cand = Candidate.from_dict(config["candidate"]) if "candidate" in config else space.candidate(config)
    cand_json = json.dumps(cand.to_dict(), default=str)
    _trace(ctx.get("trace"), "start", cand)

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        m = {**metrics, "candidate": cand_json}
        tune.report(m, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    setting, kind = ctx["setting"], ctx["kind"]
    if kind == "stored":
        loader = trials.stage_loader(ctx["checkpoint"], cand.stages, cand.detector, **ctx["model"])
        trials.run_stored(loader, stored_groups(ctx["stored"]), setting, report)
    elif kind == "adaptive":
        loader = trials.stage_loader(ctx["checkpoint"], cand.stages, cand.detector, **ctx["model"])
        trials.run_adaptive(loader, ctx["val"], setting, report, grace=ctx["grace"], factor=ctx["factor"])
    else:
        work = tempfile.mkdtemp(prefix="adv-trial-")
        restored = tune.get_checkpoint()
        if restored is not None:
            restored.to_directory(work)
        t = ctx["training"]
        trials.run_training(cand.loss, ctx["checkpoint"], ctx["train"], ctx["val"], setting, report,
                            epochs=t["epochs"], batch_size=t["batch_size"], lr=t["lr"], work_dir=work,
                            overfit_drop=t["overfit_drop"], overfit_gap=t["overfit_gap"])
    _trace(ctx.get("trace"), "end", cand)


def _trace(path: str | None, event: str, cand: Candidate) -> None:
    """The driver's ``$ADV_TUNE_TRACE``: one JSON line per trial start/end (how the resume test sees what ran)."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "candidate": cand.label}) + "\n")


# --- Tune phases ------------------------------------------------------------------------------------------------
def tune_phase(cfg: TuneConfig, uri: str, phase: str, ctx: dict, param_space: dict, *, search_alg=None,
               scheduler=None, num_samples: int = 1):
    """Run (or resume with ``Tuner.restore``) one Tune experiment at ``<run>/<phase>``."""
    from ray import tune

    res = cfg.resources
    fn = tune.with_resources(tune.with_parameters(trainable, ctx=ctx),
                             {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial})
    path, live = f"{uri}/{phase}", common.live_progress()
    if tune.Tuner.can_restore(path):
        log(f"{phase}: resuming {path} (finished trials are kept)")
        tuner = tune.Tuner.restore(path, trainable=fn, resume_errored=True, param_space=param_space)
    else:
        tuner = tune.Tuner(
            fn, param_space=param_space,
            tune_config=tune.TuneConfig(metric="objective", mode="max", search_alg=search_alg, scheduler=scheduler,
                                        num_samples=num_samples, max_concurrent_trials=res.max_concurrent,
                                        trial_dirname_creator=_trial_dirname),
            # Tune's status table is a multi-line box every few seconds: a terminal redraws it, a log file
            # would keep every copy (most of a make main log), so logs get one line per finished trial instead
            run_config=tune.RunConfig(name=phase, storage_path=uri, verbose=1 if live else 0,
                                      callbacks=[] if live else [trial_lines(phase, log)],
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    return tuner.fit()


def trial_lines(phase: str, log):
    """A Tune callback writing one line when a trial finishes or fails: a log file's progress of the sweep."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            objective = (trial.last_result or {}).get("objective")
            shown = "-" if objective is None else f"{objective:.3f}"
            log(f"{phase}: trial {trial.trial_id} finished ({self.done} so far), objective {shown}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            log(f"{phase}: trial {trial.trial_id} failed ({self.done} so far); see its error.txt")

    return TrialLines()


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"  # the default name embeds the whole candidate dict


def search_setup(search: SearchConfig, space: SearchSpace) -> tuple[dict, Any, int, str]:
    """``(param_space, search_alg, num_samples, description)``: grid search, or Optuna over tune domains."""
    from ray import tune

    algorithm = search.algorithm
    if algorithm == "auto":
        algorithm = "grid" if space.discrete else "optuna"
    if algorithm == "grid":
        grid = space.grid()
        grid_space = {"candidate": tune.grid_search([c.to_dict() for c in grid])}
        return grid_space, None, 1, f"grid ({len(grid)} configurations)"
    from ray.tune.search.optuna import OptunaSearch

    domains = {}
    for key, dim in space.choices().items():
        if dim.kind in ("choice", "fixed"):
            domains[key] = tune.choice(list(dim.values))  # OptunaSearch refuses grid_search (Ray 2.60)
        elif dim.kind == "randint":
            domains[key] = tune.randint(int(dim.low), int(dim.high))
        else:
            domains[key] = getattr(tune, dim.kind)(dim.low, dim.high)
    return domains, OptunaSearch(seed=search.seed), search.num_samples, \
        f"Optuna (TPE), {search.num_samples} samples"


def asha(cfg: AshaConfig, resource: str, max_t: int, grace: int):
    from ray.tune.schedulers import ASHAScheduler

    if not cfg.enabled:
        return None, "none"
    grace = min(grace, max_t)  # a validation subset smaller than the first rung: one rung, not Ray's assertion
    sched = ASHAScheduler(time_attr=resource, max_t=max_t, grace_period=grace,
                          reduction_factor=cfg.reduction_factor)  # metric/mode come from TuneConfig
    return sched, f"ASHA on {resource} (grace {grace}, reduction factor {cfg.reduction_factor}, max {max_t})"


def records_of(results, full: int, resource: str, space: SearchSpace, kind: str) -> list[TrialRecord]:
    out = []
    for r in results:
        m = r.metrics or {}
        if "candidate" not in m:  # the trial failed before its first report
            config = dict(r.config or {})
            cand = Candidate.from_dict(config["candidate"]) if "candidate" in config else space.candidate(config)
            out.append(TrialRecord(os.path.basename(r.path or "?"), cand.to_dict(), {}, math.nan, math.nan, 0,
                                   status=f"error: {str(r.error).strip().splitlines()[-1][:160] if r.error else '?'}",
                                   kind=kind))
            continue
        got = m.get(resource, 0)
        status = "finished" if got >= full else f"stopped early by ASHA at {got} {resource}"
        overfit = str(m.get("overfit") or "")
        status = f"{overfit}; never selected ({status})" if overfit else status
        out.append(TrialRecord(m.get("trial_id", "?"), json.loads(m["candidate"]), numbers_from_flat(m),
                               float(m["objective"]), float(m["clean_ref"]), float(got), status,
                               r.checkpoint.path if r.checkpoint else None, kind=kind, overfit=overfit,
                               handle=r.checkpoint))
    return sorted(out, key=lambda r: r.trial_id)


# --- the run ------------------------------------------------------------------------------------------------------
def run(cfg: TuneConfig) -> TuneResult:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    lap = _stopwatch(timings)
    space = SearchSpace.parse(_abs_space(cfg.space), kind=cfg.kind)
    check_model(cfg)
    uri = run_uri(cfg)
    store = RunStore(uri)
    # a checkpoint sweep's config.json stays as it was before model: existed
    store.write_json("config.json", cfg.model_dump(mode="json", exclude={"model"} if cfg.model is None else None))
    res = cfg.resources
    need = int(math.ceil(res.cpus_per_trial * res.max_concurrent)) + 1
    common.init_ray(res.address, num_cpus=res.local_cpus or max(os.cpu_count() or 1, need), log=log)
    lap("ray")
    full, split, grid = load_split(cfg, store)
    val = take(full, split.validation)
    check_outputs(cfg, val)
    setting = Setting(grid, cfg.objective.max_clean_drop, split.describe("validation"), cfg.seed, res.batch_size)
    ctx = {"space": space, "setting": setting, "kind": cfg.kind, "val": val,
           "checkpoint": _abs(cfg.checkpoint) if cfg.model is None else None,
           "model": {} if cfg.model is None else classifier_kwargs(cfg),
           "threads": max(1, int(res.cpus_per_trial)), "grace": cfg.asha.grace or 64,
           "factor": cfg.asha.reduction_factor, "training": cfg.training.model_dump(),
           "trace": os.environ.get("ADV_TUNE_TRACE")}  # read on the driver: trial workers have the cluster's env
    param_space, search_alg, samples, search_desc = search_setup(cfg.search, space)
    lap("split")
    scheduler, sched_desc, resource, full_t = sweep_setup(cfg, ctx, split, val, uri)
    lap("stored_set")
    log(f"sweep: {search_desc}, scheduler {sched_desc}, {len(val)} validation images")
    records = records_of(tune_phase(cfg, uri, "sweep", ctx, param_space, search_alg=search_alg,
                                    scheduler=scheduler, num_samples=samples), full_t, resource, space, cfg.kind)
    lap("sweep")
    if cfg.kind == "stored":
        recheck(cfg, uri, ctx, records)
    lap("recheck")
    if cfg.training_sweep is not None:
        trained, desc = training_phase(cfg, uri, ctx, val)
        records += trained
        search_desc, sched_desc = f"{search_desc}; training trials: {desc[0]}", f"{sched_desc}; training: {desc[1]}"
    lap("training")
    selected, warnings = select(records, cfg.kind)
    log(f"selected {selected.trial_id}: {selected.label}")
    for w in warnings:
        log(f"warning: {w}")
    final, bundle = export(cfg, uri, full, split, grid, selected, ctx)
    lap("export")
    meta = _meta(cfg, split, grid, search_desc, sched_desc, time.perf_counter() - t0)
    report = _write_report(store, meta, records, selected, warnings, final, bundle)
    lap("report")
    store.write_json("timings.json", timings)
    log(f"done in {time.perf_counter() - t0:.0f} s; report {report}; bundle {bundle}")
    return TuneResult(uri, report, bundle, selected, records, warnings, timings)


def sweep_setup(cfg: TuneConfig, ctx: dict, split: Split, val, uri: str):
    """What the sweep phase of ``cfg.kind`` needs, added to ``ctx`` (the stored set, the training data), and
    ``(scheduler, its description, the ASHA resource, its full budget)``."""
    if cfg.kind == "stored":
        ctx["stored"] = ensure_stored(cfg, split, val, uri)
        return None, "none (one report per trial)", "examples", len(val)
    if cfg.kind == "adaptive":
        return (*asha(cfg.asha, "examples", len(val), cfg.asha.grace or 64), "examples", len(val))
    ctx.update(training_ctx(cfg, cfg.training, val))
    return (*asha(cfg.asha, "epoch", cfg.training.epochs, cfg.asha.grace or 1), "epoch", cfg.training.epochs)


def _stopwatch(timings: dict[str, float]):
    """``lap(name)``: seconds since the previous lap, recorded under ``name``."""
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - last[0]
        last[0] = now

    return lap


def recheck(cfg: TuneConfig, uri: str, ctx: dict, records: list[TrialRecord]) -> None:
    """Adaptive re-check of the best ``objective.recheck`` stored trials (no early stopping)."""
    from ray import tune

    ranked = sorted((r for r in records if not math.isnan(r.objective)), key=lambda r: -r.objective)
    top = ranked[:cfg.objective.recheck]
    log(f"adaptive re-check of the best {len(top)} non-adaptive trial(s): {', '.join(r.trial_id for r in top)}")
    space = {"candidate": tune.grid_search([r.candidate for r in top])}
    # the experiment is named after the candidates it re-checks, so a resumed run never mixes two selections
    phase = "recheck-" + hashlib.sha256("\n".join(key(r.candidate) for r in top).encode()).hexdigest()[:8]
    results = tune_phase(cfg, uri, phase, {**ctx, "kind": "adaptive", "grace": len(ctx["val"]) + 1}, space)
    by_cand = {key(r.candidate): r for r in top}
    for res in results:
        m = res.metrics or {}
        rec = by_cand.get(key(json.loads(m["candidate"]))) if "candidate" in m else None
        if rec is not None:
            rec.recheck, rec.recheck_objective = numbers_from_flat(m), float(m["objective"])


def key(candidate: dict) -> str:
    return json.dumps(candidate, sort_keys=True, default=str)


def training_ctx(cfg: TuneConfig, training: TrainingConfig, val) -> dict:
    """What a training trial needs beside the sweep's context: the training data, its settings, its images."""
    from adv.data import load_dataset

    d = cfg.data
    train = load_dataset(d.name, split="train", n=d.train_n, seed=cfg.seed, root=d.root, download=d.download)
    return {"kind": "training", "train": train, "training": training.model_dump(),
            "val": val if training.eval_n is None else take(val, range(min(training.eval_n, len(val))))}


def training_phase(cfg: TuneConfig, uri: str, ctx: dict, val) -> tuple[list[TrialRecord], tuple[str, str]]:
    """The training-time trials of a stored/adaptive sweep (``training_sweep``), a second Tune experiment at
    ``<run>/training`` on the same validation images and grid: their records and (search, scheduler)."""
    ts = cfg.training_sweep
    space = SearchSpace.parse(ts.space, kind="training")
    param_space, search_alg, samples, search_desc = search_setup(ts.search, space)
    scheduler, sched_desc = asha(ts.asha, "epoch", ts.training.epochs, ts.asha.grace or 1)
    tctx = {**ctx, **training_ctx(cfg, ts.training, val), "space": space}
    log(f"training trials: {search_desc}, scheduler {sched_desc}, {len(tctx['train'])} training images, "
        f"{len(tctx['val'])} validation images")
    results = tune_phase(cfg, uri, "training", tctx, param_space, search_alg=search_alg, scheduler=scheduler,
                         num_samples=samples)
    return records_of(results, ts.training.epochs, "epoch", space, "training"), (search_desc, sched_desc)


def export(cfg: TuneConfig, uri: str, full, split: Split, grid, selected: TrialRecord, ctx: dict):
    """Measure the selected configuration on the test subset and write the bundle to ``<run>/best``."""
    from adv.bundle import provenance_defaults, write_bundle
    from adv.tuning import trials

    cand = Candidate.from_dict(selected.candidate)
    test = take(full, split.test)
    setting = Setting(grid, cfg.objective.max_clean_drop, split.describe("test") + ", disjoint from validation",
                      cfg.seed, cfg.resources.batch_size)
    checkpoint, stages, factory = ctx["checkpoint"], list(cand.stages), None
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.model is not None:  # the user's module ships as the state_dict it loaded; its factory rebuilds it
            from adv.bundle import save_factory_classifier
            from adv.evaluate.worker import ModelLoader

            checkpoint = f"{tmp}/classifier.pt"
            factory = save_factory_classifier(ModelLoader(**ctx["model"]).classifier()[0], cfg.model.factory,
                                              checkpoint, full)
            loader = trials.stage_loader(None, stages, cand.detector, factory=cfg.model.factory,
                                         weights=checkpoint)
        elif selected.kind == "training":
            from ray import tune

            from adv.models import load_checkpoint
            from adv.train.losses import training_loss

            (selected.handle or tune.Checkpoint(selected.checkpoint)).to_directory(tmp)
            checkpoint, stages = f"{tmp}/model.pt", training_loss(cand.loss).stages
            loader = trials.TrainedLoader(load_checkpoint(ctx["checkpoint"])[0], load_checkpoint(checkpoint)[0],
                                          tuple(stages))
        else:
            loader = trials.stage_loader(checkpoint, stages, cand.detector)
        log(f"final numbers of {selected.trial_id} on the test subset ({len(test)} images)")
        final = trials.measure(loader, test, setting)
        linf = [gp.eps for gp in grid if gp.norm == "linf"] or [grid[0].eps]
        bundle = write_bundle(
            f"{uri}/best", checkpoint=checkpoint, stages=stages, detector=cand.detector, numbers=final,
            query_detector=cfg.query_detector.model_dump(mode="json") if cfg.query_detector else None,
            factory=factory,
            provenance={**provenance_defaults(), "versions": common.versions(), "sweep": cfg.name, "run": uri,
                        "trial": selected.trial_id, "kind": selected.kind or cfg.kind,
                        "candidate": selected.candidate, **_training_provenance(cfg, selected),
                        **({"model": cfg.model.model_dump(mode="json")} if cfg.model is not None else {}),
                        "validation": split.describe("validation"), "test": split.describe("test"),
                        "selected_on": "adaptive robust accuracy under the clean-accuracy constraint"},
            evaluation={"dataset": split.dataset, "split": split.split, "n": len(split.test),
                        "seed": split.test_seed, "eps": max(linf), "norm": "linf" if grid[0].norm == "linf" else
                        grid[0].norm, "attacks": [gp.key for gp in grid]},
        )
    return final, bundle.location


def _training_provenance(cfg: TuneConfig, selected: TrialRecord) -> dict:
    """A trained classifier's training spec, as the bundle's provenance records it (empty for stage trials)."""
    if selected.kind != "training":
        return {}
    t = cfg.training if cfg.kind == "training" else cfg.training_sweep.training
    d = cfg.data
    return {"training": {"loss": selected.candidate["loss"], "epochs": int(selected.resource),
                         "batch_size": t.batch_size, "lr": t.lr, "dataset": d.name, "split": "train",
                         "train_n": d.train_n, "seed": cfg.seed, "architecture_of": cfg.checkpoint}}


def _meta(cfg: TuneConfig, split: Split, grid, search: str, sched: str, wall: float) -> dict:
    objective = (f"maximize adaptive robust accuracy subject to a clean-accuracy drop of at most "
                 f"{cfg.objective.max_clean_drop:g} (penalty: robust - 1 - breach below the allowed clean accuracy)"
                 + (f"; stored trials rank on the non-adaptive number, the best {cfg.objective.recheck} are "
                    "re-checked adaptively and the selection uses the re-check" if cfg.kind == "stored" else "")
                 + ("; training trials marked for catastrophic overfitting (multi-step accuracy collapsing while "
                    "FGSM accuracy rises, Wong et al. 2020) are never selected"
                    if cfg.kind == "training" or cfg.training_sweep is not None else ""))
    kind = cfg.kind + (" + training" if cfg.training_sweep is not None else "")
    return {"name": cfg.name, "kind": kind, "search": search, "scheduler": sched,
            "validation": split.describe("validation"), "test": split.describe("test"), "objective": objective,
            "grid": "; ".join(gp.key for gp in grid), "wall_seconds": wall, "versions": common.versions(),
            "max_clean_drop": cfg.objective.max_clean_drop}


def _write_report(store: RunStore, meta, records, selected, warnings, final, bundle) -> str:
    from adv.tuning.report import write_report

    local = store.local_dir()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_report(local or Path(tmp), meta=meta, records=records, selected=selected, warnings=warnings,
                            final=final, bundle=bundle)
        if local is None:
            store.put_folder(tmp)
            return f"{store.uri.rstrip('/')}/report.md"
    return str(path)


# --- entrypoint ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="sweep YAML (docs/tuning.md lists the keys)")
    parser.add_argument("--smoke", action="store_true",
                        help="shrink the sweep to a CPU smoke run (tiny subsets, 2 epochs, 2 samples, 3-step "
                             "attacks, no GPUs unless visible), named <name>-smoke")
    parser.add_argument("--checkpoint", help="replace the config's checkpoint (e.g. a local one for --smoke)")
    parser.add_argument("--storage-path", help="replace the config's storage_path")
    common.add_base_dir(parser, "jobs.tune")
    args = parser.parse_args(argv)

    def body() -> int:
        from jobs.tune_config import smoke_config

        with common.run_from(args.base_dir):
            if args.base_dir is None:
                common.check_job_paths({"--config": args.config}, {})
            cfg = load_tune_config(args.config)
            if args.smoke:
                cfg = smoke_config(cfg, checkpoint=args.checkpoint, storage_path=args.storage_path)
            elif args.checkpoint and cfg.model is not None:
                raise ConfigError("--checkpoint: the config gives model.factory; give one of them")
            elif args.checkpoint or args.storage_path:
                cfg = cfg.model_copy(update={k: v for k, v in (("checkpoint", args.checkpoint),
                                                               ("storage_path", args.storage_path)) if v})
            if args.base_dir is None:
                common.check_job_paths({"checkpoint": cfg.checkpoint, "data.root": cfg.data.root,
                                        "model.weights": cfg.model.weights if cfg.model else None,
                                        "stored.run": cfg.stored.run}, {"storage_path": cfg.storage_path})
            print(run(cfg).report)
        return 0

    return common.guarded("tune", body, "rerun the same command to resume (finished trials are kept)")


if __name__ == "__main__":
    sys.exit(main())
