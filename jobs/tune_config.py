"""The typed config of a sweep (``python -m jobs.tune --config sweep.yaml``); docs/tuning.md lists every key.

Validation happens here, before Ray starts: unknown keys, bad resources and a
search space whose values the parameter models forbid all fail with one line
naming the key (``jobs.tune`` formats pydantic's first error).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator

from adv.detectors import DetectorConfig
from adv.tuning.space import SearchSpace
from adv.validation import validate_mapping
from adv.validation import read_yaml
from jobs.config import AttackConfig, RayConnection, Strict


class SubsetConfig(Strict):
    n: int = Field(ge=1)
    seed: int = 0


class DataConfig(Strict):
    #: A registered in-memory dataset (``adv info datasets``); the validation and test subsets come from ``split``.
    name: str = "fashion-mnist"
    split: Literal["train", "test"] = "test"
    root: str | None = Field(None, validation_alias=AliasChoices("root", "data_dir", "data-dir"))  # as jobs.config
    download: bool = False
    #: The subset the exported bundle's final numbers use (same form as ``adv eval --n N --seed S``).
    test: SubsetConfig = SubsetConfig(n=300, seed=0)
    #: The subset every trial sees: a seeded draw from the rest of ``split``, disjoint from ``test``.
    validation: SubsetConfig = SubsetConfig(n=200, seed=1)
    #: Training-time trials: a seeded subset of the training split (all when null).
    train_n: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _known(self):
        from adv.data.base import DATASETS

        if self.name not in DATASETS:
            raise ValueError(f"name: {DATASETS.unknown(self.name)}")
        return self


class ObjectiveConfig(Strict):
    #: The largest clean-accuracy drop (vs the undefended classifier on the same examples) a trial may cost.
    max_clean_drop: float = Field(0.05, ge=0, le=1)
    #: Stored (non-adaptive) sweeps: re-check the best K trials adaptively; the selection uses the re-check.
    recheck: int = Field(3, ge=1)


class SearchConfig(Strict):
    #: ``auto``: grid search when every dimension is discrete, else Optuna (``ray.tune.search.optuna``).
    algorithm: Literal["auto", "grid", "optuna"] = "auto"
    #: Trials Optuna samples (ignored by grid search, which runs every combination once).
    num_samples: int = Field(8, ge=1)
    seed: int = 0


class AshaConfig(Strict):
    """Early stopping (ASHA) on the trial's resource: evaluated examples (adaptive) or epochs (training)."""

    enabled: bool = True
    #: First rung: 64 examples (adaptive: rungs at 64, 128, 256, ...) or 1 epoch (training).
    grace: int | None = Field(None, ge=1)
    reduction_factor: int = Field(2, ge=2)


class TrainingConfig(Strict):
    """Training-time trials: a fresh classifier of the base checkpoint's architecture, trained with the loss."""

    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    #: Validation examples evaluated after every epoch (all of ``data.validation`` when null).
    eval_n: int | None = Field(None, ge=1)
    #: Catastrophic overfitting (Wong et al. 2020): a trial is marked, penalized and never selected when its
    #: multi-step accuracy falls this far below its best epoch while its FGSM accuracy does not fall ...
    overfit_drop: float = Field(0.2, gt=0, le=1)
    #: ... or when its FGSM accuracy exceeds its multi-step accuracy by this much (the gradient-masking gap).
    overfit_gap: float = Field(0.3, gt=0, le=1)


class ResourcesConfig(RayConnection):
    cpus_per_trial: float = Field(1, gt=0)
    #: Fractional GPUs are allowed (they share memory; Ray does not isolate it); 0 on CPU machines.
    gpus_per_trial: float = Field(0, ge=0)
    max_concurrent: int = Field(2, ge=1)
    #: Examples per attack call.
    batch_size: int = Field(64, ge=1)
    #: Actors of the Ray Data job that generates a missing stored set.
    generate_actors: int = Field(2, ge=1)


class StoredConfig(Strict):
    #: A finished ``jobs.evaluate`` run made on this sweep's validation subset; null = generate it once.
    run: str | None = None
    #: How a missing set is generated: ``ray_data`` (the evaluation job, distributed), ``in_process`` (in the
    #: driver), ``auto``: in the driver on a one-node cluster for at most ``in_process_max`` images.
    generate: Literal["auto", "ray_data", "in_process"] = "auto"
    in_process_max: int = Field(20_000, ge=1)


class TrainingSweepConfig(Strict):
    """Training-time trials beside a ``stored``/``adaptive`` sweep: a second Tune experiment (``<run>/training``)
    on the same validation subset and attack grid, whose trials compete in the same selection."""

    #: ``loss`` and ``loss.NAME.PARAM`` dimensions (a ``kind: training`` space).
    space: dict[str, Any]
    search: SearchConfig = SearchConfig()
    asha: AshaConfig = AshaConfig()
    training: TrainingConfig = TrainingConfig()

    @cached_property
    def search_space(self) -> SearchSpace:
        """``space`` parsed: once, by the validator, whose parse the sweep uses (``model_copy(update=...)``
        does not validate, so it must not replace ``space``)."""
        return SearchSpace.parse(self.space, kind="training")

    @model_validator(mode="after")
    def _space(self):
        # the error's key path gets its "training_sweep." prefix from the enclosing model's validation
        self.search_space
        return self


class FactoryModel(Strict):
    """A user's own architecture, spelled as ``jobs.evaluate``'s ``model:`` block (``factory`` + ``weights``)."""

    #: ``"mypkg.nets:make_net"``, a function returning the nn.Module (logits of [0, 1] images), imported from the
    #: job's working directory (``ray job submit --working-dir .``), which Ray gives every trial.
    factory: str
    #: The state_dict the built module loads (prefixes aligned as ``adv eval --model-factory`` does); null when
    #: the factory returns a trained module itself.
    weights: str | None = None

    @model_validator(mode="after")
    def _spec(self):
        from adv.errors import AdvError
        from adv.models.factory import parse_factory

        try:
            parse_factory(self.factory)
        except AdvError as exc:
            raise ValueError(f"factory: {exc}") from None
        return self


class TuneConfig(Strict):
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    #: ``stored``: inference stages on stored non-adaptive adversarials; ``adaptive``: each trial attacks its own
    #: pipeline (ASHA on examples); ``training``: each trial trains a classifier (ASHA on epochs).
    kind: Literal["stored", "adaptive", "training"]
    data: DataConfig = DataConfig()
    #: The classifier (an adv checkpoint) the stages defend, or whose architecture training trials train.
    checkpoint: str | None = None
    #: Or your own architecture, as in jobs.evaluate: ``model: {factory: mypkg.nets:make_net, weights: net.pt}``
    #: (stored and adaptive sweeps; exactly one of ``checkpoint`` and ``model``).
    model: FactoryModel | None = None
    #: The attack grid (the ``attacks`` schema of jobs.evaluate); the numbers are worst cases over it.
    attacks: list[AttackConfig] = Field(min_length=1)
    #: Namespaced dimensions (``pipeline``, ``stage.NAME.PARAM``, ``loss.NAME.PARAM``, ``detector.NAME.PARAM``).
    space: dict[str, Any]
    objective: ObjectiveConfig = ObjectiveConfig()
    search: SearchConfig = SearchConfig()
    asha: AshaConfig = AshaConfig()
    training: TrainingConfig = TrainingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    stored: StoredConfig = StoredConfig()
    #: Stored/adaptive sweeps: training-time trials that compete with the inference stages (null: none).
    training_sweep: TrainingSweepConfig | None = None
    #: The query-attack detector the exported bundle ships (``adv.detectors.DetectorConfig``: ``per_user``,
    #: ``index``, ``action``), validated by the detector's own model; ``jobs.serve`` runs it unless its config
    #: sets ``detector``. Null: the bundle ships none and Serve falls back to ``DetectorConfig()``'s defaults.
    query_detector: DetectorConfig | None = None
    #: Where runs go: a local folder or a pyarrow URI (``s3://bucket/prefix``); a run is ``<storage_path>/<name>``.
    storage_path: str = "runs/tune"

    @model_validator(mode="after")
    def _one_model(self):
        if self.checkpoint is not None and self.model is not None:
            raise ValueError("give checkpoint: PATH (an adv checkpoint) or model: {factory: ..., weights: ...}, "
                             "not both")
        if self.checkpoint is None and self.model is None:
            raise ValueError("checkpoint: required (an adv checkpoint), or model: {factory: MODULE:FUNCTION, "
                             "weights: PATH} for your own architecture")
        if self.model is not None and (self.kind == "training" or self.training_sweep is not None):
            # training trials save and resume adv checkpoints (model.pt), which record a registry architecture
            # and its normalization; a factory's module is neither, and re-initialising its output is a guess
            what = "kind: training" if self.kind == "training" else "training_sweep"
            raise ValueError(f"{what}: training trials need an adv checkpoint (they save adv checkpoints of its "
                             "architecture); with model.factory use kind: stored or adaptive without training_sweep")
        return self

    @model_validator(mode="after")
    def _query_detector(self):
        # QueryDetector refuses "fallback" without a fallback model, which a bundle does not carry: fail before
        # the sweep rather than when jobs.serve starts the exported bundle.
        if self.query_detector is not None and self.query_detector.action == "fallback":
            raise ValueError("query_detector.action: 'fallback' needs a fallback model, which a bundle does not "
                             "carry (jobs.serve could not run it); use flag, deceive or block")
        return self

    @cached_property
    def search_space(self) -> SearchSpace:
        """``space`` parsed: once, by the validator, whose parse the sweep uses (``model_copy(update=...)``
        does not validate, so it must not replace ``space``)."""
        return SearchSpace.parse(self.space, kind=self.kind)

    @model_validator(mode="after")
    def _space(self):
        self.search_space  # raises "space.<key>: ..." before any trial
        if self.training_sweep is not None and self.kind == "training":
            raise ValueError("training_sweep: a kind: training sweep trains in its main phase already")
        return self

    def stored_eval_config(self, root: str, n: int, classifier: dict):
        """The ``jobs.evaluate`` config that attacks the ``n`` validation images exported to ``root`` once;
        ``classifier``: the undefended classifier as ``ModelLoader`` keywords (the sweep's own spelling)."""
        from jobs.config import parse_config

        return parse_config({
            "name": f"{self.name}-validation", "seed": self.seed, "dataset": {"name": "parquet", "root": root},
            "model": classifier, "defenses": [], "adaptive": False, "features": [],
            "attacks": [a.model_dump(mode="json") for a in self.attacks], "store_images": True,
            "shards": min(4, n), "resources": {"actors": self.resources.generate_actors,
                                               "batch_size": self.resources.batch_size},
        }, "stored set")


def parse_tune_config(data: Any, source: str = "") -> TuneConfig:
    return validate_mapping(TuneConfig, data, source)


def load_tune_config(path: str | Path) -> TuneConfig:
    """Read and validate a sweep's YAML; every error is one line naming the key."""
    return parse_tune_config(read_yaml(path), str(path))


#: ``--smoke``: the sizes a sweep shrinks to, so a cluster config runs end to end on a laptop's CPU in a minute.
SMOKE = {"test": 16, "validation": 32, "train_n": 256, "epochs": 2, "eval_n": 16, "num_samples": 2, "steps": 3,
         "batch_size": 16}


def smoke_config(cfg: TuneConfig, *, checkpoint: str | None = None, storage_path: str | None = None) -> TuneConfig:
    """``cfg`` shrunk for a CPU smoke run (``python -m jobs.tune --smoke``): tiny subsets, 2 epochs, 2 samples,
    attacks capped at 3 steps, no GPUs when none is visible (``gpus_per_trial`` stays for clusters otherwise),
    no downloads; ``checkpoint``/``storage_path`` replace the config's cluster paths. The run is named
    ``<name>-smoke``; the sweep's logic (search, ASHA, checkpoints, selection, export) is unchanged."""
    import torch

    s = SMOKE
    raw = cfg.model_dump(mode="json")
    raw["name"] = f"{cfg.name}-smoke"
    raw["checkpoint"] = checkpoint or raw["checkpoint"]
    raw["storage_path"] = storage_path or raw["storage_path"]
    raw["data"].update(download=False, test={"n": s["test"], "seed": cfg.data.test.seed},
                       validation={"n": s["validation"], "seed": cfg.data.validation.seed}, train_n=s["train_n"])
    for a in raw["attacks"]:
        a["steps"] = [min(x, s["steps"]) for x in a["steps"]] if a.get("steps") else a.get("steps")
    res = raw["resources"]
    gpus = res["gpus_per_trial"] if torch.cuda.is_available() else 0
    res.update(cpus_per_trial=1, gpus_per_trial=gpus, max_concurrent=2, batch_size=s["batch_size"],
               generate_actors=1, address=None)
    for section in [raw] + ([raw["training_sweep"]] if raw.get("training_sweep") else []):
        section["training"].update(epochs=min(section["training"]["epochs"], s["epochs"]), eval_n=s["eval_n"],
                                   batch_size=min(section["training"]["batch_size"], 64))
        section["search"]["num_samples"] = min(section["search"]["num_samples"], s["num_samples"])
        section["asha"]["grace"] = 1 if section["asha"]["grace"] else None
    raw["objective"]["recheck"] = min(raw["objective"]["recheck"], 2)
    return parse_tune_config(raw, f"{cfg.name} (--smoke)")
