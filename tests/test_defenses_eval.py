"""``adv eval --defense/--adaptive/--detector``: every number says which threat model produced it."""

from __future__ import annotations

import json

import pytest

from adv.cli import main
from tests.test_defenses_helpers import cli_classifier, single_thread


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A digits lenet5, one trained with DWT augmentation, and a disagreement detector file."""
    d = tmp_path_factory.mktemp("eval")
    with single_thread():
        for out, extra in (("plain", ()), ("dwt", ("--defense", "dwt:wavelet=db2"))):
            cli_classifier(d / out, epochs=1, n=400, extra=extra)
        assert main(["defend", "train", "disagreement:epochs=1,batch_size=32", "--dataset", "digits", "--n", "400",
                     "--checkpoint", str(d / "plain" / "model.pt"), "--out", str(d / "det.pt"), "--quiet"]) == 0
    return d


def _eval(capsys, run_dir, *extra, checkpoint="plain"):
    capsys.readouterr()
    with single_thread():
        code = main(["eval", "--checkpoint", str(run_dir / checkpoint / "model.pt"), "--dataset", "digits",
                     "--n", "48", "--attack", "fgsm", "--attack", "pgd", "--steps", "3", "--eps", "0.1",
                     "--json", "--quiet", *extra])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


def test_non_adaptive_and_adaptive_are_labelled(capsys, run_dir):
    code, plain, _ = _eval(capsys, run_dir, "--defense", "quantize:bits=2")
    assert code == 0 and plain["defense"]["threat_model"] == "non-adaptive"
    assert [a["label"] for a in plain["attacks"]] == ["fgsm@undefended", "pgd@undefended"]
    code, adaptive, _ = _eval(capsys, run_dir, "--defense", "quantize:bits=2", "--adaptive")
    assert code == 0 and adaptive["defense"]["threat_model"] == "adaptive"
    assert adaptive["attacks"][0]["label"] == "fgsm" and "BPDA" in adaptive["defense"]["notes"][0]
    assert plain["clean_acc"] == adaptive["clean_acc"]  # same defended forward either way


def test_detector_metrics_are_reported(capsys, run_dir):
    det = f"disagreement:checkpoint={run_dir / 'det.pt'}"
    code, res, _ = _eval(capsys, run_dir, "--detector", det, "--adaptive")
    assert code == 0 and res["defense"]["detector"].startswith("disagreement")
    assert res["attacks"][0]["label"] == "fgsm@detector-aware"
    for name in ("fgsm", "pgd"):
        m = res["detection"][name]
        assert {"tpr", "fpr", "auroc", "undetected_success"} <= set(m) and 0 <= m["undetected_success"] <= 1


def test_checkpoint_training_defense_is_re_created(capsys, run_dir):
    code, res, _ = _eval(capsys, run_dir, checkpoint="dwt")
    assert code == 0 and res["defense"]["defenses"] == ["dwt:wavelet=db2"]
    assert "re-created" in res["defense"]["notes"][0]


@pytest.mark.parametrize("extra,needle", [
    (["--adaptive"], "--adaptive attacks a defended model"),
    (["--defense", "dwt:level=0"], "level"),
    (["--defense", "nope"], "unknown defense 'nope'"),
    (["--detector", "disagreement"], "untrained"),
])
def test_bad_defense_options_fail_with_one_line(capsys, run_dir, extra, needle):
    code, _, err = _eval(capsys, run_dir, *extra)
    assert code == 2 and needle in err.strip().splitlines()[-1] and "Traceback" not in err
