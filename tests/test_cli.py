import json
import subprocess
import sys

import pytest

from adv.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_lists_datasets_and_models(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    info = json.loads(out)
    assert code == 0 and "fashion-mnist" in info["datasets"] and "lenet" in info["models"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--dataset", "nope", "--model", "lenet"], "invalid choice: 'nope'"),
        (["train", "--dataset", "digits", "--model", "lenet", "--epochs", "0"], "expected a positive integer"),
        (["train", "--dataset", "digits", "--model", "lenet", "--lr", "-1"], "--lr"),
        (["train", "--dataset", "digits"], "--model NAME"),
        (["train", "--dataset", "mnist", "--model", "lenet", "--data-dir", "/nonexistent"], "does not exist"),
        (["train", "--dataset", "digits", "--model", "lenet", "--weights", "/no/such.pt"], "weights file not found"),
        (["train", "--dataset", "digits", "--checkpoint", "/no/such.pt"], "checkpoint not found"),
        (["train", "--dataset", "digits", "--model", "lenet", "--device", "cuda:9"], "CUDA is not available"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_fail_with_one_line(capsys, argv, needle):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors exit from inside parse_args
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2
    assert lines and lines[-1].startswith("adv: error:") and needle in lines[-1]
    assert "Traceback" not in err


def test_train_writes_checkpoint_and_metrics(tmp_path, capsys):
    code, out, _ = run_cli(
        capsys, "train", "--dataset", "digits", "--model", "lenet5", "--epochs", "1", "--n", "300",
        "--out", str(tmp_path / "run"), "--quiet",
    )
    summary = json.loads(out)
    assert code == 0 and (tmp_path / "run" / "model.pt").is_file()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_acc"] == summary["test_acc"]


def test_console_script_help_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "adv", "train", "--dataset", "digits", "--model", "lenet",
                           "--batch-size", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "adv: error" in proc.stderr
    helped = subprocess.run([sys.executable, "-m", "adv", "train", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--dataset" in helped.stdout
