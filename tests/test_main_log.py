"""`make main > log 2>&1` stays readable: no Serve access log by default, no known-harmless Ray error line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY_LINE = ("[2026-12-05 08:25:26,555 E 4233 4233] core_worker.cc:2465: Actor with class name: "
            "'MapWorker(MapBatches(F))' and ID: 'da12' has constructor arguments in the object store and "
            "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor "
            "restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details.")


def test_the_known_ray_error_line_is_dropped_from_a_log_and_nothing_else(tmp_path):
    script = textwrap.dedent(f"""
        import os, subprocess, sys
        from jobs.common import filter_stderr
        assert filter_stderr()
        os.write(2, b"before\\n" + {RAY_LINE.encode()!r} + b"\\nafter\\n")  # as Ray's C++ logger writes it
        subprocess.run(["sh", "-c", "echo from a child process >&2"], check=True)  # e.g. a raylet started later
        print("python", file=sys.stderr)
        raise ValueError("a traceback still gets through")
    """)
    log = tmp_path / "log"
    with log.open("wb") as fh:  # not a terminal, as in `make main > log 2>&1`
        rc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    assert rc == 1 and "core_worker" not in text
    assert text.splitlines()[:4] == ["before", "after", "from a child process", "python"]
    assert "Traceback" in text and text.rstrip().endswith("ValueError: a traceback still gets through")


def test_serve_access_log_is_off_unless_asked(monkeypatch):
    import jobs.serve as js

    seen = []
    monkeypatch.setattr(js.serve, "start", lambda **kw: seen.append(kw["logging_config"]))
    monkeypatch.setattr(js.serve, "run", lambda app, **kw: seen.append(kw["logging_config"]))
    monkeypatch.setattr(js, "build", lambda cfg, env_keys=None: None)
    monkeypatch.setattr(js, "check_local_bundle", lambda location: None)
    monkeypatch.setattr(js, "_wait_healthy", lambda *a: None)
    cfg = js.ServeConfig(bundle="b")
    js.deploy(cfg, access_log=False)
    assert [c.enable_access_log for c in seen] == [False, False]  # the proxies and the application's replicas
    seen.clear()
    js.deploy(cfg)  # `jobs.serve`, a server: access log on, as Serve has it
    assert [c.enable_access_log for c in seen] == [True, True]


def test_main_serves_without_access_log_and_keeps_the_flag(monkeypatch, tmp_path):
    import jobs.main as main
    import jobs.redteam as redteam

    calls = []
    monkeypatch.setattr(redteam, "story", lambda bundle, out, **kw: calls.append(kw) or tmp_path / "r.md")
    main.serve_stage("bundle", str(tmp_path / "tune-report.md"), 0.0)
    main.serve_stage("bundle", str(tmp_path / "tune-report.md"), 0.0, access_log=True)
    assert calls == [{"access_log": False}, {"access_log": True}]
    assert main.main(["--config", str(tmp_path / "missing.yaml"), "--access-log"]) == 2  # the flag parses


def test_a_ray_that_cannot_start_is_one_line_not_a_traceback(monkeypatch, capsys):
    import ray._private.node as node

    from jobs.common import guarded

    def start_ray():
        # what ray._private.node.Node raises when the local node does not come up in time on a loaded machine
        exec(compile("raise Exception('The current node timed out during startup.')", node.__file__, "exec"), {})

    assert guarded("main", start_ray, "rerun") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "main: error: the Ray pipeline failed: The current node timed out" in err

    def our_bug():
        exec(compile("raise TypeError('bad argument')", node.__file__, "exec"), {})

    with pytest.raises(TypeError):  # a bug keeps its traceback
        guarded("main", our_bug, "rerun")


def test_ray_data_logs_progress_every_two_minutes_in_a_log(monkeypatch):
    import ray

    from jobs import common

    monkeypatch.delenv("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # connected already: only the driver's defaults
    common.init_ray()
    assert common.os.environ["RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"] == "120"  # Ray's default: 10 s
    monkeypatch.setenv("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", "5")
    common.init_ray()
    assert common.os.environ["RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL"] == "5"  # the user's setting wins
