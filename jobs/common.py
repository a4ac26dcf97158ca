"""What every Ray stage shares: connecting to Ray, one-line errors, logging, versions.

Each stage (``jobs.evaluate``, ``jobs.tune``, ``jobs.serve``, ``jobs.redteam``,
``jobs.main``) keeps only what is specific to it; the Ray-free logic lives in ``adv/``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import platform
import sys
import threading
import time
from typing import Callable, Iterator, Sequence

from adv.errors import AdvError, ConfigError
from adv.logs import to_stderr


class _StageFormat(logging.Formatter):
    """``[stage] message``: the stage is the last part of the logger's name (``jobs.tune`` -> ``tune``)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"[{record.name.rpartition('.')[2]}] {record.getMessage()}"


def logger(stage: str) -> Callable[[str], None]:
    """``log(msg)``: ``[stage] msg`` on stderr through the stdlib logger ``jobs.<stage>`` (stdout stays
    machine-readable). A job is an entrypoint, so this also turns on the library's own log lines (``adv.*``,
    e.g. a training epoch), quiet otherwise."""
    to_stderr("adv")
    to_stderr("jobs", _StageFormat())
    return logging.getLogger(f"jobs.{stage}").info


#: Defaults for a Ray cluster this process starts (a user's environment wins). Serve gives a new HTTP proxy 5 s
#: to report ready and then kills it; on a busy 2-core machine its imports alone can take longer, and the
#: deployment then fails with "actor died ... killed by ray.kill".
LOCAL_RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
                 "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
                 # a request whose Serve replica died is 503 + Retry-After, not the proxy's bare 500
                 "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "adv.serving.http:proxy_middlewares"}


#: Defaults for this driver (a user's environment wins): without a terminal on stdout, Ray Data logs a block of
#: ~9 progress lines every 10 s, most of a redirected log; every 2 min is a heartbeat (the job logs each
#: committed shard itself). Read when a dataset first runs, so setting it in :func:`init_ray` is in time.
DRIVER_ENV = {"RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "120"}


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

    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        local_ray_env()
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            log(f"connecting to the Ray cluster at {address}")
            connect(address)
        else:
            cpus = num_cpus or os.cpu_count() or 1
            log(f"starting an embedded local Ray cluster ({cpus} logical CPUs)")
            # address="local": a new cluster even when another one runs on this machine (ray start, someone
            # else's job), which ray.init() would otherwise join and then refuse num_cpus for
            ray.init(address="local", num_cpus=cpus, object_store_memory=object_store_memory,
                     include_dashboard=False)
    DataContext.get_current().enable_progress_bars = os.environ.get("ADV_NO_PROGRESS") != "1"


def live_progress() -> bool:
    """Whether redrawn progress displays (bars, Tune's status table) suit stderr: a terminal, not a log file."""
    from adv.progress import interactive

    return os.environ.get("ADV_NO_PROGRESS") != "1" and interactive(sys.stderr)


#: Lines Ray writes at error level that are harmless here, each with why; :func:`filter_stderr` drops them.
KNOWN_RAY_NOISE = (
    # The driver's core worker (core_worker.cc), once per actor-pool actor: Ray Data hands each MapWorker its
    # DataContext and map function as object-store references, and its pools restart dead actors
    # (max_restarts=-1, the fault tolerance jobs.evaluate records). The driver owns both references for the
    # pool's whole life, so the restart the line warns about works; Ray's own issue 53727 tracks the message.
    b"has constructor arguments in the object store and max_restarts > 0",
)


def filter_stderr(patterns: Sequence[bytes] = KNOWN_RAY_NOISE) -> bool:
    """From now on, drop the lines of file descriptor 2 that contain one of ``patterns``; True when installed.

    Ray's C++ logs go straight to the descriptor, past Python's ``sys.stderr`` and logging filters, so a pipe
    and a thread forward every other line unchanged. Only when stderr is not a terminal (a log file, CI):
    on a terminal the bars need the real descriptor. Call it before Ray starts: the cluster's processes then
    inherit the filtered descriptor. At exit the descriptor is restored and the rest of the pipe forwarded.
    """
    if sys.stderr.isatty():
        return False
    sys.stderr.flush()
    out = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def pump() -> None:
        with os.fdopen(read, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                if not any(p in line for p in patterns):
                    with contextlib.suppress(OSError):  # keep reading whatever happens: a full pipe blocks writers
                        while line:
                            line = line[os.write(out, line):]

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(out, 2)  # the pipe's last write end in this process: the thread reads to the end and stops
        thread.join(timeout=2.0)  # processes started meanwhile may hold the pipe open: do not wait for them

    atexit.register(restore)
    return True


def connect(address: str) -> None:
    """``ray.init(address)``; a refused connection is one line (a missing token: how to send it)."""
    import ray

    try:
        ray.init(address=address, log_to_driver=True)
    except ConnectionError as exc:
        chain, cause = [], exc
        while cause is not None:
            chain.append(f"{type(cause).__name__}: {cause}")
            cause = cause.__cause__ or cause.__context__
        if any("AuthenticationError" in c or "InvalidAuthToken" in c for c in chain):
            raise ConfigError(f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token "
                              "(the token is read from $RAY_AUTH_TOKEN, else $RAY_AUTH_TOKEN_PATH, else "
                              "~/.ray/auth_token; `ray get-auth-token` on the head prints it)") from None
        raise ConfigError(f"cannot connect to the Ray cluster at {address}: {str(exc).strip().splitlines()[-1]}") \
            from None


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
    """One line for a failed Ray task or a Ray that could not start (its root cause), or None for other
    exceptions (real bugs). Ray raises plain ``Exception`` too (a local node that timed out starting on a
    loaded machine): an exception raised inside the ``ray`` package counts."""
    if not (type(exc).__module__.startswith("ray") or _raised_in_ray(exc)):
        return None
    cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return (f"the Ray pipeline failed: {cause} (finished shards are kept; rerun to resume; "
            "worker logs under /tmp/ray/session_latest/logs)")


def _raised_in_ray(exc: BaseException) -> bool:
    """A bare ``Exception`` (or a runtime, timeout or connection error) whose innermost frame is Ray's code;
    other types raised there (a TypeError, say) are our bugs and keep their traceback."""
    import traceback

    import ray

    if type(exc) not in (Exception, RuntimeError, TimeoutError, ConnectionError):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    root = os.path.dirname(os.path.realpath(ray.__file__)) + os.sep
    return bool(frames) and os.path.realpath(frames[-1].filename).startswith(root)


# --- paths of a submitted job ------------------------------------------------------------------------------
#: Ray sets this in a ``ray job submit`` entrypoint's environment: the job's runtime env and submission metadata.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
#: What to do instead of a relative path in a submitted job (one clause of every such error).
JOB_PATHS_FIX = ('add --base-dir "$PWD" to the job\'s command when the cluster runs on the submitting machine '
                 "(ray start --head there), else use absolute paths on storage every node mounts or URIs such "
                 "as s3://... (README, \"Ray clusters\")")


def submitted_job() -> dict | None:
    """The runtime env of the ``ray job submit`` entrypoint this process is (or was started by); None outside one.

    Such a process runs in Ray's temporary copy of ``--working-dir`` (or, without one, in the folder the cluster
    was started from), not in the submitting folder: relative paths there do not name the submitter's files.
    """
    raw = os.environ.get(JOB_CONFIG_ENV)
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        return None
    if not isinstance(info, dict) or not (info.get("metadata") or {}).get("job_submission_id"):
        return None
    return info.get("runtime_env") or {}


def _relative(path: str | None) -> bool:
    return bool(path) and "://" not in path and not os.path.isabs(os.path.expanduser(path))


def check_job_paths(inputs: dict[str, str | None], outputs: dict[str, str | None]) -> None:
    """In a submitted job: a relative input must exist in the job's folder, and a relative output is refused
    (it would land in that folder, a temporary copy Ray deletes); each with one line naming the fix. No-op
    outside a submitted job. ``inputs``/``outputs`` map what the user set (``model.checkpoint``) to its path."""
    job = submitted_job()
    if job is None:
        return
    here = os.getcwd()
    folder = (f"Ray's temporary copy of the job's working dir ({here}), deleted after the job"
              if job.get("working_dir") else f"the cluster's folder {here}, not the submitting one")
    for what, path in inputs.items():
        if _relative(path) and not os.path.exists(path):
            raise ConfigError(f"{what}: {path!r} is relative and not in this Ray job's working dir {here} "
                              "(ray job submit uploads --working-dir without what .gitignore lists, such as runs/); "
                              f"{JOB_PATHS_FIX}")
    for what, path in outputs.items():
        if _relative(path):
            raise ConfigError(f"{what}: {path!r} is relative, so this Ray job would write it into {folder}; "
                              f"{JOB_PATHS_FIX}")


def add_base_dir(parser, prog: str) -> None:
    """The ``--base-dir`` option every submittable job takes (see :func:`run_from`)."""
    parser.add_argument("--base-dir", metavar="DIR",
                        help="resolve relative paths (--config, the config's files, outputs) against DIR; in "
                             f'`ray job submit ... -- python -m {prog} ... --base-dir "$PWD"` the submitting '
                             "folder, for a cluster on the same machine")


@contextlib.contextmanager
def run_from(base_dir: str | None) -> Iterator[None]:
    """Run the body in ``base_dir`` (``--base-dir``: relative paths resolve against it), then return.

    A submitted job's command gets the submitting folder this way (``--base-dir "$PWD"``, expanded by the
    submitting shell); a node that cannot see that folder (a remote cluster) is told to use shared storage.
    """
    if base_dir is None:
        yield
        return
    base = os.path.expanduser(base_dir)
    if not os.path.isdir(base):
        where = (" on the Ray node running this job (a remote cluster cannot read the submitting machine's files)"
                 if submitted_job() is not None else "")
        raise ConfigError(f"--base-dir {base_dir}: no such folder{where}; put inputs and outputs on storage every "
                          "node mounts (absolute paths) or URIs such as s3://..., and drop --base-dir")
    before = os.getcwd()
    os.chdir(base)
    try:
        yield
    finally:
        os.chdir(before)


def stopwatch(timings: dict[str, float]):
    """``lap(name)``: seconds since the previous lap, recorded under ``name``."""
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - last[0]
        last[0] = now

    return lap
