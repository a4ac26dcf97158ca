"""Shared fixtures: one Ray local cluster per test session (started lazily, by the first test that asks), and the
single-thread / tiny-model fixtures of the attack and evaluation tests.

Token auth (on by default for a new local cluster since Ray 2.59) and usage stats are off for the local cluster; the
cluster is 4 logical CPUs on 2 cores, no GPUs, ~512 MB of object store, and
runs the dashboard so job-submission tests can reach it. Never ``ray stop
--force`` here: it would kill every Ray process of the user.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from jobs.common import local_ray_env
from tests.attack_helpers import one_thread, train_tiny

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
local_ray_env()  # the same cluster defaults as the jobs' embedded clusters


@pytest.fixture(scope="module")
def single_threaded():
    """One intra-op torch thread for a whole module (opt in: ``pytestmark = pytest.mark.usefixtures(...)``)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def model(single_threaded):
    """The tiny trained CNN of the attack and evaluation tests (``attack_helpers.train_tiny``), one per module."""
    return train_tiny()


@contextlib.contextmanager
def free_agent_port():
    """``ray.init`` with the job agent on a free port instead of the fixed 52365.

    Another Ray on the machine (a developer's cluster, a parallel test run) may hold 52365; the agent then never
    comes up and every job submission fails with "No available agent". ``ray start`` takes
    ``--dashboard-agent-listen-port`` but ``ray.init`` has no such argument, so the node parameters' default is
    replaced for the duration of the call (Ray is pinned, so this private default is stable).
    """
    from ray._private.parameter import RayParams

    from tests.token_cluster import free_ports

    original = RayParams.__init__
    port = free_ports(1)[0]

    def init(self, *args, **kwargs):
        kwargs["dashboard_agent_listen_port"] = kwargs.get("dashboard_agent_listen_port") or port
        original(self, *args, **kwargs)

    RayParams.__init__ = init
    try:
        yield
    finally:
        RayParams.__init__ = original


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's Ray context (``ray.init`` once; shut down at the end of the session)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        with free_agent_port():
            # address="local": a new cluster even when another one runs on this machine (another session's
            # `ray start` or multi-node test cluster), which ray.init() would join and then refuse num_cpus for
            ctx = ray.init(address="local", num_cpus=4, num_gpus=0, object_store_memory=512 * 2**20,
                           include_dashboard=True, log_to_driver=False)
    else:  # someone else's ray.init: expose the same field the tests read
        from types import SimpleNamespace

        from ray._private.worker import get_dashboard_url

        ctx = SimpleNamespace(dashboard_url=get_dashboard_url())
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    yield ctx
    if started:
        ray.shutdown()


@pytest.fixture()
def spec_parses(monkeypatch):
    """Every spec string parsed while the test runs, in order: :func:`adv.specs.parse_spec` is the one parser
    (``StageSpec.parse`` and the registries' lookups go through it), so issue 23's "parsed once" is countable."""
    import adv.specs

    parsed: list[str] = []
    real = adv.specs.parse_spec

    def counting(text, what="defense"):
        parsed.append(text)
        return real(text, what)

    monkeypatch.setattr(adv.specs, "parse_spec", counting)
    return parsed
