"""What every Ray stage shares: connecting to Ray, one-line errors, logging, versions.

Each stage (``jobs.evaluate``, ``jobs.tune``, ``jobs.serve``, ``jobs.redteam``,
``jobs.main``) keeps only what is specific to it; the Ray-free logic lives in ``adv/``.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Callable

from adv.errors import AdvError


def logger(stage: str) -> Callable[[str], None]:
    """``log(msg)`` printing ``[stage] msg`` to stderr (stdout stays machine-readable)."""

    def log(msg: str) -> None:
        print(f"[{stage}] {msg}", file=sys.stderr, flush=True)

    return log


#: Defaults for a Ray cluster this process starts (a user's environment wins). Serve gives a new HTTP proxy 5 s
#: to report ready and then kills it; on a busy 2-core machine its imports alone can take longer, and the
#: deployment then fails with "actor died ... killed by ray.kill".
LOCAL_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                 "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def local_ray_env() -> None:
    """Set :data:`LOCAL_RAY_ENV` where unset, before ``ray.init`` starts a cluster (its processes inherit it)."""
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None,
             log: Callable[[str], None] = logger("ray")) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS``, else start an embedded local cluster; no-op when connected.

    A caller that already owns the connection (a test session, a Tune trial) keeps it.
    """
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        local_ray_env()
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            log(f"connecting to the Ray cluster at {address}")
            ray.init(address=address, log_to_driver=True)
        else:
            cpus = num_cpus or os.cpu_count() or 1
            log(f"starting an embedded local Ray cluster ({cpus} logical CPUs)")
            # address="local": a new cluster even when another one runs on this machine (ray start, someone
            # else's job), which ray.init() would otherwise join and then refuse num_cpus for
            ray.init(address="local", num_cpus=cpus, object_store_memory=object_store_memory,
                     include_dashboard=False)
    DataContext.get_current().enable_progress_bars = os.environ.get("ADV_NO_PROGRESS") != "1"


def versions() -> dict[str, str]:
    """The library versions a run records next to its numbers."""
    import ray
    import torch

    import adv

    return {"adv": adv.__version__, "ray": ray.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def guarded(prog: str, body: Callable[[], int], on_interrupt: str) -> int:
    """Run an entrypoint: a user error exits 2 and a failed Ray task 1, each with one line; Ctrl-C 130."""
    try:
        return body()
    except AdvError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {on_interrupt}", file=sys.stderr)
        return 130
    except Exception as exc:
        msg = ray_failure(exc)
        if msg is None:
            raise
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1


def ray_failure(exc: BaseException) -> str | None:
    """One line for a failed Ray task (its root cause), or None for other exceptions (real bugs)."""
    if not type(exc).__module__.startswith("ray"):
        return None
    cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return (f"the Ray pipeline failed: {cause} (finished shards are kept; rerun to resume; "
            "worker logs under /tmp/ray/session_latest/logs)")
