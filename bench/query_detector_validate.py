"""Choosing the Blacklight index's chain limit on validation images (issue 25: benign retakes flagged).

    .venv/bin/python -m bench.query_detector_validate [--limits 2 3 4 5] [--n 20] [--benign 1000]

The two query-detector benchmarks report on Fashion-MNIST test images chosen
with seed 0 (``bench.query_detector``: 20 attacked + 1000 benign;
``bench.query_detector_noisy``: 30 + 1000). This script tunes on *other*
test images: every one of those is left out, and ``--n`` attacked plus
``--benign`` benign images are drawn (seed 1) from the rest. Per chain limit:

* benign *retakes* (each photo sent again ``copies`` times after a mild crop,
  mirror and brightness change, by random users) through the index alone,
  with 2 copies (the benchmarks' traffic) and 4 (a heavier retaker), ``--seeds`` streams each;
* Square, Square L2 and HopSkipJump rotated over 1000 accounts against the
  per-user layer plus the index (``bench.query_detector``'s Sybil rows);
* the noisy Sybil (Square, ±0.05 uniform noise per query, 150 accounts)
  against the default detector (``bench.query_detector_noisy``'s target row).

Writes the "## Query-attack detector: choosing the chain limit" section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from adv.evaluate.stats import pct
from bench.docs import command as command_line, logger, markers, write_section

BEGIN, END = markers("query_detector_validate")
log = logger("bench.query_detector_validate")
#: (attacked, benign) test images of the reporting benchmarks, drawn with seed 0: never used here.
REPORTED = ((20, 1000), (30, 1000))


def validation_images(n: int, benign: int, seed: int = 1):
    """Fashion-MNIST test images outside every reporting benchmark's draw: (attacked x, y, benign x)."""
    from adv.data import load_dataset
    from adv.data.base import subset_indices

    x, y = load_dataset("fashion-mnist", split="test").tensors()
    used = set().union(*(subset_indices(len(x), a + b, 0).tolist() for a, b in REPORTED))
    rest = np.array(sorted(set(range(len(x))) - used))
    pick = torch.from_numpy(np.random.default_rng(seed).choice(rest, n + benign, replace=False))
    return x[pick[:n]], y[pick[:n]], x[pick[n:]]


def benign_rows(clf, benign, limits, users: int, seeds: int) -> list[dict]:
    from adv.detectors import DetectorConfig, IndexConfig
    from adv.evaluate.query_detection import benign_traffic

    rows = []
    for limit in limits:
        config = DetectorConfig(per_user=None, features=None, index=IndexConfig(chain_limit=limit))
        for copies in (2, 4):
            runs = [benign_traffic(clf, config, benign, kind="retakes", users=users, copies=copies, seed=s)
                    for s in range(seeds)]
            rows.append({"limit": limit, "copies": copies, "queries": sum(r.queries for r in runs),
                         "users_flagged": max(r.users_flagged for r in runs),
                         "queries_flagged": float(np.mean([r.queries_flagged for r in runs]))})
            log(f"chain limit {limit}, retakes x{copies}: {rows[-1]}")
    return rows


def attack_rows(clf, x, y, limits, args) -> list[dict]:
    from adv.attacks import get_attack
    from adv.attacks.oracle import QueryOracle
    from adv.detectors import DetectorConfig, IndexConfig
    from adv.evaluate.query_detection import Transform, evaluate_query_detection
    from bench.query_detector import attacks

    rows = []
    for name, spec in attacks(args).items():
        attack = get_attack(name)
        params = {k: v for k, v in spec.items() if k not in ("attack", "eps")}
        base, _ = attack(QueryOracle(clf, output=attack.oracle), x, y, eps=spec["eps"], seed=0, **params)
        for limit in limits:
            config = DetectorConfig(features=None, index=IndexConfig(chain_limit=limit))
            r = evaluate_query_detection(clf, x, y, config=config, seed=0, accounts=1000, baseline=base, **spec)
            rows.append({"attacker": f"{name}, 1000 accounts", "detector": "per-user SSIM + index", "limit": limit,
                         **r.to_dict()})
            log(f"{name}, chain limit {limit}: detected {r.detection_rate:.2f}, success {r.true_success_with_layer}")
    spec = {"attack": "square", "eps": args.eps, "queries": args.noisy_queries}
    noisy = Transform(uniform=0.05)
    none = evaluate_query_detection(clf, x, y, config=DetectorConfig(per_user=None, index=None, features=None),
                                    seed=0, accounts=150, transform=noisy, **spec)
    for limit in limits:
        config = DetectorConfig(index=IndexConfig(chain_limit=limit))
        r = evaluate_query_detection(clf, x, y, config=config, seed=0, accounts=150, transform=noisy, **spec)
        rows.append({"attacker": "noisy Sybil (±0.05), 150 accounts", "detector": "default (all three)",
                     "limit": limit, "no_detector": none.true_success_with_layer, **r.to_dict()})
        log(f"noisy Sybil, chain limit {limit}: success {r.true_success_with_layer} (none "
            f"{none.true_success_with_layer})")
    return rows


def markdown(benign: list[dict], attacks: list[dict], args, command: str, info: str) -> str:
    lines = [BEGIN, "## Query-attack detector: choosing the chain limit (validation)", "",
             "Blacklight's rule (Li et al. 2022) flags a query as soon as it has one near-duplicate (chain limit 2). "
             "Benign *retakes* (a photo sent again after a mild crop, mirror and brightness change) are such "
             "near-duplicates: two retakes of one photo with the same crop and mirror share 27-45 of 50 hashes. "
             "A photo sent `v` times makes a chain of at most `v`; an attack walk makes one as long as the attack. "
             "This section picks the limit on validation images; the two sections above report on their own, "
             "disjoint images.", "",
             f"Produced by `{command}` ({info}). Images: Fashion-MNIST test, leaving out the images the reporting "
             f"benchmarks draw (seed 0: {', '.join(f'{a}+{b}' for a, b in REPORTED)}); {args.n} attacked and "
             f"{args.benign} benign drawn from the rest (seed 1). Retakes: {args.users} users, {args.seeds} "
             "seed(s) (users flagged: the worst seed).", "",
             "| chain limit | retakes per photo | queries | users flagged (worst seed) | queries flagged |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['limit']} | {r['copies']} | {r['queries']} | {r['users_flagged']:.0%} | "
              f"{100 * r['queries_flagged']:.2f}% |" for r in benign]
    lines += ["", "| attacker | detector | chain limit | attackers detected | median queries to detection | attack "
              "success, with detector | no detector |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in attacks:
        med = r["median_queries_to_detection"]
        base = r.get("no_detector", r["true_success_without_layer"])
        lines.append(f"| {r['attacker']} | {r['detector']} | {r['limit']} | {pct(r['detection_rate'], digits=0)} | "
                     f"{'–' if med is None else f'{med:.0f}'} | {pct(r['true_success_with_layer'], digits=0)} | "
                     f"{pct(base, digits=0)} |")
    return "\n".join(lines + ["", END])


def main(argv=None) -> int:
    from bench.defenses import classifier
    from bench.query_detector import traffic_parser

    p = traffic_parser(__doc__)
    p.add_argument("--limits", type=int, nargs="+", default=[2, 3, 4, 5])
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3, help="benign retake streams per setting")
    p.add_argument("--eps-l2", type=float, default=2.0)
    p.add_argument("--hsj-steps", type=int, default=10)
    p.add_argument("--hsj-evals", type=int, default=100)
    p.add_argument("--noisy-queries", type=int, default=500)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, load0 = time.time(), os.getloadavg()[0]
    clf, meta = classifier(args)
    x, y, benign = validation_images(args.n, args.benign)
    rows = benign_rows(clf, benign, args.limits, args.users, args.seeds)
    attack = attack_rows(clf, x, y, args.limits, args)
    info = (f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs (load average {load0:.1f} at the "
            f"start, {os.getloadavg()[0]:.1f} at the end); classifier `{args.classifier}` (test acc "
            f"{meta.get('metrics', {}).get('test_acc', '?')}); {(time.time() - t0) / 60:.1f} min")
    text = markdown(rows, attack, args, command_line("query_detector_validate", argv), info)
    write_section(Path(args.docs) / "benchmarks.md", text, "query_detector_validate")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
