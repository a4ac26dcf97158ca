"""jobs.tune with the user's own model (``model: {factory, weights}``, issue 21): config errors are one line, and
a stored sweep over a factory model exports a bundle that rebuilds the factory and scores like the user's net."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adv.errors import ConfigError
from jobs.tune_config import parse_tune_config

FACTORY = "tests.byom_nets:make_net"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """``tests.byom_nets:make_net`` (a linear classifier) fitted to the digits training split, and its file."""
    from adv.data import load_dataset
    from tests.byom_nets import make_net

    torch.manual_seed(0)
    net = make_net()
    x, y = load_dataset("digits", split="train").tensors()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    path = tmp_path_factory.mktemp("byom") / "net.pt"
    torch.save(net.state_dict(), path)
    return net.eval(), path


def _cfg(out: Path, weights: Path | None = None, **over) -> dict:
    cfg = {"name": "byom", "kind": "stored", "seed": 0,
           "model": {"factory": FACTORY, "weights": str(weights) if weights else None},
           "data": {"name": "digits", "test": {"n": 32, "seed": 0}, "validation": {"n": 32, "seed": 1}},
           "attacks": [{"name": "fgsm", "eps": [0.1]}, {"name": "pgd", "eps": [0.1], "steps": [2]}],
           "space": {"pipeline": [["dwt"], ["quantize:bits=3"]]},
           "objective": {"max_clean_drop": 0.2, "recheck": 1},
           "resources": {"batch_size": 16, "max_concurrent": 2, "generate_actors": 1},
           "storage_path": str(out)}
    cfg.update(over)
    return cfg


# --- one-line config errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("over,needle", [
    ({"checkpoint": "model.pt"}, "give checkpoint: PATH (an adv checkpoint) or model: {factory"),
    ({"model": None}, "checkpoint: required (an adv checkpoint), or model: {factory"),
    ({"model": {"factory": "tests.byom_nets"}}, "model.factory: a model factory is 'package.module:function'"),
    ({"model": {"factory": FACTORY, "arch": "lenet5"}}, "model.arch"),
    ({"kind": "training", "space": {"loss": ["at"]}}, "kind: training: training trials need an adv checkpoint"),
    ({"training_sweep": {"space": {"loss": ["at"]}}}, "training_sweep: training trials need an adv checkpoint"),
])
def test_config_errors_are_one_line(tmp_path, over, needle):
    with pytest.raises(ConfigError) as err:
        parse_tune_config(_cfg(tmp_path, **over))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("model,needle", [
    ({"factory": "nopkg_xyz.nets:make_net"}, "model.factory: cannot import 'nopkg_xyz.nets'"),
    ({"factory": "tests.byom_nets:nope"}, "model.factory: module 'tests.byom_nets' has no 'nope'"),
    ({"factory": FACTORY, "weights": "missing.pt"}, "model.weights: file not found: missing.pt"),
    ({"factory": "tests.byom_nets:make_net", "weights": "OTHER"}, "does not match the module"),
])
def test_the_entrypoint_refuses_a_bad_model_in_one_line_before_ray(tmp_path, capsys, model, needle):
    import yaml

    from jobs.tune import main

    if model.get("weights") == "OTHER":  # a state_dict of another architecture
        model = {**model, "weights": str(tmp_path / "other.pt")}
        torch.save(torch.nn.Linear(3, 2).state_dict(), model["weights"])
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump(_cfg(tmp_path / "runs", model=model)))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()  # refused before the run folder (and Ray) starts


def test_checkpoint_configs_keep_their_config_json_and_loader(tmp_path):
    """``checkpoint:`` sweeps are unchanged: no ``model`` key in what they record, the same loader keywords."""
    from adv.tuning.checks import classifier_kwargs

    cfg = parse_tune_config(_cfg(tmp_path, model=None, checkpoint="ckpt/model.pt"))
    assert "model" not in cfg.model_dump(mode="json", exclude={"model"})
    assert classifier_kwargs(cfg) == {"checkpoint": str(Path("ckpt/model.pt").resolve())}
    byom = parse_tune_config(_cfg(tmp_path, weights=Path("w.pt")))
    assert classifier_kwargs(byom) == {"factory": FACTORY, "weights": str(Path("w.pt").resolve())}


def test_the_ray_data_stored_set_job_takes_the_factory_and_sizes_from_the_parquet_set(weights, tmp_path):
    """``stored.generate: ray_data``: the jobs.evaluate config names the factory, and a module without an
    ``input_size`` attribute takes the exported validation set's image shape (it was refused before)."""
    from adv.data import load_dataset
    from adv.evaluate.preflight import preflight
    from adv.tuning.checks import classifier_kwargs
    from jobs.evaluate import build_loader, build_plan
    from jobs.sources import export_dataset, make_source

    _, path = weights
    export_dataset(load_dataset("digits", n=8), str(tmp_path / "validation"))
    cfg = parse_tune_config(_cfg(tmp_path, path))
    ecfg = cfg.stored_eval_config(str(tmp_path / "validation"), 8, classifier_kwargs(cfg))
    assert ecfg.model.factory == FACTORY and ecfg.model.weights == str(path) and ecfg.model.checkpoint is None
    source = make_source(ecfg.dataset)
    assert source.input_size == (1, 28, 28)
    size, _ = preflight(build_loader(ecfg), build_plan(ecfg), None, source.input_size)
    assert size == (1, 28, 28)
    with pytest.raises(ConfigError, match="no input_size attribute"):
        preflight(build_loader(ecfg), build_plan(ecfg))


# --- a stored sweep over the user's model, on the shared cluster ------------------------------------------------
@pytest.mark.ray
def test_stored_sweep_over_a_factory_model_exports_a_bundle_that_rebuilds_it(ray_cluster, weights, tmp_path,
                                                                             capsys):
    """The stored set (generated in the driver: one node, few images), the trials, the adaptive re-check and
    the final numbers load the factory, and the bundle ships its state_dict with the spec."""
    from adv.bundle import load_bundle
    from adv.cli import main as adv_main
    from adv.data import load_dataset
    from adv.defenses.compose import build_defended
    from jobs.tune import run

    net, path = weights
    result = run(parse_tune_config(_cfg(tmp_path, path)))
    run_dir = Path(result.run_dir)
    assert (run_dir / "stored-local/rows.npz").is_file()
    assert len(result.records) == 2 and all(r.status == "finished" for r in result.records), result.records
    assert [r for r in result.records if r.recheck] == [result.selected]
    assert "model" in json.loads((run_dir / "config.json").read_text())

    b = load_bundle(result.bundle)
    c = b.manifest["classifier"]
    assert (c["factory"], c["num_classes"], c["input_size"], c["dataset"]) == (FACTORY, 10, [1, 28, 28], "digits")
    assert b.manifest["provenance"]["model"] == {"factory": FACTORY, "weights": str(path)}
    shipped = torch.load(b.checkpoint, weights_only=True)
    assert all(torch.equal(shipped[k], v) for k, v in net.state_dict().items())

    # the bundle's numbers are the user's net behind the selected stages on the test subset (the seeded subset
    # ``adv eval --n 32 --seed 0`` loads)
    x, y = load_dataset("digits", split="test", n=32, seed=0).tensors()
    ours = build_defended(net, b.stages).eval()
    with torch.no_grad():
        expected = ours(x).argmax(1)
        assert torch.equal(b.build()(x).argmax(1), expected)  # what jobs.serve builds
    assert b.numbers["clean"]["value"] == pytest.approx((expected == y).float().mean().item())
    assert b.numbers["clean"]["value"] > 0.5 and b.numbers["adaptive"]["n"] == 32

    capsys.readouterr()
    assert adv_main(["eval", "--bundle", result.bundle, "--attack", "fgsm", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 32 and out["clean_acc"] == pytest.approx(b.numbers["clean"]["value"])
