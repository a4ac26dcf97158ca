"""The evaluation report: tables, curves, example grids, attention IoU and gradient-masking flags.

Ray-free: the job (``jobs.evaluate``) reads the Parquet store and hands this
module plain numpy columns (the row layout of :mod:`adv.pipeline`,
docs/parquet-schema.md). Writes ``report.md``, ``results.json`` and PNGs.

Conventions:

* robust accuracy follows AutoAttack: an example counts when the defended
  model accepts and classifies it correctly clean *and* it is still
  correct (or detected) under the attack;
* worst case: per example, robust against every attack of the same norm and
  ε (per track, and over both tracks);
* the attention IoU is seed 004's Table 3 (top-N Grad-CAM cells of the clean
  vs the adversarial map, each explaining its own prediction), among examples
  correct before the attack, split by attack success;
* the example grid is seed 003's: clean, adversarial, perturbation ×30.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

NONE = "none"
#: Track names as the report prints them; the undefended model's "non-adaptive" rows are plain white-box.
TRACK_LABEL = {"clean": "clean", "non-adaptive": "non-adaptive", "adaptive": "adaptive", "any": "worst of both"}


# --- aggregation ------------------------------------------------------------------------------------
def _group(*cols: np.ndarray) -> tuple[list[tuple], np.ndarray]:
    """Unique key tuples (in first-seen order) and each row's group id."""
    keys = np.array(["\x1f".join(map(str, t)) for t in zip(*cols)]) if len(cols[0]) else np.array([], str)
    uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    order = np.argsort(first)
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    tuples = [tuple(c[first[i]] for c in cols) for i in order]
    return tuples, remap[inv]


def clean_ok(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per defense: bool array over example index, True where the clean input is accepted and correct."""
    n = int(rows["index"].max()) + 1 if len(rows["index"]) else 0
    out = {}
    clean = rows["track"] == "clean"
    for d in dict.fromkeys(rows["defense"][clean].tolist()):
        sel = clean & (rows["defense"] == d)
        arr = np.zeros(n, bool)
        arr[rows["index"][sel]] = rows["robust"][sel]
        out[d] = arr
    return out


def _nanmean(x: np.ndarray) -> float | None:
    """Mean ignoring NaN (an IoU of two all-zero maps is undefined); None when nothing is left."""
    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else None


def _finite_mean(x: np.ndarray) -> float | None:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


def accuracy_entries(rows: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One entry per (defense, track, grid point): robust accuracy, success rate, perturbation statistics."""
    ok = clean_ok(rows)
    attacked = rows["track"] != "clean"
    idx = np.flatnonzero(attacked)
    keys, gid = _group(rows["defense"][idx], rows["track"][idx], rows["grid"][idx])
    out = []
    for g, (defense, track, grid) in enumerate(keys):
        r = idx[gid == g]
        c_ok = ok[defense][rows["index"][r]]
        robust = c_ok & rows["robust"][r]
        q = rows["queries"][r]
        out.append({
            "defense": defense, "track": track, "grid": int(grid), "attack": rows["attack"][r[0]],
            "attack_key": rows["attack_key"][r[0]], "norm": rows["norm"][r[0]], "eps": float(rows["eps"][r[0]]),
            "steps": int(rows["steps"][r[0]]), "n": len(r), "robust_accuracy": float(robust.mean()),
            "success_rate": float(rows["success"][r].sum() / c_ok.sum()) if c_ok.any() else None,
            "mean_l2": _finite_mean(rows["l2"][r]), "mean_linf": _finite_mean(rows["linf"][r]),
            "mean_ssim": _finite_mean(rows["ssim"][r]), "mean_psnr": _finite_mean(rows["psnr"][r]),
            "mean_queries": float(q.mean()) if (q >= 0).all() else None,
            "detected_rate": float(rows["detected"][r].mean()),
        })
    return out


def clean_accuracy(rows: dict[str, np.ndarray]) -> dict[str, float]:
    return {d: float(v[np.unique(rows["index"])].mean()) for d, v in clean_ok(rows).items()}


def worst_case(rows: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per defense, track ("any" = both) and (norm, ε): the fraction robust against every attack."""
    ok = clean_ok(rows)
    present = np.unique(rows["index"])
    attacked = np.flatnonzero(rows["track"] != "clean")
    out = []
    for track_sel in ("non-adaptive", "adaptive", "any"):
        sel = attacked if track_sel == "any" else attacked[rows["track"][attacked] == track_sel]
        keys, gid = _group(rows["defense"][sel], rows["norm"][sel], rows["eps"][sel])
        for g, (defense, norm, eps) in enumerate(keys):
            r = sel[gid == g]
            alive = ok[defense].copy()
            np.logical_and.at(alive, rows["index"][r], rows["robust"][r])
            tracks = sorted(set(rows["track"][r].tolist()))
            if track_sel == "any" and len(tracks) < 2:
                continue  # identical to the single track
            out.append({"defense": defense, "track": track_sel, "norm": norm, "eps": float(eps),
                        "attacks": sorted(set(rows["attack_key"][r].tolist())),
                        "robust_accuracy": float(alive[present].mean())})
    return out


def throughput(rows: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Images/s of each attack on the model it attacked (actor compute time, from ``gen_seconds``)."""
    sel = np.flatnonzero(rows["gen_seconds"] > 0)
    keys, gid = _group(rows["track"][sel], rows["defense"][sel], rows["attack_key"][sel])
    out = []
    for g, (track, defense, key) in enumerate(keys):
        r = sel[gid == g]
        seconds = float(rows["gen_seconds"][r].sum())
        out.append({"attack_key": key, "track": track, "attacked": defense if track == "adaptive" else NONE,
                    "images": len(r), "seconds": seconds, "images_per_second": len(r) / seconds})
    return out


def iou_entries(rows: dict[str, np.ndarray], cells: Sequence[int]) -> list[dict[str, Any]]:
    """Seed 004 Table 3 per (defense, track, grid point) from stored Grad-CAM maps."""
    import torch

    from adv.explain.iou import attention_iou

    if "cam" not in rows:
        return []
    ok = clean_ok(rows)
    n = len(next(iter(ok.values()))) if ok else 0
    grid_cells = rows["cam"].shape[1] * rows["cam"].shape[2]
    clean_cam = {}
    for d in ok:
        sel = (rows["track"] == "clean") & (rows["defense"] == d)
        cams = np.zeros((n, *rows["cam"].shape[1:]), np.float32)
        cams[rows["index"][sel]] = rows["cam"][sel]
        clean_cam[d] = cams
    attacked = np.flatnonzero(rows["track"] != "clean")
    keys, gid = _group(rows["defense"][attacked], rows["track"][attacked], rows["grid"][attacked])
    out = []
    for g, (defense, track, _grid) in enumerate(keys):
        r = attacked[gid == g]
        index = rows["index"][r]
        was_ok = ok[defense][index]
        succeed, fail = was_ok & rows["success"][r], was_ok & ~rows["success"][r]
        entry = {"defense": defense, "track": track, "grid": int(_grid), "attack_key": rows["attack_key"][r[0]],
                 "n_succeed": int(succeed.sum()), "n_fail": int(fail.sum()), "cells": {}}
        a, b = torch.from_numpy(clean_cam[defense][index]), torch.from_numpy(np.asarray(rows["cam"][r]))
        for c in cells:
            if c > grid_cells:
                continue
            iou = attention_iou(a, b, cells=int(c)).numpy()
            entry["cells"][int(c)] = {"succeed": _nanmean(iou[succeed]), "fail": _nanmean(iou[fail])}
        out.append(entry)
    return out


# --- gradient-masking flags -----------------------------------------------------------------------------
ITERATIVE = ("pgd", "apgd", "bim", "iter_stepll", "cw", "deepfool")


def _flag(code: str, where: str, detail: str) -> dict[str, str]:
    return {"flag": code, "where": where, "detail": detail}


def masking_flags(entries: list[dict[str, Any]], rows: dict[str, np.ndarray] | None = None,
                  input_shape: Sequence[int] | None = None, margin: float = 0.02) -> list[dict[str, str]]:
    """Signs of gradient masking in the results (Athalye et al. 2018 §3.1; Carlini et al. 2019 §5).

    The checks of :mod:`adv.evaluate.checks`, applied to the stored grid:
    ``eps_not_monotone``/``eps_not_to_zero`` (per attack over its ε values),
    ``more_steps_weaker`` (per attack over its step budgets) and, per example,
    ``query_beats_whitebox``. Three more that a grid makes possible:
    ``one_step_beats_iterative``, ``unbounded_not_zero`` (an ε = inf attack
    leaves accuracy above ``margin``) and ``adaptive_much_stronger`` (the
    non-adaptive numbers overstate the defense's robustness).
    """
    from adv.attacks import get_attack
    from adv.evaluate.checks import check_steps, check_sweep

    flags: list[dict[str, str]] = []
    n = max((e["n"] for e in entries), default=1)
    shape = tuple(input_shape) if input_shape else (10**6,)  # unknown: eps_not_to_zero never fires
    series: dict[tuple, list[dict]] = {}
    for e in entries:
        if math.isfinite(e["eps"]):
            series.setdefault((e["defense"], e["track"], e["attack"], e["norm"], e["steps"]), []).append(e)
    for (defense, track, attack, norm, steps), s in series.items():
        s = sorted(s, key=lambda e: e["eps"])
        for f in check_sweep([e["eps"] for e in s], [e["robust_accuracy"] for e in s], norm, shape, n):
            flags.append(_flag(f.code, f"{defense} ({track}), {attack} {norm}", f.message))
    budgets: dict[tuple, list[dict]] = {}
    for e in entries:
        if e["steps"] > 0:
            budgets.setdefault((e["defense"], e["track"], e["attack"], e["norm"], e["eps"]), []).append(e)
    for (defense, track, attack, norm, eps), s in budgets.items():
        s = sorted(s, key=lambda e: e["steps"])
        for few, many in zip(s, s[1:]):
            for f in check_steps(few["robust_accuracy"], many["robust_accuracy"], few["steps"], many["steps"], n):
                flags.append(_flag(f.code, f"{defense} ({track}), {attack} {norm} eps={eps:g}", f.message))
    by: dict[tuple, list[dict]] = {}
    for e in entries:
        by.setdefault((e["defense"], e["track"], e["norm"], e["eps"]), []).append(e)
    for (defense, track, norm, eps), group in by.items():
        where = f"{defense} ({track}), {norm} eps={eps:g}"
        white = [e for e in group if get_attack(e["attack"]).family == "whitebox"]
        one_step = [e for e in white if e["steps"] < 0 and e["attack"] not in ITERATIVE]
        for o in one_step:
            for it in (e for e in white if e["attack"] in ITERATIVE):
                if o["robust_accuracy"] + margin < it["robust_accuracy"]:
                    flags.append(_flag("one_step_beats_iterative", where,
                                       f"{o['attack_key']}: {o['robust_accuracy']:.1%} < "
                                       f"{it['attack_key']}: {it['robust_accuracy']:.1%}"))
        for e in group:
            if math.isinf(e["eps"]) and e["robust_accuracy"] > margin:
                flags.append(_flag("unbounded_not_zero", where, f"{e['attack_key']}: {e['robust_accuracy']:.1%}"))
        if rows is not None and white and len(white) < len(group):
            beaten = _query_beats_whitebox(rows, defense, track, norm, eps, {e["grid"] for e in white})
            if beaten:
                flags.append(_flag("query_beats_whitebox", where,
                                   f"a query-based attack fooled {beaten} example(s) that survived every white-box "
                                   "attack: the gradients may be masked"))
    pairs: dict[tuple, dict[str, dict]] = {}
    for e in entries:
        pairs.setdefault((e["defense"], e["grid"]), {})[e["track"]] = e
    for (defense, _), p in pairs.items():
        if "adaptive" in p and "non-adaptive" in p:
            na, ad = p["non-adaptive"]["robust_accuracy"], p["adaptive"]["robust_accuracy"]
            if na - ad > 0.1:
                flags.append(_flag("adaptive_much_stronger", defense,
                                   f"{p['adaptive']['attack_key']}: non-adaptive {na:.1%} vs adaptive {ad:.1%}"))
    return flags


def _query_beats_whitebox(rows, defense, track, norm, eps, white_grids: set[int]) -> int:
    """Examples a query attack fooled although every white-box attack (same norm, ε) failed."""
    sel = ((rows["defense"] == defense) & (rows["track"] == track) & (rows["norm"] == norm)
           & (rows["eps"] == eps))
    is_white = np.isin(rows["grid"], list(white_grids))
    fooled_white = set(rows["index"][sel & is_white & rows["success"]].tolist())
    fooled_query = set(rows["index"][sel & ~is_white & rows["success"]].tolist())
    return len(fooled_query - fooled_white)


TRACK_ORDER = {"clean": 0, "non-adaptive": 1, "adaptive": 2, "any": 3}


def summarize(rows: dict[str, np.ndarray], cells: Sequence[int] = (5, 10, 20, 30),
              defense_order: Sequence[str] = (), input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """Everything results.json holds about the rows; defenses listed "none" first, then in ``defense_order``."""
    rank = {d: i for i, d in enumerate([NONE, *defense_order])}

    def order(entries: list[dict]) -> list[dict]:
        return sorted(entries, key=lambda e: (rank.get(e.get("defense", e.get("attacked")), len(rank)),
                                              TRACK_ORDER.get(e["track"], 9), e.get("grid", 0), e.get("eps", 0)))

    entries = order(accuracy_entries(rows))
    clean = clean_accuracy(rows)
    return {
        "examples": int(len(np.unique(rows["index"]))),
        "clean_accuracy": dict(sorted(clean.items(), key=lambda kv: rank.get(kv[0], len(rank)))),
        "attacks": entries,
        "worst_case": order(worst_case(rows)),
        "throughput": order(throughput(rows)),
        "attention_iou": order(iou_entries(rows, cells)),
        "masking_flags": masking_flags(entries, rows, input_shape),
    }


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
    defenses = list(summary["clean_accuracy"])
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
                ys = [summary["clean_accuracy"][d]] + [e["robust_accuracy"] for e in s]
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
    """Seed 003 Figs. 3-6: clean, adversarial and the perturbation magnified ×``magnify`` (0.5 + k·δ)."""
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


# --- markdown ---------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "–" if x is None else format(x, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def accuracy_markdown(summary: dict) -> list[str]:
    keys = list(dict.fromkeys(e["attack_key"] for e in summary["attacks"]))
    eps_groups = list(dict.fromkeys((w["norm"], w["eps"]) for w in summary["worst_case"]))
    acc = {(e["defense"], e["track"], e["attack_key"]): e["robust_accuracy"] for e in summary["attacks"]}
    worst = {(w["defense"], w["track"], w["norm"], w["eps"]): w["robust_accuracy"] for w in summary["worst_case"]}
    header = ["defense", "track", "clean", *keys, *(f"worst case {n} eps={e:g}" for n, e in eps_groups)]
    rows = []
    for d, clean in summary["clean_accuracy"].items():
        tracks = ["non-adaptive"] + (["adaptive", "any"] if d != NONE and
                                     any(e["defense"] == d and e["track"] == "adaptive" for e in summary["attacks"])
                                     else [])
        for t in tracks:
            label = "white-box" if d == NONE else TRACK_LABEL[t]
            rows.append([d, label, _pct(clean), *(_pct(acc.get((d, t, k))) for k in keys),
                         *(_pct(worst.get((d, t, n, e))) for n, e in eps_groups)])
    return _table(header, rows)


def render_markdown(summary: dict, meta: dict, figures: dict[str, Path | None]) -> str:
    attempts = meta.get("attempts", [])
    wall = sum(a.get("wall_seconds", 0) for a in attempts)
    lines = [f"# Robustness report: {meta.get('name', '')}", "",
             f"Run `{meta.get('run_dir', '')}` (config key `{str(meta.get('key', ''))[:12]}`), "
             f"{summary['examples']} examples from {meta.get('layout', {}).get('source', '?')}."]
    if meta.get("reuse_from"):
        lines += ["", f"Adversarials reused from `{meta['reuse_from']}` (non-adaptive track only; nothing regenerated)."]
    lines += ["", "## Robust accuracy", "",
              "Robust accuracy per defense. *non-adaptive*: adversarials crafted on the undefended classifier, then "
              "fed through the defense; *adaptive*: crafted on the defended pipeline (BPDA/EOT, detector-aware loss; "
              "query attacks query it); *worst of both*: robust against every attack of both tracks. "
              "A detected adversarial counts as defended; a rejected clean input as an error.", "",
              *accuracy_markdown(summary)]
    if figures.get("curves"):
        lines += ["", f"![accuracy vs eps]({figures['curves'].name})"]
    lines += ["", "## Attacks", "", *_table(
        ["defense", "track", "attack", "robust acc", "success rate", "mean L2", "mean Linf", "SSIM", "PSNR dB",
         "queries", "detected"],
        [[e["defense"], e["track"], e["attack_key"], _pct(e["robust_accuracy"]), _pct(e["success_rate"]),
          _num(e["mean_l2"]), _num(e["mean_linf"]), _num(e["mean_ssim"]), _num(e["mean_psnr"], ".1f"),
          _num(e["mean_queries"], ".0f"), _pct(e["detected_rate"])] for e in summary["attacks"]])]
    if figures.get("examples"):
        lines += ["", "## Examples", "", "Clean, adversarial, and the perturbation magnified "
                  f"x{meta.get('report', {}).get('magnify', 30):g} (shown as 0.5 + k·δ), as in seed 003. "
                  "Red titles: misclassified.", "", f"![examples]({figures['examples'].name})"]
    if figures.get("gradcam"):
        lines += ["", "## Grad-CAM before and after the defense", "",
                  f"![grad-cam]({figures['gradcam'].name})"]
    lines += ["", "## Attention IoU (seed 004, Table 3)", ""]
    if summary["attention_iou"]:
        cells = sorted({c for e in summary["attention_iou"] for c in e["cells"]})
        lines += ["Mean IoU of the top-N Grad-CAM cells of the clean vs the adversarial image, among examples "
                  "correct before the attack, for successful (succeed) and failed (fail) attacks; pairs of two "
                  "all-zero maps have no attention area and are left out.", "",
                  *_table(["defense", "track", "attack", "n succeed", "n fail",
                           *(f"#cell {c} succeed / fail" for c in cells)],
                          [[e["defense"], e["track"], e["attack_key"], e["n_succeed"], e["n_fail"],
                            *(f"{_num(e['cells'].get(c, {}).get('succeed'))} / {_num(e['cells'].get(c, {}).get('fail'))}"
                              for c in cells)] for e in summary["attention_iou"]])]
    else:
        lines += ["Not computed: add `gradcam` to `features`."]
    lines += ["", "## Gradient-masking flags", ""]
    lines += ([f"- **{f['flag']}**: {f['where']}: {f['detail']}" for f in summary["masking_flags"]]
              or ["None raised (model outputs, gradients, eps and step sweeps, query vs white-box, one-step vs "
                  "iterative, unbounded attacks, adaptive vs non-adaptive: see adv/report.py masking_flags)."])
    lines += ["", "## Throughput", "", *_table(
        ["attack", "track", "attacked model", "images", "actor seconds", "images/s"],
        [[t["attack_key"], t["track"], t["attacked"], t["images"], f"{t['seconds']:.1f}",
          f"{t['images_per_second']:.1f}"] for t in summary["throughput"]])]
    lines += ["", "Attempts (a resumed run has several):", "", *_table(
        ["attempt", "shards", "examples", "wall s", "first result s", "images/s (whole grid)",
         "steady images/s", "actors", "GPUs/actor"],
        [[a.get("attempt"), len(a.get("shards", [])), a.get("examples"), f"{a.get('wall_seconds', 0):.1f}",
          _num(a.get("first_result_seconds"), ".1f"), _num(a.get("images_per_second"), ".2f"),
          _num(a.get("steady_images_per_second"), ".2f"), a.get("actors"), a.get("gpus_per_actor")]
         for a in attempts])]
    lines += ["", "*First result*: seconds until the first result reached the driver (actor start-up: process, "
              "imports, model load, first batch). *Steady*: images/s after that; the whole-grid rate includes it."]
    skipped = meta.get("skipped", [])
    lines += ["", "## Run", "", f"- wall time (all attempts, attack stage): {wall:.1f} s",
              f"- versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
              f"- seeds: " + ", ".join(f"{k} {v}" for k, v in meta.get("seeds", {}).items()),
              f"- shards: {meta.get('layout', {}).get('shards')}, chunk size {meta.get('layout', {}).get('chunk_size')}",
              f"- skipped (corrupt or unreadable) images: {len(skipped)}"]
    lines += [f"  - `{p}`: {reason}" for p, reason in skipped[:20]]
    if len(skipped) > 20:
        lines += [f"  - ... and {len(skipped) - 20} more (results.json lists all)"]
    return "\n".join(lines) + "\n"


def write_report(rows: dict[str, np.ndarray], examples: dict[str, np.ndarray], meta: dict[str, Any],
                 out_dir: str | Path) -> dict[str, Any]:
    """Write report.md, results.json and the figures into ``out_dir``; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = meta.get("report", {})
    summary = summarize(rows, opts.get("iou_cells", (5, 10, 20, 30)), meta.get("defenses", ()),
                        meta.get("input_shape"))
    summary["masking_flags"] = list(meta.get("model_checks", [])) + summary["masking_flags"]
    classes = meta.get("layout", {}).get("classes")
    figures = {
        "curves": plot_curves(summary, out / "accuracy_vs_eps.png"),
        "examples": plot_examples(examples, out / "examples.png", opts.get("magnify", 30.0), classes),
        "gradcam": plot_gradcam(examples, out / "gradcam.png", classes),
    }
    results = {**summary, "skipped": {"count": len(meta.get("skipped", [])), "files": meta.get("skipped", [])},
               **{k: meta.get(k) for k in ("name", "key", "run_dir", "versions", "seeds", "attempts", "layout",
                                           "reuse_from", "config")},
               "wall_seconds": sum(a.get("wall_seconds", 0) for a in meta.get("attempts", [])),
               "figures": {k: v.name for k, v in figures.items() if v}}
    (out / "results.json").write_text(json.dumps(_finite(results), indent=2, default=_json_default))
    (out / "report.md").write_text(render_markdown(summary, meta, figures))
    return results


def _finite(o):
    """Strict JSON: inf becomes "inf", NaN becomes null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
