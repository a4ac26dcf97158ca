"""Query-attack detectors on Fashion-MNIST with ``lenet``: the per-user layer (Echeberria-Barrio et al. 2020
§4.3), the global fingerprint index (Li et al. 2022, Blacklight) and both combined (``QueryDetector``).

    .venv/bin/python -m bench.query_detector [--n 20] [--queries 1000] [--benign 1000]

For Square (score-based, L∞ and L2) and HopSkipJump (decision-based, L2), each
attacked image is one attacker whose queries pass through the detector
(``action: deceive``); the same attack (same seed) runs once without it:

* **per-user metrics** (one account per attacker): SSIM, PSNR and MSE;
* **Sybil sweep**: 1, 10, 100 and 1000 accounts, per-user SSIM layer, index, combined;
* **adaptive attackers** against the combined detector, 1000 accounts: random
  transforms of each query (Feng et al. 2023), and one query per 1.5 days
  (past both detectors' one-day expiry);
* **benign traffic** (distinct images, retakes, a popular image) per detector;
* **latency** of ``observe`` at 10⁴ and 10⁵ stored queries over 1000 users
  (28x28 gray, 32x32 colour, 224x224x3), and the per-user SSIM layer's
  latency against one user's history.

Writes ``docs/benchmarks_query_detector.png`` and the "## Query-attack
detector" section of ``docs/benchmarks.md`` with the command used.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench.docs import command as command_line, logger, markers, write_section

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = markers("query_detector")
ACCOUNTS = (1, 10, 100, 1000)


log = logger("bench.query_detector")


def attacks(args) -> dict[str, dict]:
    return {
        "square": {"attack": "square", "eps": args.eps, "queries": args.queries},
        "square_l2": {"attack": "square_l2", "eps": args.eps_l2, "queries": args.queries},
        "hopskipjump": {"attack": "hopskipjump", "eps": args.eps_l2, "norm": "l2", "steps": args.hsj_steps,
                        "max_evals": args.hsj_evals, "init_evals": args.hsj_evals},
    }


def detectors() -> dict:
    from adv.detectors import DetectorConfig, SimilarityConfig

    # the Blacklight index alone, without the feature index (bench.query_detector_noisy measures that one)
    return {"per-user": SimilarityConfig(metric="ssim"), "index": DetectorConfig(per_user=None, features=None),
            "combined": DetectorConfig(features=None)}


def runs(args):
    """(label, detector, per-user metric, accounts, extra evaluate_query_detection kwargs) of every attack row."""
    from adv.evaluate.query_detection import Transform

    top = max(ACCOUNTS)
    out = [("metric", "per-user", m, 1, {}) for m in ("ssim", "psnr", "mse")]
    out += [("sybil", "per-user", "ssim", a, {}) for a in ACCOUNTS if a > 1]
    out += [("sybil", "index", None, a, {}) for a in (1, top)]
    out += [("sybil", "combined", "ssim", a, {}) for a in ACCOUNTS]
    out += [("adaptive", "combined", "ssim", top, {"transform": t}) for t in (
        Transform(shift=1, brightness=0.05), Transform(shift=1, brightness=0.05, noise=0.05))]
    out.append(("adaptive", "combined", "ssim", top, {"interval": 1.5 * 86_400}))
    return out


def attack_rows(clf, xa, ya, benign, args) -> list[dict]:
    from adv.attacks import get_attack
    from adv.attacks.oracle import QueryOracle
    from adv.detectors import SimilarityConfig
    from adv.evaluate.query_detection import evaluate_query_detection

    rows, configs = [], detectors()
    for name, spec in attacks(args).items():
        attack = get_attack(name)
        params = {k: v for k, v in spec.items() if k not in ("attack", "eps")}
        baseline, _ = attack(QueryOracle(clf, output=attack.oracle), xa, ya, eps=spec["eps"], seed=0, **params)
        first = None
        if "queries" in params:  # what the attack's first query alone achieves: no stateful detector can stop it
            x1, _ = attack(QueryOracle(clf, output=attack.oracle), xa, ya, eps=spec["eps"], seed=0,
                           **{**params, "queries": 1})
            with torch.no_grad():
                correct = clf(xa).argmax(1) == ya
                first = float(((clf(x1).argmax(1) != ya) & correct).sum() / correct.sum())
        for label, det, metric, accounts, extra in runs(args):
            config = SimilarityConfig(metric=metric) if label == "metric" else configs[det]
            fp = accounts == 1 and label != "adaptive"
            log(f"{name}: {det}, {metric}, {accounts} account(s) {', '.join(map(str, extra.values()))}")
            r = evaluate_query_detection(clf, xa, ya, config=config, seed=0, accounts=accounts, baseline=baseline,
                                         benign=benign if fp else None, benign_users=args.benign_users,
                                         **extra, **spec)
            rows.append({"sweep": label, "metric": metric, "kind": det, "first_query_success": first, **r.to_dict()})
    return rows


def benign_rows(clf, benign, args) -> list[dict]:
    from adv.evaluate.query_detection import BENIGN_KINDS, benign_traffic

    rows = []
    for det, config in detectors().items():
        for kind in BENIGN_KINDS:
            log(f"benign {kind} traffic, {det}")
            rows.append(benign_traffic(clf, config, benign, kind=kind, users=args.benign_users, seed=0).to_dict())
    return rows


def traffic_parser(doc: str) -> argparse.ArgumentParser:
    """The options every query-detector benchmark shares: attacked and benign images, Square's budget."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--n", type=int, default=20, help="attacked test images (one attacker each)")
    p.add_argument("--benign", type=int, default=1000, help="benign test images (distinct from the attacked ones)")
    p.add_argument("--benign-users", type=int, default=100)
    p.add_argument("--eps", type=float, default=0.1, help="Square's L-inf budget")
    p.add_argument("--queries", type=int, default=1000, help="Square's query budget")
    p.add_argument("--latency-reps", type=int, default=100, help="timed observe calls per latency point")
    p.add_argument("--classifier", default=str(ROOT / "runs" / "fm-lenet" / "model.pt"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--docs", default=str(ROOT / "docs"))
    return p


def main(argv=None) -> int:
    from adv.data import load_dataset
    from bench.defenses import classifier
    from bench.query_latency import detector_latency, per_user_latency

    p = traffic_parser(__doc__)
    p.add_argument("--eps-l2", type=float, default=2.0, help="Square L2's and HopSkipJump's L2 budget")
    p.add_argument("--hsj-steps", type=int, default=10)
    p.add_argument("--hsj-evals", type=int, default=100, help="HopSkipJump gradient-estimation queries per step")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load0 = time.time(), os.getloadavg()[0]
    clf, meta = classifier(args)
    test = load_dataset("fashion-mnist", split="test", n=args.n + args.benign, seed=0)
    x, y = test.tensors()
    xa, ya, benign = x[: args.n], y[: args.n], x[args.n :]
    rows = attack_rows(clf, xa, ya, benign, args)
    benign_table = benign_rows(clf, benign, args)
    latency = detector_latency(reps=args.latency_reps, log=log)
    per_user = per_user_latency(reps=max(args.latency_reps // 2, 10), log=log)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    from bench.query_detector_docs import markdown, plot

    plot(rows, latency, per_user, docs / "benchmarks_query_detector.png")
    info = (f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average {load0:.1f} at the "
            f"start, {os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}, {args.threads} thread(s); "
            f"{(time.time() - t0) / 60:.1f} min")
    write_section(docs / "benchmarks.md", markdown(rows, benign_table, latency, per_user, args,
                                                   command_line("query_detector", argv), info, meta), "query_detector")
    return 0


if __name__ == "__main__":
    sys.exit(main())
