"""The Serve endpoint (jobs.serve) under load, malformed input and faults; all traffic on 127.0.0.1.

    .venv/bin/python -m bench.serve [--bundle DIR] [--clients 1 8 32] [--seconds 15] [--malformed 10000]
                                    [--load-seconds 120] [--fault-seconds 40]

Without ``--bundle`` it serves Fashion-MNIST ``lenet`` (``runs/fm-lenet``)
behind a DWT stage (haar, BayesShrink) with the default query detector
(per-user layer + global index, ``deceive``), two model replicas of 0.25 CPU.

1. **Throughput and latency** at each ``--clients`` (closed loop, one image
   per request, ``--seconds`` each), against the same defended model and
   detector called in-process at the batch size Serve can form
   (min(clients, max_batch_size)); the detector's share of in-process time.
2. **Malformed requests**: ``--malformed`` of them (truncated PNGs, wrong
   dimensions, bodies over the limit, wrong content types, NaN ``.npy``,
   missing keys); counts 5xx answers and replicas that died.
3. **Load**: ``--load-seconds`` at the highest concurrency; errors, and
   acknowledged answers against the updates the state owner holds.
4. **Faults**: ``--fault-seconds`` of load; the state owner is killed (Ray
   restarts it), later a model replica (Serve replaces it). Failed requests,
   time to recover, acknowledged updates lost.

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
    from adv.bundle import accuracy_number, write_bundle
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
    ``(start, end, status, client, k)`` per request (the client's k-th; status 0: no answer)."""
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
                    status = (await http.post("/v1/predict", content=content, headers=headers)).status_code
                except httpx.HTTPError:
                    status = 0
                out.append((t0, time.monotonic(), status, i, k))
                k += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return out


def summary(rows: list[tuple]) -> dict:
    lat = np.array([e - s for s, e, *_ in rows])
    span = max(r[1] for r in rows) - min(r[0] for r in rows)
    ok = sum(r[2] == 200 for r in rows)
    return {"requests": len(rows), "ok": ok, "errors": len(rows) - ok, "rps": ok / span,
            "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99))}


def in_process(bundle: str, images: np.ndarray, batches: list[int], state: Path) -> dict:
    """The same defended model and detector without Serve: seconds per batch of each stage."""
    import torch

    from adv.bundle import load_bundle
    from adv.detectors import DetectorConfig
    from adv.serving import ServeConfig
    from adv.serving.owner import DetectorOwner

    torch.set_num_threads(1)  # what a replica gets
    model = load_bundle(bundle).build("cpu")
    owner = DetectorOwner(ServeConfig(bundle=bundle, state=str(state)), DetectorConfig())
    out = {}
    for b in batches:
        t_model, t_det = [], []
        for rep in range(20):
            x = images[(rep * b) % (len(images) - b):][:b]
            t0 = time.perf_counter()
            with torch.no_grad():
                probs = model(torch.from_numpy(x)).softmax(1).numpy()
            t1 = time.perf_counter()
            owner.observe(x, [f"inproc{rep % 4}"] * b, probs)
            t2 = time.perf_counter()
            t_model.append(t1 - t0)
            t_det.append(t2 - t1)
        m, d = float(np.median(t_model)), float(np.median(t_det))
        out[b] = {"model_ms": 1000 * m, "detector_ms": 1000 * d, "images_per_s": b / (m + d),
                  "detector_share": d / (m + d)}
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
    """Load with the owner killed at 25% of ``seconds`` and a model replica at 60%."""
    import threading

    import ray

    from jobs.serve import kill_owner

    kills: dict[str, float] = {}

    def killer():
        time.sleep(0.25 * seconds)
        kills["state owner"] = time.monotonic()
        kill_owner(cfg, restart=True)
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
            "failed_after": failed, "timeline": [(s - t0, e - t0, st) for s, e, st, *_ in rows],
            **lost_updates(url, keys["admin"], acked_per_user(rows, "fault"))}


def start(bundle: str, work: Path, keys: dict, name: str, port: int = 0, *, owner_timeout_s: float):
    """A local Ray with Serve hosting ``bundle`` (two model replicas of 0.25 CPU, the default detector) for
    ``keys`` (``admin`` is the admin); its state under ``work``. Returns the config and the URL."""
    import ray

    from adv.serving import Limits, RateLimit, Scaling, ServeConfig
    from adv.serving.keys import hash_key
    from jobs.serve import deploy, free_port

    (work / "keys.yaml").write_text(json.dumps({"keys": [
        {"user": u, "sha256": hash_key(k), "role": "admin" if u == "admin" else "user"} for u, k in keys.items()]}))
    cfg = ServeConfig(bundle=bundle, keys=str(work / "keys.yaml"), keys_env="ADV_BENCH_NO_KEYS",
                      state=str(work / "state"), name=name, rate_limit=RateLimit(rate=10_000, burst=10_000),
                      limits=Limits(max_body_bytes=256 * 1024), owner_timeout_s=owner_timeout_s,
                      scaling=Scaling(min_replicas=2, max_replicas=2, max_batch_size=16, max_ongoing_requests=32))
    ray.init(address="local", num_cpus=4, num_gpus=0, object_store_memory=512 * 2**20, include_dashboard=False,
             log_to_driver=False)
    return cfg, deploy(cfg, "127.0.0.1", port or free_port())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", help="a defense bundle (default: lenet + DWT, see above)")
    p.add_argument("--classifier", default=str(ROOT / "runs" / "fm-lenet" / "model.pt"))
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    p.add_argument("--malformed", type=int, default=10_000)
    p.add_argument("--load-seconds", type=float, default=120.0)
    p.add_argument("--fault-seconds", type=float, default=40.0)
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
    names = ["mal", "admin", *(f"{p}{i}" for p in ("tp", "load", "fault") for i in range(top))]
    keys = {u: f"{u}-bench-key-{os.urandom(6).hex()}" for u in names}
    images = load_dataset("fashion-mnist", split="test", n=2000, seed=1).tensors()[0].numpy()
    bundle = make_bundle(args, work / "bundle")
    cfg, url = start(bundle, work, keys, "bench", args.port, owner_timeout_s=60.0)
    log(f"serving at {url}")
    res: dict = {"config": cfg.model_dump(mode="json")}
    try:
        res["in_process"] = in_process(bundle, images, sorted({min(c, 16) for c in args.clients}), work / "inproc")
        res["throughput"] = {}
        for c in args.clients:
            log(f"throughput at {c} client(s), {args.seconds:.0f} s")
            rows = asyncio.run(closed_loop(url, c, args.seconds, benign_requests(keys, images, "tp"), 10**6))
            res["throughput"][c] = summary(rows)
        log(f"{args.malformed} malformed requests")
        res["malformed"] = malformed(url, keys, images, cfg.limits.max_body_bytes, top, args.malformed)
        log(f"load: {top} clients, {args.load_seconds:.0f} s")
        rows = asyncio.run(closed_loop(url, top, args.load_seconds, benign_requests(keys, images, "load"), 10**7))
        res["load"] = {**summary(rows), **lost_updates(url, keys["admin"], acked_per_user(rows, "load"))}
        log(f"faults: {top} clients, {args.fault_seconds:.0f} s")
        res["faults"] = faults(url, cfg, keys, images, top, args.fault_seconds)
    finally:
        undeploy(cfg)
        ray.shutdown()
    res["minutes"] = (time.time() - t_start) / 60
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
    tp = res["throughput"]
    cs = sorted(tp, key=int)
    a.plot([int(c) for c in cs], [tp[c]["rps"] for c in cs], "o-", label="endpoint, requests/s")
    inproc = res["in_process"]
    a.plot([int(c) for c in cs], [inproc[min(int(c), 16)]["images_per_s"] for c in cs], "s--", color="gray",
           label="in-process, images/s (same batch)")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("concurrent clients")
    a2 = a.twinx()
    a2.plot([int(c) for c in cs], [tp[c]["p99_ms"] for c in cs], "^:", color="tab:red", label="endpoint p99 (ms)")
    a2.set_ylabel("p99 latency (ms)", color="tab:red")
    a.legend(fontsize=8, loc="upper left")
    a.set_title("throughput and tail latency (one image per request)", fontsize=10)
    f = res["faults"]
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


def markdown(res: dict, command: str) -> str:
    from adv.serving.owner import COMPACT_EVERY as COMPACT

    tp, inproc = res["throughput"], res["in_process"]
    lines = [BEGIN, "## Serve endpoint", "",
             f"`{command}` ({platform.machine()}, {os.cpu_count()} cores shared with other work, "
             f"{res['minutes']:.1f} min; Ray Serve 2.60 on an embedded local cluster, 2 model replicas of 0.25 CPU, "
             "one gateway, one state owner; the load generator runs on the same 2 cores). Each request carries "
             "one 28x28 Fashion-MNIST test image; the defended model is the bundle's stages plus lenet, and every "
             "answer waits for the detector's durable (fsync'ed) update.", "",
             "| clients | requests/s | p50 ms | p99 ms | errors | in-process images/s at batch min(clients,16) "
             "| endpoint / in-process | detector share of in-process time |", "|---|---|---|---|---|---|---|---|"]
    for c in sorted(tp, key=int):
        r, ip = tp[c], inproc[min(int(c), 16)]
        lines.append(f"| {c} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} | "
                     f"{ip['images_per_s']:.0f} | {r['rps'] / ip['images_per_s']:.2f} | {ip['detector_share']:.0%} |")
    m, ld, f = res["malformed"], res["load"], res["faults"]
    rec = ", ".join(f"{k}: {'not recovered' if v is None else f'{v:.1f} s'}" for k, v in f["recovery_s"].items())
    kinds = "; ".join(f"{kind}: " + ", ".join(f"{n}x {st}" for st, n in sorted(t.items()))
                      for kind, t in m["per_kind"].items())
    lines += ["", f"**Malformed requests:** {m['requests']} ({kinds}); **5xx or no answer: {m['5xx']}** "
              f"(target 0), replicas that died: {m['replicas_died']} (target 0), /healthz afterwards: "
              f"{'200' if m['healthy_after'] else 'failing'}.", "",
              f"**Load:** {ld['requests']} requests at the highest concurrency, "
              f"{ld['rps']:.1f}/s, p99 {ld['p99_ms']:.0f} ms, **errors {ld['errors']}** (target 0); acknowledged "
              f"{ld['acknowledged']}, stored {ld['stored']}, **lost {ld['lost']}** (target 0).", "",
              f"**Faults:** during {f['requests']} requests the state owner was killed at {f['kills']['state owner']:.0f} s "
              f"(Ray restarts it; it reloads snapshot + log) and one of the two model replicas at "
              f"{f['kills']['model replica']:.0f} s (Serve replaces it). Failed requests: {f['errors']}; time to the "
              f"first answer to a request sent after each kill: {rec}; acknowledged {f['acknowledged']}, stored "
              f"{f['stored']}, **lost {f['lost']}** (target 0). Stored can exceed acknowledged: an update made "
              "durable whose answer never reached the client (at-least-once, never at-most-once). A gap in "
              "the timeline without a kill is the owner compacting its log into a snapshot (every "
              f"{COMPACT} updates; the default index has 100,000 slots), which blocks the single-threaded "
              "owner for a few seconds on a loaded machine; restarting the owner costs a process start plus "
              "loading the snapshot and replaying the log.", "",
              "![serve benchmark](benchmarks_serve.png)", "", END]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
