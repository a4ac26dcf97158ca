"""Ray fixtures: one shared local cluster per test session (started lazily, by the first test that asks).

Token auth and usage stats are off for the local cluster (RAY_NOTES.md); the
cluster is 4 logical CPUs on 2 cores, no GPUs, ~512 MB of object store, and
runs the dashboard so job-submission tests can reach it. Never ``ray stop
--force`` here: it would kill every Ray process of the user.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's Ray context (``ray.init`` once; shut down at the end of the session)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ctx = ray.init(num_cpus=4, num_gpus=0, object_store_memory=512 * 2**20, include_dashboard=True,
                       log_to_driver=False)
    else:  # someone else's ray.init: expose the same field the tests read
        from types import SimpleNamespace

        from ray._private.worker import get_dashboard_url

        ctx = SimpleNamespace(dashboard_url=get_dashboard_url())
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ctx
    if started:
        ray.shutdown()
