"""Search spaces built from the registries' typed parameters, with namespaced keys.

Keys (values: a list = a choice; ``loguniform(a, b)``, ``uniform(a, b)``,
``randint(a, b)`` (b exclusive), or ``{loguniform: [a, b]}`` = a range; a
scalar = fixed)::

    pipeline: [["dwt"], ["initial_ae:checkpoint=ae.pt"], ["dwt", "noise"]]   # alternative stage lists
    stage.dwt.wavelet: [haar, db2, db4]          # a parameter of every ``dwt`` stage of the pipeline
    loss.aad.alpha: loguniform(1e-3, 1)          # a training loss's parameter (training sweeps)
    loss: [at, trades]                           # which training loss, when several are named
    detector.disagreement.threshold: [0.1, 0.2]  # the per-input detector's parameter

Each value (each end of a range) is validated against the component's
pydantic parameter model before any trial starts, so ``stage.dwt.level: [0]``
fails with ``space.stage.dwt.level: ...`` naming the constraint. A trial's
configuration resolves to a :class:`Candidate`: canonical stage specs, a
detector spec and a training-loss spec. Every spec string is parsed once, by
:meth:`SearchSpace.parse`; candidates are built from the parsed specs and the
validated parameters (:meth:`adv.specs.StageSpec.canonical`). This module is
Ray-free; ``jobs.tune`` maps a :class:`Dim` to ``tune.choice``/``tune.loguniform``/...
and grid searches over :meth:`SearchSpace.grid` (de-duplicated candidates), the
:class:`Candidate` objects themselves.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from adv.errors import ConfigError
from adv.specs import StageSpec

RANGES = ("uniform", "loguniform", "randint")
_RANGE_RE = re.compile(r"^\s*(uniform|loguniform|randint)\s*\(\s*([^,]+?)\s*,\s*([^,]+?)\s*\)\s*$")


@dataclass(frozen=True)
class Dim:
    """One dimension: ``kind`` is ``choice``, ``fixed`` or one of :data:`RANGES`."""

    key: str
    kind: str
    values: tuple = ()
    low: float | None = None
    high: float | None = None

    @property
    def discrete(self) -> bool:
        return self.kind in ("choice", "fixed")


@dataclass(frozen=True)
class Candidate:
    """What one trial evaluates: canonical specs, parsed (the bundle and the report print them).

    Tune's param space carries the object itself to the trials and back to the driver (pickled); only the
    file boundaries (trials.json, a bundle's provenance) hold it as a dict (:meth:`to_dict`, :meth:`from_dict`).
    """

    stages: tuple[StageSpec, ...]
    detector: StageSpec | None = None
    loss: str | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        parts = [str(s) for s in self.stages] + ([f"detector {self.detector}"] if self.detector else [])
        parts += [f"loss {self.loss}"] if self.loss else []
        return " + ".join(parts) or "none"

    def __str__(self) -> str:
        return self.label  # what Tune's params.json and status table show of a trial's config

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [str(s) for s in self.stages], "detector": str(self.detector) if self.detector else None,
                "loss": self.loss, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        det = d.get("detector")
        return cls(tuple(StageSpec.parse(s) for s in d["stages"]), StageSpec.parse(det) if det else None,
                   d.get("loss"), tuple(sorted((d.get("params") or {}).items())))

    @property
    def key(self) -> str:
        """A stable text key (sorted JSON): what names a re-check experiment and matches its results."""
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


def _component(ns: str, name: str, where: str):
    """The registry entry behind ``stage.NAME`` / ``detector.NAME`` / ``loss.NAME``."""
    if ns == "loss":
        from adv.train.losses import get_loss

        return get_loss(name)
    from adv.defenses.registry import get_defense

    entry = get_defense(name)
    if ns == "detector" and entry.kind != "detector":
        raise ConfigError(f"{where}: {name!r} is not a detector (use stage.{name}.*)")
    if ns == "stage" and entry.kind == "detector":
        raise ConfigError(f"{where}: {name!r} is a detector (use detector.{name}.*)")
    return entry


def _check_value(entry, param: str, value: Any, where: str) -> None:
    from adv.specs import build_params

    try:
        build_params(entry.params, {param: value}, where)
    except ConfigError as exc:
        msg = str(exc).split(": ", 1)[-1].split("; known params")[0]
        raise ConfigError(f"{where}: {value!r} is not allowed: {msg}") from None


def _dim(key: str, raw: Any) -> Dim:
    if isinstance(raw, str) and _RANGE_RE.match(raw):
        kind, lo, hi = _RANGE_RE.match(raw).groups()
        raw = {kind: [lo, hi]}
    if isinstance(raw, dict):
        if len(raw) != 1 or next(iter(raw)) not in RANGES:
            raise ConfigError(f"space.{key}: a range is one of {', '.join(RANGES)}: [low, high], got {raw!r}")
        kind, bounds = next(iter(raw.items()))
        try:
            lo, hi = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise ConfigError(f"space.{key}: {kind} needs [low, high] numbers, got {bounds!r}") from None
        if not lo < hi or (kind == "loguniform" and lo <= 0):
            raise ConfigError(f"space.{key}: {kind} needs {'0 < ' if kind == 'loguniform' else ''}low < high, "
                              f"got [{lo:g}, {hi:g}]")
        if kind == "randint" and (lo != int(lo) or hi != int(hi)):
            raise ConfigError(f"space.{key}: randint needs integer bounds, got [{lo:g}, {hi:g}]")
        return Dim(key, kind, low=lo, high=hi)
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(f"space.{key}: an empty list (give at least one value)")
        return Dim(key, "choice", tuple(raw))
    return Dim(key, "fixed", (raw,))


@dataclass(frozen=True)
class SearchSpace:
    dims: tuple[Dim, ...]
    pipelines: tuple[tuple[StageSpec, ...], ...]
    kind: str
    losses: tuple[str, ...] = ()
    detectors: tuple[StageSpec | None, ...] = (None,)
    _checked: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, space: dict[str, Any], *, kind: str) -> "SearchSpace":
        """Validate ``space`` (the config's ``space:`` mapping); every error names ``space.<key>``."""
        if not isinstance(space, dict) or not space:
            raise ConfigError("space: give at least one dimension, e.g. stage.dwt.wavelet: [haar, db2]")
        pipelines = _pipelines(space.get("pipeline", [[]]))
        dims, loss_names = [], []
        for key, raw in space.items():
            if key in ("pipeline", "loss", "detector"):
                continue
            ns, _, rest = key.partition(".")
            name, _, param = rest.partition(".")
            if ns not in ("stage", "loss", "detector") or not name or not param:
                raise ConfigError(f"space.{key}: keys are pipeline, loss, stage.NAME.PARAM, loss.NAME.PARAM "
                                  f"or detector.NAME.PARAM")
            entry = _component(ns, name, f"space.{key}")
            if param not in entry.params.model_fields:
                raise ConfigError(f"space.{key}: {name} has no parameter {param!r}; "
                                  f"known: {', '.join(entry.params.model_fields)}")
            dim = _dim(key, raw)
            _check_dim(entry, param, dim)
            if ns == "stage" and not any(s.name == name for p in pipelines for s in p):
                raise ConfigError(f"space.{key}: no pipeline has a {name!r} stage (add it to space.pipeline)")
            if ns == "loss" and name not in loss_names:
                loss_names.append(name)
            dims.append(dim)
        losses = _losses(space.get("loss"), loss_names, kind)
        detectors = _detectors(space.get("detector"), dims)
        if kind != "training" and losses:
            raise ConfigError("space.loss: training losses need kind: training")
        if not any(pipelines) and kind != "training" and detectors == (None,):
            raise ConfigError("space.pipeline: give the stage lists to sweep, e.g. [[dwt], [initial_ae:...]]")
        return cls(tuple(dims), pipelines, kind, losses, detectors)

    def absolute(self) -> "SearchSpace":
        """The space with its stage files (``checkpoint=``) made absolute on the driver: Tune runs each trial in
        its own working directory."""
        return replace(self, pipelines=tuple(tuple(s.absolute() for s in p) for p in self.pipelines),
                       detectors=tuple(d.absolute() if d else None for d in self.detectors))

    @property
    def discrete(self) -> bool:
        return all(d.discrete for d in self.dims)

    def choices(self) -> dict[str, Any]:
        """The dimensions as a flat dict: ``pipeline``/``loss``/``detector`` become indices/names."""
        out: dict[str, Dim] = {}
        if len(self.pipelines) > 1:
            out["pipeline"] = Dim("pipeline", "choice", tuple(range(len(self.pipelines))))
        if len(self.losses) > 1:
            out["loss"] = Dim("loss", "choice", self.losses)
        if len(self.detectors) > 1:  # the spec texts: Optuna's categorical values are plain strings
            out["detector"] = Dim("detector", "choice", tuple(str(d) if d else None for d in self.detectors))
        return {**out, **{d.key: d for d in self.dims}}

    def candidate(self, values: dict[str, Any]) -> Candidate:
        """The canonical specs of one sampled configuration (``values``: key -> value, as :meth:`choices`), built
        from the parsed specs and the validated parameters."""
        from adv.defenses.registry import validate_params

        pipeline = self.pipelines[int(values.get("pipeline", 0))]
        used: dict[str, Any] = {}
        if len(self.pipelines) > 1:
            used["pipeline"] = " + ".join(map(str, pipeline)) or "(none)"

        def apply(spec: StageSpec, ns: str) -> StageSpec:
            over = {k.split(".")[2]: v for k, v in values.items() if k.startswith(f"{ns}.{spec.name}.")}
            used.update({f"{ns}.{spec.name}.{k}": v for k, v in over.items()})
            return StageSpec.canonical(spec.name, validate_params(spec.name, {**dict(spec.params), **over}))

        stages = tuple(apply(s, "stage") for s in pipeline)
        det = self._detector(values)
        detector = apply(det, "detector") if det else None
        loss = None
        if self.losses:
            from adv.specs import format_spec
            from adv.train.losses import resolve_loss

            name = values.get("loss", self.losses[0])
            over = {k.split(".")[2]: v for k, v in values.items() if k.startswith(f"loss.{name}.")}
            used.update({f"loss.{name}.{k}": v for k, v in over.items()})
            if len(self.losses) > 1:
                used["loss"] = name
            loss = format_spec(*resolve_loss((name, over)))
        return Candidate(stages, detector, loss, tuple(sorted(used.items())))

    def trial_candidate(self, config: dict[str, Any]) -> Candidate:
        """A Tune trial's candidate, from its config: the :class:`Candidate` a grid search carries
        (``candidate``), or the one a searcher's sampled values make."""
        return config["candidate"] if "candidate" in config else self.candidate(config)

    def _detector(self, values: dict[str, Any]) -> StageSpec | None:
        """The parsed detector spec ``values`` picks (by its text, as :meth:`choices` offers it)."""
        if "detector" not in values:
            return self.detectors[0]
        by_text = {str(d): d for d in self.detectors if d}
        return by_text[values["detector"]] if values["detector"] is not None else None

    def grid(self) -> list[Candidate]:
        """Every combination of a discrete space, de-duplicated (a stage's keys are moot without the stage)."""
        if not self.discrete:
            raise ConfigError("space: grid search needs every dimension discrete (lists or fixed values)")
        dims = self.choices()
        out: dict[tuple, Candidate] = {}
        for combo in itertools.product(*(d.values for d in dims.values())):
            c = self.candidate(dict(zip(dims, combo)))
            out.setdefault((c.stages, c.detector, c.loss), c)
        return list(out.values())


def _check_dim(entry, param: str, dim: Dim) -> None:
    where = f"space.{dim.key}"
    if dim.discrete:
        for v in dim.values:
            _check_value(entry, param, v, where)
        return
    annotation = str(entry.params.model_fields[param].annotation)
    if "float" not in annotation and "int" not in annotation:
        raise ConfigError(f"{where}: {dim.kind} needs a numeric parameter; {param} is {annotation}")
    if dim.kind != "randint" and "float" not in annotation:
        raise ConfigError(f"{where}: {param} is an integer; use randint(low, high) or a list")
    ends = (int(dim.low), int(dim.high) - 1) if dim.kind == "randint" else (dim.low, dim.high)
    for v in ends:
        _check_value(entry, param, v, where)


def _pipelines(raw: Any) -> tuple[tuple[StageSpec, ...], ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("space.pipeline: a list of stage lists, e.g. [[dwt], [initial_ae:checkpoint=ae.pt]]")
    out = []
    for i, p in enumerate(raw):
        stages = [p] if isinstance(p, str) else p
        if not isinstance(stages, list) or not all(isinstance(s, str) for s in stages):
            raise ConfigError(f"space.pipeline[{i}]: a stage spec or a list of them, got {p!r}")
        out.append(tuple(_parsed(s, f"space.pipeline[{i}]", detector=False) for s in stages))
    return tuple(out)


def _parsed(text: str, where: str, *, detector: bool) -> StageSpec:
    """``text`` parsed (the one parse of a sweep's spec) and validated, a detector or a stage as asked."""
    from adv.defenses.registry import get_defense, resolve

    try:
        spec = StageSpec.parse(text)
        if (get_defense(resolve(spec)[0]).kind == "detector") != detector:
            raise ConfigError(f"{spec.name!r} is not a detector" if detector else
                              f"{spec.name!r} is a detector; sweep it under space.detector")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return spec


def _losses(raw: Any, named: list[str], kind: str) -> tuple[str, ...]:
    from adv.train.losses import get_loss

    given = [raw] if isinstance(raw, str) else list(raw or [])
    for name in given:
        try:
            get_loss(name)
        except ConfigError as exc:
            raise ConfigError(f"space.loss: {exc}") from None
    missing = [n for n in named if given and n not in given]
    if missing:
        raise ConfigError(f"space.loss.{missing[0]}: {missing[0]!r} is not among space.loss {given}")
    losses = tuple(given or named)
    if kind == "training" and not losses:
        raise ConfigError("space.loss: a training sweep needs a training loss (loss: [at] or loss.NAME.PARAM)")
    return losses


def _detectors(raw: Any, dims: list[Dim]) -> tuple[StageSpec | None, ...]:
    given = [raw] if isinstance(raw, str) or raw is None else list(raw)
    parsed = tuple(None if s is None else _parsed(s, "space.detector", detector=True) for s in given)
    named = {d.key.split(".")[1] for d in dims if d.key.startswith("detector.")}
    for name in named:
        if not any(s and s.name == name for s in parsed):
            raise ConfigError(f"space.detector.{name}: add the detector's spec under space.detector")
    return parsed
