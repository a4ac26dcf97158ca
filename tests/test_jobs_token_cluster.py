"""The README's `ray job submit` example, as written, against a `ray start --head` cluster with token auth;
`jobs.serve --address` and `--shutdown` on the same cluster.

The cluster is the test's own (tests/token_cluster.py: its own HOME, temp dir and
ports, stopped by stopping its `ray start --block`), so it coexists with the
session's shared cluster. Only the README's address (default port 8265) and its
config (the full default evaluation, ~15 min) are replaced: by this cluster's
dashboard and by a tiny config whose paths are relative to the repository, the
folder the command is run from.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.pipeline_helpers import REPO, random_checkpoint, tiny_config, write_yaml
from tests.serve_helpers import SHAPE, make_bundle, npy
from tests.token_cluster import free_ports, token_cluster

pytestmark = pytest.mark.cluster_cli

README_SUBMIT = re.compile(r"^RAY_AUTH_MODE=token ray job submit .*?(?<!\\)$", re.M | re.S)


@pytest.fixture(scope="module")
def head():
    with token_cluster() as cluster:
        yield cluster


def readme_submit() -> str:
    """The README's `ray job submit` example for a local token-auth cluster (continuation lines joined)."""
    found = README_SUBMIT.search((REPO / "README.md").read_text())
    assert found, "README.md lost its `RAY_AUTH_MODE=token ray job submit ...` example"
    return found.group(0).replace("\\\n", " ")


def _shell(cmd: str, head, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=REPO, env=head.env(), capture_output=True, text=True,
                          timeout=timeout)


def _rel(path) -> str:
    return os.path.relpath(path, REPO)


def test_readme_submit_example_succeeds_on_a_token_auth_cluster(head, tmp_path):
    cmd = readme_submit()
    assert "--address http://127.0.0.1:8265" in cmd and "jobs/configs/default.yaml" in cmd and '"$PWD"' in cmd
    # every path relative to the folder the user submits from, none of it in Ray's copy of the working dir
    ckpt = random_checkpoint(tmp_path / "model.pt")
    cfg = tiny_config(_rel(ckpt), _rel(tmp_path / "runs"), defenses=[], attacks=[{"name": "fgsm", "eps": [0.1]}],
                      adaptive=False, features=[], shards=2, dataset={"name": "digits", "n": 8, "seed": 0},
                      resources={"actors": 1, "batch_size": 4})
    config = write_yaml(tmp_path / "job.yaml", cfg)
    cmd = cmd.replace("http://127.0.0.1:8265", head.dashboard).replace("jobs/configs/default.yaml", _rel(config))

    # without RAY_AUTH_MODE=token, `ray job submit` sends no token and such a cluster answers 401
    refused = _shell(cmd.replace("RAY_AUTH_MODE=token ", ""), head, timeout=120)
    assert refused.returncode != 0 and "Authentication required" in refused.stdout + refused.stderr

    done = _shell(cmd, head)
    logs = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in logs, logs[-3000:]
    reports = list((tmp_path / "runs").glob("tiny-*/report.md"))
    assert len(reports) == 1 and str(reports[0]) in logs  # written in the submitting folder's runs/, path printed


def test_a_relative_path_in_a_submitted_job_is_one_line_naming_the_fix(head):
    """The issue's command (no --base-dir): the checkpoint under runs/ is not uploaded, and was a missing-file error
    (or outputs written into Ray's temporary copy); now one line that names --base-dir and shared storage."""
    cmd = readme_submit().replace("http://127.0.0.1:8265", head.dashboard).replace(' --base-dir "$PWD"', "")
    failed = _shell(cmd, head)
    logs = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "failed" in logs, logs[-3000:]
    errors = {line for line in logs.splitlines() if line.startswith("evaluate: error:")}  # the CLI echoes the log
    assert len(errors) == 1, logs[-3000:]
    error = errors.pop()
    assert "model.checkpoint" in error and "--base-dir" in error and "s3://" in error
    assert "Traceback" not in logs


def _owners(head) -> list[str]:
    """The detector state owners alive on the cluster (named actors of jobs.serve's namespace)."""
    code = ("import json, ray; ray.init(address='%s', log_to_driver=False); "
            "print(json.dumps(sorted(a['name'] for a in ray.util.list_named_actors(all_namespaces=True) "
            "if a['namespace'] == 'adv-serve')))" % head.gcs)
    done = subprocess.run([sys.executable, "-c", code], env=head.env(RAY_AUTH_MODE="token"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_serve_on_a_cluster_takes_the_drivers_env_keys_and_shutdown_removes_the_state_owner(head, tmp_path):
    """`jobs.serve --address` with $ADV_SERVE_KEYS only in the deploying shell (the cluster's replicas never see
    it: they crash-looped); `jobs.serve --shutdown` removes Serve and the detached owner `serve shutdown` left."""
    import httpx

    bundle = make_bundle(tmp_path / "bundle")
    port = free_ports(1)[0]
    env = head.env(RAY_AUTH_MODE="token", ADV_SERVE_KEYS="alice=alice-secret-key,admin:ops=ops-secret-key")
    serve = [sys.executable, "-m", "jobs.serve", "--address", head.gcs]
    deployed = subprocess.run([*serve, "--bundle", str(bundle), "--state", str(tmp_path / "state"), "--port",
                               str(port)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    assert "--shutdown --address" in deployed.stderr  # it names the clean way to remove it
    url = f"http://127.0.0.1:{port}"
    x = np.random.default_rng(0).random((1, *SHAPE), dtype=np.float32)
    with httpx.Client(base_url=url, timeout=60) as http:
        answer = http.post("/v1/predict", content=npy(x), headers={"content-type": "application/x-npy",
                                                                     "Authorization": "Bearer alice-secret-key"})
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1, answer.text
        assert http.get("/v1/model", headers={"Authorization": "Bearer wrong-key-000"}).status_code == 401
    assert _owners(head) == ["adv-detector-adv"]

    stopped = subprocess.run([*serve, "--shutdown"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "adv-detector-adv" in stopped.stderr
    assert _owners(head) == []
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/healthz", timeout=5)  # the proxy is gone with Serve


def test_connecting_without_the_token_is_one_line_naming_ray_auth_mode(head):
    """An explicit --address never sends the token unless RAY_AUTH_MODE=token (it was a 50-line traceback)."""
    # Ray retries a refused GCS connection ~20 times, a second apart; 2 tries show the same error sooner
    done = subprocess.run([sys.executable, "-m", "jobs.serve", "--address", head.gcs, "--shutdown"], cwd=REPO,
                          env=head.env(RAY_gcs_server_port_wait_time_s="2"), capture_output=True, text=True,
                          timeout=200)
    err = [line for line in done.stderr.splitlines() if line.startswith("serve: error:")]
    assert done.returncode == 2 and len(err) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"cluster at {head.gcs} requires token authentication: set RAY_AUTH_MODE=token" in err[0]
