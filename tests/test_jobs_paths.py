"""Relative paths of `jobs.evaluate` run as a submitted Ray job (Ray-free: the job's environment is simulated).

A `ray job submit --working-dir .` entrypoint runs in Ray's temporary copy of the
working dir (no `runs/`, deleted afterwards) with `RAY_JOB_CONFIG_JSON_ENV_VAR` set;
tests/test_jobs_token_cluster.py runs the real thing.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from jobs import common, evaluate
from tests.pipeline_helpers import REPO, random_checkpoint, tiny_config, write_yaml

JOB = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}, "metadata": {"job_submission_id": "raysubmit_x"}}


@pytest.fixture
def job_copy(tmp_path, monkeypatch):
    """The job's working dir: the repository's configs, nothing under runs/."""
    copy = tmp_path / "ray_pkg"
    (copy / "jobs" / "configs").mkdir(parents=True)
    shutil.copy(REPO / "jobs" / "configs" / "default.yaml", copy / "jobs" / "configs")
    monkeypatch.chdir(copy)
    monkeypatch.setenv(common.JOB_CONFIG_ENV, json.dumps(JOB))
    return copy


@pytest.fixture
def submit_dir(tmp_path):
    """The folder the user submits from: the checkpoint under runs/ and a config naming it relatively."""
    here = tmp_path / "project"
    (here / "runs" / "m").mkdir(parents=True)
    random_checkpoint(here / "runs" / "m" / "model.pt")
    write_yaml(here / "job.yaml", tiny_config("runs/m/model.pt", "runs/eval", defenses=[], features=[],
                                              attacks=[{"name": "fgsm", "eps": [0.1]}], adaptive=False))
    return here


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_the_issue_command_in_a_job_is_one_line_naming_the_fix(job_copy, capsys):
    assert evaluate.main(["--config", "jobs/configs/default.yaml"]) == 2
    line = _one_error(capsys)
    assert line.startswith("evaluate: error: model.checkpoint: 'runs/main/fashion-mnist-lenet/model.pt'")
    assert str(job_copy) in line and '--base-dir "$PWD"' in line and "s3://" in line


def test_a_relative_output_in_a_job_is_refused_even_when_the_inputs_were_uploaded(job_copy, capsys):
    random_checkpoint(job_copy / "model.pt")  # a small checkpoint committed with the code: uploaded
    write_yaml(job_copy / "job.yaml", tiny_config("model.pt", "runs/eval", defenses=[]))
    assert evaluate.main(["--config", "job.yaml"]) == 2
    line = _one_error(capsys)
    assert line.startswith("evaluate: error: output.path: 'runs/eval' is relative") and "deleted after the job" in line
    assert evaluate.main(["--config", "job.yaml", "--out", "here"]) == 2
    assert _one_error(capsys).startswith("evaluate: error: --out: 'here' is relative")


def test_base_dir_resolves_config_inputs_and_outputs_against_the_submitting_folder(job_copy, submit_dir, monkeypatch,
                                                                                     capsys):
    seen = {}

    def fake_run(cfg, out=None):  # what the run would open, seen from the driver
        seen.update(cwd=os.getcwd(), checkpoint=evaluate.build_loader(cfg).checkpoint,
                    store=evaluate.open_run(cfg, out).uri)
        return evaluate.RunResult(run_dir=seen["store"], key=cfg.run_key(), report="report.md")

    monkeypatch.setattr(evaluate, "run", fake_run)
    assert evaluate.main(["--config", "job.yaml", "--base-dir", str(submit_dir)]) == 0, capsys.readouterr().err
    assert seen["cwd"] == str(submit_dir) and os.getcwd() == str(job_copy)  # back where it started
    assert seen["checkpoint"] == str(submit_dir / "runs" / "m" / "model.pt")
    assert seen["store"].startswith(str(submit_dir / "runs" / "eval") + "/")  # absolute: the actors write there
    assert (submit_dir / "runs" / "eval").is_dir() and not (job_copy / "runs").exists()


def test_a_base_dir_the_jobs_node_cannot_see_means_a_remote_cluster(job_copy, capsys):
    assert evaluate.main(["--config", "jobs/configs/default.yaml", "--base-dir", "/home/someone/adv"]) == 2
    line = _one_error(capsys)
    assert line.startswith("evaluate: error: --base-dir /home/someone/adv: no such folder on the Ray node")
    assert "remote cluster" in line and "s3://" in line


def test_outside_a_submitted_job_relative_paths_stay_the_users(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(common.JOB_CONFIG_ENV, raising=False)
    common.check_job_paths({"model.checkpoint": "missing.pt"}, {"output.path": "runs/eval"})  # no refusal
    for raw in ("not json", json.dumps({"runtime_env": {}}), json.dumps([1])):  # not a submitted job
        monkeypatch.setenv(common.JOB_CONFIG_ENV, raw)
        assert common.submitted_job() is None
        common.check_job_paths({"model.checkpoint": "missing.pt"}, {"output.path": "runs/eval"})
    monkeypatch.setenv(common.JOB_CONFIG_ENV, json.dumps({**JOB, "runtime_env": {}}))  # no --working-dir
    with pytest.raises(common.ConfigError, match="the cluster's folder .* not the submitting one"):
        common.check_job_paths({}, {"output.path": "runs/eval"})
    common.check_job_paths({"model.checkpoint": "/abs/m.pt", "dataset.root": "s3://b/x"}, {"--out": "gs://b/run"})


# --- jobs.tune: the same rules (its docstring's `ray job submit` example) ---------------------------------------
def _sweep(checkpoint: str, storage_path: str) -> dict:
    return {"name": "t", "kind": "stored", "checkpoint": checkpoint, "storage_path": storage_path,
            "data": {"name": "digits"}, "attacks": [{"name": "fgsm", "eps": [0.1]}], "space": {"pipeline": [["dwt"]]}}


def test_the_tune_submit_example_is_one_line_naming_the_fix(job_copy, capsys):
    from jobs import tune

    shutil.copy(REPO / "jobs" / "configs" / "tune-default.yaml", job_copy / "jobs" / "configs")
    assert tune.main(["--config", "jobs/configs/tune-default.yaml"]) == 2
    line = _one_error(capsys)
    assert line.startswith("tune: error: checkpoint: 'runs/main/fashion-mnist-lenet/model.pt' is relative")
    assert '--base-dir "$PWD"' in line
    write_yaml(job_copy / "up.yaml", _sweep("/abs/model.pt", "runs/tune"))
    assert tune.main(["--config", "up.yaml"]) == 2  # an uploaded config whose output would land in the copy
    assert _one_error(capsys).startswith("tune: error: storage_path: 'runs/tune' is relative")


def test_tune_base_dir_resolves_the_sweep_paths_against_the_submitting_folder(job_copy, submit_dir, monkeypatch,
                                                                               capsys):
    from jobs import tune

    seen = {}

    def fake_run(cfg):
        seen.update(cwd=os.getcwd(), checkpoint=os.path.abspath(cfg.checkpoint))
        return type("R", (), {"report": "report.md"})()

    write_yaml(submit_dir / "sweep.yaml", _sweep("runs/m/model.pt", "runs/tune"))
    monkeypatch.setattr(tune, "run", fake_run)
    assert tune.main(["--config", "sweep.yaml"]) == 2  # the submitting folder's config is not in the copy
    assert _one_error(capsys).startswith("tune: error: --config: 'sweep.yaml' is relative")
    assert tune.main(["--config", "sweep.yaml", "--base-dir", str(submit_dir)]) == 0, capsys.readouterr().err
    assert seen == {"cwd": str(submit_dir), "checkpoint": str(submit_dir / "runs" / "m" / "model.pt")}
    assert os.getcwd() == str(job_copy)
