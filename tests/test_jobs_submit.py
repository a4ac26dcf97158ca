"""`ray job submit` round trip: the evaluate job through JobSubmissionClient on the shared local cluster."""

from __future__ import annotations

import sys
import time
import uuid

import pytest

from tests.pipeline_helpers import (REPO, on_this_cluster, random_checkpoint, submit_when_agent_ready, tiny_config,
                                    write_yaml)

pytestmark = pytest.mark.ray


def test_evaluate_job_round_trip(ray_cluster, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    url = ray_cluster.dashboard_url
    assert url, "the session cluster runs without a dashboard"
    client = JobSubmissionClient(url if "://" in url else f"http://{url}")

    ckpt = random_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "run"
    cfg = tiny_config(ckpt, tmp_path / "runs", defenses=[], attacks=[{"name": "fgsm", "eps": [0.1]}],
                      adaptive=False, features=[], shards=2,
                      dataset={"name": "digits", "n": 8, "seed": 0},
                      resources={"actors": 1, "batch_size": 4})
    config = write_yaml(tmp_path / "job.yaml", cfg)
    # The same command as `ray job submit --working-dir . -- python -m jobs.evaluate ...`;
    # the interpreter is explicit because the job runs outside this virtualenv's PATH.
    sid = submit_when_agent_ready(
        client,
        entrypoint=on_this_cluster(f"{sys.executable} -m jobs.evaluate --config {config} --out {out}"),
        runtime_env={"working_dir": str(REPO), "excludes": [".git", ".venv", "runs", "*.egg-info"],
                     "env_vars": {"ADV_NO_PROGRESS": "1"}},
        submission_id=f"adv-evaluate-test-{uuid.uuid4().hex[:8]}",
    )
    deadline = time.time() + 300
    status = client.get_job_status(sid)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(sid)
    logs = client.get_job_logs(sid)
    if status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        client.stop_job(sid)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert str(out / "report.md") in logs  # the job prints the report path on stdout
    assert "connecting to the Ray cluster" in logs  # it joined this cluster instead of starting one
    assert (out / "report.md").is_file() and (out / "shards" / "shard-00001.done").is_file()
