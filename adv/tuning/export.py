"""The sweep's selected configuration measured on the disjoint test subset and written as a bundle.

``cfg`` is ``jobs.tune``'s validated ``TuneConfig``; a training trial's weights come back through the injected
``restore(record, folder)`` (``jobs.tune`` restores Tune's checkpoint there).
"""

from __future__ import annotations

import tempfile
from typing import Callable

from adv.tuning.objective import TrialRecord
from adv.tuning.splits import Split, take
from adv.tuning.trials import Setting


def export(cfg, uri: str, full, split: Split, grid, selected: TrialRecord, *, checkpoint: str | None,
           model: dict, versions: dict, restore: Callable[[TrialRecord, str], None]) -> tuple[dict, str]:
    """Measure ``selected`` on the test subset and write the bundle to ``<uri>/best``: (numbers, location).
    ``checkpoint``/``model``: the undefended classifier (an adv checkpoint, or factory ``ModelLoader`` keywords)."""
    from adv.bundle import provenance_defaults, write_bundle
    from adv.tuning import trials

    cand = selected.candidate
    test = take(full, split.test)
    setting = Setting(grid, cfg.objective.max_clean_drop, split.describe("test") + ", disjoint from validation",
                      cfg.seed, cfg.resources.batch_size)
    stages, factory = list(cand.stages), None
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.model is not None:  # the user's module ships as the state_dict it loaded; its factory rebuilds it
            from adv.bundle import save_factory_classifier
            from adv.evaluate.worker import ModelLoader

            checkpoint = f"{tmp}/classifier.pt"
            factory = save_factory_classifier(ModelLoader(**model).classifier()[0], cfg.model.factory,
                                              checkpoint, full)
            loader = trials.stage_loader(None, stages, cand.detector, factory=cfg.model.factory,
                                         weights=checkpoint)
        elif selected.kind == "training":
            from adv.models import load_checkpoint
            from adv.train.losses import training_loss

            restore(selected, tmp)
            source, checkpoint, stages = checkpoint, f"{tmp}/model.pt", training_loss(cand.loss).stages
            loader = trials.TrainedLoader(load_checkpoint(source)[0], load_checkpoint(checkpoint)[0],
                                          tuple(stages))
        else:
            loader = trials.stage_loader(checkpoint, stages, cand.detector)
        final = trials.measure(loader, test, setting)
        linf = [gp.eps for gp in grid if gp.norm == "linf"] or [grid[0].eps]
        bundle = write_bundle(
            f"{uri}/best", checkpoint=checkpoint, stages=stages, detector=cand.detector, numbers=final,
            query_detector=cfg.query_detector.model_dump(mode="json") if cfg.query_detector else None,
            factory=factory,
            provenance={**provenance_defaults(), "versions": versions, "sweep": cfg.name, "run": uri,
                        "trial": selected.trial_id, "kind": selected.kind or cfg.kind,
                        "candidate": cand.to_dict(), **training_provenance(cfg, selected),
                        **({"model": cfg.model.model_dump(mode="json")} if cfg.model is not None else {}),
                        "validation": split.describe("validation"), "test": split.describe("test"),
                        "selected_on": "adaptive robust accuracy under the clean-accuracy constraint"},
            evaluation={"dataset": split.dataset, "split": split.split, "n": len(split.test),
                        "seed": split.test_seed, "eps": max(linf), "norm": "linf" if grid[0].norm == "linf" else
                        grid[0].norm, "attacks": [gp.key for gp in grid]},
        )
    return final, bundle.location


def training_provenance(cfg, selected: TrialRecord) -> dict:
    """A trained classifier's training spec, as the bundle's provenance records it (empty for stage trials)."""
    if selected.kind != "training":
        return {}
    t = cfg.training if cfg.kind == "training" else cfg.training_sweep.training
    d = cfg.data
    return {"training": {"loss": selected.candidate.loss, "epochs": int(selected.resource),
                         "batch_size": t.batch_size, "lr": t.lr, "dataset": d.name, "split": "train",
                         "train_n": d.train_n, "seed": cfg.seed, "architecture_of": cfg.checkpoint}}
