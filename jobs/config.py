"""The one typed config of ``jobs.evaluate``: YAML -> ``EvalConfig`` (pydantic), validated at the boundary.

Every error names the key that is wrong (``attacks[1].eps[0]: ...``) and is
raised as ``ConfigError``; the entrypoint turns it into one line and exit 2.
Keys are documented in docs/pipeline.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices, BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, field_validator, model_validator,
)

from adv.errors import AdvError, ConfigError
from adv.evaluate.plan import BUDGET_PARAMS, budget_param
from adv.runs.rows import FEATURES
from adv.specs import StageSpec
from adv.validation import parse_eps, read_yaml, validate_mapping

#: Datasets read by Ray Data from files instead of loaded in memory by ``adv.data``.
FILE_SOURCES = ("imagefolder", "parquet")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(Strict):
    #: A registered ``adv.data`` dataset (loaded in memory), ``imagefolder`` (read_images) or ``parquet``.
    name: str = "fashion-mnist"
    split: Literal["train", "test"] = "test"
    #: Seeded random subset of ``n`` examples (all when null).
    n: int | None = Field(None, ge=1)
    seed: int = 0
    #: Data folder (registered sets), image-folder root, or Parquet path/URI; ``data_dir`` is the same key
    #: (``--data-dir`` on the CLI, ``data_dir=`` in Python).
    root: str | None = Field(None, validation_alias=AliasChoices("root", "data_dir", "data-dir"))
    download: bool = False
    #: read_images resize target (H, W) for image folders; default: the model's input size.
    image_size: tuple[int, int] | None = None

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v):
        if v is not None and min(v) < 1:
            raise ValueError(f"image_size must be two positive integers, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _known(self):
        from adv.data import list_datasets

        known = (*list_datasets(), "parquet")
        if self.name not in known:
            raise ValueError(f"name: unknown dataset {self.name!r}; known: {', '.join(sorted(known))}")
        if self.name in FILE_SOURCES and not self.root:
            raise ValueError(f"root: dataset {self.name!r} needs root (a folder, or a path/URI)")
        return self


class ModelConfig(Strict):
    #: Registry name (``adv info`` lists them); optional with ``checkpoint``.
    arch: str | None = None
    #: An adv checkpoint (``model.pt``); mutually exclusive with ``weights``.
    checkpoint: str | None = None
    #: A foreign state_dict loaded into ``arch`` or into the module ``factory`` builds.
    weights: str | None = None
    #: Your own architecture: ``"mypkg.nets:make_net"``, a function returning the nn.Module, found in the job's
    #: working directory (``ray job submit --working-dir .``), which Ray gives every worker. ``weights`` fill it.
    factory: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        from adv.models.registry import MODELS

        if self.factory:
            if self.arch or self.checkpoint:
                raise ValueError("give factory (with optional weights), or arch/checkpoint, not both")
            from adv.models.factory import parse_factory

            try:
                parse_factory(self.factory)
            except AdvError as exc:
                raise ValueError(f"factory: {exc}") from None
            return self
        if self.checkpoint and (self.weights or self.arch):
            raise ValueError("give checkpoint, or arch (with optional weights), not both")
        if not self.checkpoint and not (self.arch and self.weights):
            raise ValueError("give checkpoint: PATH, or arch: NAME with weights: PATH "
                             "(random weights are not evaluated)")
        if self.arch and self.arch not in MODELS:
            raise ValueError(f"arch: {MODELS.unknown(self.arch)}")
        return self


def _spec(value: Any) -> StageSpec:
    if not isinstance(value, (str, StageSpec)):
        raise ValueError(f"a stage spec is a string NAME[:k=v,...], got {value!r}")
    try:
        return StageSpec.parse(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


#: A stage spec parsed once, here, at the config's edge; stored and hashed as the string it was written as.
Spec = Annotated[StageSpec, PlainValidator(_spec), PlainSerializer(str, return_type=str)]


class DefenseConfig(Strict):
    """One defended model: preprocessing/classifier stages in order, and an optional detector."""

    #: Label in the report; default: the stage specs joined with " + ".
    name: str | None = None
    stages: list[Spec] = Field(default_factory=list)
    detector: Spec | None = None
    #: A training-time defense: an adv checkpoint that answers in place of ``model`` for this defense (behind
    #: ``stages``); its non-adaptive adversarials are still crafted on ``model``, the undefended classifier.
    classifier: str | None = None

    @model_validator(mode="after")
    def _check(self):
        from adv.defenses.registry import get_defense, resolve

        if not self.stages and not self.detector and not self.classifier:
            raise ValueError("a defense needs at least one stage, a detector or a classifier")
        for i, spec in enumerate(self.stages):
            try:
                name, _ = resolve(spec)
                if get_defense(name).kind == "detector":
                    raise ConfigError(f"{name!r} is a detector; put it under detector:")
            except ConfigError as exc:
                raise ValueError(f"stages[{i}]: {exc}") from None
        if self.detector:
            try:
                name, _ = resolve(self.detector)
                if get_defense(name).kind != "detector":
                    raise ConfigError(f"{name!r} is not a detector")
            except ConfigError as exc:
                raise ValueError(f"detector: {exc}") from None
        return self

    @property
    def label(self) -> str:
        return self.name or " + ".join([*([f"classifier {self.classifier}"] if self.classifier else []),
                                        *map(str, self.stages), *([f"detector {self.detector}"] if self.detector
                                                                  else [])])


class AttackConfig(Strict):
    name: str
    #: Budgets of the grid; numbers, "inf" (minimal attacks only) or fractions like "8/255".
    eps: list[float]
    #: Iteration budgets of the grid (``steps``, or ``queries`` for Square); omit for one-step attacks.
    steps: list[int] | None = None
    norm: str = "linf"
    #: Other hyperparameters, passed to the attack unchanged (``get_attack(name).defaults`` lists them).
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("eps", mode="before")
    @classmethod
    def _eps(cls, v):
        values = v if isinstance(v, list) else [v]
        if not values:
            raise ValueError("eps needs at least one value")
        return [parse_eps(x) for x in values]

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, v):
        if v is None:
            return v
        values = v if isinstance(v, list) else [v]
        if not values or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in values):
            raise ValueError(f"steps must be one or more integers >= 1, got {v!r}")
        return values

    @model_validator(mode="after")
    def _against_registry(self):
        from adv.attacks import get_attack

        try:
            spec = get_attack(self.name)
        except ValueError as exc:
            raise ValueError(f"name: {exc}") from None
        if self.norm not in spec.norms:
            raise ValueError(f"norm: {self.name} supports {list(spec.norms)}, got {self.norm!r}")
        if any(math.isinf(e) for e in self.eps) and not spec.minimal:
            raise ValueError(f"eps: 'inf' is only for minimal-perturbation attacks, not {self.name}")
        if self.steps is not None and budget_param(spec) is None:
            raise ValueError(f"steps: {self.name} has no iteration budget (omit steps)")
        reserved = {"eps", "norm", "targeted", "y_target", "seed", *BUDGET_PARAMS} & set(self.params)
        if reserved:
            raise ValueError(f"params: {sorted(reserved)} are set by the grid or the run, not params")
        spec.check_renamed(self.params)
        unknown = [k for k in self.params if not spec.accepts(k)]
        if unknown:
            raise ValueError(f"params: {self.name} has no hyperparameter(s) {unknown}; "
                             f"it takes {sorted(spec.defaults)}")
        return self


class RayConnection(Strict):
    """Where a Ray stage runs: the keys every stage's ``resources:`` shares."""

    #: Ray address; null = ``$RAY_ADDRESS`` if set, else an embedded local cluster.
    address: str | None = None
    #: CPUs of the embedded local cluster (ignored when connecting to one); null = all.
    local_cpus: int | None = Field(None, ge=1)


class ResourcesConfig(RayConnection):
    #: Fixed actor-pool size (pin it to the number of GPUs on GPU clusters, Ray issue #59144).
    actors: int = Field(2, ge=1)
    #: GPUs per actor; 0 on CPU-only machines (a GPU request there would wait forever).
    gpus_per_actor: float = Field(0, ge=0)
    cpus_per_actor: float = Field(1, gt=0)
    #: Examples per attack call (and per Ray Data batch); also the unit of seeding.
    batch_size: int = Field(64, ge=1)
    #: Object-store bytes of the embedded local cluster; null = Ray's default.
    object_store_memory: int | None = Field(None, ge=75 * 2**20)
    #: Custom Ray resources each actor asks for, e.g. ``{evaluator: 1}`` to keep the pool on worker nodes.
    custom: dict[str, float] = Field(default_factory=dict)


class OutputConfig(Strict):
    #: Local folder or a pyarrow filesystem URI (``s3://bucket/prefix``); a run writes to PATH/<config hash>.
    path: str = "runs/eval"


class ReportConfig(Strict):
    #: Examples in the example and Grad-CAM grids.
    examples: int = Field(4, ge=1, le=32)
    #: Attention-IoU cell counts (Wu et al. 2022 (AAD) Table 3).
    iou_cells: list[int] = Field(default_factory=lambda: [5, 10, 20, 30])
    #: Perturbation magnification in the example grid (Himbitski et al. 2024: x30).
    magnify: float = Field(30.0, gt=0)


class EvalConfig(Strict):
    """Everything one evaluation run needs; ``run_key()`` hashes what determines its results."""

    name: str = "eval"
    #: Seed of the randomized attacks (per batch: combined with the batch index).
    seed: int = 0
    dataset: DatasetConfig | None = None
    model: ModelConfig | None = None
    #: Defended models; the undefended classifier is always evaluated too, as "none".
    defenses: list[DefenseConfig] = Field(default_factory=list)
    attacks: list[AttackConfig] = Field(default_factory=list)
    #: Also attack each defended model directly (BPDA/EOT for white-box attacks, queries for black-box).
    adaptive: bool = True
    features: list[Literal["logits", "penultimate", "gradcam"]] = Field(default_factory=lambda: ["logits", "gradcam"])
    #: Keep adversarial images in the Parquet store (needed to reuse them and for the example grid).
    store_images: bool = True
    #: Deterministic shards of the dataset: the unit of resume.
    shards: int = Field(8, ge=1)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    #: A finished run whose stored adversarial examples are re-evaluated on ``defenses``
    #: (the non-adaptive track) without regenerating attacks.
    reuse_from: str | None = None

    @field_validator("defenses", mode="before")
    @classmethod
    def _defense_shorthand(cls, v):
        # "dwt:wavelet=haar" or ["dwt", "initial_ae:..."] are one-line defenses.
        if not isinstance(v, list):
            return v
        return [{"stages": [d]} if isinstance(d, str) else {"stages": d} if isinstance(d, list) else d for d in v]

    @model_validator(mode="after")
    def _check(self):
        if self.reuse_from:
            given = ([k for k in ("dataset", "model") if getattr(self, k) is not None]
                     + (["attacks"] if self.attacks else []))
            if given:
                raise ValueError(f"{given[0]}: omit it with reuse_from (the stored run's {given[0]} is reused)")
            if self.adaptive:
                raise ValueError("adaptive: must be false with reuse_from (adaptive attacks are regenerated "
                                 "per defense; stored sets serve the non-adaptive track)")
            if not self.defenses:
                raise ValueError("defenses: reuse_from needs at least one defense to evaluate")
            return self
        if self.dataset is None:
            raise ValueError("dataset: required (or reuse_from: RUN_DIR)")
        if self.model is None:
            raise ValueError("model: required (or reuse_from: RUN_DIR)")
        if not self.attacks:
            raise ValueError("attacks: give at least one attack")
        labels = [d.label for d in self.defenses]
        dup = next((x for x in labels if labels.count(x) > 1 or x == "none"), None)
        if dup:
            raise ValueError(f"defenses: label {dup!r} is used twice or reserved; set name: on one of them")
        if self.dataset.n is not None and self.dataset.n < self.shards:
            raise ValueError(f"shards: {self.shards} shards for {self.dataset.n} examples; use at most n shards")
        return self

    def job_paths(self, out: str | None) -> tuple[dict[str, str | None], dict[str, str | None]]:
        """The input and output paths, by the key that sets them (for ``jobs.common.check_job_paths``)."""
        inputs: dict[str, str | None] = {"reuse_from": self.reuse_from}
        if self.model is not None:
            inputs.update({"model.checkpoint": self.model.checkpoint, "model.weights": self.model.weights})
        if self.dataset is not None:
            inputs["dataset.root"] = self.dataset.root
        for i, d in enumerate(self.defenses):
            inputs.update({f"defenses[{i}].stages[{j}]": s.get("checkpoint") for j, s in enumerate(d.stages)})
            inputs[f"defenses[{i}].detector"] = d.detector and d.detector.get("checkpoint")
        return inputs, ({"--out": out} if out else {"output.path": self.output.path})

    def run_key(self) -> str:
        """sha256 of what determines the results; resources, output and report options are left out."""
        data = self.model_dump(mode="json", exclude={"resources", "output", "report", "name"})
        data["batch_size"] = self.resources.batch_size  # the unit of per-batch seeding
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def parse_config(data: Any, source: str = "") -> EvalConfig:
    return validate_mapping(EvalConfig, data, source)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> EvalConfig:
    """Read and validate a YAML config; ``overrides`` replace top-level keys, ``drop`` removes some."""
    data = read_yaml(path)
    if isinstance(data, dict):
        data = {k: v for k, v in {**data, **(overrides or {})}.items() if k not in drop}
    return parse_config(data, str(path))


__all__ = ["AdvError", "ConfigError", "EvalConfig", "FEATURES", "load_config", "parse_config", "read_yaml"]
