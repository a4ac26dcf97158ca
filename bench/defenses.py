"""Input-transformation, reconstruction and detection defenses on Fashion-MNIST with ``lenet``.

    .venv/bin/python -m bench.defenses [--n 500] [--n-train 10000] [--epochs 3] [--threads 1]

* **Robustness table**: clean accuracy and accuracy under FGSM, BIM-10 and
  PGD-10 (L∞, eps 0.05/0.1/0.2) for: no defense, DWT-haar, DWT-db4 (Kaminskyi, DWT study,
  parameters chosen by PSNR/MSE on 64 training images), a DWT-trained lenet
  plus reconstruction (Kaminskyi, DWT study), the initial AE, middle AE and encoder
  variant (Echeberria-Barrio et al. 2020 §4.2) and the U-Net (Himbitski et al. 2024). Every cell is given
  **non-adaptive** (the papers' protocol: adversarials crafted on the
  undefended lenet, then fed through the defense) and **adaptive**
  (adversarials crafted on the defended pipeline: BPDA through the DWT,
  gradients through the AEs and the U-Net).
* **Detector**: TPR/FPR of the encoder-disagreement detector (Echeberria-Barrio et al. 2020 Fig. 8),
  non-adaptive and against the detector-aware attack.
* **U-Net study** (Himbitski et al. 2024): accuracy after 1..E epochs at three widths
  (parameter counts).
* **Grad-CAM** before/after the U-Net on adversarial inputs (Khoshbakht et al. 2024 (SFE) Figs. 3-4)
  and the clean-vs-adversarial attention IoU of Wu et al. 2022 (AAD) Table 3.

Learned stages are cached in ``--out`` (delete it or pass ``--retrain`` to
train again). Writes ``docs/benchmarks_defenses*.png`` and the "## Defenses"
section of ``docs/benchmarks.md`` (between markers) with the command used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from adv.evaluate.stats import pct
from adv.evaluate.tables import markdown_table
from bench.docs import STAMP, command as command_line, logger, markers, write_section
import torch

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = markers("defenses")
EPS = (0.05, 0.1, 0.2)
ATTACKS = {"fgsm": {}, "bim": {"steps": 10}, "pgd": {"steps": 10, "seed": 0}}
IOU_EPS = (0.02, 0.1)
#: Stages this run loaded from the cache instead of training (reported next to the wall time).
LOADED: list[str] = []
ROWS = ("no defense", "DWT-haar", "DWT-db4", "DWT-trained + reconstruction", "initial AE", "middle AE",
        "encoder variant", "U-Net")


log = logger("bench.defenses", STAMP)


@torch.no_grad()
def accuracy(model, x, y, batch: int = 250) -> float:
    return float(torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)]).eq(y).float().mean())


def attack(ev, name: str, x, y, eps: float, early_stop: bool = False, batch: int = 250) -> torch.Tensor:
    """Batched adversarials under ``ev``'s threat model (``adv.evaluate.threat.EvaluatedModel.attack``)."""
    kw = dict(ATTACKS[name], **({"early_stop": True} if early_stop and name != "fgsm" else {}))
    return torch.cat([ev.attack(name, x[i:i + batch], y[i:i + batch], eps=eps, **kw)
                      for i in range(0, len(x), batch)])


def undefended(clf):
    """The classifier as the non-adaptive threat model's source: adversarials crafted on it alone."""
    from adv.defenses import Defended
    from adv.evaluate.threat import evaluated_model

    return evaluated_model(Defended(None, clf), adaptive=False)


# --- setup ----------------------------------------------------------------------------------
def classifier(args):
    """The lead's ``runs/fm-lenet`` checkpoint, or ``adv train --dataset fashion-mnist --model lenet --epochs 2``."""
    from adv.cli import main as adv_main
    from adv.models import load_checkpoint

    path = Path(args.classifier)
    if not path.is_file():
        log(f"{path} missing: training it with adv train")
        adv_main(["train", "--dataset", "fashion-mnist", "--model", "lenet", "--epochs", "2",
                  "--out", str(path.parent), "--quiet"])
    model, meta = load_checkpoint(path)
    return model.eval(), meta


def select_dwt(train) -> dict:
    """Kaminskyi, DWT study: per wavelet, the strongest DWT whose output keeps PSNR >= 30 dB / MSE <= 1e-3 on 64
    images."""
    from adv.defenses import select_dwt_params
    from adv.defenses.dwt import DWTParams

    x, _ = train.subset(64, seed=7).tensors()
    chosen = {}
    for wavelet in ("haar", "db4"):
        grid = {"wavelet": [wavelet], "level": [1, 2, 3], "mode": ["soft", "hard"],
                "method": ["BayesShrink", "VisuShrink"]}
        best, table = select_dwt_params(x, grid=grid, psnr_min=30.0, mse_max=1e-3)
        if best is None:  # nothing admissible: fall back to the mildest candidate, and say so
            row = max(table, key=lambda r: r["psnr"])
            best = DWTParams(**{k: row[k] for k in grid})
        chosen[wavelet] = (best, table)
    return chosen


def learned(spec: str, path: Path, clf, train, retrain: bool):
    """Load ``path`` if present, else train ``spec`` on ``train`` and save it there."""
    from adv.defenses import create_defense, save_stage

    if path.is_file() and not retrain:
        log(f"loading {path}")
        LOADED.append(path.name)
        return create_defense(f"{spec.split(':')[0]}:checkpoint={path}", classifier=clf)
    log(f"training {spec} on {len(train)} images")
    stage = create_defense(spec, classifier=clf, data=train)
    save_stage(path, stage, meta={"train": {k: v for k, v in stage.train_metrics.items() if k != "history"},
                                  "history": stage.train_metrics.get("history", [])})
    return stage


def dwt_trained(params, train, args, out: Path):
    """Kaminskyi, DWT study's proactive half: lenet trained on x and DWT(x) (``adv train --defense dwt:...``)."""
    from adv.defenses import format_defense_spec
    from adv.models import create_model, load_checkpoint
    from adv.train import TrainConfig, fit
    from adv.train.losses import training_loss

    path = out / "dwt-trained" / "model.pt"
    if path.is_file() and not args.retrain:
        LOADED.append("dwt-trained lenet")
        return load_checkpoint(path)[0].eval()
    spec = format_defense_spec("dwt", params)
    log(f"training lenet with --defense {spec} on {len(train)} images")
    torch.manual_seed(0)
    model = create_model("lenet", num_classes=10, input_size=(1, 28, 28))
    loss = training_loss(spec)
    fit(model, train, None, TrainConfig(epochs=args.epochs_classifier, seed=0), loss_fn=loss.loss_fn,
        out_dir=path.parent, resume=False, show_progress=False,
        extra_meta={"command": "bench.defenses", **loss.checkpoint_meta()})
    return model.eval()


def build_rows(clf, train, dwt, args, out: Path) -> tuple[dict, dict]:
    """``{row: (Defended, extra info)}`` and the encoder-variant stage file (for the detector)."""
    from adv.defenses import Defended, create_defense

    e = f"epochs={args.epochs}"
    haar, db4 = (create_defense(("dwt", dwt[w][0])) for w in ("haar", "db4"))
    ae = learned(f"initial_ae:{e}", out / "initial_ae.pt", clf, train, args.retrain)
    middle = learned(f"middle_ae:{e}", out / "middle_ae.pt", clf, train, args.retrain)
    enc = learned(f"encoder:{e},ae_checkpoint={out / 'middle_ae.pt'}", out / "encoder.pt", clf, train, args.retrain)
    unet = learned(f"unet:{e},attacks=fgsm+pgd,pgd_steps=3", out / "unet.pt", clf,
                   train.subset(args.n_train_unet, seed=2), args.retrain)
    rows = {
        "no defense": Defended(None, clf),
        "DWT-haar": Defended(haar, clf),
        "DWT-db4": Defended(db4, clf),
        "DWT-trained + reconstruction": Defended(create_defense(("dwt", dwt["haar"][0])),
                                                 dwt_trained(dwt["haar"][0], train, args, out)),
        "initial AE": Defended(ae, clf),
        "middle AE": Defended(None, middle),
        "encoder variant": Defended(None, enc),
        "U-Net": Defended(unet, clf),
    }
    return rows, {"encoder_file": out / "encoder.pt"}


# --- measurements ---------------------------------------------------------------------------
def robustness(rows: dict, source_adv: dict, x, y) -> dict:
    """``{row: {"clean": acc, (attack, eps): {"non-adaptive": acc, "adaptive": acc}}}``."""
    from adv.evaluate.threat import evaluated_model

    out = {}
    for row, defended in rows.items():
        t0 = time.time()
        cells = {"clean": accuracy(defended, x, y)}
        ev = evaluated_model(defended, adaptive=True)
        for (name, eps), x_adv in source_adv.items():
            cell = {"non-adaptive": accuracy(defended, x_adv, y)}
            # the undefended row has one threat model: its adversarials *are* the adaptive ones
            cell["adaptive"] = cell["non-adaptive"] if row == "no defense" else accuracy(
                defended, attack(ev, name, x, y, eps, early_stop=True), y)
            cells[(name, eps)] = cell
        out[row] = cells
        pgd = cells[("pgd", 0.1)]
        log(f"{row}: clean {cells['clean']:.3f}, PGD 0.1 {pgd['non-adaptive']:.3f} non-adaptive / "
            f"{pgd['adaptive']:.3f} adaptive ({time.time() - t0:.0f}s)")
    return out


def detector(clf, encoder_file: Path, source_adv: dict, x, y) -> dict:
    from adv.defenses import Defended, create_defense
    from adv.evaluate.threat import detection_summary, evaluated_model

    defended = Defended(None, clf, create_defense(f"disagreement:checkpoint={encoder_file}", classifier=clf))
    ev = evaluated_model(defended, adaptive=True)  # FGSM/BIM/PGD run on the detector-aware loss
    out = {}
    for (name, eps), x_adv in source_adv.items():
        joint = attack(ev, name, x, y, eps)
        out[(name, eps)] = {"non-adaptive": detection_summary(defended, x, x_adv, y),
                            "adaptive": detection_summary(defended, x, joint, y)}
    log("detector done")
    return out


def unet_study(clf, train, source_adv: dict, x, y, args) -> list[dict]:
    """Himbitski et al. 2024: accuracy on non-adaptive FGSM/PGD (eps 0.1) after each epoch, for three widths."""
    from adv.defenses import Defended, create_defense
    from adv.defenses.unet import parameter_count, train_unet
    from adv.metrics import image_quality

    rows = []
    for width in args.unet_widths:
        unet = create_defense(f"unet:width={width},epochs={args.study_epochs},attacks=fgsm", classifier=clf)
        defended = Defended(unet, clf, allow_untrained=True)

        def on_epoch_end(epoch, _metrics, unet=unet, defended=defended, width=width):
            unet.eval()
            with torch.no_grad():
                psnr = image_quality(x, unet(source_adv[("pgd", 0.1)]))["psnr"].mean()
            rows.append({"width": width, "parameters": parameter_count(unet), "epoch": epoch,
                         "clean": accuracy(defended, x, y),
                         "fgsm@0.1": accuracy(defended, source_adv[("fgsm", 0.1)], y),
                         "pgd@0.1": accuracy(defended, source_adv[("pgd", 0.1)], y), "psnr_pgd@0.1": float(psnr)})
            unet.train()

        log(f"U-Net study: width {width}")
        train_unet(unet, clf, train, on_epoch_end=on_epoch_end)
    return rows


def explain(clf, rows: dict, source_adv: dict, x, y, classes, docs: Path) -> dict:
    """Grad-CAM before/after the U-Net (Khoshbakht et al. 2024 (SFE) Figs. 3-4) and Wu et al. 2022 (AAD)'s
    attention IoU (Table 3)."""
    from adv.explain import attention_iou_table, save_before_after

    x_adv = source_adv[("pgd", 0.1)]
    with torch.no_grad():
        fooled = (clf(x_adv).argmax(1) != y) & (rows["U-Net"](x_adv).argmax(1) == y)
    idx = fooled.nonzero()[:, 0][:5]
    if len(idx) == 0:  # the U-Net restores none: show images lenet gets wrong anyway
        idx = (clf(x_adv).argmax(1) != y).nonzero()[:, 0][:5]
    save_before_after(docs / "benchmarks_defenses_gradcam.png", clf, rows["U-Net"], x_adv[idx], y[idx], classes,
                      title="PGD-10 eps 0.1 (crafted on lenet): Grad-CAM before / after the U-Net")
    from adv.attacks import get_attack

    tables = {}
    for eps in IOU_EPS:  # Wu et al. 2022 (AAD) used StepLL (its eq. 4) at small budgets; PGD for comparison
        tables[("stepll", eps)] = attention_iou_table(clf, x, get_attack("stepll")(clf, x, y, eps=eps), y)
        tables[("pgd", eps)] = attention_iou_table(clf, x, source_adv[("pgd", eps)] if ("pgd", eps) in source_adv
                                                   else attack(undefended(clf), "pgd", x, y, eps), y)
    return tables


# --- report ---------------------------------------------------------------------------------
def plot(results: dict, study: list[dict], docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, name in zip(axes, ATTACKS):
        for i, (row, cells) in enumerate(results.items()):
            color = plt.cm.tab10(i)
            xs = [0.0, *EPS]
            ax.plot(xs, [cells["clean"], *(cells[(name, e)]["non-adaptive"] for e in EPS)], "-o", color=color,
                    label=row, ms=3)
            if row != "no defense":
                ax.plot(xs, [cells["clean"], *(cells[(name, e)]["adaptive"] for e in EPS)], "--x", color=color, ms=3)
        ax.set_title(f"{name.upper()} (solid: non-adaptive, dashed: adaptive)", fontsize=9)
        ax.set_xlabel("eps (L∞)")
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(docs / "benchmarks_defenses.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for width in sorted({r["width"] for r in study}):
        pts = [r for r in study if r["width"] == width]
        ax.plot([r["epoch"] for r in pts], [r["pgd@0.1"] for r in pts], "-o",
                label=f"width {width} ({pts[0]['parameters'] / 1e6:.2f}M params)")
    ax.set_xlabel("training epochs")
    ax.set_ylabel("accuracy, PGD-10 eps 0.1 (non-adaptive)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "benchmarks_defenses_unet.png", dpi=110)
    plt.close(fig)


#: percentages as this section prints them (the one formatter: adv.evaluate.stats.pct)
_pct = partial(pct, sign=False, missing="nan")


def overlap_md(results: dict, cols: list, n: int | None) -> list[str]:
    """The cells' interval width, and per defense how many attack cells stay within no defense's 95% interval."""
    from adv.evaluate.stats import accuracy_ci, interval_note, intervals_overlap

    if not n:
        return []

    def ci(v: float) -> tuple[float, float]:
        return accuracy_ci(round(v * n), n)

    base = results["no defense"]
    lines = [interval_note(n) + " Attack cells whose interval overlaps no defense's (a difference within "
             "sampling noise), non-adaptive / adaptive:", ""]
    for row, cells in results.items():
        if row != "no defense":
            same = {t: sum(intervals_overlap(ci(cells[c][t]), ci(base[c][t])) for c in cols)
                    for t in ("non-adaptive", "adaptive")}
            lines.append(f"- {row}: {same['non-adaptive']} / {same['adaptive']} of {len(cols)}")
    return lines


def markdown(command: str, info: str, dwt: dict, results: dict, det: dict, study: list[dict], iou: dict,
             notes: dict) -> str:
    return "\n".join([BEGIN, "## Defenses", "", f"Produced by `{command}` on {info}.", "",
                      *_robustness_md(results, dwt, notes), *_detector_md(det), *_study_md(study),
                      *_explain_md(iou), "", END])


def _robustness_row(row: str, cells: dict, base: dict, cols: list) -> list[str]:
    gain = {t: 100 * np.mean([cells[c][t] - base[c][t] for c in cols]) for t in ("non-adaptive", "adaptive")}
    return [row, _pct(cells["clean"]), *(f"{_pct(cells[c]['non-adaptive'])} / {_pct(cells[c]['adaptive'])}"
                                         for c in cols), f"{gain['non-adaptive']:+.1f}", f"{gain['adaptive']:+.1f}"]


def _robustness_md(results: dict, dwt: dict, notes: dict) -> list[str]:
    from adv.defenses import format_defense_spec

    cols = [(n, e) for n in ATTACKS for e in EPS]
    lines = ["Each robust cell is **non-adaptive / adaptive** accuracy (%). Non-adaptive is the papers' protocol: "
             "adversarials crafted on the undefended lenet, then fed through the defense. Adaptive: crafted on "
             "the defended pipeline itself (BPDA straight-through for the DWT, gradients through the autoencoders "
             "and the U-Net; BIM/PGD stop early per example once the *defended* model is fooled, which never "
             "weakens them). A defense that only holds non-adaptively shows a high first number and a low second.",
             "The last two columns average, over the nine attack cells, the gain in points over no defense.",
             "", *markdown_table(["defense", "clean", *(f"{n.upper()} {e}" for n, e in cols), "gain non-adaptive",
                                  "gain adaptive"], [_robustness_row(row, cells, results["no defense"], cols)
                                                     for row, cells in results.items()], "l" + "r" * (len(cols) + 3))]
    lines += ["", *overlap_md(results, cols, notes.get("n")), "", "![accuracy vs eps](benchmarks_defenses.png)", "",
              "Setup:", ""]
    lines += [f"- {k}: {v}" for k, v in notes.items() if k != "n"]
    lines += [f"- DWT-{w}: `{format_defense_spec('dwt', p)}` chosen among {len(t)} candidates "
              f"({sum(r['admissible'] for r in t)} admissible: mean PSNR >= 30 dB, MSE <= 1e-3 on 64 training "
              "images; the strongest admissible is taken)" for w, (p, t) in dwt.items()]
    return lines


def _detector_md(det: dict) -> list[str]:
    lines = ["", "### Encoder-disagreement detector (Echeberria-Barrio et al. 2020 Fig. 8)", "",
             "TPR: flagged fraction of successful adversarials; FPR: flagged fraction of clean test images; "
             "undetected: points the attack turns *and* the detector misses (attacker's success, % of all). "
             "Adaptive = the detector-aware attack (per example the worse of a joint margin loss that keeps "
             "lenet and its encoder variant on the same wrong class, and the plain attack).", ""]
    rows = []
    for (name, eps), d in det.items():
        na, ad = d["non-adaptive"], d["adaptive"]
        rows.append([name.upper(), eps, _pct(na["fpr"]), _pct(na["tpr"]), f"{na['auroc']:.3f}",
                     _pct(na["undetected_success"]), _pct(ad["tpr"]), _pct(ad["undetected_success"])])
    return lines + markdown_table(["attack", "eps", "FPR", "TPR non-adaptive", "AUROC non-adaptive",
                                   "undetected non-adaptive", "TPR adaptive", "undetected adaptive"], rows, "lrrrrrrr")


def _study_md(study: list[dict]) -> list[str]:
    lines = ["", "### U-Net: quality vs training epochs and parameter count (Himbitski et al. 2024)", "",
             "Non-adaptive accuracy (%) on adversarials crafted on lenet at eps 0.1; PSNR of u(x_adv) against the "
             "clean x. Trained with FGSM pairs only (the table above uses FGSM + PGD pairs).", "",
             *markdown_table(["width", "parameters", "epoch", "clean", "FGSM 0.1", "PGD-10 0.1", "PSNR dB"],
                             [[r["width"], f"{r['parameters']:,}", r["epoch"], _pct(r["clean"]), _pct(r["fgsm@0.1"]),
                               _pct(r["pgd@0.1"]), f"{r['psnr_pgd@0.1']:.1f}"] for r in study], "rrrrrrr")]
    return lines + ["", "![U-Net study](benchmarks_defenses_unet.png)"]


def _explain_md(iou: dict) -> list[str]:
    keys = list(iou)
    grid = iou[keys[0]]["grid"]
    lines = ["", "### Grad-CAM and attention IoU (Khoshbakht et al. 2024, SFE; Wu et al. 2022, AAD)", "",
             "![Grad-CAM before and after the U-Net](benchmarks_defenses_gradcam.png)", "",
             "Attention IoU between clean and adversarial Grad-CAM maps of lenet (top-#cell cells of the raw "
             f"{grid[0]}x{grid[1]} grid, Wu et al. 2022 (AAD) eq. 6, Table 3), "
             "among test images lenet classifies correctly; "
             "each cell is **attack succeeded / attack failed**:", "",
             *markdown_table(["#cell", *(f"{n.upper()} eps {e}" for n, e in keys)],
                             [[n, *(f"{iou[k]['rows'][i]['iou_succeed']:.3f} / {iou[k]['rows'][i]['iou_fail']:.3f}"
                                    for k in keys)] for i, n in enumerate(r["cells"] for r in iou[keys[0]]["rows"])],
                             "r" * (len(keys) + 1))]
    counts = "; ".join(f"{n.upper()} {e}: {t['n_succeed']} succeeded, {t['n_fail']} failed, {t['n_no_attention']} "
                       "without attention" for (n, e), t in iou.items())
    return lines + ["", f"({counts}. Only cells with positive attention count as attention area; pairs where both "
                    "maps are all-zero are left out and counted as without attention.)"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500, help="test images (seeded subset)")
    p.add_argument("--n-train", type=int, default=8000, help="training images for the learned stages")
    p.add_argument("--n-train-unet", type=int, default=3000, help="training images for the U-Net")
    p.add_argument("--epochs", type=int, default=3, help="epochs for every learned stage")
    p.add_argument("--epochs-classifier", type=int, default=2, help="epochs for the DWT-trained lenet")
    p.add_argument("--unet-widths", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--study-epochs", type=int, default=3)
    p.add_argument("--n-train-study", type=int, default=1500)
    p.add_argument("--classifier", default=str(ROOT / "runs" / "fm-lenet" / "model.pt"))
    p.add_argument("--out", default=str(ROOT / "runs" / "bench-defenses"), help="cache of trained stages")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    command = command_line("defenses", argv)
    info = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), "
            f"load average {os.getloadavg()[0]:.1f} at start")
    from adv.data import load_dataset

    out, docs = Path(args.out), Path(args.docs)
    out.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    clf, meta = classifier(args)
    test = load_dataset("fashion-mnist", split="test", n=args.n, seed=0)
    train = load_dataset("fashion-mnist", split="train", n=args.n_train, seed=1)
    x, y = test.tensors()
    dwt = select_dwt(train)
    rows, extra = build_rows(clf, train, dwt, args, out)
    log("crafting non-adaptive adversarials on lenet")
    source_adv = {(name, eps): attack(undefended(clf), name, x, y, eps) for name in ATTACKS for eps in EPS}
    results = robustness(rows, source_adv, x, y)
    det = detector(clf, extra["encoder_file"], source_adv, x, y)
    study = unet_study(clf, train.subset(args.n_train_study, seed=3), source_adv, x, y, args)
    iou = explain(clf, rows, source_adv, x, y, test.classes, docs)
    plot(results, study, docs)
    notes = {
        "classifier": f"`{os.path.relpath(args.classifier, ROOT)}` (lenet, Fashion-MNIST, "
                      f"test acc {meta['metrics'].get('test_acc', '?')} "
                      f"in its metadata); test subset: {args.n} images (seed 0)",
        "learned stages": f"trained for {args.epochs} epochs on {args.n_train} training images (seed 1), the U-Net "
                          f"on {args.n_train_unet} of them with FGSM + PGD-3 pairs (eps ~ U(0.02, 0.2]); stage "
                          f"files in `{os.path.relpath(out, ROOT)}`",
        "DWT-trained": f"a fresh lenet trained {args.epochs_classifier} epochs on the same {args.n_train} images "
                       "and their DWT-haar "
                       "reconstructions (Kaminskyi, DWT study), reconstruction in front at inference; its non-adaptive "
                       "adversarials are the standard lenet's, as in Kaminskyi, DWT study",
        "attacks": "FGSM, BIM-10, PGD-10 (random start, seed 0); step size 2.5·eps/steps",
        "n": args.n,
        "wall time": f"{(time.time() - t_start) / 60:.1f} min" + (
            f" ({', '.join(LOADED)} loaded from the cache, their training not included; `--retrain` includes it)"
            if LOADED else ", training every learned stage"),
    }
    write_section(docs / "benchmarks.md", markdown(command, info, dwt, results, det, study, iou, notes), "defenses")
    raw = {"results": {r: {("/".join(map(str, k)) if isinstance(k, tuple) else k): v for k, v in c.items()}
                       for r, c in results.items()},
           "detector": {"/".join(map(str, k)): v for k, v in det.items()}, "unet_study": study,
           "iou": {"/".join(map(str, k)): v for k, v in iou.items()}}
    (out / "results.json").write_text(json.dumps(raw, indent=1, default=str))
    log(f"done in {(time.time() - t_start) / 60:.1f} min; wrote {docs / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
