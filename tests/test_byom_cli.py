"""Bring your own model from the CLI (issue 21): `adv info SECTION`, factory weights behind a Normalize, the
missing-normalization warning, and `adv bundle create --model-factory` with fractional eps."""

from __future__ import annotations

import json

import pytest

from adv.cli import main
from tests.helpers import SHARED_DATA, needs_shared_data


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- adv info SECTION ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("section,member", [("datasets", "mnist"), ("attacks", "pgd"), ("suites", "standard"),
                                            ("training-defenses", "trades"), ("model", "lenet")])
def test_info_shows_one_section(capsys, section, member):
    code, out, _ = run_cli(capsys, "info", section)
    assert code == 0 and f"  {member} " in out
    assert len([line for line in out.splitlines() if line.endswith(":")]) == 1  # only that section's heading
    code, out, _ = run_cli(capsys, "info", section, "--json")
    assert code == 0 and member in json.loads(out)


def test_info_unknown_section_is_one_line(capsys):
    code, _, err = run_cli(capsys, "info", "atacks")
    assert code == 2 and err.count("\n") == 1 and "datasets, models, attacks" in err


# --- --model-factory with --weights ---------------------------------------------------------------------------
NETS = '''
import torch
from torch import nn

from adv.models import Normalize, create_model


def bare():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def wrapped():  # the network behind its normalization: keys 1.1.weight, ...
    return nn.Sequential(Normalize((0.5,), (0.5,)), bare())


def other():
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 10))


def resnet20_without_normalization():
    return create_model("resnet20", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """``userpkg.nets``: factories importable from the working directory, and weights of the bare network."""
    import sys

    import torch
    from torch import nn

    pkg = tmp_path / "code" / "userpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(NETS)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    weights = tmp_path / "net.pt"
    torch.save(net.state_dict(), weights)
    monkeypatch.chdir(tmp_path / "code")
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    yield net.eval(), weights
    for name in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[name]


def test_bare_network_weights_load_into_a_factory_that_wraps_it_in_normalize(factories):
    import torch

    from adv.models.factory import build_from_factory

    net, weights = factories
    model = build_from_factory("userpkg.nets:wrapped", weights)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - 0.5) / 0.5))
    # the reverse: weights saved from the wrapper, a factory returning the bare network
    torch.save(model.state_dict(), weights.with_name("wrapped.pt"))
    with torch.no_grad():
        assert torch.allclose(build_from_factory("userpkg.nets:bare", weights.with_name("wrapped.pt"))(x), net(x))


def test_weights_of_another_architecture_fail_with_one_short_line(factories, capsys):
    _, weights = factories
    code, _, err = run_cli(capsys, "eval", "--model-factory", "userpkg.nets:other", "--weights", weights,
                           "--dataset", "digits", "--n", "8", "--attack", "fgsm", "--eps", "0.1", "--quiet")
    assert code == 2 and err.count("\n") == 1 and len(err) < 400
    assert "2 of its 4 keys missing from the file (first '3.bias')" in err and "Normalize" in err


def test_align_keys_never_renames_into_a_partial_match():
    from adv.models.factory import align_keys

    assert align_keys({"a.w": 1, "b.w": 2}, ["1.a.w", "1.b.w"]) == {"1.a.w": 1, "1.b.w": 2}
    assert align_keys({"1.a.w": 1, "1.b.w": 2}, ["a.w", "b.w"]) == {"a.w": 1, "b.w": 2}
    assert align_keys({"a.w": 1, "b.w": 2}, ["1.a.w", "2.b.w"]) is None  # no single prefix
    assert align_keys({"a.w": 1, "c.w": 2}, ["1.a.w", "1.b.w"]) is None


@needs_shared_data
def test_a_factory_without_normalization_is_warned_about(factories, capsys):
    """akamaster's ResNet-20 (94/100 with its ImageNet normalization) runs at 42/100 without one."""
    weights = SHARED_DATA / "models" / "cifar10_resnet20_akamaster.th"
    argv = ["eval", "--weights", weights, "--dataset", "cifar10", "--data-dir", SHARED_DATA / "cifar10", "--n", "100",
            "--attack", "fgsm", "--eps", "1/255", "--quiet", "--json", "--checks", "none", "--model-factory"]
    code, out, err = run_cli(capsys, *argv, "userpkg.nets:resnet20_without_normalization")
    assert code == 0, err
    assert json.loads(out)["clean_acc"] == pytest.approx(0.42)
    warning = [line for line in err.splitlines() if line.startswith("adv: warning: normalization is probably missing")]
    assert len(warning) == 1 and "clean accuracy 42%" in warning[0] and "adv.models.Normalize(" in warning[0]



@needs_shared_data
def test_a_model_that_normalizes_is_not_warned_about():
    from adv.data import load_dataset
    from adv.evaluate.inputs import normalization_hint
    from adv.models import load_external

    model = load_external("resnet20", SHARED_DATA / "models" / "cifar10_resnet20_akamaster.th")  # normalizes
    x, y = load_dataset("cifar10", root=SHARED_DATA / "cifar10").tensors()
    assert normalization_hint(model, x, y) is None


# --- adv bundle create with a user's own model --------------------------------------------------------------
def test_bundle_create_from_a_factory_with_fractional_eps_then_eval_and_build(factories, tmp_path, capsys):
    import torch

    from adv.bundle import load_bundle
    from adv.data import load_dataset

    net, weights = factories
    out = tmp_path / "bundle"
    code, stdout, err = run_cli(capsys, "bundle", "create", "--model-factory", "userpkg.nets:wrapped", "--weights",
                                weights, "--defense", "quantize:bits=4", "--dataset", "digits", "--n", "16",
                                "--attack", "fgsm", "--eps", "8/255", "--out", out)
    assert code == 0, err
    b = load_bundle(out)
    c = b.manifest["classifier"]
    assert c["factory"] == "userpkg.nets:wrapped" and c["num_classes"] == 10 and c["input_size"] == [1, 28, 28]
    assert b.evaluation["eps"] == pytest.approx(8 / 255) and b.numbers["clean"]["n"] == 16
    x, y = load_dataset("digits", n=16).tensors()
    with torch.no_grad():
        squeezed = torch.round(x * 15) / 15
        expected = (net((squeezed - 0.5) / 0.5).argmax(1) == y).float().mean().item()
        assert b.numbers["clean"]["value"] == pytest.approx(expected)
        assert torch.equal(b.build()(x).argmax(1), net((squeezed - 0.5) / 0.5).argmax(1))
    code, stdout, err = run_cli(capsys, "eval", "--bundle", out, "--attack", "fgsm", "--json", "--quiet")
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["n"] == 16 and res["clean_acc"] == pytest.approx(expected)


def test_bundle_create_from_registry_weights_ships_an_adv_checkpoint(tmp_path, capsys):
    from adv.bundle import load_bundle
    from adv.models import create_model, load_checkpoint

    import torch

    torch.manual_seed(0)
    foreign = tmp_path / "lenet5.pt"
    torch.save(create_model("lenet5").state_dict(), foreign)
    code, _, err = run_cli(capsys, "bundle", "create", "--model", "lenet5", "--weights", foreign, "--dataset",
                           "digits", "--n", "8", "--attack", "fgsm", "--eps", "0.1", "--out", tmp_path / "b")
    assert code == 0, err
    assert load_checkpoint(load_bundle(tmp_path / "b").checkpoint)[1]["arch"] == "lenet5"


@pytest.mark.parametrize("argv,needle", [
    ([], "give --checkpoint PATH, --model NAME --weights PATH or --model-factory"),
    (["--model-factory", "userpkg.nets:nope"], "has no 'nope'"),
    (["--model", "lenet5"], "--model needs --weights PATH"),
    (["--checkpoint", "x.pt", "--model-factory", "userpkg.nets:bare"], "not both"),
])
def test_bundle_create_model_errors_are_one_line(factories, tmp_path, capsys, argv, needle):
    code, _, err = run_cli(capsys, "bundle", "create", *argv, "--dataset", "digits", "--n", "8", "--eps", "8/255",
                           "--out", tmp_path / "b")
    assert code == 2 and needle in err and err.count("\n") == 1
