"""Ray Tune: sweep defense settings on validation data, select on adaptive robustness, export a bundle.

    python -m jobs.tune --config jobs/configs/tune-default.yaml
    ray job submit --working-dir . -- python -m jobs.tune --config jobs/configs/tune-gpu.yaml --base-dir "$PWD"

(``--base-dir``: relative paths resolve against the submitting folder; on a remote cluster use absolute shared
paths or URIs instead, README "Ray clusters").

Stages (the Ray-free logic is :mod:`adv.tuning`):

1. the validation subset is drawn from the split minus the test subset (:mod:`adv.tuning.splits`); ``stored``
   sweeps generate their stored non-adaptive set on it once (``jobs.evaluate.run``, or in the driver for a
   small set on one node) unless ``stored.run`` names one made on the same subset;
2. Tune runs the trials (grid search when every dimension is discrete, else Optuna; ASHA on evaluated examples
   or epochs) into ``<run>/sweep`` (:mod:`jobs.tune_search`);
3. ``stored`` sweeps re-check their best few trials adaptively (``<run>/recheck``);
4. the selected configuration is measured on the disjoint test subset and
   written as a bundle to ``<run>/best``, next to ``<run>/report.md``.

Kill the driver and rerun the same command: each phase resumes with ``Tuner.restore``; finished trials are kept.
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

from adv.errors import ConfigError
from adv.evaluate.plan import build_grid
from adv.runs.store import RunStore
from adv.runs.stored import IN_PROCESS_ROWS, StoredRun, save_rows
from adv.evaluate.worker import ModelLoader
from adv.specs import absolute_path
from adv.tuning.checks import check_model, check_outputs, check_stored, classifier_kwargs
from adv.tuning.export import export as export_bundle
from adv.tuning.objective import TrialRecord, numbers_from_flat, records_from, select
from adv.tuning.report import sweep_meta, write_sweep_report
from adv.tuning.space import Candidate
from adv.tuning.splits import Split, load_split, take
from adv.tuning.trials import Setting
from jobs import common
from jobs.tune_config import TrainingConfig, TuneConfig, load_tune_config
from jobs.tune_search import asha, search_setup, trial_dirname, trial_lines

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
def run_uri(cfg: TuneConfig) -> str:
    return f"{absolute_path(cfg.storage_path).rstrip('/')}/{cfg.name}"


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
    ecfg = cfg.stored_eval_config(root, len(val), classifier_kwargs(cfg))
    out = f"{uri}/stored"
    log(f"stored set: the {len(val)} validation images attacked once by the Ray Data job (resumed if partial) -> {out}")
    evaluate(ecfg, out=out, report=False)
    return out


def _in_process(cfg: TuneConfig, n: int) -> bool:
    import ray

    mode = cfg.stored.generate
    if mode == "auto":
        return n <= cfg.stored.in_process_max and len([x for x in ray.nodes() if x.get("Alive")]) == 1
    return mode == "in_process"


def stored_in_process(cfg: TuneConfig, val, uri: str) -> str:
    """The stored set generated in the driver (``adv.tuning.trials.generate_stored``) into
    ``<run>/stored-local/rows.npz``, once: a resumed run reads it back."""
    from adv.tuning.trials import generate_stored

    out = f"{uri}/stored-local"
    if not RunStore(out).exists(IN_PROCESS_ROWS):
        log(f"stored set: the {len(val)} validation images attacked once in this process -> {out}")
        setting = Setting(build_grid(cfg.attacks), cfg.objective.max_clean_drop, "", cfg.seed, cfg.resources.batch_size)
        rows = generate_stored(ModelLoader(**classifier_kwargs(cfg)), val, setting)
        RunStore(out).write_bytes(IN_PROCESS_ROWS, save_rows(rows))
    return out


# --- the trainable ------------------------------------------------------------------------------------------
def trainable(config: dict, ctx: dict) -> None:
    """One trial: resolve its candidate, run the trial body of its kind, report through ``tune.report``."""
    import torch
    from ray import tune

    from adv.tuning import trials

    torch.set_num_threads(ctx["threads"])
    cand = ctx["space"].trial_candidate(config)
    _trace(ctx.get("trace"), "start", cand)

    def report(metrics: dict, checkpoint_dir: str | None = None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    setting, kind = ctx["setting"], ctx["kind"]
    if kind == "stored":
        loader = trials.stage_loader(ctx["checkpoint"], cand.stages, cand.detector, **ctx["model"])
        trials.run_stored(loader, StoredRun(ctx["stored"]).reusable_chunks(), setting, report)
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
                                        trial_dirname_creator=trial_dirname),
            # Tune's status table is a multi-line box every few seconds: a terminal redraws it, a log file
            # would keep every copy (most of a make main log), so logs get one line per finished trial instead
            run_config=tune.RunConfig(name=phase, storage_path=uri, verbose=1 if live else 0,
                                      callbacks=[] if live else [trial_lines(phase, log)],
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    return tuner.fit()


# --- the run ------------------------------------------------------------------------------------------------------
def run(cfg: TuneConfig) -> TuneResult:
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    lap = common.stopwatch(timings)
    space = cfg.search_space.absolute()
    check_model(cfg)
    uri = run_uri(cfg)
    store = RunStore(uri)
    # a checkpoint sweep's config.json stays as it was before model: existed
    store.write_json("config.json", cfg.model_dump(mode="json", exclude={"model"} if cfg.model is None else None))
    res = cfg.resources
    need = int(math.ceil(res.cpus_per_trial * res.max_concurrent)) + 1
    common.init_ray(res.address, num_cpus=res.local_cpus or max(os.cpu_count() or 1, need), log=log)
    lap("ray")
    full, split = load_split(cfg.data, store)
    grid = build_grid(cfg.attacks)
    val = take(full, split.validation)
    check_outputs(cfg, val)
    setting = Setting(grid, cfg.objective.max_clean_drop, split.describe("validation"), cfg.seed, res.batch_size)
    ctx = {"space": space, "setting": setting, "kind": cfg.kind, "val": val,
           "checkpoint": absolute_path(cfg.checkpoint) if cfg.model is None else None,
           "model": {} if cfg.model is None else classifier_kwargs(cfg),
           "threads": max(1, int(res.cpus_per_trial)), "grace": cfg.asha.grace or 64,
           "factor": cfg.asha.reduction_factor, "training": cfg.training.model_dump(),
           "trace": os.environ.get("ADV_TUNE_TRACE")}  # read on the driver: trial workers have the cluster's env
    param_space, search_alg, samples, search_desc = search_setup(cfg.search, space)
    lap("split")
    scheduler, sched_desc, resource, full_t = sweep_setup(cfg, ctx, split, val, uri)
    lap("stored_set")
    log(f"sweep: {search_desc}, scheduler {sched_desc}, {len(val)} validation images")
    records = records_from(tune_phase(cfg, uri, "sweep", ctx, param_space, search_alg=search_alg,
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
    log(f"final numbers of {selected.trial_id} on the test subset ({len(split.test)} images)")
    final, bundle = export_bundle(cfg, uri, full, split, grid, selected, checkpoint=ctx["checkpoint"],
                                  model=ctx["model"], versions=common.versions(), restore=restore_trial)
    lap("export")
    meta = sweep_meta(cfg, split, grid, search_desc, sched_desc, time.perf_counter() - t0, common.versions())
    report = write_sweep_report(store, meta, records, selected, warnings, final, bundle)
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


def recheck(cfg: TuneConfig, uri: str, ctx: dict, records: list[TrialRecord]) -> None:
    """Adaptive re-check of the best ``objective.recheck`` stored trials (no early stopping)."""
    from ray import tune

    top = sorted((r for r in records if not math.isnan(r.objective)), key=lambda r: -r.objective)
    top = top[:cfg.objective.recheck]
    log(f"adaptive re-check of the best {len(top)} non-adaptive trial(s): {', '.join(r.trial_id for r in top)}")
    space = {"candidate": tune.grid_search([r.candidate for r in top])}
    # the experiment is named after the candidates it re-checks, so a resumed run never mixes two selections
    phase = "recheck-" + hashlib.sha256("\n".join(r.candidate.key for r in top).encode()).hexdigest()[:8]
    results = tune_phase(cfg, uri, phase, {**ctx, "kind": "adaptive", "grace": len(ctx["val"]) + 1}, space)
    by_cand = {r.candidate.key: r for r in top}
    for res in results:
        m = res.metrics or {}
        rec = by_cand.get(res.config["candidate"].key) if "objective" in m else None  # none: failed unreported
        if rec is not None:
            rec.recheck, rec.recheck_objective = numbers_from_flat(m), float(m["objective"])


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
    space = ts.search_space
    param_space, search_alg, samples, search_desc = search_setup(ts.search, space)
    scheduler, sched_desc = asha(ts.asha, "epoch", ts.training.epochs, ts.asha.grace or 1)
    tctx = {**ctx, **training_ctx(cfg, ts.training, val), "space": space}
    log(f"training trials: {search_desc}, scheduler {sched_desc}, {len(tctx['train'])} training images, "
        f"{len(tctx['val'])} validation images")
    results = tune_phase(cfg, uri, "training", tctx, param_space, search_alg=search_alg, scheduler=scheduler,
                         num_samples=samples)
    return records_from(results, ts.training.epochs, "epoch", space, "training"), (search_desc, sched_desc)


def restore_trial(record: TrialRecord, folder: str) -> None:
    """A training trial's checkpoint (its model.pt) restored into ``folder``."""
    from ray import tune

    (record.handle or tune.Checkpoint(record.checkpoint)).to_directory(folder)


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
