"""The report's PNG figures: robust-accuracy curves, example grids, Grad-CAM before/after."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from adv.evaluate.report.aggregate import clean_acc
from adv.runs.rows import NONE

# --- figures -----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series_label(attack_key: str) -> str:
    """``pgd linf eps=0.1 steps=10`` -> ``pgd steps=10`` (the eps axis and the norm row say the rest)."""
    parts = attack_key.split()
    return " ".join(p for i, p in enumerate(parts) if not p.startswith("eps=") and not (i == 1 and p in ("linf", "l2")))


def plot_curves(summary: dict, path: Path) -> Path | None:
    """Robust accuracy vs ε: one row per norm, one column per defense; solid non-adaptive, dashed adaptive."""
    entries = [e for e in summary["attacks"] if math.isfinite(e["eps"])]
    if not entries:
        return None
    plt = _plt()
    clean, _ = clean_acc(summary)
    defenses = list(clean)
    norms = list(dict.fromkeys(e["norm"] for e in entries))
    labels = list(dict.fromkeys(_series_label(e["attack_key"]) for e in entries))
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    fig, axes = plt.subplots(len(norms), len(defenses), figsize=(4.0 * len(defenses), 3.2 * len(norms)),
                             squeeze=False, sharey=True)
    for r, norm in enumerate(norms):
        for c, d in enumerate(defenses):
            ax = axes[r][c]
            series: dict[tuple[str, str], list[dict]] = {}
            for e in entries:
                if e["defense"] == d and e["norm"] == norm:
                    series.setdefault((_series_label(e["attack_key"]), e["track"]), []).append(e)
            for (label, track), s in series.items():
                s = sorted(s, key=lambda e: e["eps"])
                xs = [0.0] + [e["eps"] for e in s]
                ys = [clean[d]] + [e["robust_accuracy"] for e in s]
                ax.plot(xs, ys, "--" if track == "adaptive" else "-", marker="o", ms=3, color=colors[label],
                        label=label + (" (adaptive)" if track == "adaptive" else ""))
            ax.set_title(f"{d} ({norm})", fontsize=9)
            ax.set_xlabel(f"eps ({norm})")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if series:
                ax.legend(fontsize=6)
        axes[r][0].set_ylabel("robust accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _namer(classes: Sequence[str] | None):
    """Class name of an index; the index itself when the names do not cover it (a model with more classes)."""
    return lambda i: classes[i] if classes and 0 <= i < len(classes) else str(i)


def _show(ax, img: np.ndarray, title: str = "", color: str = "black") -> None:
    img = np.clip(img.transpose(1, 2, 0), 0, 1)
    ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1) if img.shape[-1] == 1 else ax.imshow(img)
    ax.set_title(title, fontsize=7, color=color)
    ax.axis("off")


def headline_grid(examples: dict[str, np.ndarray], limit: int = 3) -> list[int]:
    """Grid points shown: per attack, its largest finite ε (non-adaptive, undefended)."""
    sel = (examples["defense"] == NONE) & (examples["track"] == "non-adaptive") & np.isfinite(examples["eps"])
    best: dict[str, tuple[float, int]] = {}
    for a, eps, g in zip(examples["attack"][sel], examples["eps"][sel], examples["grid"][sel]):
        if a not in best or eps > best[a][0]:
            best[a] = (float(eps), int(g))
    return [g for _, g in list(best.values())[:limit]]


def _row(examples, index: int, defense: str, track: str, grid: int) -> int | None:
    hit = np.flatnonzero((examples["index"] == index) & (examples["defense"] == defense)
                         & (examples["track"] == track) & (examples["grid"] == grid))
    return int(hit[0]) if len(hit) else None


def plot_examples(examples: dict[str, np.ndarray], path: Path, magnify: float = 30.0,
                  classes: Sequence[str] | None = None) -> Path | None:
    """Himbitski et al. 2024 Figs. 3-6: clean, adversarial and the perturbation magnified ×``magnify`` (0.5 + k·δ)."""
    if "image" not in examples or not len(examples["index"]):
        return None
    grids = headline_grid(examples)
    if not grids:
        return None
    plt = _plt()
    name = _namer(classes)
    idx = list(dict.fromkeys(examples["index"].tolist()))
    cols = 1 + 2 * len(grids)
    fig, axes = plt.subplots(len(idx), cols, figsize=(1.6 * cols, 1.7 * len(idx)), squeeze=False)
    for i, index in enumerate(idx):
        c = _row(examples, index, NONE, "clean", -1)
        y = int(examples["label"][c])
        _show(axes[i][0], examples["image"][c], f"clean: {name(int(examples['pred'][c]))}\n(true {name(y)})",
              "black" if examples["correct"][c] else "red")
        for j, g in enumerate(grids):
            r = _row(examples, index, NONE, "non-adaptive", g)
            if r is None:
                continue
            _show(axes[i][1 + 2 * j], examples["image"][r],
                  f"{examples['attack_key'][r]}\npred {name(int(examples['pred'][r]))}",
                  "black" if examples["correct"][r] else "red")
            delta = examples["image"][r] - examples["image"][c]
            _show(axes[i][2 + 2 * j], 0.5 + magnify * delta, f"perturbation x{magnify:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from adv.explain.cam import normalize_cam

    t = normalize_cam(torch.from_numpy(np.asarray(cam, np.float32)))[:, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()


def plot_gradcam(examples: dict[str, np.ndarray], path: Path, classes: Sequence[str] | None = None) -> Path | None:
    """Grad-CAM before and after each defense: clean and adversarial through the undefended model,
    then the adversarial through each defense (its classifier explained on the defended input)."""
    if "cam" not in examples or "image" not in examples:
        return None
    grids = headline_grid(examples, limit=1)
    if not grids:
        return None
    import torch

    from adv.explain.heatmaps import overlay

    plt = _plt()
    name = _namer(classes)
    g = grids[0]
    defenses = [d for d in dict.fromkeys(examples["defense"].tolist()) if d != NONE]
    idx = list(dict.fromkeys(examples["index"].tolist()))
    panels = [(NONE, "clean", -1, "clean, no defense"), (NONE, "non-adaptive", g, "adversarial, no defense")]
    panels += [(d, "non-adaptive", g, f"adversarial, after {d}") for d in defenses]
    fig, axes = plt.subplots(len(idx), len(panels), figsize=(2.0 * len(panels), 2.0 * len(idx)), squeeze=False)
    for i, index in enumerate(idx):
        for j, (d, track, grid, title) in enumerate(panels):
            r = _row(examples, index, d, track, grid)
            ax = axes[i][j]
            ax.axis("off")
            if r is None:
                continue
            img = examples["image"][r]
            cam = _upsample(examples["cam"][r][None], img.shape[1:])
            ax.imshow(overlay(torch.from_numpy(img[None]), cam)[0])
            ax.set_title(f"{title}\npred {name(int(examples['pred'][r]))}", fontsize=6,
                         color="black" if examples["correct"][r] else "red")
    fig.suptitle(f"Grad-CAM, {examples['attack_key'][_row(examples, idx[0], NONE, 'non-adaptive', g)]}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
