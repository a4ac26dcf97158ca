"""The Ray-free half of the Tune stage: search spaces, config errors, objective, splits, selection, report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adv.errors import ConfigError
from adv.numbers import Number
from adv.tuning.objective import (TrialRecord, flat_metrics, numbers_from_counts, numbers_from_flat, pareto_front,
                                  penalized, select)
from adv.tuning.space import Candidate, SearchSpace
from adv.tuning.splits import make_split
from jobs.tune import main as tune_main
from jobs.tune_config import parse_tune_config
from tests.pipeline_helpers import write_yaml


def _cfg(**over) -> dict:
    cfg = {"name": "t", "kind": "stored", "checkpoint": "model.pt", "data": {"name": "digits"},
           "attacks": [{"name": "fgsm", "eps": [0.1]}],
           "space": {"pipeline": [["dwt"]], "stage.dwt.wavelet": ["haar", "db2"]}}
    cfg.update(over)
    return cfg


def test_grid_is_built_from_typed_params_and_deduplicated():
    space = SearchSpace.parse({"pipeline": [["dwt"], ["quantize"]], "stage.dwt.wavelet": ["haar", "db2"],
                               "stage.dwt.level": [1, 2]}, kind="stored")
    assert space.discrete
    grid = space.grid()
    stages = [tuple(map(str, c.stages)) for c in grid]  # parsed specs, printed as the report and bundle print them
    # 4 DWT combinations and one quantize pipeline (the dwt keys are moot there, so it is not repeated)
    assert stages.count(("quantize",)) == 1 and len(grid) == 5
    assert ("dwt:wavelet=db2,level=2",) in stages
    assert dict(grid[0].params)["stage.dwt.wavelet"] == "haar"


def test_a_sweep_parses_each_spec_string_once(spec_parses):
    """Issue 23: ``SearchSpace.parse`` parses every pipeline and detector spec once; the grid, a sampled
    configuration and a candidate's label, dict and key work on the parsed specs."""
    pipelines = [["dwt:level=2", "quantize"], ["quantize:bits=3"]]
    space = SearchSpace.parse({"pipeline": pipelines, "stage.dwt.wavelet": ["haar", "db2"],
                               "detector": ["disagreement:hidden=8", None],
                               "detector.disagreement.bottleneck": [4, 64]}, kind="stored")
    grid = space.grid()
    sampled = space.candidate({"pipeline": 0, "stage.dwt.wavelet": "db2", "detector": "disagreement:hidden=8",
                               "detector.disagreement.bottleneck": 4})
    assert sorted(spec_parses) == sorted(["dwt:level=2", "quantize", "quantize:bits=3", "disagreement:hidden=8"])
    assert len(grid) == 9 and sampled in grid
    assert sampled.label == "dwt:wavelet=db2,level=2 + quantize + detector disagreement:hidden=8,bottleneck=4"
    assert sampled.to_dict() == {"stages": ["dwt:wavelet=db2,level=2", "quantize"],
                                 "detector": "disagreement:hidden=8,bottleneck=4", "loss": None,
                                 "params": {"detector.disagreement.bottleneck": 4,
                                            "pipeline": "dwt:level=2 + quantize", "stage.dwt.wavelet": "db2"}}
    assert sampled.key == json.dumps(sampled.to_dict(), sort_keys=True)
    assert Candidate.from_dict(sampled.to_dict()) == sampled  # the file boundary parses


def test_the_driver_makes_stage_files_absolute_on_the_parsed_space(spec_parses, tmp_path, monkeypatch):
    """Tune runs each trial in its own folder: ``SearchSpace.absolute`` (the driver) fixes the files, no re-parse."""
    monkeypatch.chdir(tmp_path)
    space = SearchSpace.parse({"pipeline": [["initial_ae:checkpoint=ae.pt", "dwt"]],
                               "detector": "disagreement:checkpoint=d.pt"}, kind="stored").absolute()
    (c,) = space.grid()
    assert c.to_dict()["stages"] == [f"initial_ae:checkpoint={tmp_path / 'ae.pt'}", "dwt"]
    assert str(c.detector) == f"disagreement:checkpoint={tmp_path / 'd.pt'}" and len(spec_parses) == 3


def test_a_sweep_config_holds_its_space_parsed_once(spec_parses):
    """Issue 23: the config's validation parses the space; the sweep uses that parse (``cfg.search_space``)."""
    cfg = parse_tune_config(_cfg(space={"pipeline": [["dwt:level=2"], ["quantize"]]}))
    space = cfg.search_space
    assert space is cfg.search_space and [str(p[0]) for p in space.pipelines] == ["dwt:level=2", "quantize"]
    assert sorted(spec_parses) == ["dwt:level=2", "quantize"]


def test_ranges_make_the_space_continuous():
    space = SearchSpace.parse({"loss.at.eps": "loguniform(0.01, 0.3)", "loss.at.steps": [1, 2]}, kind="training")
    assert not space.discrete and space.choices()["loss.at.eps"].kind == "loguniform"
    cand = space.candidate({"loss.at.eps": 0.05, "loss.at.steps": 2})
    assert cand.loss.startswith("at:") and "eps=0.05" in cand.loss and "steps=2" in cand.loss


@pytest.mark.parametrize("space, match", [
    ({"pipeline": [["dwt"]], "stage.dwt.level": [1, 0]}, r"space\.stage\.dwt\.level: 0 is not allowed"),
    ({"pipeline": [["dwt"]], "stage.dwt.threshold": "uniform(-1, 0.5)"},
     r"space\.stage\.dwt\.threshold: -1\.0 is not allowed"),
    ({"pipeline": [["dwt"]], "stage.dwt.level": "uniform(1, 3)"}, r"level is an integer"),
    ({"pipeline": [["dwt"]], "stage.dwt.wavelett": ["haar"]}, r"dwt has no parameter 'wavelett'"),
    ({"pipeline": [["dwt"]], "stage.quantize.bits": [2]}, r"no pipeline has a 'quantize' stage"),
    ({"pipeline": [["dwt"]], "stage.dwt.threshold": "loguniform(0, 1)"}, r"0 < low < high"),
])
def test_the_space_rejects_what_the_parameter_model_forbids(space, match):
    with pytest.raises(ConfigError, match=match):
        SearchSpace.parse(space, kind="stored")


def test_a_bad_config_fails_with_one_line_naming_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^resources\.max_concurrent: "):
        parse_tune_config(_cfg(resources={"max_concurrent": 0}))
    with pytest.raises(ConfigError, match=r"^space\.stage\.dwt\.level: 0 is not allowed"):
        parse_tune_config(_cfg(space={"pipeline": [["dwt"]], "stage.dwt.level": [0]}))
    with pytest.raises(ConfigError, match=r"^objective\.max_clean_dropp: unknown key"):
        parse_tune_config(_cfg(objective={"max_clean_dropp": 0.1}))
    # the key path is named once, not "training_sweep.training_sweep."
    with pytest.raises(ConfigError, match=r"^training_sweep\.space\.loss: unknown training defense"):
        parse_tune_config(_cfg(training_sweep={"space": {"loss": ["bogus:x=1"]}}))
    path = write_yaml(tmp_path / "bad.yaml", _cfg(attacks=[{"name": "fgsm", "eps": [-1]}]))
    assert tune_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "attacks[0].eps" in err[0], err


def test_the_query_detector_is_validated_by_its_own_model():
    from adv.detectors import DetectorConfig

    cfg = parse_tune_config(_cfg(query_detector={"action": "flag", "per_user": None, "index": {"chain_limit": 3}}))
    assert isinstance(cfg.query_detector, DetectorConfig) and cfg.query_detector.per_user is None
    assert cfg.query_detector.index.chain_limit == 3 and cfg.query_detector.action == "flag"
    assert parse_tune_config(_cfg()).query_detector is None  # optional: the bundle then ships none
    for bad, match in [({"index": {"chain_limt": 3}},
                        r"^query_detector\.index\.chain_limt: unknown key; did you mean 'chain_limit'\?"),
                       ({"actionn": "flag"}, r"^query_detector\.actionn: unknown key; did you mean 'action'\?"),
                       ({"per_user": {"threshold": 5}}, r"^query_detector\.per_user: threshold for ssim must lie"),
                       ({"action": "fallback"}, r"^query_detector\.action: 'fallback' needs a fallback model")]:
        with pytest.raises(ConfigError, match=match) as err:
            parse_tune_config(_cfg(query_detector=bad))
        assert "\n" not in str(err.value)


def test_the_shipped_sweep_configs_ship_a_query_detector():
    from pathlib import Path

    from adv.detectors import DetectorConfig
    from jobs.tune_config import load_tune_config

    for name in ("tune-default.yaml", "tune-gpu.yaml"):
        qd = load_tune_config(Path(__file__).parents[1] / "jobs" / "configs" / name).query_detector
        # the values bench/query_detector.py measured (docs/benchmarks.md), written out so users see and edit them
        assert qd == DetectorConfig(), name


def test_asha_grace_never_exceeds_the_subset():
    # Ray's ASHAScheduler asserts grace_period <= max_t: a validation subset smaller than the first rung
    # must give one rung, not that assertion.
    from jobs.tune_search import asha
    from jobs.tune_config import AshaConfig

    sched, desc = asha(AshaConfig(), "examples", 40, 64)
    assert sched is not None and "grace 40" in desc and "max 40" in desc


def test_penalty_puts_every_breach_below_every_feasible_trial():
    ok = penalized(0.0, clean=0.90, clean_ref=0.92, max_clean_drop=0.05)
    breach_small = penalized(0.9, clean=0.85, clean_ref=0.92, max_clean_drop=0.05)
    breach_big = penalized(0.9, clean=0.50, clean_ref=0.92, max_clean_drop=0.05)
    assert ok == 0.0 and breach_big < breach_small < ok


def test_a_number_survives_the_flat_tune_metrics_unchanged():
    labels = {"clean": "clean L", "non_adaptive": "non-adaptive L", "adaptive": "adaptive L"}
    numbers = numbers_from_counts({"clean": 30, "non_adaptive": 0, "adaptive": 7}, 41, labels, "val[n=41]")
    flat = flat_metrics(numbers)
    assert all(isinstance(v, (int, float, str)) for v in flat.values())  # Tune metrics are flat scalars
    back = numbers_from_flat(flat)
    assert back == numbers and all(isinstance(v, Number) for v in back.values())
    assert numbers_from_flat(flat_metrics({"clean": numbers["clean"]})) == {"clean": numbers["clean"]}
    dumped = TrialRecord("t", Candidate(("dwt",)), back, 0.1, 0.9, 41).to_json()["numbers"]
    assert dumped["adaptive"] == {"value": 7 / 41, "ci95": list(numbers["adaptive"].ci95), "n": 41,
                                  "label": "adaptive L", "subset": "val[n=41]"}


def test_pareto_front_keeps_the_non_dominated_points():
    pts = [(0.9, 0.1), (0.8, 0.3), (0.85, 0.05), (0.7, 0.3), (0.6, 0.4)]
    assert pareto_front(pts) == [4, 1, 0]


def test_validation_and_test_subsets_are_disjoint():
    s = make_split("d", "test", 500, 100, 0, 200, 1)
    assert len(np.intersect1d(s.test, s.validation)) == 0 and len(s.validation) == 200
    from adv.data.base import subset_indices

    assert (s.test == subset_indices(500, 100, 0).numpy()).all()  # what `adv eval --n 100 --seed 0` loads
    with pytest.raises(ConfigError, match="exceed"):
        make_split("d", "test", 250, 100, 0, 200, 1)


def _record(tid, clean, nonadaptive, recheck=None):
    num = lambda v: Number(value=v, ci95=(v, v), n=10, label="x", subset="v")  # noqa: E731
    r = TrialRecord(tid, Candidate((f"dwt:level={tid}",)), {"clean": num(clean),
                    "non_adaptive": num(nonadaptive)}, nonadaptive, 0.9, 10)
    if recheck is not None:
        r.recheck, r.recheck_objective = {"clean": num(clean), "adaptive": num(recheck)}, recheck
    return r


def test_selection_warns_when_the_adaptive_recheck_disagrees():
    records = [_record("1", 0.9, 0.8, recheck=0.1), _record("2", 0.9, 0.6, recheck=0.3), _record("3", 0.9, 0.2)]
    best, warnings = select(records, "stored")
    assert best.trial_id == "2" and len(warnings) == 1 and "gradient masking" in warnings[0]
    best, warnings = select([_record("1", 0.9, 0.8, recheck=0.3), _record("2", 0.9, 0.6, recheck=0.1)], "stored")
    assert best.trial_id == "1" and warnings == []


def test_selection_ignores_trials_asha_stopped_early():
    from dataclasses import replace

    lucky = replace(_record("1", 0.9, 0.9), resource=16, status="stopped early by ASHA at 16 examples")
    full = _record("2", 0.9, 0.5)  # resource 10 in _record: make it the full budget
    full = replace(full, resource=64)
    best, _ = select([lucky, full], "adaptive")
    assert best.trial_id == "2"


def test_report_has_the_table_the_figure_and_the_selection(tmp_path):
    from adv.tuning.report import write_report

    records = [_record("1", 0.9, 0.8, recheck=0.1), _record("2", 0.9, 0.6, recheck=0.3)]
    meta = {"name": "t", "kind": "stored", "search": "grid", "scheduler": "none", "validation": "v", "test": "t",
            "objective": "o", "grid": "fgsm", "versions": {}, "max_clean_drop": 0.05}
    path = write_report(tmp_path, meta=meta, records=records, selected=records[1], warnings=["w"], final=None,
                        bundle="b")
    text = path.read_text()
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    assert "| 2* |" in text and "**warning:** w" in text and "trial `2`" in text
