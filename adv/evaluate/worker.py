"""The per-batch work of the distributed evaluation, without Ray.

``jobs.evaluate`` runs these callables in a Ray Data actor pool
(``map_batches``/``map_groups``); here they are plain classes, so a unit
test or a single-process loop calls them directly on a dict of numpy
columns. Each actor builds its models once through an injected ``loader``.

Per *chunk* (``batch_size`` examples) a :class:`BatchEvaluator` runs the
whole attack grid and writes one row per (example, defense, track, grid point):

* ``clean``: the clean image through every defended model;
* ``non-adaptive``: adversarials crafted once on the undefended classifier,
  then fed through every defense (the papers' protocol; reusable later);
* ``adaptive``: adversarials crafted on each defended pipeline
  (:class:`adv.evaluate.threat.EvaluatedModel`: BPDA/EOT, detector-aware loss),
  or by querying it for query-based attacks.

The row layout is :mod:`adv.runs.rows` (docs/parquet-schema.md).

Seeding: an attack's random draws follow the example, not the chunk: each
grid point's attack gets one stream per example from (run seed, grid point
key, example index) (:func:`adv.attacks.seeding.example_seeds`, as in
:func:`adv.evaluate.robust_accuracy`), so its rows do not change with
``batch_size``. Randomized defense *stages* (noise, quantization draws) and
the EOT samples of the adaptive track draw from the global torch RNG, which
is seeded per (chunk, grid point, defense) (:func:`chunk_seed`): those rows
stay reproducible, but change with ``batch_size``.

Shape:
    batch["image"]: (N, C, H, W) float in [0, 1] or uint8; batch["label"|"index"|"shard"|"chunk"]: (N,)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from adv.attacks.seeding import derive_seed, example_seeds
from adv.evaluate.allocator import keep_freed_memory
from adv.runs.rows import ATTACK_COLUMNS, FEATURES, KEY_COLUMNS, NONE
from adv.metrics import image_quality, perturbation_norms
from adv.models.device import resolve_device

@dataclass(frozen=True)
class GridPoint:
    """One attack configuration of the grid: attack × ε × steps."""

    attack: str
    eps: float
    norm: str = "linf"
    #: Iteration budget, passed as ``budget_param`` (``steps``, or ``queries`` for Square).
    steps: int | None = None
    budget_param: str | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        eps = "inf" if math.isinf(self.eps) else f"{self.eps:.4g}"
        steps = f" {self.budget_param}={self.steps}" if self.steps is not None else ""
        extra = "".join(f" {k}={v}" for k, v in self.params)
        return f"{self.attack} {self.norm} eps={eps}{steps}{extra}"

    def kwargs(self) -> dict[str, Any]:
        kw = {"eps": self.eps, "norm": self.norm, **dict(self.params)}
        if self.steps is not None:
            kw[self.budget_param or "steps"] = self.steps
        return kw


@dataclass(frozen=True)
class Plan:
    """What each chunk goes through; built by ``jobs.config`` from the validated config."""

    grid: tuple[GridPoint, ...]
    adaptive: bool = True
    features: tuple[str, ...] = ()
    store_images: bool = True
    seed: int = 0

    def __post_init__(self):
        bad = set(self.features) - set(FEATURES)
        if bad:
            raise ValueError(f"features must be among {FEATURES}, got {sorted(bad)}")


@dataclass
class Models:
    """What a loader returns: the classifier and the defended models by label.

    ``defenses`` maps a label to an :class:`adv.evaluate.threat.EvaluatedModel`
    built with ``adaptive=True`` (its ``defended`` answers queries, its
    ``attack`` crafts adaptive adversarials).
    """

    classifier: nn.Module
    defenses: Mapping[str, Any] = field(default_factory=dict)


Loader = Callable[[], Models]


@dataclass(frozen=True)
class ModelLoader:
    """The default loader: an adv checkpoint (a registry name plus foreign weights, or a user's factory) and
    defended models composed from stage specs. Picklable, so it travels to every actor.

    ``defenses`` holds ``(label, stage_specs, detector_spec)``, or ``(label,
    stage_specs, detector_spec, classifier_checkpoint)`` for a training-time
    defense, whose own classifier answers (non-adaptive adversarials are still
    crafted on the undefended one); learned stages need ``checkpoint=PATH`` in
    their spec (actors never train). Specs are spec strings or, from a job's config, the
    :class:`adv.specs.StageSpec` objects it parsed once (they travel to the actors as they are).
    """

    checkpoint: str | None = None
    arch: str | None = None
    weights: str | None = None
    defenses: tuple[tuple, ...] = ()
    eot_samples: int = 8
    #: A user's architecture, ``"mypkg.nets:make_net"`` (:mod:`adv.models.factory`); ``weights`` fill it.
    factory: str | None = None

    def classifier(self) -> tuple[nn.Module, dict]:
        from adv.models import load_checkpoint, load_external

        if self.factory:
            from adv.models.factory import build_from_factory

            return build_from_factory(self.factory, self.weights), {}
        if self.checkpoint:
            return load_checkpoint(self.checkpoint)
        if self.arch and self.weights:
            return load_external(self.arch, self.weights), {}
        raise ValueError("ModelLoader needs checkpoint=, or arch= with weights=")

    def __call__(self) -> Models:
        from adv.evaluate.threat import build_evaluated_model
        from adv.models import load_checkpoint

        model, meta = self.classifier()
        model.eval()
        defenses = {}
        for label, stages, detector, *own in self.defenses:
            classifier, cmeta = load_checkpoint(own[0]) if own else (model, meta)
            defenses[label] = build_evaluated_model(classifier, list(stages), adaptive=True, detector=detector,
                                                    checkpoint_meta=cmeta, source=model if own else None,
                                                    eot_samples=self.eot_samples)
        return Models(model, defenses)


def chunk_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for (run seed, chunk, grid point, defense), of the randomized stages: independent of how
    Ray batches chunks and of the actors."""
    return derive_seed(seed, *parts)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """A (N, C, H, W) float32 copy in [0, 1] (batches are read-only views of the object store)."""
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {arr.shape}")
    out = torch.tensor(arr, dtype=torch.float32)
    return out.div_(255.0) if arr.dtype == np.uint8 else out


class _Rows:
    """Column lists, concatenated once at the end."""

    def __init__(self):
        self.cols: dict[str, list[np.ndarray]] = {}

    def add(self, **cols) -> None:
        n = next(len(v) for v in cols.values() if isinstance(v, np.ndarray))
        for k, v in cols.items():
            arr = v if isinstance(v, np.ndarray) else np.full(n, v, dtype=object if isinstance(v, str) else None)
            self.cols.setdefault(k, []).append(arr)

    def extend(self, other: "_Rows") -> None:
        for k, v in other.cols.items():
            self.cols.setdefault(k, []).extend(v)

    def build(self) -> dict[str, np.ndarray]:
        lengths = {k: sum(len(p) for p in parts) for k, parts in self.cols.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"ragged result columns (a bug): {lengths}")
        out = {}
        for k, parts in self.cols.items():
            arr = np.concatenate(parts)
            out[k] = arr.astype(str) if arr.dtype == object else arr
        return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _scatter(mask: np.ndarray, where_true: np.ndarray, where_false: np.ndarray) -> np.ndarray:
    """Rows of ``where_true`` at ``mask`` and of ``where_false`` elsewhere, in order."""
    out = np.empty((len(mask), *where_true.shape[1:]), dtype=where_true.dtype)
    out[mask], out[~mask] = where_true, where_false
    return out


class Scorer:
    """Predictions, detector flags and features of one model on a batch."""

    def __init__(self, loader: Loader, plan: Plan, device: str = "auto"):
        # the torch thread count is process-wide: the job's actor sets it, not the library
        self.plan = plan
        self.device = resolve_device(device)
        if torch.device(self.device).type == "cpu":
            keep_freed_memory()  # attack steps reuse activation-sized blocks: no page faults per step
        models = loader()
        self.classifier = models.classifier.to(self.device).eval()
        self.defenses = dict(models.defenses)
        for ev in self.defenses.values():
            ev.defended.to(self.device).eval()
            ev.attack_target.to(self.device)

    def model(self, label: str) -> nn.Module:
        return self.classifier if label == NONE else self.defenses[label].defended

    def labels(self) -> list[str]:
        return [NONE, *self.defenses]

    @torch.no_grad()
    def score(self, label: str, x: torch.Tensor, y: torch.Tensor, clean_ok: torch.Tensor | None) -> dict:
        """Columns of ``x`` under model ``label``; ``clean_ok`` None means these are the clean rows."""
        model = self.model(label)
        logits = model(x)
        pred = logits.argmax(1)
        correct = pred == y
        detector = getattr(model, "detector", None)
        detected = model.detect(x) if detector is not None else torch.zeros_like(correct)
        if clean_ok is None:  # a clean input the detector rejects is an error
            ok = correct & ~detected
            success = torch.zeros_like(correct)
        else:  # an adversarial the detector catches is defended
            ok = correct | detected
            success = clean_ok & ~ok
        cols = {"pred": _np(pred), "correct": _np(correct), "detected": _np(detected),
                "robust": _np(ok), "success": _np(success)}
        cols.update(self.features(model, x, logits))
        return cols

    def features(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor) -> dict[str, np.ndarray]:
        feats = self.plan.features
        if not feats:
            return {}
        out = {}
        pre, clf = (model.preprocess, model.classifier) if hasattr(model, "preprocess") else (None, model)
        xp = pre(x) if pre is not None and ("penultimate" in feats or "gradcam" in feats) else x
        if "logits" in feats:
            out["logits"] = _np(logits).astype(np.float32)
        if "penultimate" in feats:
            out["features"] = _np(clf.features(xp)).astype(np.float32)
        if "gradcam" in feats:
            from adv.explain import grad_cam

            out["cam"] = _np(grad_cam(clf, xp.detach(), create_graph=False)).astype(np.float32)
        return out


def _quality(x: torch.Tensor, x_adv: torch.Tensor) -> dict[str, np.ndarray]:
    norms = {k: _np(v).astype(np.float32) for k, v in perturbation_norms(x, x_adv).items()}
    q = image_quality(x.cpu(), x_adv.cpu())
    return {**norms, **{k: v.astype(np.float32) for k, v in q.items()}}


class BatchEvaluator(Scorer):
    """``map_batches`` callable: the whole attack grid on each chunk of a batch.

    Construct with ``loader`` (a picklable callable returning :class:`Models`),
    the :class:`Plan` and a device (``jobs.evaluate`` sets the actor's torch thread count).
    """

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [c for c in ("image", *KEY_COLUMNS) if c not in batch]
        if missing:
            raise ValueError(f"batch lacks column(s) {missing}; has {sorted(batch)}")
        chunks = np.asarray(batch["chunk"])
        rows = _Rows()
        for c in dict.fromkeys(chunks.tolist()):  # first-seen order
            sel = np.flatnonzero(chunks == c)
            meta = {k: np.asarray(batch[k])[sel] for k in KEY_COLUMNS}
            rows.extend(self.evaluate_chunk(images_to_tensor(np.asarray(batch["image"])[sel]), meta, int(c)))
        return rows.build()

    def evaluate_chunk(self, x: torch.Tensor, meta: dict[str, np.ndarray], chunk: int) -> _Rows:
        x = x.to(self.device)
        y = torch.as_tensor(meta["label"], dtype=torch.long, device=self.device)
        n = len(x)
        rows = _Rows()
        clean_ok = {}
        zeros = {k: np.zeros(n, np.float32) for k in ("l0", "l2", "linf", "mse")}
        same = {**zeros, "ssim": np.ones(n, np.float32), "psnr": np.full(n, np.inf, np.float32)}
        for label in self.labels():
            cols = self.score(label, x, y, None)
            clean_ok[label] = torch.as_tensor(cols["robust"], device=self.device)
            self._add(rows, meta, x, cols, same, label, "clean", None, -1, 0.0, np.full(n, -1))
        for gi, gp in enumerate(self.plan.grid):
            torch.manual_seed(chunk_seed(self.plan.seed, chunk, gi, 0))
            x_adv, queries, seconds = self.run_attack(gp, self.classifier, None, x, y, meta["index"])
            quality = _quality(x, x_adv)
            for label in self.labels():
                cols = self.score(label, x_adv, y, clean_ok[label])
                gen = seconds / n if label == NONE else 0.0
                self._add(rows, meta, x_adv, cols, quality, label, "non-adaptive", gp, gi, gen, queries)
        if self.plan.adaptive:
            for di, (label, ev) in enumerate(self.defenses.items(), start=1):
                for gi, gp in enumerate(self.plan.grid):
                    torch.manual_seed(chunk_seed(self.plan.seed, chunk, gi, di))  # EOT / random stages
                    x_adv, queries, seconds = self.run_attack(gp, None, ev, x, y, meta["index"])
                    cols = self.score(label, x_adv, y, clean_ok[label])
                    self._add(rows, meta, x_adv, cols, _quality(x, x_adv), label, "adaptive", gp, gi,
                              seconds / n, queries)
        return rows

    def run_attack(self, gp: GridPoint, model, evaluated, x, y, index: np.ndarray):
        """``(x_adv, queries (N,) int64 with -1 for white-box attacks, seconds)`` of one grid point.

        The attack runs on ``model`` (the classifier), or under ``evaluated``'s
        threat model (:meth:`adv.evaluate.threat.EvaluatedModel.craft`: the
        adaptive target, the detector-aware loss, or queries to the defended
        pipeline itself). A randomized attack draws per example, from the
        streams of (run seed, ``gp.key``, ``index``): the same on every track.
        """
        from adv.attacks import get_attack

        spec = get_attack(gp.attack)
        kw = gp.kwargs()
        if spec.randomized:
            kw["seed"] = example_seeds(self.plan.seed, gp.key, index, x.device)
        t0 = time.perf_counter()
        if evaluated is None:
            x_adv, queries = spec.run(model, x, y, **kw)
        else:
            x_adv, queries = evaluated.craft(gp.attack, x, y, **kw)
        queries = np.full(len(x), -1, np.int64) if queries is None else _np(queries).astype(np.int64)
        return x_adv.detach(), queries, time.perf_counter() - t0

    def _add(self, rows, meta, x_img, cols, quality, label, track, gp: GridPoint | None, gi, gen_seconds, queries):
        n = len(x_img)
        extra = {"image": _np(x_img).astype(np.float32)} if self.plan.store_images else {}
        rows.add(
            **meta, defense=label, track=track, grid=np.full(n, gi, np.int32),
            attack=gp.attack if gp else "clean", attack_key=gp.key if gp else "clean",
            norm=gp.norm if gp else "", eps=np.full(n, gp.eps if gp else 0.0),
            steps=np.full(n, gp.steps if gp and gp.steps is not None else -1, np.int64),
            queries=np.asarray(queries, np.int64), gen_seconds=np.full(n, gen_seconds),
            **quality, **cols, **extra,
        )


class StoredEvaluator(Scorer):
    """``map_groups`` callable for stored runs: new defenses on stored non-adaptive adversarials.

    Each group is one chunk of a stored shard: its ``clean`` rows and its
    ``non-adaptive`` rows crafted on the undefended classifier (defense
    ``none``). The stored rows pass through unchanged; each new defense adds
    its own rows, with ``gen_seconds`` 0 (nothing is regenerated).
    """

    def __call__(self, group: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" not in group:
            raise ValueError("the stored run has no images (store_images was false); it cannot be reused")
        rows = _Rows()
        rows.add(**{k: np.asarray(v) for k, v in group.items() if k != "defense"},
                 defense=np.full(len(group["index"]), NONE, dtype=object))
        x_all = images_to_tensor(np.asarray(group["image"])).to(self.device)
        y_all = torch.as_tensor(np.asarray(group["label"]), dtype=torch.long, device=self.device)
        track = np.asarray(group["track"])
        index = np.asarray(group["index"])
        is_clean = track == "clean"
        passed = {k: np.asarray(group[k]) for k in ATTACK_COLUMNS if k in group}
        passed["gen_seconds"] = np.zeros(len(index))
        for label in self.defenses:
            clean = self.score(label, x_all[is_clean], y_all[is_clean], None)
            ok_by_index = dict(zip(index[is_clean].tolist(), clean["robust"].tolist()))
            missing = sorted(set(index[~is_clean].tolist()) - set(ok_by_index))
            if missing:
                raise ValueError(f"stored chunk lacks clean rows for examples {missing[:5]}")
            adv_idx = index[~is_clean].tolist()
            clean_ok = torch.as_tensor([ok_by_index[i] for i in adv_idx], dtype=torch.bool, device=self.device)
            attacked = self.score(label, x_all[~is_clean], y_all[~is_clean], clean_ok)
            cols = {k: _scatter(is_clean, clean[k], attacked[k]) for k in clean}
            rows.add(**passed, **cols, defense=label, image=np.asarray(group["image"], dtype=np.float32))
        out = rows.build()
        order = [k for k in group if k in out] + [k for k in out if k not in group]
        return {k: out[k] for k in order}
