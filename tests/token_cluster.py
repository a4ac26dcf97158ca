"""A `ray start --head` cluster of the test's own, with token authentication as Ray 2.60 sets it up by default.

``ray start`` turns token auth on when ``RAY_AUTH_MODE`` is unset and a token exists
(``~/.ray/auth_token``, which any earlier ``ray.init()`` writes). The cluster gets
its own ``HOME`` (so its token never touches the user's ``~/.ray``), temp dir and
ports, and runs under ``ray start --block`` in a subprocess: stopping that process
(SIGTERM) stops exactly this cluster. Never ``ray stop``: it has no ``--address``
in Ray 2.60 and stops every Ray process of the user, other sessions' clusters too.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent  # the virtualenv's bin: python and ray, first on PATH as after `activate`


def free_ports(k: int) -> list[int]:
    """``k`` distinct ports nothing listens on right now (held open together so they differ)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(k)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """A user's shell on this machine: no RAY_* settings of the test process, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "ADV_SERVE_KEYS"}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               ADV_NO_PROGRESS="1", **extra)
    return env


@dataclass(frozen=True)
class TokenCluster:
    home: Path  # HOME of every command talking to it: ~/.ray/auth_token holds the token
    gcs: str  # GCS address (``ray.init(address=...)``, ``--address`` of jobs.serve)
    dashboard: str  # http://127.0.0.1:PORT (``ray job submit --address``)
    temp_dir: Path

    def env(self, **extra: str) -> dict[str, str]:
        return user_env(self.home, **extra)

    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()


def _ready(head: TokenCluster) -> bool:
    """The job API answers (with the token) and a trivial job runs: the dashboard and the node's job agent are up
    (the agent registers after the dashboard, and until then a submission fails with "No available agent")."""
    req = urllib.request.Request(f"{head.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {head.token()}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            if r.status != 200:
                return False
    except (urllib.error.URLError, OSError):
        return False
    job = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", head.dashboard, "--", "true"],
                         env=head.env(RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=120)
    return job.returncode == 0


def _start(root: Path, num_cpus: int) -> tuple[TokenCluster, subprocess.Popen]:
    # the ports whose defaults are fixed (6379, 8265, 10001, 52365) would meet another cluster's; the rest are
    # chosen by Ray, as for every other cluster on the machine
    gcs, dash, client, agent = free_ports(4)
    head = TokenCluster(root / "home", f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", root / "ray")
    with open(root / "ray-start.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
             "--dashboard-agent-listen-port", str(agent),
             "--num-cpus", str(num_cpus), "--num-gpus", "0", "--object-store-memory", str(300 * 2**20),
             "--temp-dir", str(head.temp_dir), "--include-dashboard", "true"],
            # no memory monitor: it judges the whole machine's memory, and on a shared one it killed this cluster's
            # job drivers for what other processes used (the cluster's own work is a few hundred MB)
            env=head.env(RAY_memory_monitor_refresh_ms="0"), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    return head, proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # `ray start --block` stops its own node's processes on SIGTERM
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextmanager
def token_cluster(num_cpus: int = 2, wait_s: float = 180.0, attempts: int = 2) -> Iterator[TokenCluster]:
    """Start the cluster (``ray get-auth-token --generate``, then ``ray start --head --block``); stop it after.

    A start that fails is tried once more: on an overloaded machine Ray gives its raylet only 30 s to register.
    """
    root = Path(tempfile.mkdtemp(prefix="adv-rc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (root / "home").mkdir()
    proc = None
    try:
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=user_env(root / "home"), check=True,
                       capture_output=True)
        for attempt in range(1, attempts + 1):
            head, proc = _start(root, num_cpus)
            deadline, ready = time.monotonic() + wait_s, False
            while not ready and proc.poll() is None and time.monotonic() < deadline:
                ready = _ready(head)
                time.sleep(0 if ready else 1.0)
            if ready:
                break
            _stop(proc)
            if attempt == attempts:
                raise RuntimeError(f"ray start --head did not come up: {(root / 'ray-start.log').read_text()[-2000:]}")
        yield head
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)
