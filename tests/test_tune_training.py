"""Training-time trials beside inference stages (`training_sweep`), catastrophic overfitting, the GPU config's
smoke run and the main job's selected-defense row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adv.numbers import Number
from adv.tuning.objective import TrialRecord, select
from adv.tuning.overfitting import catastrophic_overfitting
from adv.tuning.space import Candidate
from tests.pipeline_helpers import REPO, train_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("tiny"))


def _epoch(epoch, fgsm, pgd, apgd=None):
    h = {"epoch": epoch, "adaptive_by_attack_fgsm": fgsm, "adaptive_by_attack_pgd": pgd}
    return h if apgd is None else {**h, "adaptive_by_attack_apgd": apgd}


# --- catastrophic overfitting (Ray-free) ----------------------------------------------------------------------
def test_catastrophic_overfitting_is_flagged_when_pgd_collapses_while_fgsm_rises():
    # Wong et al. 2020's picture: PGD accuracy falls from 55% to 30% in one epoch while FGSM accuracy climbs
    history = [_epoch(1, 0.60, 0.50, 0.48), _epoch(2, 0.64, 0.55, 0.52), _epoch(3, 0.70, 0.33, 0.30)]
    flag = catastrophic_overfitting(history)
    assert flag and "epoch 3" in flag and "multi-step accuracy fell" in flag
    # the mark stays when a later epoch looks better: it is in the history
    assert catastrophic_overfitting([*history, _epoch(4, 0.62, 0.5, 0.5)]) == flag
    # the worst multi-step attack counts: APGD collapsing alone is enough
    assert catastrophic_overfitting([_epoch(1, 0.6, 0.5, 0.5), _epoch(2, 0.65, 0.5, 0.2)])


def test_a_fgsm_gap_in_the_first_epoch_is_flagged_and_healthy_training_is_not():
    flag = catastrophic_overfitting([_epoch(1, 0.85, 0.02)])
    assert flag and "epoch 1" in flag and "gap" in flag
    healthy = [_epoch(1, 0.55, 0.48, 0.47), _epoch(2, 0.62, 0.56, 0.55), _epoch(3, 0.66, 0.60, 0.58)]
    assert catastrophic_overfitting(healthy) is None
    # both accuracies falling together is ordinary overfitting (or noise), not the single-step collapse
    assert catastrophic_overfitting([_epoch(1, 0.6, 0.55), _epoch(2, 0.4, 0.3)]) is None
    # a grid without FGSM cannot show it
    assert catastrophic_overfitting([{"epoch": 1, "adaptive_by_attack_pgd": 0.0}]) is None


def _num(v):
    return Number(value=v, ci95=(max(0, v - 0.05), min(1, v + 0.05)), n=200, label="x", subset="val")


def _trained(tid, adaptive, overfit=""):
    return TrialRecord(tid, Candidate((), loss=f"at:eps={tid}"),
                       {"clean": _num(0.85), "adaptive": _num(adaptive)}, adaptive, 0.9, 4, kind="training",
                       overfit=overfit)


def test_selection_pools_stage_and_training_trials_and_never_picks_an_overfit_one():
    stage = TrialRecord("s1", Candidate(("dwt:level=2",)),
                        {"clean": _num(0.88), "non_adaptive": _num(0.6)}, 0.6, 0.9, 200, kind="stored")
    stage.recheck, stage.recheck_objective = {"adaptive": _num(0.08)}, 0.08
    good, masked = _trained("0.1", 0.62), _trained("0.15", 0.9, overfit="catastrophic overfitting at epoch 2")
    best, warnings = select([stage, good, masked], "stored")
    assert best is good and not warnings
    # without training trials the stage trial wins on its adaptive re-check
    assert select([stage, masked], "stored")[0] is stage
    with pytest.raises(Exception, match="catastrophic overfitting"):
        select([masked], "training")


# --- Ray: a tiny mixed sweep, the GPU config's smoke run ----------------------------------------------------
@pytest.mark.ray
def test_a_trained_defense_beats_an_input_transformation_and_is_exported_with_its_training_spec(
        ray_cluster, ckpt, tmp_path):
    from adv.bundle import load_bundle
    from jobs.tune import run
    from jobs.tune_config import parse_tune_config

    eps = 0.15
    cfg = {"name": "mixed", "kind": "stored", "checkpoint": str(ckpt), "seed": 0,
           "data": {"name": "digits", "test": {"n": 32, "seed": 0}, "validation": {"n": 64, "seed": 1},
                    "train_n": 1000},
           "attacks": [{"name": "fgsm", "eps": [eps]}, {"name": "pgd", "eps": [eps], "steps": [5]}],
           "space": {"pipeline": [["dwt"]]},
           "objective": {"max_clean_drop": 0.1, "recheck": 1},
           # Goodfellow's clean mix lets the tiny model learn in 2 epochs (pure AT stalls at chance here)
           "training_sweep": {"space": {"loss.at.attack": ["fgsm_rs"], "loss.at.eps": [eps], "loss.at.mix": [0.5]},
                              "asha": {"enabled": False},
                              "training": {"epochs": 2, "batch_size": 32, "lr": 0.003}},
           "resources": {"batch_size": 32, "max_concurrent": 2, "generate_actors": 1},
           "storage_path": str(tmp_path)}
    result = run(parse_tune_config(cfg))
    kinds = {r.kind: r for r in result.records}
    assert set(kinds) == {"stored", "training"}, result.records
    stage, trained = kinds["stored"], kinds["training"]
    # the DWT stage was re-checked adaptively (BPDA) on the same validation images the trained model saw
    assert stage.recheck["adaptive"].n == trained.numbers["adaptive"].n == 64
    assert trained.numbers["adaptive"].value > stage.recheck["adaptive"].value + 0.1, result.records
    assert trained.numbers["clean"].value >= trained.clean_ref - 0.1 and not trained.overfit
    assert result.selected is trained and trained.resource == 2
    report = (Path(result.run_dir) / "report.md").read_text()
    assert "stored + training" in report and "loss at:" in report and "catastrophic overfitting" in report

    b = load_bundle(result.bundle)  # every file's sha256 checked, the trained classifier's included
    prov = b.manifest["provenance"]
    assert prov["kind"] == "training" and prov["training"]["loss"] == trained.candidate.loss
    assert prov["training"]["epochs"] == 2 and prov["training"]["train_n"] == 1000
    assert "classifier.pt" in b.manifest["files"] and set(b.manifest["numbers"]) == {"clean", "non_adaptive",
                                                                                     "adaptive"}
    assert b.manifest["numbers"]["adaptive"]["n"] == 32  # the final numbers: the disjoint test subset
    assert json.loads((Path(result.run_dir) / "trials.json").read_text())[0]["kind"]


@pytest.mark.ray
def test_the_gpu_config_runs_end_to_end_on_cpu_with_smoke(ray_cluster, tmp_path):
    from adv.bundle import load_bundle
    from adv.data import load_dataset
    from adv.models import create_model, save_checkpoint
    from jobs.tune import main
    from jobs.tune_config import load_tune_config

    gpu = REPO / "jobs/configs/tune-gpu.yaml"
    assert load_tune_config(gpu).resources.gpus_per_trial > 0  # the cluster config keeps its GPUs
    # its architecture, untrained: training trials train from scratch, and it is the non-adaptive source
    data = load_dataset("fashion-mnist", split="test", n=2)
    ckpt = save_checkpoint(tmp_path / "lenet.pt", create_model("lenet", num_classes=10, input_size=data.input_size))
    rc = main(["--config", str(gpu), "--smoke", "--checkpoint", str(ckpt), "--storage-path", str(tmp_path)])
    assert rc == 0
    run_dir = tmp_path / "gpu-training-smoke"
    trials = json.loads((run_dir / "trials.json").read_text())
    assert len(trials) == 2 and all(t["kind"] == "training" for t in trials)
    assert all(t["status"] != "" and not t["status"].startswith("error") for t in trials), trials
    b = load_bundle(run_dir / "best")
    assert b.manifest["provenance"]["training"]["loss"] and b.build() is not None


# --- the main job's evaluation: the selected trained defense as one more row (Ray-free) -------------------------
def test_the_selected_trained_defense_becomes_a_row_of_the_main_evaluation(ckpt, tmp_path):
    from types import SimpleNamespace

    import numpy as np

    from adv.bundle import write_bundle
    from adv.data import load_dataset
    from adv.evaluate.worker import BatchEvaluator
    from adv.models import create_model, save_checkpoint
    from jobs.config import parse_config
    from jobs.evaluate import build_loader, build_plan
    from jobs.main import selected_lines, with_selected
    from tests.pipeline_helpers import batch_of, tiny_config

    other = save_checkpoint(tmp_path / "trained.pt", create_model("convsmall", num_classes=10, input_size=(1, 28, 28)))
    num = {"value": 0.5, "ci95": [0.4, 0.6], "n": 32, "label": "x", "subset": "test"}
    bundle = write_bundle(tmp_path / "best", checkpoint=str(other), stages=[], numbers={
        "clean": num, "non_adaptive": num, "adaptive": num}, provenance={}).location
    selected = _trained("0.1", 0.6)
    tuned = SimpleNamespace(selected=selected, bundle=str(bundle))
    cfg = with_selected(parse_config(tiny_config(ckpt, tmp_path, features=[]), "tiny"), tuned)
    row = cfg.defenses[-1]
    assert row.label == "selected: loss at:eps=0.1 (trained)" and row.classifier.endswith("best/classifier.pt")
    assert [d.label for d in cfg.defenses][:-1] == ["dwt:wavelet=haar,level=1"]  # the config's rows stay

    models = build_loader(cfg)()
    ev = models.defenses[row.label]
    # the trained classifier answers, the undefended one stays the non-adaptive source
    assert ev.defended.classifier is not models.classifier
    x = load_dataset("digits", split="test", n=4).images
    assert not np.allclose(ev.defended(x).detach().numpy(), models.classifier(x).detach().numpy())
    evaluator = BatchEvaluator(build_loader(cfg), build_plan(cfg))
    rows = evaluator(batch_of(load_dataset("digits", split="test", n=4)))
    mine = rows["defense"] == row.label
    assert {"clean", "non-adaptive", "adaptive"} <= set(rows["track"][mine])
    lines = selected_lines(tuned)
    assert lines[0].startswith("selected configuration: loss at:eps=0.1 (training trial 0.1)")
    assert "adaptive 50.0%" in lines[1] and lines[2] == f"bundle: {bundle}"


def test_a_stored_set_generated_in_process_scores_like_the_trials_expect(ckpt):
    from adv.data import load_dataset
    from adv.runs.stored import load_rows, reusable_chunks, save_rows
    from adv.evaluate.worker import ModelLoader
    from adv.evaluate.plan import build_grid
    from adv.tuning import trials
    from jobs.tune_config import parse_tune_config

    cfg = parse_tune_config({"name": "t", "kind": "stored", "checkpoint": str(ckpt),
                             "attacks": [{"name": "fgsm", "eps": [0.1]}], "space": {"pipeline": [["dwt"]]}})
    setting = trials.Setting(build_grid(cfg.attacks), 0.05, "val", 0, 8)
    data = load_dataset("digits", split="test", n=20)
    rows = trials.generate_stored(ModelLoader(checkpoint=str(ckpt)), data, setting)
    assert set(rows["defense"]) == {"none"} and set(rows["track"]) == {"clean", "non-adaptive"}
    chunks = list(reusable_chunks(load_rows(save_rows(rows))))  # no pickles: strings become unicode arrays
    assert len(chunks) == 3 and sum(len(c["index"]) for c in chunks) == 40
    out = trials.run_stored(trials.stage_loader(str(ckpt), ["dwt"], None), chunks, setting, lambda m: None)
    assert out["clean_n"] == 20 and 0 <= out["non_adaptive_acc"] <= out["clean_acc"]
