"""The evaluate job's config: bad configs give one clear line naming the key, exit 2, no traceback."""

from __future__ import annotations

import copy

import pytest

from jobs.config import EvalConfig, load_config, parse_config
from adv.evaluate.plan import rows_per_example
from jobs.evaluate import build_plan, main
from tests.pipeline_helpers import REPO, random_checkpoint, tiny_config, write_yaml


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cfg")
    return tiny_config(random_checkpoint(tmp / "model.pt"), tmp / "runs")


BAD = [
    ("attacks[1].eps", lambda c: c["attacks"][1].update(eps=[-0.1])),
    ("attacks[0].eps", lambda c: c["attacks"][0].update(eps=["inf"])),
    ("attacks[1].steps", lambda c: c["attacks"][1].update(steps=[0])),
    ("attacks[0].steps", lambda c: c["attacks"][0].update(steps=[5])),
    ("attacks[2].name", lambda c: c["attacks"][2].update(name="nope")),
    ("attacks[2].norm", lambda c: c["attacks"][2].update(norm="l2")),
    ("attacks[0].params", lambda c: c["attacks"][0].update(params={"bogus": 1})),
    ("attacks[0].colour", lambda c: c["attacks"][0].update(colour="red")),
    ("defenses[0].stages[0]", lambda c: c.update(defenses=["dwt:wavelet=nope"])),
    ("defenses[0].stages[0]", lambda c: c.update(defenses=["no_such_defense"])),
    ("resources.actors", lambda c: c["resources"].update(actors=0)),
    ("resources.gpus_per_actor", lambda c: c["resources"].update(gpus_per_actor=-1)),
    ("model", lambda c: c.update(model={"arch": "lenet"})),
    ("model.arch", lambda c: c.update(model={"arch": "nope", "weights": "w.pt"})),
    ("dataset.name", lambda c: c["dataset"].update(name="nope")),
    ("dataset.root", lambda c: c.update(dataset={"name": "imagefolder"})),
    ("features[1]", lambda c: c.update(features=["logits", "saliency"])),
    ("shards", lambda c: c.update(shards=100)),
    ("attacks", lambda c: c.update(attacks=[])),
    ("speed", lambda c: c.update(speed="fast")),
]


@pytest.mark.parametrize("key,mutate", BAD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BAD)])
def test_bad_config_is_one_line_naming_the_key(base, key, mutate, tmp_path, capsys):
    cfg = copy.deepcopy(base)
    mutate(cfg)
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith("evaluate: error: ") and f"{path}: {key}:" in err, err


@pytest.mark.parametrize("key,needle,mutate", [
    ("attacks[0]", "'kappa' was renamed to 'confidence'",
     lambda c: c["attacks"][0].update(name="cw", norm="l2", params={"kappa": 1})),
    ("defenses[0].stages[0]", "'sigma' was renamed to 'noise_std'", lambda c: c.update(defenses=["noise:sigma=0.1"])),
])
def test_renamed_keys_fail_naming_the_new_key(base, key, needle, mutate, tmp_path, capsys):
    cfg = copy.deepcopy(base)
    mutate(cfg)
    path = write_yaml(tmp_path / "old.yaml", cfg)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}: {key}:" in err and needle in err and len(err.splitlines()) == 1, err


def test_unreadable_files_are_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    assert main(["--config", str(missing)]) == 2
    assert "config file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("attacks: [fgsm\nmodel: {")
    assert main(["--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "invalid YAML" in err and "line" in err and len(err.strip().splitlines()) == 1
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    assert main(["--config", str(scalar)]) == 2
    assert "expected a mapping" in capsys.readouterr().err


def test_a_missing_checkpoint_is_a_clear_error(base, tmp_path, capsys):
    cfg = copy.deepcopy(base)
    cfg["model"] = {"checkpoint": str(tmp_path / "nope.pt")}
    assert main(["--config", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "checkpoint not found" in err and "Traceback" not in err


def test_reuse_rules(base):
    with pytest.raises(Exception, match="omit it with reuse_from"):
        parse_config({**base, "reuse_from": "runs/x", "adaptive": False})
    with pytest.raises(Exception, match="adaptive: must be false"):
        parse_config({"reuse_from": "runs/x", "defenses": ["dwt"]})


def test_eps_fractions_and_the_grid(base):
    cfg = copy.deepcopy(base)
    cfg["attacks"][1]["eps"] = ["8/255", 0.1]
    cfg["attacks"][1]["steps"] = [2, 5]
    plan = build_plan(parse_config(cfg))
    pgd = [g for g in plan.grid if g.attack == "pgd"]
    assert [round(g.eps, 6) for g in pgd] == [round(8 / 255, 6)] * 2 + [0.1] * 2
    assert [g.steps for g in pgd] == [2, 5, 2, 5]
    square = next(g for g in plan.grid if g.attack == "square")
    assert square.kwargs()["queries"] == 8
    assert rows_per_example(plan, 1) == 2 + len(plan.grid) * 2 + len(plan.grid)


def test_run_key_ignores_resources_but_not_the_attacks(base):
    a = parse_config(base)
    b = parse_config({**base, "resources": {**base["resources"], "actors": 7}})
    c = parse_config({**base, "seed": 3})
    assert a.run_key() == b.run_key() != c.run_key()


@pytest.mark.parametrize("name", ["default.yaml", "gpu-cluster.yaml"])
def test_shipped_configs_validate(name):
    path = REPO / "jobs" / "configs" / name
    data = __import__("yaml").safe_load(path.read_text())
    cfg = EvalConfig.model_validate(data)  # structure and registry names, without the checkpoint files
    assert cfg.attacks and cfg.defenses and cfg.adaptive
    assert load_config  # the loader used by the job is the same validation


def test_main_trains_missing_stages_once(base, tmp_path, capsys):
    from jobs.main import main as main_job, train_stages

    cfg = parse_config({**base, "defenses": [f"initial_ae:checkpoint={tmp_path / 'ae.pt'},epochs=1"]})
    written = train_stages(cfg)
    assert written == [tmp_path / "ae.pt"] and written[0].is_file()
    assert train_stages(cfg) == []  # present now: not retrained
    loader = __import__("jobs.evaluate", fromlist=["build_loader"]).build_loader(cfg)
    models = loader()
    assert list(models.defenses) == [cfg.defenses[0].label]
    no_ckpt = write_yaml(tmp_path / "arch.yaml", {**base, "model": {"arch": "convsmall", "weights": "w.pt"}})
    assert main_job(["--config", str(no_ckpt)]) == 2
    assert "needs model.checkpoint" in capsys.readouterr().err


def test_arrivals_split_start_up_from_steady_throughput(monkeypatch):
    import adv.evaluate.tally as evaluate

    clock = iter([10.0, 14.0, 16.0, 18.0])  # stage start, then three result blocks
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: next(clock))
    arrivals = evaluate.Arrivals(evaluate.time.perf_counter())
    for rows in (30, 60, 60):  # 3 rows per example: 10, 20, 20 examples
        arrivals.add(rows)
    record = arrivals.record(per_example=3)
    assert record["first_result_seconds"] == 4.0
    assert record["steady_images_per_second"] == 40 / 4.0  # the first block's 10 examples belong to start-up
    assert evaluate.Arrivals(0.0).record(3) == {"first_result_seconds": None, "steady_images_per_second": None}
