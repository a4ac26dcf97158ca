"""Training-time defenses on MNIST with ``lenet``: Wu et al. 2022 (AAD), Table 6, reproduced row by row.

    .venv/bin/python -m bench.training_defenses [--rows raw,madry,...]
        [--extras finetune,ensemble,sensitivity,published,subsets] [--n 1000] [--epochs 3] [--threads 1]

* **Table 6 (MNIST, ε = 0.3)**: RAW, Madry, Madry + AAD, ALP, ALP + AAD and
  TRADES (beyond the paper). Each row is trained by ``adv train`` (the exact
  command is in the docs) and scored on the first ``--n`` test images under
  the paper's columns (clean, FGSM, PGD-10/20/40/100, CW-10/20/40/100, each
  attack alone) and AutoAttack's ``standard`` suite (worst case), with 95%
  Wilson intervals and the gradient-masking flags.
* **Extras**: fine-tuning on known adversarials (Echeberria-Barrio et al.
  §4.1, their 92% claim), multi-model adversarial training (Himbitski et al.,
  9.98% → 94.1%) and the α/β sensitivity of Wu et al. Fig. 8 (on MNIST here;
  the paper's figure is CIFAR-10); the published Madry LeNet5 as a reference;
  and how much the scored images and the PGD step alone move PGD-40.

Everything is resumable: ``adv train`` resumes per epoch, every attack
column per batch (``robust_accuracy`` state files) and each finished cell is
written to ``bench/results/training_defenses/ROW.json`` at once. Rows can run
in separate processes (``--rows madry`` and ``--rows trades`` side by side).
Writes ``docs/benchmarks_training_defenses.png`` and the "Training-time
defenses" section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from adv.io import atomic_write_json
from bench.docs import STAMP, command as command_line, logger
from bench.training_defenses_docs import write_docs
from bench.training_defenses_grid import BUDGET, COLUMNS, CONTINUES, EPOCHS, EPS, PUBLISHED, ROWS, TRAIN_ARGS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "training_defenses"


log = logger("bench.training_defenses", STAMP)


def adv_train(args, out: Path, *extra: str) -> list[str]:
    """The ``adv train`` command line of a run (as the docs quote it)."""
    return [".venv/bin/adv", "train", "--dataset", "mnist", "--data-dir", args.data_dir, "--batch-size", "100",
            "--lr", "1e-3", "--seed", "0", "--out", str(out.relative_to(ROOT)), "--quiet", *extra]


def train(cmd: list[str], out: Path, epochs: int, threads: int) -> dict:
    """Run ``cmd`` unless ``out`` already holds ``epochs`` finished epochs (``adv train`` resumes otherwise)."""
    metrics = out / "metrics.json"
    if not (metrics.is_file() and json.loads(metrics.read_text()).get("epoch") == epochs):
        log(" ".join(cmd))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ADV_NO_PROGRESS": "1"}
        # `python -m adv` from ROOT runs the adv beside this bench, even when ROOT is a frozen copy of the tree
        subprocess.run([sys.executable, "-m", "adv", *cmd[1:]], cwd=ROOT, env=env, check=True)
    return json.loads(metrics.read_text())


def test_images(args) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``--n`` MNIST test images, in file order."""
    from adv.data import load_dataset

    x, y = load_dataset("mnist", split="test", root=args.data_dir).tensors()
    return x[: args.n], y[: args.n]


def load(path: Path):
    from adv.models import load_checkpoint

    return load_checkpoint(path)[0].eval()


def cell(result) -> dict:
    from adv.metrics import wilson_interval

    k = round(result.robust_acc * result.n)
    return {"acc": result.robust_acc, "ci": list(wilson_interval(k, result.n)), "n": result.n,
            "clean": result.clean_acc, "flags": sorted({f.code for f in result.flags}),
            "attacks": [{"label": a.label, "after": a.robust_acc_after, "fooled": a.n_fooled,
                         "time_s": round(a.time_s, 1)} for a in result.attacks], "time_s": round(result.time_s, 1)}


def evaluate(model, data, state: Path, attacks=(), suite=None, eps: float = EPS) -> dict:
    from adv.evaluate import RobustnessWarning, robust_accuracy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RobustnessWarning)  # the flags are recorded in the cell
        res = robust_accuracy(model, data, list(attacks), suite=suite, eps=eps, batch_size=500, seed=0,
                              state_path=str(state), progress=False)
    return cell(res)


class Results:
    """One JSON file per row (or extra), rewritten after every cell, so parallel processes never clash."""

    def __init__(self, name: str):
        self.path = RESULTS / f"{name}.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        atomic_write_json(self.path, self.data, indent=1)


def run_row(row: str, args) -> None:
    label, spec = ROWS[row]
    out = Path(args.out) / row
    res = Results(row)
    epochs = EPOCHS.get(row, args.epochs)
    cmd = adv_train(args, out, "--model", "lenet", "--epochs", str(epochs), *TRAIN_ARGS.get(row, ()),
                    *(["--defense", spec] if spec else []))
    res.put("label", label)
    res.put("command", " ".join(cmd))
    continue_from(row, out, args)
    metrics = train(cmd, out, epochs, args.threads)
    res.put("train", {k: metrics.get(k) for k in ("train_seconds", "test_acc", "train_adv_acc", "epoch")})
    model, data = load(out / "model.pt"), test_images(args)
    cells = res.data.get("cells", {})
    # the checks first (PGD-40, then the suite against PGD-100), the other columns after
    for col in ("pgd40", "pgd100", "standard", *[c for c in COLUMNS if c not in ("pgd40", "pgd100")]):
        if col in cells or (col == "standard" and row not in args.suite_rows):
            continue
        log(f"{row}: {col}")
        if col == "standard":
            cells[col] = suite_cell(model, data, out, args.suite_n)
        else:
            cells[col] = evaluate(model, data, out / f"state_{col}.json", [COLUMNS[col]])
        res.put("cells", cells)
    log(f"{row}: done")


def suite_cell(model, data, out: Path, n: int) -> dict:
    """The standard suite on the first ``n`` images, with PGD-100 on the same images (from its finished state)."""
    cell_ = evaluate(model, (data[0][:n], data[1][:n]), out / f"state_standard_{n}.json", suite="standard")
    return {**cell_, "pgd100_same_images": robust_share(out / "state_pgd100.json", n)}


def continue_from(row: str, out: Path, args) -> None:
    """Seed a longer row with the finished state of the row it extends (``adv train`` then resumes from it)."""
    base = Path(args.out) / CONTINUES.get(row, "")
    if row not in CONTINUES or (out / "train_state.pt").exists() or not (base / "train_state.pt").is_file():
        return
    if json.loads((base / "metrics.json").read_text()).get("epoch") != args.epochs:
        return  # the base row is unfinished: train this one from scratch
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base / "train_state.pt", out / "train_state.pt")
    log(f"{row}: continues {CONTINUES[row]}'s epoch-{args.epochs} state")


def robust_share(state: Path, n: int) -> float:
    """Robust accuracy of the first ``n`` images, from a finished evaluation's per-example mask."""
    mask = json.loads(state.read_text())["robust_mask"][:n]
    return mask.count("1") / len(mask)


# --- extras ---------------------------------------------------------------------------------------------
def finetune(args) -> None:
    """Echeberria-Barrio et al. §4.1: fine-tune RAW on its own known adversarials; share now classified right."""
    from adv.attacks import pgd
    from adv.data import load_dataset
    from adv.train.losses.finetune_at import known_accuracy

    res, base = Results("finetune"), Path(args.out) / "raw" / "model.pt"
    out = Path(args.out) / "finetune"
    known = out / "known.pt"
    raw = load(base)
    if not known.is_file():
        x, y = load_dataset("mnist", split="train", root=args.data_dir, n=args.known, seed=1).tensors()
        x_adv = torch.cat([pgd(raw, xb, yb, eps=EPS, steps=10, seed=0) for xb, yb in zip(x.split(500), y.split(500))])
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"x_adv": x_adv, "y": y}, known)
    blob = torch.load(known, weights_only=True)
    cmd = adv_train(args, out / "model", "--checkpoint", str(base.relative_to(ROOT)), "--epochs", "1", "--n",
                    "10000", "--defense", f"finetune_at:adversarials={known.relative_to(ROOT)}")
    train(cmd, out / "model", 1, args.threads)
    tuned, data = load(out / "model" / "model.pt"), test_images(args)
    res.put("command", " ".join(cmd))
    res.put("known_before", known_accuracy(raw, blob["x_adv"], blob["y"]))
    res.put("known_after", known_accuracy(tuned, blob["x_adv"], blob["y"]))
    res.put("n_known", len(blob["y"]))
    for key, model in (("raw", raw), ("tuned", tuned)):
        if f"fresh_{key}" not in res.data:
            res.put(f"fresh_{key}", evaluate(model, data, out / f"state_fresh_{key}.json", [("pgd", {"steps": 10})]))


def ensemble(args) -> None:
    """Himbitski et al.: FGSM collapse of the undefended model, recovered by multi-model adversarial training."""
    from adv.models import save_checkpoint

    res, out = Results("ensemble"), Path(args.out) / "ensemble"
    raw, data = load(Path(args.out) / "raw" / "model.pt"), test_images(args)
    sweep = res.data.get("raw_fgsm", {})
    for eps in (0.05, 0.1, 0.15, 0.2, 0.25):
        if str(eps) not in sweep:
            sweep[str(eps)] = evaluate(raw, data, out / f"state_raw_fgsm_{eps}.json", [("fgsm", {})], eps=eps)
            res.put("raw_fgsm", sweep)
    # the paper's collapse: 94.65% -> 9.98% under FGSM, about a tenth of the clean accuracy remains
    eps = min((float(e) for e, c in sweep.items() if c["acc"] <= 0.106 * c["clean"]), default=0.25)
    res.put("eps", eps)
    second = out / "lenet5_advertorch.pt"
    if not second.is_file():
        save_checkpoint(second, advertorch_lenet5(args, "mnist_lenet5_clntrained.pt"), dataset="mnist")
    sources = f"{(Path(args.out) / 'raw' / 'model.pt').relative_to(ROOT)}+{second.relative_to(ROOT)}"
    cmd = adv_train(args, out / "model", "--model", "lenet", "--epochs", "2", "--defense",
                    f"ensemble_at:attack=fgsm,eps={eps},mix=0.5,sources={sources}")
    res.put("command", " ".join(cmd))
    train(cmd, out / "model", 2, args.threads)
    model = load(out / "model" / "model.pt")
    for col, attack in (("fgsm", ("fgsm", {})), ("pgd40", ("pgd", {"steps": 40}))):
        if col not in res.data:
            res.put(col, evaluate(model, data, out / f"state_{col}.json", [attack], eps=eps))


def sensitivity(args) -> None:
    """Wu et al. Fig. 8 at a few (alpha, beta) points, at a reduced budget (10k images, 2 epochs)."""
    res, data = Results("sensitivity"), test_images(args)
    for point in args.sens_points:
        alpha, beta = (float(v) for v in point.split(","))
        key = f"alpha={alpha:g},beta={beta:g}"
        if key in res.data:
            continue
        out = Path(args.out) / "sensitivity" / key.replace(",", "_")
        cmd = adv_train(args, out, "--model", "lenet", "--epochs", "2", "--n", "10000", "--defense",
                        f"aad:base=at,alpha={alpha:g},beta={beta:g},{BUDGET}")
        metrics = train(cmd, out, 2, args.threads)
        cellv = evaluate(load(out / "model.pt"), data, out / "state_pgd40.json", [("pgd", {"steps": 40})])
        res.put(key, {"command": " ".join(cmd), "pgd40": cellv, "test_acc": metrics.get("test_acc")})


def published(args) -> None:
    """The suite against PGD on advertorch's published Madry-trained LeNet5 (../shared/data/models), a reference."""
    res, out = Results("published"), Path(args.out) / "published"
    model, data = advertorch_lenet5(args, PUBLISHED), test_images(args)
    res.put("model", f"advertorch LeNet5, Madry PGD-40 training ({PUBLISHED})")
    for col in ("pgd40", "pgd100"):
        if col not in res.data:
            res.put(col, evaluate(model, data, out / f"state_{col}.json", [COLUMNS[col]]))
    if "standard" not in res.data:
        res.put("standard", suite_cell(model, data, out, args.suite_n))


def advertorch_lenet5(args, file: str):
    """One of advertorch's published LeNet5 weights, from the ``models`` folder beside the MNIST data."""
    from adv.models import load_external

    return load_external("lenet5", str(Path(args.data_dir).parent / "models" / file)).eval()


def subsets(args) -> None:
    """What moves PGD-40 besides training: the images (the first ``--n`` test images against all 10,000) and
    the step (ours, 2.5·ε/k from a random start, against Madry et al.'s 0.01), on the best Madry models."""
    from adv.data import load_dataset

    res, out = Results("subsets"), Path(args.out) / "subsets"
    x, y = load_dataset("mnist", split="test", root=args.data_dir).tensors()
    trained = {row: Path(args.out) / row / "model.pt" for row in ("madry_pgd40", "madry_5ep")}
    models = {row: load(path) for row, path in trained.items() if path.is_file()}  # rows not trained yet: skipped
    models["published"] = advertorch_lenet5(args, PUBLISHED)
    madry_step = ("pgd", {"steps": 40, "step_size": 0.01})
    checks = {"all": ((x, y), COLUMNS["pgd40"]), "step_0.01": ((x[: args.n], y[: args.n]), madry_step),
              "all_step_0.01": ((x, y), madry_step)}
    for name, model in models.items():
        for col, (data, attack) in checks.items():
            if f"{name}/{col}" not in res.data:
                log(f"subsets: {name} {col}")
                res.put(f"{name}/{col}", evaluate(model, data, out / f"state_{name}_{col}.json", [attack]))


EXTRAS = {"finetune": finetune, "ensemble": ensemble, "sensitivity": sensitivity, "published": published,
          "subsets": subsets}


def comma_list(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), type=comma_list,
                   help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--extras", default="", type=comma_list, help=f"comma-separated subset of {','.join(EXTRAS)}")
    p.add_argument("--suite-rows", default="madry,madry_aad,alp,alp_aad,trades,madry_5ep,madry_cosine,madry_pgd40",
                   type=comma_list,
                   help="rows that also face the standard suite")
    p.add_argument("--n", type=int, default=1000, help="first N test images")
    p.add_argument("--suite-n", type=int, default=200, help="first N test images for the standard suite")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--known", type=int, default=2000, help="known adversarials for the fine-tuning extra")
    p.add_argument("--sens-points", nargs="+", default=["0,0", "0.01,0.01", "0.1,0.01", "0.01,0.1"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    p.add_argument("--out", default=str(ROOT / "runs" / "training_defenses"), type=lambda s: str(Path(s).absolute()))
    p.add_argument("--docs-only", action="store_true", help="rewrite the docs section from the stored results")
    p.add_argument("--note", default="", help="a paragraph for the docs section (e.g. what stopped a run)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.docs_only:
        for row in args.rows:
            if row not in ROWS:
                p.error(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
            run_row(row, args)
        for extra in args.extras:
            if extra not in EXTRAS:
                p.error(f"unknown extra {extra!r}; extras: {', '.join(EXTRAS)}")
            EXTRAS[extra](args)

    with open(RESULTS.parent / ".training_defenses.lock", "w") as lock:  # rows in parallel share one doc
        fcntl.flock(lock, fcntl.LOCK_EX)
        shown = list(sys.argv[1:] if argv is None else argv)
        if "--note" in shown:  # the note is prose for the section, not part of the measurement
            del shown[shown.index("--note") : shown.index("--note") + 2]
        write_docs(ROOT / "docs", RESULTS, command_line("training_defenses", shown), stored_note(args.note))
    return 0


def stored_note(note: str) -> str:
    """The docs paragraph: a new ``--note`` is kept beside the results, so a later run or ``--docs-only``
    (which passes none) rewrites the section with it instead of dropping it."""
    path = RESULTS / "note.md"
    if note:
        path.write_text(note.strip() + "\n")
        return note
    return path.read_text().strip() if path.exists() else ""


if __name__ == "__main__":
    sys.exit(main())
