"""`jobs.serve`'s driver checks everything a replica would fail on before anything is deployed (no Ray needed).

Without them a missing key crash-looped every replica with a 40-line traceback per
retry; now each is one line and exit status 2, and Ray is never started.
"""

from __future__ import annotations

import os
import shutil

import pytest

from adv.serving.keys import KeyEntry, KeyRing, hash_key
from jobs import serve as serve_job
from tests.serve_helpers import make_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("serve-driver") / "bundle")


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the driver got as far as connecting to Ray."""
    def connect(*a, **k):
        raise AssertionError("jobs.serve connected to Ray before refusing its config")

    monkeypatch.setattr(serve_job, "init_ray", connect)
    monkeypatch.delenv("ADV_SERVE_KEYS", raising=False)


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv, env, expected", [
    ([], None, "serve: error: no API keys: give a key file (none given) or set $ADV_SERVE_KEYS"),
    (["--address", "127.0.0.1:1"], None, "serve: error: no API keys"),
    ([], "alice=short", "serve: error: $ADV_SERVE_KEYS: bad entry for user 'alice'"),
    ([], "alice", "serve: error: $ADV_SERVE_KEYS: entries are user=key"),
    (["--keys", "missing-keys.yaml"], None, "serve: error: cannot read the key file missing-keys.yaml"),
], ids=["no-keys", "no-keys-address", "short-key", "no-equals", "missing-file"])
def test_bad_keys_are_one_line_and_exit_2_before_any_deployment(bundle, no_ray, monkeypatch, capsys, argv, env,
                                                                expected):
    if env is not None:
        monkeypatch.setenv("ADV_SERVE_KEYS", env)
    assert serve_job.main(["--bundle", str(bundle), *argv]) == 2
    assert _one_error(capsys).startswith(expected)


def test_a_bad_bundle_or_config_is_one_line_and_exit_2(bundle, no_ray, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ADV_SERVE_KEYS", "alice=alice-secret-key")
    assert serve_job.main(["--bundle", str(tmp_path / "nothing")]) == 2
    assert "not a bundle" in _one_error(capsys)
    assert serve_job.main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert _one_error(capsys) == f"serve: error: config file not found: {tmp_path / 'none.yaml'}"
    (tmp_path / "bad.yaml").write_text("args: [1, 2]\n")
    assert serve_job.main(["--config", str(tmp_path / "bad.yaml"), "--bundle", str(bundle)]) == 2
    assert "expected a mapping" in _one_error(capsys)
    (tmp_path / "det.yaml").write_text("detector: {no_such_field: 1}\n")
    assert serve_job.main(["--config", str(tmp_path / "det.yaml"), "--bundle", str(bundle)]) == 2
    assert "query detector config" in _one_error(capsys)


def test_env_keys_reach_the_replicas_hashed(bundle, monkeypatch, tmp_path):
    monkeypatch.setenv("ADV_SERVE_KEYS", "alice=alice-secret-key,admin:ops=ops-secret-key")
    monkeypatch.chdir(tmp_path)
    cfg = serve_job.check_driver(serve_job.parse_config({"bundle": str(bundle), "state": "state"}))
    assert cfg.state == str(tmp_path / "state")  # absolute: replicas and the owner run elsewhere
    entries = serve_job.driver_keys(cfg)
    assert entries == [{"user": "alice", "sha256": hash_key("alice-secret-key"), "role": "user", "revoked": False},
                       {"user": "ops", "sha256": hash_key("ops-secret-key"), "role": "admin", "revoked": False}]
    assert "secret" not in repr(entries)
    monkeypatch.delenv("ADV_SERVE_KEYS")  # a replica on a cluster started elsewhere: no such variable
    replica_keys = KeyRing(None, None, entries=tuple(KeyEntry(**e) for e in entries))
    assert replica_keys.lookup("ops-secret-key").role == "admin" and replica_keys.lookup("nope") is None


def test_shutdown_needs_the_cluster(no_ray, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert serve_job.main(["--shutdown"]) == 2
    assert _one_error(capsys).startswith("serve: error: --shutdown needs the cluster: --address")


def test_a_deployment_failing_in_its_replicas_is_one_line(monkeypatch):
    """What a replica raised (kept by Serve as a traceback), as the driver's one-line error."""
    from types import SimpleNamespace

    from adv.errors import ConfigError

    failed = SimpleNamespace(message="Deploying app failed", deployments={
        "Other": SimpleNamespace(message=""),
        "DefendedModel": SimpleNamespace(message="Traceback (most recent call last):\n  File ...\n"
                                           "ray.exceptions.RayActorError: ...\nRuntimeError: CUDA unavailable\n")})
    monkeypatch.setattr(serve_job.serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve_job.serve, "run", lambda *a, **kw: (_ for _ in ()).throw(
        RuntimeError("Deploying application adv failed: Failed to update the deployments ['DefendedModel'].")))
    monkeypatch.setattr(serve_job.serve, "status", lambda: SimpleNamespace(applications={"adv": failed}))
    monkeypatch.setattr(serve_job, "undeploy", lambda cfg, shutdown: None)
    monkeypatch.setattr(serve_job, "build", lambda *a: None)
    with pytest.raises(ConfigError, match=r"^deploying 'adv' failed: RuntimeError: CUDA unavailable$"):
        serve_job.deploy(serve_job.parse_config({"bundle": "b"}), check_http=False)


def test_in_a_submitted_job_relative_serve_paths_are_refused_or_resolved(bundle, no_ray, monkeypatch, tmp_path,
                                                                          capsys):
    """`ray job submit -- python -m jobs.serve`: the job's folder is Ray's temporary copy (no runs/, deleted)."""
    import json

    from jobs import common

    copy = tmp_path / "ray_pkg"
    copy.mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv(common.JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"},
                                                          "metadata": {"job_submission_id": "raysubmit_1"}}))
    monkeypatch.setenv("ADV_SERVE_KEYS", "alice=alice-secret-key")
    assert serve_job.main(["--bundle", "runs/best"]) == 2
    assert _one_error(capsys).startswith("serve: error: bundle: 'runs/best' is relative and not in this Ray job's")
    assert serve_job.main(["--bundle", str(bundle)]) == 2  # the default state folder would vanish with the copy
    assert _one_error(capsys).startswith("serve: error: state: 'runs/serve-state' is relative, so this Ray job")
    shutil.copytree(bundle, tmp_path / "runs" / "best")
    checked = {}
    monkeypatch.setattr(serve_job, "init_ray", lambda address: checked.setdefault("cwd", os.getcwd()))
    monkeypatch.setattr(serve_job, "deploy", lambda cfg, *a, **k: checked.update(cfg=cfg) or "http://x")
    assert serve_job.main(["--bundle", "runs/best", "--base-dir", str(tmp_path), "--address", "auto"]) == 0
    assert checked["cfg"].bundle == str(tmp_path / "runs" / "best")
    assert checked["cfg"].state == str(tmp_path / "runs" / "serve-state") and checked["cwd"] == str(copy)
