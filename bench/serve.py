"""The Serve endpoint (jobs.serve) under load, malformed input and faults, with one and with two state owner
shards; all traffic on 127.0.0.1.

    .venv/bin/python -m bench.serve [--bundle DIR] [--clients 1 8 32] [--seconds 10] [--malformed 2000]
                                    [--load-seconds 30] [--fault-seconds 30] [--shards 1 2]

Without ``--bundle`` it serves Fashion-MNIST ``lenet`` (``runs/fm-lenet``)
behind a DWT stage (haar, BayesShrink) with the default query detector
(per-user layer, global index, feature index, ``deceive``), two model
replicas of 0.25 CPU. Each ``--shards`` value is one deployment (fresh state):

1. **Decisions**: the same sequence of attack and benign requests (a walk
   toward one image from one account, the same walk rotated over six
   accounts, a popular image, benign users), one at a time; every answer and
   every account's alarm counts, compared between the deployments.
2. **Throughput and latency** at each ``--clients`` (closed loop, one image
   per request, ``--seconds`` each), against the same defended model and
   detector called in-process (one owner, durable) at the batch size Serve
   can form (min(clients, max_batch_size)).
3. With the first deployment only: **malformed requests** (truncated PNGs,
   wrong dimensions, bodies over the limit, wrong content types, NaN
   ``.npy``, missing keys; 5xx answers, replicas that died) and **load**
   (``--load-seconds`` at the highest concurrency; acknowledged answers
   against the updates the owners hold).
4. With the last deployment: **faults** (``--fault-seconds`` of load; a state
   owner shard is killed, Ray restarts it, later a model replica, Serve
   replaces it): failed requests, 5xx other than 503 with Retry-After, time
   to recover, acknowledged updates lost.

Writes ``docs/benchmarks_serve.png``, ``runs/bench-serve/results.json`` and
the "## Serve endpoint" section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from adv.serving.client import npy_bytes
from bench.docs import command as command_line, markers, write_section

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = markers("serve")
NPY = "application/x-npy"


def log(msg: str) -> None:
    print(f"[bench.serve] {msg}", file=sys.stderr, flush=True)


def npy(x: np.ndarray) -> bytes:
    return npy_bytes(np.asarray(x, np.float32))


def make_bundle(args, out: Path) -> str:
    """``--bundle``, or lenet + a DWT stage written as a bundle (numbers: the checkpoint's clean accuracy)."""
    if args.bundle:
        return args.bundle
    from adv.bundle import write_bundle
    from adv.numbers import accuracy_number
    from bench.defenses import classifier

    _, meta = classifier(args)
    acc = float(meta["metrics"]["test_acc"])
    numbers = {"clean": accuracy_number(round(acc * 10000), 10000, label="clean (classifier alone, from training)",
                                        subset="fashion-mnist test[n=10000]")}
    write_bundle(out, checkpoint=args.classifier, stages=["dwt:wavelet=haar"], numbers=numbers,
                 provenance={"made_by": "bench/serve.py"})
    return str(out)


async def closed_loop(url: str, clients: int, seconds: float, request, max_requests: int) -> list[tuple]:
    """``clients`` concurrent loops for ``seconds`` (and at most ``max_requests`` in all):
    ``(start, end, status, client, k)`` per request (the client's k-th; status 0: no answer, -503: a 503
    without ``Retry-After``)."""
    import httpx

    out: list[tuple] = []
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        async def worker(i: int) -> None:
            k = 0
            while time.monotonic() < end and len(out) < max_requests:
                headers, content = request(i, k)
                t0 = time.monotonic()
                try:
                    r = await http.post("/v1/predict", content=content, headers=headers)
                    status = -503 if r.status_code == 503 and "retry-after" not in r.headers else r.status_code
                except httpx.HTTPError:
                    status = 0
                out.append((t0, time.monotonic(), status, i, k))
                k += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return out


def statuses(rows: list[tuple]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, _, st, *_ in rows:
        out[str(st)] = out.get(str(st), 0) + 1
    return out


def summary(rows: list[tuple]) -> dict:
    lat = np.array([e - s for s, e, *_ in rows])
    span = max(r[1] for r in rows) - min(r[0] for r in rows)
    ok = sum(r[2] == 200 for r in rows)
    return {"requests": len(rows), "ok": ok, "errors": len(rows) - ok, "rps": ok / span,
            "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99))}


def in_process(bundle: str, images: np.ndarray, batches: list[int], state: Path) -> dict:
    """The same defended model and detector without Serve: seconds per batch of each stage, and the CPU time per
    image (this thread's: the model and the owner step run in it; the fsync wait is not CPU)."""
    import torch

    from adv.bundle import load_bundle
    from adv.detectors import DetectorConfig
    from adv.serving import ServeConfig
    from adv.serving.owner import DetectorOwner, Request

    torch.set_num_threads(1)  # what a replica gets
    model = load_bundle(bundle).build("cpu")
    owner = DetectorOwner(ServeConfig(bundle=bundle, state=str(state)), DetectorConfig())  # durable, fsync
    t_flush = []

    def timed_flush(flush=owner.detector.flush):  # the durable write's share of a step (wrapped for this bench)
        t0 = time.perf_counter()
        try:
            return flush()
        finally:
            t_flush.append(time.perf_counter() - t0)

    owner.detector.flush = timed_flush
    out = {}
    for b in batches:
        t_model, t_det = [], []
        t_flush.clear()
        cpu0 = time.thread_time()
        for rep in range(20):
            x = images[(rep * b) % (len(images) - b):][:b]
            t0 = time.perf_counter()
            with torch.no_grad():
                probs = model(torch.from_numpy(x)).softmax(1).numpy()
            t1 = time.perf_counter()
            owner.step(x, [Request(f"inproc{(rep + i) % 4}", None, 1) for i in range(b)], probs)
            t2 = time.perf_counter()
            t_model.append(t1 - t0)
            t_det.append(t2 - t1)
        cpu = (time.thread_time() - cpu0) / (20 * b)
        m, d = float(np.median(t_model)), float(np.median(t_det))
        out[b] = {"model_ms": 1000 * m, "detector_ms": 1000 * d, "write_ms": 1000 * float(np.median(t_flush)),
                  "images_per_s": b / (m + d), "detector_share": d / (m + d), "cpu_ms_per_image": 1000 * cpu}
    return out


def malformed_requests(keys: dict, images: np.ndarray, limit: int):
    """Request factory cycling through six kinds of bad request."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((images[0, 0] * 255).astype(np.uint8)).save(buf, "PNG")
    nan = images[:1].copy()
    nan[0, 0, 5, 5] = np.nan
    key = {"Authorization": f"Bearer {keys['mal']}"}
    kinds = [
        ("truncated png", {**key, "content-type": "image/png"}, buf.getvalue()[:60]),
        ("wrong dimensions", {**key, "content-type": NPY}, npy(np.zeros((1, 3, 32, 32)))),
        ("huge body", {**key, "content-type": NPY}, b"\x93NUMPY" + bytes(limit + 1024)),
        ("wrong content type", {**key, "content-type": "text/plain"}, b"hello"),
        ("NaN npy", {**key, "content-type": NPY}, npy(nan)),
        ("missing key", {"content-type": NPY}, npy(images[:1])),
    ]
    return kinds, (lambda i, k: kinds[(i + k) % len(kinds)][1:])


def malformed(url: str, keys: dict, images: np.ndarray, limit: int, clients: int, n: int) -> dict:
    """``n`` bad requests from ``clients`` loops: answers per kind, 5xx, replicas lost, health afterwards."""
    before = replicas()
    kinds, request = malformed_requests(keys, images, limit)
    rows = asyncio.run(closed_loop(url, clients, 3600, request, n))
    per_kind: dict[str, dict[str, int]] = {}
    for _, _, st, i, k in rows:  # client i's k-th request was kind (i + k) % 6
        tally = per_kind.setdefault(kinds[(i + k) % len(kinds)][0], {})
        tally[str(st)] = tally.get(str(st), 0) + 1
    return {"requests": len(rows), "per_kind": per_kind, "5xx": sum(r[2] >= 500 or r[2] == 0 for r in rows),
            "replicas_died": len(before - replicas()), "healthy_after": healthy(url)}


def healthy(url: str) -> bool:
    import httpx

    return httpx.get(f"{url}/healthz", timeout=60).status_code == 200


def replicas() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]}


def lost_updates(url: str, admin: str, acked: dict[str, int]) -> dict:
    """Acknowledged answers per user against what the state owner stores; lost = acknowledged, not stored."""
    import httpx

    stored = {u: httpx.get(f"{url}/v1/admin/users/{u}", headers={"Authorization": f"Bearer {admin}"},
                           timeout=120).json()["queries"] for u in acked}
    return {"acknowledged": sum(acked.values()), "stored": sum(stored.values()),
            "lost": sum(max(0, acked[u] - stored[u]) for u in acked)}


def benign_requests(keys: dict, images: np.ndarray, prefix: str):
    bodies = [npy(images[i : i + 1]) for i in range(len(images))]

    def request(i: int, k: int):
        return ({"Authorization": f"Bearer {keys[f'{prefix}{i}']}", "content-type": NPY},
                bodies[(i * 997 + k) % len(bodies)])
    return request


def acked_per_user(rows: list[tuple], prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, _, status, i, _ in rows:
        out[f"{prefix}{i}"] = out.get(f"{prefix}{i}", 0) + (status == 200)
    return out


def faults(url: str, cfg, keys: dict, images, clients: int, seconds: float) -> dict:
    """Load with the last state owner shard killed at 25% of ``seconds`` and a model replica at 60%."""
    import threading

    import ray

    from jobs.serve import kill_owner

    kills: dict[str, float] = {}

    def killer():
        time.sleep(0.25 * seconds)
        kills["state owner"] = time.monotonic()
        kill_owner(cfg, restart=True, shard=cfg.shards - 1)
        time.sleep(0.35 * seconds)
        name = sorted(n for n in replicas() if "DefendedModel" in n)[0]
        kills["model replica"] = time.monotonic()
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    t = threading.Thread(target=killer)
    t.start()
    rows = asyncio.run(closed_loop(url, clients, seconds, benign_requests(keys, images, "fault"), 10**6))
    t.join()
    t0 = min(r[0] for r in rows)
    recovery = {}
    for what, at in kills.items():
        after = [e for s, e, st, *_ in rows if s >= at and st == 200]
        recovery[what] = (min(after) - at) if after else None
    failed = {what: sum(st != 200 for s, e, st, *_ in rows if e >= at) for what, at in kills.items()}
    return {**summary(rows), "kills": {k: v - t0 for k, v in kills.items()}, "recovery_s": recovery,
            "failed_after": failed, "statuses": statuses(rows),
            "bad_5xx": sum(st >= 500 and st != 503 or st in (0, -503) for _, _, st, *_ in rows),
            "timeline": [(s - t0, e - t0, st) for s, e, st, *_ in rows],
            **lost_updates(url, keys["admin"], acked_per_user(rows, "fault"))}


def start(bundle: str, work: Path, keys: dict, name: str, port: int = 0, *, owner_timeout_s: float,
          shards: int = 1):
    """Serve hosting ``bundle`` (two model replicas of 0.25 CPU, the default detector, ``shards`` state owners)
    for ``keys`` (``admin`` is the admin); its state under ``work/<name>``. Returns the config and the URL."""
    from adv.serving import Limits, RateLimit, Scaling, ServeConfig
    from adv.serving.keys import hash_key
    from jobs.serve import deploy, free_port

    (work / "keys.yaml").write_text(json.dumps({"keys": [
        {"user": u, "sha256": hash_key(k), "role": "admin" if u == "admin" else "user"} for u, k in keys.items()]}))
    cfg = ServeConfig(bundle=bundle, keys=str(work / "keys.yaml"), keys_env="ADV_BENCH_NO_KEYS",
                      state=str(work / name), name=name, rate_limit=RateLimit(rate=10_000, burst=10_000),
                      limits=Limits(max_body_bytes=256 * 1024), owner_timeout_s=owner_timeout_s, shards=shards,
                      scaling=Scaling(min_replicas=2, max_replicas=2, max_batch_size=16, max_ongoing_requests=32))
    return cfg, deploy(cfg, "127.0.0.1", port or free_port(), access_log=False)


def decision_traffic(images: np.ndarray, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """The attack and benign requests the deployments must decide alike, in order: (user, one image)."""
    rng = np.random.default_rng(seed)
    target = images[-1:]
    out = []
    for k in range(60):  # an attack's walk: small steps around one image (what a query attack sends)
        step = np.clip(target + rng.normal(0, 0.02, target.shape), 0, 1).astype(np.float32)
        out += [("walker", step), (f"sybil{k % 6}", np.clip(step + 0.01, 0, 1))]
        out.append((f"benign{k % 5}", images[k : k + 1]))
        if k % 10 == 0:
            out.append(("fan", images[-2:-1]))  # a popular image, again and again
    return out


def decisions(url: str, keys: dict, traffic: list[tuple[str, np.ndarray]]) -> dict:
    """Send ``traffic`` one request at a time; every answer (status and body) and every account's counts."""
    import httpx

    answers = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for user, x in traffic:
            r = http.post("/v1/predict", content=npy(x),
                          headers={"Authorization": f"Bearer {keys[user]}", "content-type": NPY})
            answers.append([r.status_code, r.json()])
        admin = {"Authorization": f"Bearer {keys['admin']}"}
        users = sorted({u for u, _ in traffic})
        stats = {u: {k: v for k, v in http.get(f"/v1/admin/users/{u}", headers=admin).json().items()
                     if k != "first_flagged_at"} for u in users}  # each owner's own clock
    return {"answers": answers, "stats": stats, "suspicious": sum(s["suspicious"] for s in stats.values())}


def throughput(url: str, keys: dict, images, clients: list[int], seconds: float) -> dict:
    """Requests/s and latency at each concurrency, the load average, and the CPU seconds each process of this
    Ray session spent per answered request (a profile that depends far less on the other work on the machine
    than wall time does)."""
    out = {}
    for c in clients:
        log(f"throughput at {c} client(s), {seconds:.0f} s")
        before = cpu_by_process()
        rows = asyncio.run(closed_loop(url, c, seconds, benign_requests(keys, images, "tp"), 10**6))
        spent = {k: v - before.get(k, 0.0) for k, v in cpu_by_process().items()}
        r = out[c] = {**summary(rows), "load_average": os.getloadavg()[0]}
        r["cpu_ms_per_request"] = {k: 1000 * v / max(1, r["ok"]) for k, v in spent.items() if v > 0}
    return out


#: Process titles of this session's Ray processes, as the profile names them.
PROCESSES = {"ray::ProxyActor": "HTTP proxy", "DefendedModel": "model replicas (ingress)",
             "ray::StateOwner": "state owner", "ray::StateShard": "state shards", "ray::ServeController": "Serve "
             "controller", "raylet": "raylet", "gcs_server": "GCS"}


def cpu_by_process() -> dict[str, float]:
    """CPU seconds (user + system) so far of this process (the load generator) and its descendants (the local
    Ray cluster it started), by role; read from /proc, as py-spy or psutil would, without either."""
    tick, parent = os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent[int(pid)] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    mine, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        mine.append(pid)
        todo += [c for c, p in parent.items() if p == pid]
    out: dict[str, float] = {}
    for pid in mine:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            title = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0]
        except (OSError, IndexError):
            continue
        role = "load generator (this process)" if pid == os.getpid() else next(
            (name for key, name in PROCESSES.items() if key in title), "other Ray processes")
        out[role] = out.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", help="a defense bundle (default: lenet + DWT, see above)")
    p.add_argument("--classifier", default=str(ROOT / "runs" / "fm-lenet" / "model.pt"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    p.add_argument("--malformed", type=int, default=2000)
    p.add_argument("--load-seconds", type=float, default=30.0)
    p.add_argument("--fault-seconds", type=float, default=30.0)
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2], help="one deployment per value")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from jobs.common import local_ray_env

    local_ray_env()  # the jobs' defaults for a cluster this process starts (Serve's proxy start-up time too)
    import ray

    from adv.data import load_dataset
    from jobs.serve import undeploy

    t_start = time.time()
    work = ROOT / "runs" / "bench-serve"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    top = max(args.clients)
    traffic = decision_traffic(load_dataset("fashion-mnist", split="test", n=200, seed=2).tensors()[0].numpy())
    names = ["mal", "admin", "walker", "fan", *(f"sybil{i}" for i in range(6)), *(f"benign{i}" for i in range(5)),
             *(f"{p}{i}" for p in ("tp", "load", "fault") for i in range(top))]
    keys = {u: f"{u}-bench-key-{os.urandom(6).hex()}" for u in names}
    images = load_dataset("fashion-mnist", split="test", n=2000, seed=1).tensors()[0].numpy()
    bundle = make_bundle(args, work / "bundle")
    ray.init(address="local", num_cpus=4, num_gpus=0, object_store_memory=512 * 2**20, include_dashboard=False,
             log_to_driver=False)
    res: dict = {"in_process": in_process(bundle, images, sorted({min(c, 16) for c in args.clients}),
                                          work / "inproc"), "runs": {}}
    try:
        for n in args.shards:
            cfg, url = start(bundle, work, keys, f"bench{n}", args.port, owner_timeout_s=60.0, shards=n)
            log(f"{n} shard(s): serving at {url}")
            run = res["runs"][n] = {"config": cfg.model_dump(mode="json")}
            try:
                log(f"decisions: {len(traffic)} requests, one at a time")
                run["decisions"] = decisions(url, keys, traffic)
                run["throughput"] = throughput(url, keys, images, args.clients, args.seconds)
                if n == args.shards[0]:
                    log(f"{args.malformed} malformed requests")
                    run["malformed"] = malformed(url, keys, images, cfg.limits.max_body_bytes, top, args.malformed)
                    log(f"load: {top} clients, {args.load_seconds:.0f} s")
                    rows = asyncio.run(closed_loop(url, top, args.load_seconds,
                                                   benign_requests(keys, images, "load"), 10**7))
                    run["load"] = {**summary(rows), **lost_updates(url, keys["admin"], acked_per_user(rows, "load"))}
                if n == args.shards[-1]:
                    log(f"faults: {top} clients, {args.fault_seconds:.0f} s")
                    run["faults"] = faults(url, cfg, keys, images, top, args.fault_seconds)
            finally:
                undeploy(cfg)
    finally:
        ray.shutdown()
    res["minutes"] = (time.time() - t_start) / 60
    res["bundle"] = (f"`{args.bundle}` (--bundle)" if args.bundle else
                     f"lenet (`{os.path.relpath(args.classifier, ROOT)}`) behind a DWT stage")
    (work / "results.json").write_text(json.dumps(res, indent=1, default=str))
    docs = Path(args.docs)
    plot(res, docs / "benchmarks_serve.png")
    write_section(docs / "benchmarks.md", markdown(res, command_line("serve", argv)), "serve")
    log(f"done in {res['minutes']:.1f} min")
    return 0


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    inproc = res["in_process"]
    for (n, run), marker in zip(res["runs"].items(), "os^"):
        tp = run["throughput"]
        cs = sorted(tp, key=int)
        a.plot([int(c) for c in cs], [tp[c]["rps"] for c in cs], marker + "-", label=f"endpoint, {n} shard(s)")
    cs = sorted(next(iter(res["runs"].values()))["throughput"], key=int)
    a.plot([int(c) for c in cs], [inproc[min(int(c), 16)]["images_per_s"] for c in cs], "s--", color="gray",
           label="in-process (same batch)")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrent clients")
    a.set_ylabel("images/s (one image per request)")
    a.legend(fontsize=8, loc="upper left")
    a.set_title("throughput", fontsize=10)
    f = next(run["faults"] for run in res["runs"].values() if "faults" in run)
    tl = np.array(f["timeline"], dtype=float)
    bins = np.arange(0, tl[:, 1].max() + 1, 1.0)
    b.hist(tl[tl[:, 2] == 200, 1], bins=bins, color="tab:green", label="answered 200")
    b.hist(tl[tl[:, 2] != 200, 1], bins=bins, color="tab:red", label="failed")
    for what, at in f["kills"].items():
        b.axvline(at, color="k", ls="--")
        b.text(at, b.get_ylim()[1] * 0.9, f" {what} killed", fontsize=8)
    b.set_xlabel("seconds into the fault run")
    b.set_ylabel("requests completed per second")
    b.legend(fontsize=8, loc="lower right")
    b.set_title("faults under load", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def profile(res: dict) -> list[str]:
    """Where an answered request's CPU goes, per process, at the highest concurrency; and what that allows."""
    inproc, runs = res["in_process"], res["runs"]
    top = max(next(iter(runs.values()))["throughput"], key=int)
    ip = inproc[min(int(top), 16)]
    cost = {n: run["throughput"][top]["cpu_ms_per_request"] for n, run in runs.items()}
    roles = sorted({k for c in cost.values() for k in c}, key=lambda k: -max(c.get(k, 0) for c in cost.values()))
    lines = ["", f"**Profile** at {top} clients: CPU milliseconds per answered request, by process (from /proc: "
             "user + system time of this run's processes over the run, divided by the requests answered):", "",
             "| process | " + " | ".join(f"{n} shard(s)" for n in cost) + " |", "|---|" + "---|" * len(cost)]
    lines += [f"| {k} | " + " | ".join(f"{c.get(k, 0):.2f}" for c in cost.values()) + " |" for k in roles]
    total = {n: sum(c.values()) for n, c in cost.items()}
    lines += ["| **total** | " + " | ".join(f"**{t:.2f}**" for t in total.values()) + " |", ""]
    t1 = next(iter(total.values()))
    b = min(int(top), 16)
    first = next(iter(cost.values()))
    proxy, gen = first.get("HTTP proxy", 0.0), first.get("load generator (this process)", 0.0)
    ratio = ip["cpu_ms_per_image"] / t1
    lines.append(
        f"In-process at batch {b} (wall, under the same load): model {ip['model_ms']:.1f} ms, owner step "
        f"{ip['detector_ms']:.1f} ms of which the durable write (fsync) {ip['write_ms']:.1f} ms, per batch; CPU "
        f"{ip['cpu_ms_per_image']:.2f} ms per image. The endpoint spends {t1:.1f} ms of CPU per request (1 shard), "
        f"{t1 / ip['cpu_ms_per_image']:.1f}x the in-process CPU per image, so on equal cores it answers at most "
        f"**{ratio:.2f}** of in-process (CPU time moves less with the machine's load than wall time does, but it "
        f"moves: see docs/serving.md); with all {os.cpu_count()} cores to itself, at most "
        f"{1000 * os.cpu_count() / t1:.0f} requests/s. Serve's HTTP proxy ({proxy:.1f} ms) and the load generator "
        f"({gen:.1f} ms) alone cost {proxy + gen:.1f} ms per request, {(proxy + gen) / ip['cpu_ms_per_image']:.1f}x "
        "what the model and the detector cost per image in-process.")
    return lines


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def markdown(res: dict, command: str) -> str:
    from adv.serving.owner import COMPACT_EVERY as COMPACT

    inproc, runs = res["in_process"], res["runs"]
    lines = [BEGIN, "## Serve endpoint", "",
             f"`{command}` ({platform.machine()}, {os.cpu_count()} cores shared with other work, "
             f"{res['minutes']:.1f} min; Ray Serve 2.60 on an embedded local cluster: Serve's HTTP proxy, one "
             "ingress deployment `DefendedModel` of 2 replicas (0.25 CPU each: keys, decoding, the batched model, "
             "the owner call), the state owner(s); the load generator runs on the same cores, so every figure is "
             "measured under contention, with the 1-minute load average beside it). Each request carries one 28x28 "
             f"Fashion-MNIST test image; the defended model is the bundle, {res['bundle']}; every answer waits "
             "for the detector's durable (fsync'ed) update: one owner call per batch (admission plus detector "
             "update, group commit) with one shard, three parallel rounds (admit, lookup, commit) with several. "
             "In-process: the same model and detector (one owner, durable) called directly at the batch Serve can "
             "form.", "",
             "| shards | clients | requests/s | p50 ms | p99 ms | errors | load avg | in-process images/s "
             "| endpoint / in-process |", "|---|---|---|---|---|---|---|---|---|"]
    for n, run in runs.items():
        tp = run["throughput"]
        for c in sorted(tp, key=int):
            r, ip = tp[c], inproc[min(int(c), 16)]
            lines.append(f"| {n} | {c} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
                         f"{r['load_average']:.1f} | {ip['images_per_s']:.0f} | "
                         f"{r['rps'] / ip['images_per_s']:.2f} |")
    lines += profile(res)
    first, last = next(iter(runs.values())), list(runs.values())[-1]
    top = max(first["throughput"], key=int)
    ratio = first["throughput"][top]["rps"] / inproc[min(int(top), 16)]["images_per_s"]
    mid = first["throughput"].get(8) or first["throughput"].get("8")
    cpu_ratio = inproc[min(int(top), 16)]["cpu_ms_per_image"] / sum(
        first["throughput"][top]["cpu_ms_per_request"].values())
    lines += ["", "**Targets** (first deployment, " + f"{next(iter(runs))} shard(s)): endpoint / in-process at "
              f"{top} clients {ratio:.2f} in requests/s, {cpu_ratio:.2f} in CPU per image (target >= 0.7: "
              f"{_verdict(ratio >= 0.7)})"]
    if mid:
        lines[-1] += (f"; p99 at 8 clients {mid['p99_ms']:.0f} ms against 2x p50 = {2 * mid['p50_ms']:.0f} ms "
                      f"({_verdict(mid['p99_ms'] <= 2 * mid['p50_ms'])}).")
    ds = {n: run["decisions"] for n, run in runs.items()}
    if len(ds) > 1:
        (n0, d0), *rest = ds.items()
        same = all(d["answers"] == d0["answers"] and d["stats"] == d0["stats"] for _, d in rest)
        lines += ["", f"**Decisions:** {len(d0['answers'])} requests (a walk toward one image from one account, "
                  "the same walk rotated over six accounts, a popular image repeated, five benign users), one at a "
                  f"time, to each deployment: {d0['suspicious']} queries flagged; every answer and every account's "
                  f"counts with {', '.join(str(n) for n, _ in rest)} shards "
                  f"{'identical to' if same else '**different from**'} {n0} shard(s) (target identical: "
                  f"{_verdict(same)})."]
    m, ld = first["malformed"], first["load"]
    kinds = "; ".join(f"{kind}: " + ", ".join(f"{n}x {st}" for st, n in sorted(t.items()))
                      for kind, t in m["per_kind"].items())
    lines += ["", f"**Malformed requests:** {m['requests']} ({kinds}); **5xx or no answer: {m['5xx']}** "
              f"(target 0), replicas that died: {m['replicas_died']} (target 0), /healthz afterwards: "
              f"{'200' if m['healthy_after'] else 'failing'}.", "",
              f"**Load:** {ld['requests']} requests at the highest concurrency, "
              f"{ld['rps']:.1f}/s, p99 {ld['p99_ms']:.0f} ms, **errors {ld['errors']}** (target 0); acknowledged "
              f"{ld['acknowledged']}, stored {ld['stored']}, **lost {ld['lost']}** (target 0)."]
    f = last["faults"]
    rec = ", ".join(f"{k}: {'not recovered' if v is None else f'{v:.1f} s'}" for k, v in f["recovery_s"].items())
    shards = last["config"]["shards"]
    lines += ["", f"**Faults** ({shards} shard(s)): during {f['requests']} requests state owner shard {shards - 1} "
              f"was killed at {f['kills']['state owner']:.0f} s (Ray restarts it; it reloads snapshot + log) and "
              f"one of the two model replicas at {f['kills']['model replica']:.0f} s (Serve replaces it). "
              f"Answers: {', '.join(f'{n}x {st}' for st, n in sorted(f['statuses'].items()))}; **5xx other than "
              f"503 with Retry-After: {f['bad_5xx']}** (target 0); time to the first answer to a request sent "
              f"after each kill: {rec}; acknowledged {f['acknowledged']}, stored {f['stored']}, **lost "
              f"{f['lost']}** (target 0). Stored can exceed acknowledged: an update made durable whose answer "
              "never reached the client (at-least-once, never at-most-once). Every query's hashes live on every "
              "shard, so a shard's restart pauses every predict for that time (admin reads of the other shards' "
              f"users go on); an owner compacts its log into a snapshot every {COMPACT} updates.", "",
              "![serve benchmark](benchmarks_serve.png)", "", END]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
