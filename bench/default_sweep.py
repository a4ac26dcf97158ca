"""What `make main`'s sweep selected and serves, checked against the issue's targets, on a finished run.

    .venv/bin/python -m bench.default_sweep [--run runs/tune/default] [--main-log main.err] [--suite-n 200]

Reads the finished sweep (``runs/tune/default``: ``trials.json``, ``timings.json``,
each training trial's Tune ``result.json`` for its CPU seconds, and the bundle's
manifest), then runs the standard suite (AutoAttack's APGD-CE, APGD-T, FAB-T,
Square; ``adv eval --bundle``) on the first ``--suite-n`` images of the bundle's
test subset. Targets (served bundle, Fashion-MNIST test subset, ε = 0.1 L∞):
adaptive robust accuracy (worst case of the sweep's grid, APGD-CE included)
>= 60% with clean accuracy >= 80%; the suite's number within 0.5 point of the
grid's on the same images (or explained). ``--main-log`` (the ``[main]`` lines of
a ``make main`` run) adds its stage times. Prints a JSON line and rewrites its
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path

from adv.evaluate.stats import pct
from adv.evaluate.tables import markdown_table
from bench.docs import command as command_line, markers, write_section

ROOT = Path(__file__).resolve().parents[1]


def training_cpu(run: Path) -> dict[str, float]:
    """Each training trial's CPU seconds at its last report (its ``result.json`` lines)."""
    out = {}
    for result in sorted((run / "training").glob("trial_*/result.json")):
        lines = [json.loads(x) for x in result.read_text().splitlines() if x.strip()]
        if lines:
            out[lines[-1].get("trial_id", result.parent.name)] = float(lines[-1].get("cpu_seconds", float("nan")))
    return out


def suite(bundle: Path, n: int, *extra: str) -> dict:
    """``adv eval --bundle B --n N --json`` (the standard suite by default) in-process: its JSON line."""
    from adv.cli import main as adv_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = adv_main(["eval", "--bundle", str(bundle), "--n", str(n), "--json", "--quiet", *extra])
    if rc != 0:
        raise SystemExit(f"adv eval --bundle {bundle} failed ({rc})")
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def main_stages(log: Path | None) -> list[tuple[str, int]]:
    """``(what, seconds since start)`` from the ``[main] ... N s`` lines of a make-main log."""
    if log is None or not log.is_file():
        return []
    out = []
    for line in log.read_text().splitlines():
        m = re.match(r"\[main\] (.*?)(?: after| at| in)? (\d+) s\b", line)
        if m and line.startswith("[main]"):
            out.append((line[len("[main] "):][:110], int(m.group(2))))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.default_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=str(ROOT / "runs/tune/default"))
    parser.add_argument("--main-log", help="stderr of the make-main run (its [main] lines give the stage times)")
    parser.add_argument("--suite-n", type=int, default=200)
    parser.add_argument("--doc", default=str(ROOT / "docs/benchmarks.md"))
    args = parser.parse_args(argv)
    run = Path(args.run)
    manifest = json.loads((run / "best/manifest.json").read_text())
    trials = json.loads((run / "trials.json").read_text())
    timings = json.loads((run / "timings.json").read_text())
    s = suite(run / "best", args.suite_n)
    grid = suite(run / "best", args.suite_n, *sum((["--attack", a.split(" ")[0]] for a in
                                                   manifest["evaluation"]["attacks"]), []), "--steps", "25")
    result = {"numbers": manifest["numbers"], "provenance": manifest["provenance"], "trials": trials,
              "timings": timings, "cpu": training_cpu(run), "suite": s, "grid_on_suite_images": grid,
              "stages": main_stages(Path(args.main_log) if args.main_log else None)}
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}, default=str))
    write_section(Path(args.doc), section(result, command_line("default_sweep", argv)), "default_sweep")
    return 0


def _pct(num: dict) -> str:
    lo, hi = num["ci95"]
    return f"{pct(num['value'])} [{pct(lo)}, {pct(hi)}]"


def _trial_row(t: dict, cpu: float | None) -> list[str]:
    num = lambda k: (t.get("recheck") or {}).get(k) or t["numbers"].get(k)  # noqa: E731
    label = t["candidate"].get("loss") or " + ".join(t["candidate"]["stages"])
    return [t["trial_id"], f"`{label}`", f"{t['resource']:g}", _pct(num("clean")) if num("clean") else "–",
            _pct(num("adaptive")) if num("adaptive") else "–", t["status"], f"{cpu:.0f}" if cpu else "–"]


def section(r: dict, cmd: str) -> str:
    begin, end = markers("default_sweep")
    nums, prov, s, g = r["numbers"], r["provenance"], r["suite"], r["grid_on_suite_images"]
    ok_robust = nums["adaptive"]["value"] >= 0.60 and nums["clean"]["value"] >= 0.80
    lines = [begin, "## Default sweep: training-time defenses (bench/default_sweep.py)", "",
             f"`make main`'s sweep (`jobs/configs/tune-default.yaml`) selected "
             f"**`{prov['candidate'].get('loss') or ' + '.join(prov['candidate']['stages'])}`** "
             f"({prov.get('kind')} trial {prov.get('trial')}). Its bundle's numbers on the test subset "
             f"({nums['clean']['subset']}), ε = 0.1 L∞, worst case of the grid (FGSM, PGD-10, APGD-CE 25 steps):",
             "", *markdown_table(["", "clean", "non-adaptive", "adaptive"],
                                 [["selected bundle", _pct(nums["clean"]), _pct(nums["non_adaptive"]),
                                   f"**{_pct(nums['adaptive'])}**"]]), "",
             f"Target adaptive >= 60% with clean >= 80%: **{'met' if ok_robust else 'missed'}**.", "",
             f"Standard suite (APGD-CE, APGD-T, FAB-T, Square) on the first {s['n']} images of the test subset: "
             f"robust {s['robust_acc']:.1%} (clean {s['clean_acc']:.1%}); the sweep's grid attacks on the same images "
             f"as one worst-case sequence (FGSM, PGD, APGD-CE; `adv eval --steps 25` gives PGD 25 steps, not the "
             f"grid's 10, so this is at most the grid's number): {g['robust_acc']:.1%}. "
             "Target suite <= grid + 0.5 point: "
             f"**{'met' if s['robust_acc'] <= g['robust_acc'] + 0.005 else 'missed'}** "
             f"(the suite finds {100 * (g['robust_acc'] - s['robust_acc']):.1f} points more).", "",
             "Every trial (validation subset; CPU seconds: the trial process's CPU time, "
             "what one idle core takes):", "",
             *markdown_table(["trial", "configuration", "epochs", "clean", "adaptive", "status", "CPU s"],
                             [_trial_row(t, r["cpu"].get(t["trial_id"])) for t in r["trials"]])]
    lines += ["", "Sweep phases (wall seconds, this run): "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["timings"].items())]
    if r["stages"]:
        lines += ["", "`make main` stages (seconds since start): " + "; ".join(f"{w}" for w, _ in r["stages"])]
    lines += ["", "```", cmd, "```", end]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
