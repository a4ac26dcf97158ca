"""The Serve endpoint against a hostile corpus and a torn detector log (issue 25); all traffic on 127.0.0.1.

    .venv/bin/python -m bench.serve_hostile [--bundle DIR] [--requests 10000] [--clients 8]

Serves the bundle of ``bench.serve`` (Fashion-MNIST ``lenet`` behind a DWT
stage, BayesShrink: the stage that turned a blank image into NaN and a 500)
with the default query detector, two model replicas of 0.25 CPU, and sends:

1. **a hostile corpus** of ``--requests`` requests cycling through every kind
   of client input that once reached a 5xx or a foreign decoder: blank images
   (0, 0.5, 1; alone and beside a normal one), empty and deeply nested JSON,
   GIF/TIFF/WEBP/BMP bodies under ``image/png`` and ``image/jpeg``, a PNG
   under ``image/jpeg``, plus ``bench.serve``'s malformed kinds (truncated
   PNG, wrong dimensions, huge body, wrong content type, NaN, no key).
   Counted: answers per kind, **500s**, **503s** (every one is a client-input
   503 here: the backend is healthy), replicas that died;
2. **a torn final log frame**: with acknowledged traffic in the detector's
   log, half a frame is appended (what a crash mid-append leaves) and the
   state owner is killed (Ray restarts it). Measured: seconds from the kill to
   the first 200, and acknowledged updates lost.

Writes the "## Serve: hostile input and a torn log" section of
``docs/benchmarks.md`` and ``runs/bench-serve-hostile/results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench.docs import command as command_line, logger, markers, write_section
from bench.serve import (
    NPY, benign_requests, closed_loop, lost_updates, make_bundle, malformed_requests, npy, replicas, start,
)

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = markers("serve_hostile")
JSON = "application/json"


log = logger("bench.serve_hostile")


def _encoded(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((image[0] * 255).round().astype(np.uint8)).save(buf, fmt)
    return buf.getvalue()


def hostile_kinds(keys: dict, images: np.ndarray, limit: int) -> list[tuple[str, int, dict, bytes]]:
    """(kind, the status it must get, headers, body) for every hostile kind."""
    key = {"Authorization": f"Bearer {keys['mal']}"}
    h = lambda kind: {**key, "content-type": kind}  # noqa: E731
    blank = [np.full((1, 1, 28, 28), v, np.float32) for v in (0.0, 0.5, 1.0)]
    gif = _encoded(images[0], "GIF")
    kinds = [
        ("blank npy (0)", 200, h(NPY), npy(blank[0])), ("blank npy (0.5)", 200, h(NPY), npy(blank[1])),
        ("blank png (1)", 200, h("image/png"), _encoded(blank[2][0], "PNG")),
        ("blank beside a normal image", 200, h(NPY), npy(np.concatenate([blank[0], images[:1], blank[2]]))),
        ("empty JSON list", 422, h(JSON), b'{"images": []}'),
        ("nested JSON (depth 50,000)", 400, h(JSON), b'{"images": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("JSON with a GIF", 415, h(JSON), json.dumps({"images": [base64.b64encode(gif).decode()]}).encode()),
        ("PNG as image/jpeg", 415, h("image/jpeg"), _encoded(images[0], "PNG")),
    ]
    for fmt in ("GIF", "TIFF", "WEBP", "BMP"):
        body = _encoded(images[0], fmt)
        kinds += [(f"{fmt} as image/png", 415, h("image/png"), body), (f"{fmt} as image/jpeg", 415,
                                                                       h("image/jpeg"), body)]
    old, _ = malformed_requests(keys, images, limit)
    expected = {"truncated png": 400, "wrong dimensions": 422, "huge body": 413, "wrong content type": 415,
                "NaN npy": 422, "missing key": 401}
    return kinds + [(name, expected[name], headers, body) for name, headers, body in old]


def hostile(url: str, keys: dict, images: np.ndarray, limit: int, clients: int, n: int) -> dict:
    kinds = hostile_kinds(keys, images, limit)
    before = replicas()
    rows = asyncio.run(closed_loop(url, clients, 3600, lambda i, k: kinds[(i + k) % len(kinds)][2:], n))
    per_kind: dict[str, dict[str, int]] = {}
    wrong = 0
    for _, _, status, i, k in rows:
        name, want, _, _ = kinds[(i + k) % len(kinds)]
        tally = per_kind.setdefault(name, {})
        tally[str(status)] = tally.get(str(status), 0) + 1
        wrong += status != want
    return {"requests": len(rows), "per_kind": per_kind, "500": sum(r[2] == 500 for r in rows),
            "503": sum(r[2] == 503 for r in rows), "5xx or none": sum(r[2] >= 500 or r[2] == 0 for r in rows),
            "not the expected status": wrong, "replicas_died": len(before - replicas()),
            "expected": {name: want for name, want, _, _ in kinds}}


def torn_log(url: str, cfg, keys: dict, images: np.ndarray, state: Path) -> dict:
    """Acknowledged traffic, then the owner killed twice: once plainly (the baseline restart), once after half
    a frame was appended to the log; seconds from each kill to the next 200."""
    rows = asyncio.run(closed_loop(url, 4, 3600, benign_requests(keys, images, "torn"), 200))
    acked = {f"torn{i}": sum(1 for r in rows if r[3] == i and r[2] == 200) for i in range(4)}
    plain, failed_plain = _kill_and_probe(url, cfg, keys, images, acked)
    (logfile,) = sorted((state / "detector").glob("log-*.log"))
    size = logfile.stat().st_size
    with open(logfile, "ab") as f:  # what a crash in the middle of an append leaves
        f.write(b"ADVL" + (50_000).to_bytes(8, "little") + b"\0\0\0\0" + os.urandom(3000))
    first, failed = _kill_and_probe(url, cfg, keys, images, acked)
    return {"log_bytes_before": size, "torn_bytes": 16 + 3000, "seconds_to_first_200": first,
            "seconds_plain_restart": plain, "failed_while_restarting": failed + failed_plain,
            **lost_updates(url, keys["admin"], acked)}


def _kill_and_probe(url: str, cfg, keys: dict, images: np.ndarray, acked: dict) -> tuple[float | None, int]:
    """Kill the owner (Ray restarts it) and probe until a 200: (seconds from the kill, failed probes)."""
    import httpx

    from jobs.serve import kill_owner

    t_kill = time.monotonic()
    assert kill_owner(cfg, restart=True)
    probe = {"Authorization": f"Bearer {keys['torn0']}", "content-type": NPY}
    failed = 0
    with httpx.Client(base_url=url, timeout=120) as http:
        while time.monotonic() - t_kill < 300:
            r = http.post("/v1/predict", content=npy(images[7:8]), headers=probe)
            if r.status_code == 200:
                acked["torn0"] += 1
                return time.monotonic() - t_kill, failed
            failed += 1
            time.sleep(0.2)
    return None, failed


def markdown(res: dict, command: str) -> str:
    h, t = res["hostile"], res["torn"]
    kinds = "; ".join(f"{k}: " + ", ".join(f"{n}x {s}" for s, n in sorted(v.items())) + f" (expected "
                      f"{h['expected'][k]})" for k, v in h["per_kind"].items())
    first, plain = ("never" if v is None else f"{v:.1f} s" for v in (t["seconds_to_first_200"],
                                                                      t["seconds_plain_restart"]))
    return "\n".join([
        BEGIN, "## Serve: hostile input and a torn log", "",
        f"`{command}` ({res['machine']}; {res['minutes']:.1f} min). Bundle: {res['bundle']}, with the default "
        "query detector (action `deceive`), 2 model replicas of 0.25 CPU; the load generator shares the 2 "
        "cores.", "",
        f"**Hostile corpus:** {h['requests']} requests from {res['clients']} clients. **500s: {h['500']}** "
        f"(target 0); **503s: {h['503']}** (target 0: the backend was healthy, so any 503 would be a client "
        f"input answered as a backend failure); answers other than the expected status: "
        f"{h['not the expected status']}; replicas that died: {h['replicas_died']}. Per kind: {kinds}.", "",
        f"**Torn final log frame:** {t['acknowledged']} acknowledged answers, then the owner killed once plainly, "
        f"then {t['torn_bytes']} bytes of half a "
        f"frame appended to the detector log and the owner killed again (Ray restarts it; loading drops the torn "
        f"tail with a warning). First 200 after the kill: **{first}**, against **{plain}** after a plain kill of the "
        f"same owner just before (the process restart, the snapshot load and the log replay on a loaded machine; "
        f"target: within 10 s of the restart); requests that failed meanwhile: {t['failed_while_restarting']} "
        f"(a replica waits up to `owner_timeout_s` for the owner); stored {t['stored']}, **lost {t['lost']}** "
        f"(target 0).",
        "", END])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", help="a defense bundle (default: lenet + DWT, as bench.serve)")
    p.add_argument("--classifier", default=str(ROOT / "runs" / "fm-lenet" / "model.pt"))
    p.add_argument("--describe", help="how the report names --bundle")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--worker-niceness", type=int, help="RAY_worker_niceness for the cluster this starts (Ray's "
                   "default: 15, which other work on a shared machine starves; docs/serving.md)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    from jobs.common import init_ray

    import ray

    # a cluster of its own: serve.start alone joins any Ray already running on this (shared) machine
    init_ray()

    from adv.data import load_dataset
    from jobs.serve import undeploy

    t_start = time.time()
    work = ROOT / "runs" / "bench-serve-hostile"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    names = ["mal", "admin", *(f"torn{i}" for i in range(4))]
    keys = {u: f"{u}-bench-key-{os.urandom(6).hex()}" for u in names}
    images = load_dataset("fashion-mnist", split="test", n=200, seed=1).tensors()[0].numpy()
    cfg, url = start(make_bundle(args, work / "bundle"), work, keys, "hostile", owner_timeout_s=120.0)
    log(f"serving at {url}")
    res: dict = {"clients": args.clients, "bundle": args.describe or ("`runs/fm-lenet` lenet behind DWT "
                                                                      "(haar, BayesShrink), as bench.serve")}
    try:
        log(f"{args.requests} hostile requests from {args.clients} clients")
        res["hostile"] = hostile(url, keys, images, cfg.limits.max_body_bytes, args.clients, args.requests)
        log("torn final log frame")
        res["torn"] = torn_log(url, cfg, keys, images, Path(cfg.state))
    finally:
        undeploy(cfg)
        ray.shutdown()
    res["minutes"] = (time.time() - t_start) / 60
    res["machine"] = (f"{platform.machine()}, {os.cpu_count()} cores shared with other work, load average "
                      f"{os.getloadavg()[0]:.1f} at the end, Ray workers at nice "
                      f"{os.environ.get('RAY_worker_niceness', '15 (Ray default)')}")
    (work / "results.json").write_text(json.dumps(res, indent=1, default=str))
    text = markdown(res, command_line("serve_hostile", argv))
    write_section(Path(args.docs) / "benchmarks.md", text, "serve_hostile")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
