"""``adv eval``: one JSON object on stdout, one-line errors."""

from __future__ import annotations

import json

import pytest

from adv.cli import main
from tests.helpers import SHARED_DATA, SHARED_MODELS, needs_shared_data

CLEAN = str(SHARED_MODELS / "mnist_lenet5_clntrained.pt")
MNIST = ["--dataset", "mnist", "--data-dir", str(SHARED_DATA / "mnist"), "--n", "64", "--quiet"]

pytestmark = pytest.mark.usefixtures("single_threaded")


def run_json(capsys, argv) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    return json.loads(out[0])


@needs_shared_data
def test_eval_prints_one_json_object(capsys):
    res = run_json(capsys, ["eval", "--model", "lenet5", "--weights", CLEAN, *MNIST, "--attack", "fgsm",
                            "--attack", "pgd", "--eps", "0.3", "--steps", "10", "--step-size", "0.05", "--json"])
    assert res["n"] == 64 and res["clean_acc"] > 0.9 and res["robust_acc"] <= 0.05
    assert [a["attack"] for a in res["attacks"]] == ["fgsm", "pgd"]
    assert res["attacks"][0]["params"] == {} and res["attacks"][1]["params"] == {"steps": 10, "step_size": 0.05}
    assert res["flags"] == [] and res["model"] == "lenet5"


@needs_shared_data
def test_eval_from_an_adv_checkpoint(capsys, tmp_path):
    from adv.models import load_external, save_checkpoint

    ckpt = save_checkpoint(tmp_path / "model.pt", load_external("lenet5", CLEAN), dataset="mnist")
    res = run_json(capsys, ["eval", "--checkpoint", str(ckpt), *MNIST, "--attack", "fgsm", "--eps", "0.1",
                            "--json"])
    ref = run_json(capsys, ["eval", "--model", "lenet5", "--weights", CLEAN, *MNIST, "--attack", "fgsm",
                            "--eps", "0.1", "--json"])
    assert res["robust_acc"] == ref["robust_acc"] and res["clean_acc"] == ref["clean_acc"]
    assert res["model"] == "lenet5" and res["weights"] == str(ckpt)  # the checkpoint's architecture, not ""


@needs_shared_data
def test_eval_progress_counts_each_attack(capsys, monkeypatch):
    monkeypatch.delenv("ADV_NO_PROGRESS", raising=False)  # `make test` turns progress off
    argv = ["eval", "--model", "lenet5", "--weights", CLEAN, *[a for a in MNIST if a != "--quiet"],
            "--attack", "fgsm", "--attack", "pgd", "--steps", "3", "--eps", "0.1"]
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("robust accuracy")]
    # one batch of 64: a line per attack (stderr is not a terminal here, as in a log), not one bar at 0/1
    assert [ln.split(" on ")[0] for ln in lines[:2]] == ["robust accuracy: fgsm", "robust accuracy: pgd(steps=3)"]
    assert "2/2" in lines[-1]


@needs_shared_data
def test_eval_state_and_text_output(capsys, tmp_path):
    argv = ["eval", "--model", "lenet5", "--weights", CLEAN, *MNIST, "--attack", "fgsm", "--eps", "0.1",
            "--state", str(tmp_path / "s.json"), "--batch-size", "32"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "robust" in first and "fgsm" in first
    assert json.loads((tmp_path / "s.json").read_text())["done"]
    assert main(argv) == 0  # resumed from the finished state: same numbers (the time differs)
    again = capsys.readouterr().out
    assert again.splitlines()[0].rsplit(" in ", 1)[0] == first.splitlines()[0].rsplit(" in ", 1)[0]


@pytest.mark.parametrize("argv,message", [
    (["--attack", "nope", "--eps", "0.1"], "unknown attack 'nope'"),
    (["--attack", "cw", "--eps", "0.1"], "--attack cw supports --norm l2"),
    (["--attack", "fgsm", "--eps", "0.1", "--steps", "5"], "no chosen attack takes 'steps'"),
    (["--attack", "fgsm", "--eps", "0.1", "--param", "oops"], "--param must be KEY=VALUE"),
    (["--attack", "fgsm", "--eps", "0.1", "--device", "cuda:0"], "cuda"),
    (["--attack", "fgsm", "--eps", "-1"], "non-negative"),
])
def test_bad_arguments_give_one_line_errors(capsys, argv, message):
    try:
        code = main(["eval", "--model", "lenet5", "--dataset", "mnist", "--n", "8", *argv])
    except SystemExit as exc:  # argparse's own checks exit from the parser
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_model_and_checkpoint_are_exclusive(capsys, tmp_path):
    code = main(["eval", "--model", "lenet5", "--checkpoint", str(tmp_path / "m.pt"), "--dataset", "mnist",
                 "--attack", "fgsm", "--eps", "0.1", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "not both" in err
