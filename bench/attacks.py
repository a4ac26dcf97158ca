"""Attack throughput (images/s) against a bare PyTorch PGD loop, and early exit vs full PGD.

    .venv/bin/python -m bench.attacks [--n 1000] [--batch-size 250] [--threads 1] [--repeats 3]

* **Throughput**: FGSM, PGD-10, PGD-40, DeepFool, CW and APGD on the
  advertorch LeNet5 (MNIST), next to the *physical reference*: the shortest
  PGD loop PyTorch allows (``bare_pgd`` below), and torchattacks' PGD when it
  is installed. ``adv``'s PGD and the bare loop run alternately, ``--repeats``
  times, and the medians are compared (target: adv >= 0.95x bare).
* **Early exit**: the worst-case evaluation ``robust_accuracy([fgsm, pgd-40])``
  (each attack only on points still standing, PGD stopping on an example once
  it is fooled) vs full PGD-40 on every point, on the undefended model
  (target: >= 3x faster at a robust accuracy no higher).
* **Fast paths**: PGD-10 through ``fast_model`` with channels_last and bf16
  autocast. They exist for accelerators; on a CPU they are measured only to
  show the path runs (no speed claim).

Writes ``docs/benchmarks_attacks.png`` and the "## Attacks" section of
``docs/benchmarks.md`` (between markers), with the command that produced it.
Without ../shared/data it falls back to random weights and random images.

``--suite`` runs only the **standard-suite comparison** and rewrites its own
section ("## The standard suite against the original AutoAttack"):

    .venv/bin/python -m bench.attacks --suite [--suite-n 500,200] [--threads 1,2]

adv's ``suite="standard"`` against the original AutoAttack code (the
``pyautoattack`` package, the ``bench`` extra: APGD-CE, APGD-T, FAB-T with 100
iterations, Square 5000) on the published Madry LeNet5 (MNIST, eps 0.3, the
first n test images) and the shared CIFAR-10 ResNet-20 (eps 8/255): robust
accuracy of both, process CPU seconds of both, their ratio and the images where
they disagree; torchattacks' AutoAttack beside them when installed. ``--threads 1,2``
runs each implementation at each thread count (rows "..., 2 threads"); every
stored image count of a case is listed with adv's CPU seconds per image, which
shows whether time grows linearly with the standing images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from adv.evaluate.stats import accuracy_ci, fmt_ci
from bench.docs import command as command_line, markers, write_section
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADV_SHARED_DIR", ROOT.parent / "shared")) / "data"
BEGIN, END = markers("attacks")


def bare_pgd(model, x, y, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """The reference: random start, sign step, clamp to the ball and [0, 1]; nothing else."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv


def load(n: int):
    from adv.models import create_model, load_external

    weights = SHARED / "models" / "mnist_lenet5_clntrained.pt"
    if weights.is_file():
        from adv.data import load_dataset

        x, y = load_dataset("mnist", split="test", root=str(SHARED / "mnist")).tensors()
        return load_external("lenet5", weights), x[:n], y[:n], "advertorch LeNet5 (clean), MNIST test"
    g = torch.Generator().manual_seed(0)
    return (create_model("lenet5").eval(), torch.rand(n, 1, 28, 28, generator=g),
            torch.randint(0, 10, (n,), generator=g), "random LeNet5, random images (shared data absent)")


def timed(fn) -> tuple[float, object]:
    """Seconds of this process's CPU time (with one thread: the work done, whatever else the machine
    runs; a shared machine makes wall time too noisy for a 5% comparison) and the result."""
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def in_batches(fn, x, y, bs):
    return torch.cat([fn(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)])


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def throughput(model, x, y, args) -> list[dict]:
    from adv.attacks import get_attack

    for p in model.parameters():  # the bare loop gets frozen weights too, as adv's attacks do
        p.requires_grad_(False)
    rows = []
    for steps in (10, 40):
        ours, bare = [], []

        def run_ours(r=0):
            return timed(lambda: in_batches(lambda a, b: get_attack("pgd")(
                model, a, b, eps=0.3, steps=steps, step_size=0.01, seed=r), x, y, args.batch_size))[0]

        def run_bare():
            return timed(lambda: in_batches(lambda a, b: bare_pgd(model, a, b, 0.3, 0.01, steps),
                                            x, y, args.batch_size))[0]

        run_ours(), run_bare()  # warm-up: first calls pay for kernel selection and allocation
        for r in range(args.repeats):  # alternate the order, so drifts hit both sides
            if r % 2:
                bare.append(run_bare())
                ours.append(run_ours(r))
            else:
                ours.append(run_ours(r))
                bare.append(run_bare())
        rows.append(row(f"PGD-{steps}", len(x), ours, ratio=statistics.median(bare) / statistics.median(ours)))
        rows.append(row(f"bare PyTorch PGD-{steps}", len(x), bare))
    rows.append(torchattacks_row(model, x, y, args))
    slow = x[: args.n_slow], y[: args.n_slow]
    for label, name, kw, data in [("FGSM", "fgsm", {"eps": 0.3}, (x, y)),
                                  ("DeepFool (L2, 50 steps, top-10)", "deepfool", {"norm": "l2"}, slow),
                                  ("CW-L2 (100 steps x 6 searches)", "cw", {"norm": "l2"}, slow),
                                  ("APGD-CE (100 steps)", "apgd", {"eps": 0.3, "seed": 0}, slow)]:
        secs = [timed(lambda: in_batches(lambda a, b: get_attack(name)(model, a, b, **kw), *data,
                                         args.batch_size))[0] for _ in range(args.repeats if name == "fgsm" else 1)]
        rows.append(row(label, len(data[0]), secs))
    return rows


def torchattacks_row(model, x, y, args) -> dict:
    try:
        import torchattacks
    except ImportError:
        return {"attack": "torchattacks PGD-40", "n": len(x), "images_per_s": None, "note": "not installed"}
    atk = torchattacks.PGD(model, eps=0.3, alpha=0.01, steps=40, random_start=True)
    secs = [timed(lambda: in_batches(atk, x, y, args.batch_size))[0] for _ in range(args.repeats)]
    return row("torchattacks PGD-40", len(x), secs)


def row(label, n, secs, **extra) -> dict:
    med = statistics.median(secs)
    return {"attack": label, "n": n, "cpu_seconds": round(med, 3), "images_per_s": round(n / med, 1),
            "runs": len(secs), **{k: round(v, 3) for k, v in extra.items()}}


def early_exit(model, x, y, args) -> dict:
    from adv.attacks import get_attack
    from adv.evaluate import robust_accuracy

    pgd40 = ("pgd", {"steps": 40, "step_size": 0.01})
    t_full, x_adv = timed(lambda: in_batches(lambda a, b: get_attack("pgd")(
        model, a, b, eps=0.3, steps=40, step_size=0.01, seed=0), x, y, args.batch_size))
    t_exit, res = timed(lambda: robust_accuracy(model, (x, y), ["fgsm", pgd40], eps=0.3,
                                                batch_size=args.batch_size, progress=False))
    return {"full_pgd40_s": round(t_full, 2), "full_pgd40_robust_acc": accuracy(model, x_adv, y),
            "early_exit_s": round(t_exit, 2), "early_exit_robust_acc": res.robust_acc,
            "speedup": round(t_full / t_exit, 2), "n": len(x)}


def fast_paths(model, x, y, args) -> list[dict]:
    from adv.attacks import get_attack
    from adv.evaluate import fast_model

    out = []
    for label, net in [("PGD-10 fp32", model), ("PGD-10 channels_last", fast_model(model, channels_last=True)),
                       ("PGD-10 bf16 autocast", fast_model(model, amp="bf16"))]:
        secs, x_adv = timed(lambda: in_batches(lambda a, b: get_attack("pgd")(
            net, a, b, eps=0.3, steps=10, step_size=0.03, seed=0), x, y, args.batch_size))
        out.append({**row(label, len(x), [secs]), "robust_acc": accuracy(model, x_adv, y)})
    return out


def figure(rows, exit_row, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["images_per_s"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    colors = ["tab:gray" if "bare" in r["attack"] or "torchattacks" in r["attack"] else "tab:blue" for r in shown]
    a.barh([r["attack"] for r in shown], [r["images_per_s"] for r in shown], color=colors)
    a.set_xscale("log")
    a.set_xlabel("images / CPU second (log)")
    a.invert_yaxis()
    a.set_title("attack throughput (grey: references)")
    b.bar(["full PGD-40", "early exit"], [exit_row["full_pgd40_s"], exit_row["early_exit_s"]],
          color=["tab:gray", "tab:blue"])
    b.set_ylabel("CPU seconds")
    b.set_title(f"worst case, {exit_row['speedup']}x faster")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows, exit_row, fast, info, command) -> str:
    lines = [BEGIN, "## Attacks", "", f"Produced by `{command}` on {info}.", "",
             "![attack throughput](benchmarks_attacks.png)", "",
             "Times are medians of this process's CPU seconds (one intra-op thread), so other jobs on the",
             "machine do not distort the comparison; images/s = images / CPU second.", "",
             "| attack | images | CPU s (median) | images/s | vs bare loop |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        ips = "n/a (" + r.get("note", "") + ")" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}"
        lines.append(f"| {r['attack']} | {r['n']} | {r.get('cpu_seconds', '')} | {ips} | "
                     f"{str(r['ratio']) + 'x' if 'ratio' in r else ''} |")
    e = exit_row
    pgd = [r["ratio"] for r in rows if "ratio" in r]
    exit_met = e["speedup"] >= 3 and e["early_exit_robust_acc"] <= e["full_pgd40_robust_acc"]
    lines += ["", f"Target PGD >= 0.95x the bare loop: {'met' if min(pgd) >= 0.95 else 'missed'} "
              f"({', '.join(f'{v}x' for v in pgd)}). Target early exit >= 3x faster at robust accuracy no "
              f"higher: {'met' if exit_met else 'missed'}."]
    def acc(v: float, n: int) -> str:  # with its 95% Wilson interval
        return fmt_ci(v, accuracy_ci(round(v * n), n))

    lines += ["", "Worst-case evaluation on the undefended model, eps 0.3 (L∞), accuracies with 95% intervals:", "",
              "| run | CPU s | robust accuracy |", "|---|---:|---:|",
              f"| full PGD-40 on all {e['n']} points | {e['full_pgd40_s']} "
              f"| {acc(e['full_pgd40_robust_acc'], e['n'])} |",
              f"| `robust_accuracy([fgsm, pgd-40])`, early exit | {e['early_exit_s']} | "
              f"{acc(e['early_exit_robust_acc'], e['n'])} |", "", f"Speed-up: **{e['speedup']}x**.", "",
              "Fast paths (CPU here: they exist for accelerators, no speed claim):", "",
              "| path | CPU s | robust accuracy |", "|---|---:|---:|"]
    lines += [f"| {f['attack']} | {f['cpu_seconds']} | {acc(f['robust_acc'], f['n'])} |" for f in fast]
    return "\n".join(lines + ["", END])


SUITE_BEGIN, SUITE_END = markers("attacks_suite")


def suite_cases(ns: list[int]):
    """(label, model, x, y, eps) of the suite comparison: the published Madry LeNet5 and the CIFAR ResNet-20."""
    from adv.data import load_dataset
    from adv.models import load_external

    models = SHARED / "models"
    mnist = load_dataset("mnist", split="test", root=str(SHARED / "mnist")).tensors()
    cifar = load_dataset("cifar10", split="test", root=str(SHARED / "cifar10")).tensors()
    return [("Madry LeNet5 (advertorch), MNIST, eps 0.3",
             load_external("lenet5", str(models / "mnist_lenet5_advtrained.pt")).eval(), *mnist, 0.3, ns[0]),
            ("ResNet-20 (akamaster), CIFAR-10, eps 8/255",
             load_external("resnet20", str(models / "cifar10_resnet20_akamaster.th")).eval(), *cifar, 8 / 255,
             ns[1])]


def still_correct(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(a).argmax(1) for a in x_adv.split(500)]) == y


def adv_suite(model, x, y, eps, channels_last: bool) -> tuple[float, torch.Tensor]:
    from adv.evaluate import robust_accuracy

    secs, res = timed(lambda: robust_accuracy(model, (x, y), suite="standard", eps=eps, batch_size=500,
                                              progress=False, checks=(), channels_last=channels_last))
    return secs, res.per_example.robust


def reference_suite(model, x, y, eps) -> tuple[float, torch.Tensor]:
    """The original AutoAttack code, standard version, as its README runs it."""
    import logging

    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    aa = AutoAttack(model, eps=eps, norm="Linf", version="standard", seed=0)
    secs, (x_adv, _) = timed(lambda: aa.run_standard_evaluation(x, y, batch_size=500))
    return secs, still_correct(model, x_adv, y)


def torchattacks_suite(model, x, y, eps) -> tuple[float, torch.Tensor] | None:
    try:
        import torchattacks
    except ImportError:
        return None
    atk = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    secs, x_adv = timed(lambda: atk(x, y))
    return secs, still_correct(model, x_adv, y)


SUITE_RUNS = {"adv_cl": "adv (channels_last)", "adv": "adv", "ref": "pyautoattack",
              "ref_cl": "pyautoattack, channels_last model", "ref_alloc": "pyautoattack, adv's malloc thresholds",
              "ta": "torchattacks (APGD/FAB 10 steps)"}


def run_key(key: str, threads: int) -> str:
    """The stored name of one implementation's run: ``adv_cl``, or ``adv_cl@2`` with 2 threads."""
    return key if threads == 1 else f"{key}@{threads}"


def run_label(stored: str) -> str:
    key, _, threads = stored.partition("@")
    return SUITE_RUNS[key] + (f", {threads} threads" if threads else "")


def suite_comparison(args) -> dict:
    """Each implementation's robust verdicts and CPU seconds per case and thread count, merged into
    ``--suite-results`` (so implementations can run as separate processes, ``--suite-runs``)."""
    from adv.evaluate.allocator import keep_freed_memory
    from adv.evaluate.precision import fast_model

    path = Path(args.suite_results)
    store = json.loads(path.read_text()) if path.is_file() else {}
    for label, model, x, y, eps, n in suite_cases(args.suite_n):
        x, y = x[:n], y[:n]
        plans = {"adv_cl": lambda: adv_suite(model, x, y, eps, True), "adv": lambda: adv_suite(model, x, y, eps, False),
                 "ref": lambda: reference_suite(model, x, y, eps),
                 "ref_cl": lambda: reference_suite(fast_model(model, channels_last=True), x, y, eps),
                 "ref_alloc": lambda: (keep_freed_memory(), reference_suite(model, x, y, eps))[1],
                 "ta": lambda: torchattacks_suite(model, x, y, eps)}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for key in args.suite_runs:
                load, wall = os.getloadavg()[0], time.perf_counter()
                out = plans[key]()
                wall = time.perf_counter() - wall
                if out is None:  # torchattacks not installed
                    continue
                print(f"{label}: {run_label(run_key(key, threads))} {out[0]:.1f} CPU s, robust "
                      f"{out[1].float().mean():.4f}", flush=True)
                store = json.loads(path.read_text()) if path.is_file() else {}  # another process may have written
                store.setdefault(f"{label} | {n}", {})[run_key(key, threads)] = {
                    "cpu_s": round(out[0], 1), "wall_s": round(wall, 1),
                    "robust": "".join("1" if r else "0" for r in out[1].tolist()),
                    "load": round(max(load, os.getloadavg()[0]), 1)}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(store, indent=1))
    return store


def suite_rows(store: dict) -> list[dict]:
    """Table rows from the stored verdicts: robust accuracy, CPU s, disagreements with adv (channels_last)."""
    rows = []
    for case, runs in store.items():
        label, n = case.rsplit(" | ", 1)
        mine = runs.get("adv_cl", {}).get("robust")
        out = {}
        for key in sorted(runs, key=lambda k: (list(SUITE_RUNS).index(k.partition("@")[0]), k)):
            rob = runs[key]["robust"]
            out[run_label(key)] = {
                "cpu_s": runs[key]["cpu_s"], "wall_s": runs[key].get("wall_s", "n/a"),
                "load": runs[key].get("load"), "robust_acc": rob.count("1") / len(rob),
                "disagree_with_adv": sum(a != b for a, b in zip(rob, mine)) if mine else None,
                "adv_weaker": sum(a == "0" and b == "1" for a, b in zip(rob, mine)) if mine else None}
        rows.append({"case": label, "n": int(n), "runs": out})
    return rows


def scaling_lines(rows: list[dict]) -> list[str]:
    """adv's CPU seconds per image at every stored image count of a case, and per standing (robust) image."""
    lines = ["adv (channels_last, one thread) at every image count run so far: CPU time should grow with the "
             "points standing, not faster.", "", "| case | images | robust | CPU s | CPU s / image | CPU s / robust "
             "image |", "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["case"], r["n"])):
        v = r["runs"].get(SUITE_RUNS["adv_cl"])
        if v is not None:
            robust = round(v["robust_acc"] * r["n"])
            lines.append(f"| {r['case']} | {r['n']} | {robust} | {v['cpu_s']} | {v['cpu_s'] / r['n']:.3f} | "
                         f"{v['cpu_s'] / robust if robust else math.nan:.3f} |")
    return lines + [""]


def suite_markdown(rows, info, command, every: list[dict] | None = None) -> str:
    lines = [SUITE_BEGIN, "## The standard suite against the original AutoAttack", "",
             f"Produced by `{command}` on {info}.", "",
             "adv's `suite=\"standard\"` (APGD-CE, APGD-T and FAB-T over 9 targets with 100 iterations, Square "
             "5000) against the original AutoAttack code (`pyautoattack`, the same attacks and budgets) on the same "
             "images; CPU seconds are this process's (`time.process_time`, one intra-op thread unless said), so "
             "other jobs on the machine distort them little. \"vs adv\": images whose robust verdict differs "
             "from adv's (channels_last) run, and of those, images only the other implementation breaks "
             "(adv weaker).", "",
             "The full-size run is `.venv/bin/python -m bench.attacks --suite` (500 MNIST images; the shared "
             "CIFAR-10 sample holds 100, so at most those). Implementations may run as separate processes "
             "(`--suite-runs adv_cl`, `--suite-runs ref`, ...; they merge into `bench/results/attacks_suite.json` "
             "and `--suite-runs ''` only renders), each timed by its own process CPU clock; `--threads 1,2` adds "
             "each at 2 threads (rerun it on an idle machine: on a loaded one a second thread waits for a core). "
             "\"load\" is the 1-minute load average of the machine during that run: on a loaded machine CPU "
             "seconds grow too (caches and cores shared; 5-15% at a load of 20-60 on the 2 cores here), so compare "
             "rows of similar load.", "",
             "Rows run at different times are less comparable than their load suggests: on this virtual machine the "
             "same pyautoattack run on the first 500 MNIST images took 2000.1 CPU s on 5 Dec, 1263.4 and (with the "
             "faster model below) 1537.0 on 6 Dec (100 images: 388.4 and 451.4 an hour apart), and the ratio of "
             "adv to the reference moves with the CPU (adv's code of 5 Dec: 0.61x on one x86 machine, 0.50x on this "
             "one). Rows meant to be compared ran side by side (`--suite-runs adv_cl` and `--suite-runs ref` "
             "started together, one core each, so both shared the caches and the host's mood): the fairest ratio "
             "here.", "",
             "Both implementations run the same model object, so a faster model speeds both: since 6 Dec the "
             "two-conv nets pool their first conv's maps before the ReLU (bit for bit the same outputs and "
             "gradients). What is adv's own: on a CPU it runs the model in cache-sized passes "
             "(`adv.evaluate.passes`; 41 rows per pass for this LeNet5 at one thread, so 438 standing images "
             "run as 11 passes whose activations stay in the core's cache, where one 438-row pass streams its "
             "44 MB conv maps through memory: one forward pass over 438 images took 72-87 ms in one pass and "
             "46-49 ms in passes of 32-128 rows), the cheap first-layer input gradient (`adv.evaluate.input_grad`), "
             "channels_last, and the attacks' early exits.", "",
             "adv's evaluation sets glibc's malloc thresholds in its process (`adv.evaluate.allocator`: freed "
             "activation buffers stay in the process, so attack steps do not page-fault), which would also speed "
             "up code run after it in the same process: the pyautoattack rows each ran in a process of their own, "
             "with the default allocator except the row that says otherwise (`--suite-runs ref_alloc`).", ""]
    for r in rows:
        base = r["runs"].get("pyautoattack", {}).get("cpu_s", math.nan)  # nan: "nanx" until it has run
        lines += [f"**{r['case']}**, first {r['n']} test images:", "",
                  "| implementation | robust accuracy | CPU s | vs pyautoattack | differs from adv (adv weaker) "
                  "| wall s | load |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for k, v in r["runs"].items():
            lines.append(f"| {k} | {v['robust_acc']:.2%} | {v['cpu_s']} | {v['cpu_s'] / base:.2f}x | "
                         f"{v['disagree_with_adv']} ({v['adv_weaker']}) | {v['wall_s']} | {v['load']} |")
        lines.append("")
    return "\n".join(lines + scaling_lines(every or rows) + list(SUITE_NOTES) + [SUITE_END])


#: What the stored rows alone cannot show (each key keeps only its latest run): figures of 6 Dec.
SUITE_NOTES = (
    "The host's speed drifts: adv's 100-image MNIST run took 116.5, 134.1, 173.8 and 161.8 CPU s within 40 "
    "minutes of 6 Dec with the same code, so the linearity table mixes moods. Run one after another in one "
    "20-minute window (beside the reference's 500-image run), the 50, 100 and 500-image runs took 58.7, 116.5 "
    "and 523.3 CPU s: 1.30, 1.31 and 1.19 CPU s per standing image, linear (the passes make the largest batch "
    "the cheapest per image).", "",
    "Two threads against one (wall time, `--threads 1,2` on the first 100 MNIST images, each pair run alone): "
    "1.59x (134.1 s against 84.5 s), 1.75x (173.8 s against 99.6 s) and 1.58x (109.8 s against 69.3 s) within "
    "an hour; the 2-thread row above is the second pair's. Per attack, in one more pair (1.73x overall): "
    "APGD-T 1.94x, FAB-T 1.76x, Square 1.65x. Square scales least: a query is one forward pass of about 11 ms "
    "over 89 images, and drawing its candidates between passes is small tensors that gain little from a "
    "second thread.", "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--n-slow", type=int, default=100, help="images for DeepFool, CW and APGD")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=lambda v: [int(i) for i in v.split(",")], default=[1],
                   help="torch intra-op threads (--suite: a list, each run at each count)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--suite", action="store_true", help="only the standard suite against the original AutoAttack")
    p.add_argument("--suite-n", type=lambda v: [int(i) for i in v.split(",")], default=[500, 200],
                   help="MNIST,CIFAR-10 images of --suite (the shared CIFAR-10 sample holds 100)")
    p.add_argument("--suite-runs", type=lambda v: [k for k in v.split(",") if k], default=list(SUITE_RUNS),
                   help=f"implementations to run ({','.join(SUITE_RUNS)}); others are read from --suite-results")
    p.add_argument("--suite-results", default=str(ROOT / "bench" / "results" / "attacks_suite.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads[0])
    if args.suite:
        return run_suite(args, argv)
    model, x, y, source = load(args.n)
    info = (f"{source}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {args.threads[0]} thread(s), load average {os.getloadavg()[0]:.1f} at start")
    rows = throughput(model, x, y, args)
    exit_row = early_exit(model, x, y, args)
    fast = fast_paths(model, x[: args.n_slow], y[: args.n_slow], args)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    figure(rows, exit_row, docs / "benchmarks_attacks.png")
    command = command_line("attacks", argv)
    write_section(docs / "benchmarks.md", markdown(rows, exit_row, fast, info, command), "attacks")
    print(json.dumps({"throughput": rows, "early_exit": exit_row, "fast_paths": fast, "machine": info}))
    return 0


def cpu_name() -> str:
    """The CPU's model and its widest vector units: the ratio to the reference moves with them (the same code
    of adv measured 0.61x on one x86 machine and 0.50x on another, with AMX)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    first = {}  # each key of the first core (every core lists the same model and flags)
    for key, _, value in (line.partition(":") for line in info.splitlines()):
        first.setdefault(key.strip(), value.strip())
    model = first.get("model name") or platform.processor() or platform.machine()
    flags = set(first.get("flags", "").split())
    units = [u for u, flag in (("AVX-512", "avx512f"), ("AMX", "amx_tile")) if flag in flags]
    return f"{model} ({', '.join(units)})" if units else model


def run_suite(args, argv) -> int:
    info = (f"{cpu_name()}, {os.cpu_count()} cores shared with other jobs, torch "
            f"{torch.__version__}, {','.join(map(str, args.threads))} thread(s), load average "
            f"{os.getloadavg()[0]:.1f} at start")
    every = suite_rows(suite_comparison(args))
    rows = [r for r in every if r["n"] in args.suite_n]
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    write_section(docs / "benchmarks.md", suite_markdown(rows, info, command_line("attacks", argv), every),
                  "attacks_suite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
