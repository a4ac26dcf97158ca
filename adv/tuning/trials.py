"""What one trial computes, without Ray: the three kinds of trial and the final numbers of a bundle.

Every kind reports through a ``report(metrics, checkpoint_dir=None)``
callback (``jobs.tune`` passes one that calls ``tune.report``), and every
number comes from the evaluation job's own grid worker
(:class:`adv.evaluate.worker.BatchEvaluator` / ``StoredEvaluator``) and its
row contract, aggregated with the report's worst-case rule: an example
counts as robust on a track only if its clean input is accepted and
correct and every attack of the grid on that track fails.

* :func:`run_stored`: inference stages on a stored non-adaptive set (rows of a
  ``jobs.evaluate`` run read in-process, never regenerated); reports once.
* :func:`run_adaptive`: the trial attacks its own pipeline (BPDA/EOT, the
  detector-aware joint loss), reporting after 64, 128, 256, ... examples (the
  ASHA resource).
* :func:`run_training`: trains a classifier with a training loss, reporting
  all three numbers after every epoch (the ASHA resource) with the epoch's
  checkpoint folder.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from adv.evaluate.checks import worst_case_mask
from adv.evaluate.report.aggregate import clean_ok
from adv.runs.rows import NONE
from adv.specs import StageSpec
from adv.evaluate.worker import BatchEvaluator, GridPoint, ModelLoader, Models, Plan, StoredEvaluator
from adv.numbers import Number
from adv.tuning.objective import flat_metrics, numbers_from_counts, penalized
from adv.tuning.overfitting import BY_ATTACK, catastrophic_overfitting

#: The defended model's label in the rows a trial computes.
TRIAL = "trial"
Report = Callable[..., None]
_NEEDED = ("index", "defense", "track", "robust", "attack")


@dataclass(frozen=True)
class Setting:
    """What every trial of a sweep shares."""

    grid: tuple[GridPoint, ...]
    max_clean_drop: float
    subset: str
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"


def labels(grid: Iterable[GridPoint]) -> dict[str, str]:
    """What each number measures, as the report and the manifest print it."""
    keys = "; ".join(gp.key for gp in grid)
    return {"clean": "clean accuracy (clean inputs accepted and correct)",
            "non_adaptive": f"non-adaptive robust accuracy, worst case over [{keys}], crafted on the undefended "
                            "classifier and fed through the defense",
            "adaptive": f"adaptive robust accuracy, worst case over [{keys}], crafted on the defended pipeline "
                        "(BPDA for non-differentiable stages, EOT for randomized ones, detector-aware loss)"}


def counts(rows: Mapping[str, np.ndarray], label: str = TRIAL) -> tuple[dict[str, int], int, int]:
    """``({track: robust examples}, examples, clean examples of the undefended classifier)`` from result rows."""
    ok = clean_ok(rows)
    present = np.unique(rows["index"])
    out = {"clean": int(ok[label][present].sum())}
    for track, key in (("non-adaptive", "non_adaptive"), ("adaptive", "adaptive")):
        sel = (rows["defense"] == label) & (rows["track"] == track)
        if sel.any():
            alive = worst_case_mask(ok[label], rows["index"][sel], rows["robust"][sel])
            out[key] = int(alive[present].sum())
    return out, len(present), int(ok[NONE][present].sum())


def metrics(rows: Mapping[str, np.ndarray], setting: Setting, track: str) -> dict[str, Any]:
    """The flat metrics a trial reports: all numbers with intervals and labels, ``clean_ref`` and ``objective``."""
    c, n, ref = counts(rows)
    numbers = numbers_from_counts(c, n, labels(setting.grid), setting.subset)
    robust = numbers[track].value
    clean_ref = ref / n
    return {**flat_metrics(numbers), **by_attack(rows), "clean_ref": clean_ref, "examples": n,
            "objective": penalized(robust, numbers["clean"].value, clean_ref, setting.max_clean_drop),
            "objective_track": track}


def by_attack(rows: Mapping[str, np.ndarray], label: str = TRIAL) -> dict[str, float]:
    """Adaptive robust accuracy per attack (worst over its grid points): ``adaptive_by_attack_<attack>``, what
    :mod:`adv.tuning.overfitting` compares (FGSM against the multi-step attacks)."""
    ok = clean_ok(rows)[label]
    present = np.unique(rows["index"])
    sel = (rows["defense"] == label) & (rows["track"] == "adaptive")
    out = {}
    for attack in np.unique(rows["attack"][sel]):
        one = sel & (rows["attack"] == attack)
        alive = worst_case_mask(ok, rows["index"][one], rows["robust"][one])
        out[f"{BY_ATTACK}{attack}"] = float(alive[present].mean())
    return out


class _Columns:
    """The few row columns the numbers need, concatenated across chunks."""

    def __init__(self):
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, rows: Mapping[str, np.ndarray]) -> None:
        self.parts.append({k: np.asarray(rows[k]) for k in _NEEDED})

    def rows(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in self.parts]) for k in _NEEDED}


# --- stored (non-adaptive) trials ----------------------------------------------------------------------------
def run_stored(loader: Callable[[], Models], groups: Iterable[Mapping[str, np.ndarray]], setting: Setting,
               report: Report) -> dict[str, Any]:
    """Score the trial's pipeline on stored chunks (clean + non-adaptive rows of the undefended classifier)."""
    plan = Plan((), adaptive=False, features=(), store_images=False, seed=setting.seed)
    scorer = StoredEvaluator(loader, plan, device=setting.device)
    cols = _Columns()
    for group in groups:
        cols.add(scorer(group))
    out = metrics(cols.rows(), setting, "non_adaptive")
    report(out)
    return out


# --- adaptive trials -----------------------------------------------------------------------------------------
def milestones(n: int, grace: int = 64, factor: int = 2) -> list[int]:
    """ASHA's rungs in evaluated examples: 64, 128, 256, ... and finally ``n``."""
    out, m = [], grace
    while m < n:
        out.append(m)
        m *= factor
    return out + [n]


def evaluate_range(evaluator: BatchEvaluator, x: torch.Tensor, y: torch.Tensor, start: int, stop: int,
                   batch_size: int) -> Iterable[dict[str, np.ndarray]]:
    """Rows of examples ``start:stop``, one chunk (the unit of seeding) per ``batch_size`` examples."""
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        idx = np.arange(a, b)
        meta = {"index": idx, "label": y[a:b].numpy(), "shard": np.zeros(b - a, np.int64),
                "chunk": np.full(b - a, a // batch_size)}
        yield evaluator.evaluate_chunk(x[a:b], meta, a // batch_size).build()


def run_adaptive(loader: Callable[[], Models], data, setting: Setting, report: Report, *,
                 grace: int = 64, factor: int = 2) -> dict[str, Any]:
    """Attack the trial's own pipeline on ``data``; report after every rung of :func:`milestones`."""
    evaluator = BatchEvaluator(loader, Plan(setting.grid, adaptive=True, features=(), store_images=False,
                                            seed=setting.seed), device=setting.device)
    x, y = data.tensors()
    cols, done, out = _Columns(), 0, {}
    for m in milestones(len(y), grace, factor):
        for rows in evaluate_range(evaluator, x, y, done, m, setting.batch_size):
            cols.add(rows)
        done = m
        out = metrics(cols.rows(), setting, "adaptive")
        report(out)
    return out


def generate_stored(loader: Callable[[], Models], data, setting: Setting) -> dict[str, np.ndarray]:
    """The stored non-adaptive set in one process: clean and non-adaptive rows of the undefended classifier on
    ``data`` (images included), chunk by chunk as the Ray Data job seeds them. For a set one machine attacks
    in seconds, the distributed job's actor start-up and Parquet commits cost more than the attacks."""
    evaluator = BatchEvaluator(loader, Plan(setting.grid, adaptive=False, features=(), store_images=True,
                                            seed=setting.seed), device=setting.device)
    x, y = data.tensors()
    parts = list(evaluate_range(evaluator, x, y, 0, len(y), setting.batch_size))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def measure(loader: Callable[[], Models], data, setting: Setting) -> dict[str, Number]:
    """All three numbers of one defended model on ``data`` (the bundle's final numbers, in one process)."""
    from adv.tuning.objective import numbers_from_flat

    return numbers_from_flat(run_adaptive(loader, data, setting, lambda m, *a: None, grace=len(data) + 1))


def stage_loader(checkpoint: str | None, stages: Iterable[str | StageSpec], detector: str | StageSpec | None,
                 eot_samples: int = 8, *, factory: str | None = None, weights: str | None = None) -> ModelLoader:
    """The evaluation job's picklable loader for one defended model, labelled :data:`TRIAL`: the classifier is
    the adv ``checkpoint``, or a user's ``factory`` filled with ``weights`` (:mod:`adv.models.factory`); the
    specs are strings or parsed (a candidate's), passed on as they are."""
    return ModelLoader(checkpoint=checkpoint, factory=factory, weights=weights,
                       defenses=((TRIAL, tuple(stages), detector),), eot_samples=eot_samples)


# --- training-time trials ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainedLoader:
    """Models for a training trial: the undefended base classifier (the non-adaptive source) and a copy of
    the model being trained, behind the loss's inference stages."""

    base: torch.nn.Module
    model: torch.nn.Module
    stages: tuple[str, ...] = ()
    eot_samples: int = 8

    def __call__(self) -> Models:
        from adv.evaluate.threat import build_evaluated_model

        trained = copy.deepcopy(self.model).eval()  # fit keeps training the original
        ev = build_evaluated_model(trained, list(self.stages), adaptive=True, eot_samples=self.eot_samples)
        return Models(copy.deepcopy(self.base).eval(), {TRIAL: ev})


def run_training(loss_spec: str, checkpoint: str, train, val, setting: Setting, report: Report, *, epochs: int,
                 batch_size: int, lr: float, work_dir: str, overfit_drop: float = 0.2,
                 overfit_gap: float = 0.3) -> dict[str, Any]:
    """Train a fresh classifier of the checkpoint's architecture with ``loss_spec``; after every epoch report
    all three numbers on ``val`` with ``work_dir`` (model.pt, train_state.pt) as the checkpoint.

    ``work_dir`` already holding a ``train_state.pt`` (a restored Tune checkpoint) resumes training there.
    Every report carries ``overfit``: the catastrophic-overfitting finding of the epochs so far
    (:mod:`adv.tuning.overfitting`, empty when none); a marked trial's objective drops by 2, below every
    unmarked trial, even one that breaks the clean-accuracy constraint, so ASHA stops it.
    """
    from adv.models import create_model, load_checkpoint
    from adv.train import TrainConfig, fit
    from adv.train.losses import training_loss

    tl = training_loss(loss_spec)
    base, meta = load_checkpoint(checkpoint)
    torch.manual_seed(setting.seed)
    model = create_model(meta["arch"], num_classes=meta["num_classes"], input_size=tuple(meta["input_size"]),
                         mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    last: dict[str, Any] = {}
    cpu0 = time.process_time()

    def validate(m: torch.nn.Module) -> dict[str, Any]:
        last.clear()
        last.update(run_adaptive(TrainedLoader(base, m, tuple(tl.stages)), val, setting, lambda *a, **k: None,
                                 grace=len(val) + 1))
        return {k: v for k, v in last.items() if isinstance(v, (int, float))}

    def on_epoch_end(epoch: int, _metrics: dict) -> None:
        # fit wrote metrics.json (every epoch's metrics, resumed epochs included) just before this call
        history = json.loads((Path(work_dir) / "metrics.json").read_text())["history"]
        flag = catastrophic_overfitting(history, drop=overfit_drop, gap=overfit_gap) or ""
        objective = last["objective"] - 2.0 if flag else last["objective"]
        # CPU seconds of this trial process so far: what an idle core would have taken, under any contention
        report({**last, "epoch": epoch, "overfit": flag, "objective": objective,
                "cpu_seconds": time.process_time() - cpu0}, checkpoint_dir=work_dir)

    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=setting.seed, device=setting.device)
    fit(model, train, None, config, loss_fn=tl.loss_fn, out_dir=work_dir, resume=True, show_progress=False,
        extra_meta=tl.checkpoint_meta(), validate=validate, on_epoch_end=on_epoch_end)
    return last
