"""Aggregation of result rows: accuracies per grid point, worst cases, throughput, attention IoU."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from adv.evaluate.checks import worst_case_mask
from adv.evaluate.report.flags import masking_flags
from adv.runs.rows import NONE, TRACK_ORDER
from adv.evaluate.stats import accuracy_ci, intervals_overlap, overlap_note



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
            "robust_accuracy_ci": list(accuracy_ci(int(robust.sum()), len(r))),
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
            alive = worst_case_mask(ok[defense], rows["index"][r], rows["robust"][r])
            tracks = sorted(set(rows["track"][r].tolist()))
            if track_sel == "any" and len(tracks) < 2:
                continue  # identical to the single track
            out.append({"defense": defense, "track": track_sel, "norm": norm, "eps": float(eps),
                        "attacks": sorted(set(rows["attack_key"][r].tolist())),
                        "robust_accuracy": float(alive[present].mean()),
                        "robust_accuracy_ci": list(accuracy_ci(int(alive[present].sum()), len(present)))})
    return out


def interval_overlaps(worst: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (track, norm, ε) with several defenses: the pairs whose 95% intervals overlap, and a note naming them."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for w in worst:
        groups.setdefault((w["track"], w["norm"], w["eps"]), {})[w["defense"]] = w["robust_accuracy_ci"]
    out = []
    for (t, n, e), cis in groups.items():
        names = list(cis)
        pairs = [[a, b] for i, a in enumerate(names) for b in names[i + 1:] if intervals_overlap(cis[a], cis[b])]
        if len(cis) > 1 and pairs:
            out.append({"track": t, "norm": n, "eps": e, "pairs": pairs, "note": overlap_note(cis)})
    return out


def clean_acc(summary: dict[str, Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """A summary's clean accuracies and intervals per defense; reads results.json written before the key was
    ``clean_acc`` (it was ``clean_accuracy``, unlike ``EvalResult.clean_acc``)."""
    if "clean_acc" in summary:
        return summary["clean_acc"], summary.get("clean_acc_ci", {})
    return summary.get("clean_accuracy", {}), summary.get("clean_accuracy_ci", {})


def headline(worst: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The report's first lines: the threat model (norm, ε) with the most attacks (ties: the larger ε), each
    defense's worst case there (worst of both tracks where an adaptive attack ran), the best defended one and
    the defenses (``none`` too) whose intervals overlap the best one's."""
    if not worst:
        return None
    attacks: dict[tuple, set] = {}
    for w in worst:
        attacks.setdefault((w["norm"], w["eps"]), set()).update(w["attacks"])
    norm, eps = max(attacks, key=lambda k: (len(attacks[k]), k[1]))
    per_defense: dict[str, dict] = {}
    for w in worst:  # the strictest track of each defense: any (both tracks) < adaptive < non-adaptive
        if (w["norm"], w["eps"]) == (norm, eps):
            best_so_far = per_defense.get(w["defense"])
            if best_so_far is None or _STRICT[w["track"]] < _STRICT[best_so_far["track"]]:
                per_defense[w["defense"]] = w
    defended = sorted((w for d, w in per_defense.items() if d != NONE), key=lambda w: -w["robust_accuracy"])
    best = defended[0] if defended else None
    rivals = [w["defense"] for w in [*defended[1:], *([per_defense[NONE]] if NONE in per_defense else [])]
              if intervals_overlap(w["robust_accuracy_ci"], best["robust_accuracy_ci"])] if best else []
    return {"norm": norm, "eps": eps, "attacks": sorted(attacks[(norm, eps)]), "best": best,
            "undefended": per_defense.get(NONE), "overlapping": rivals}


_STRICT = {"any": 0, "adaptive": 1, "non-adaptive": 2}


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
    """Wu et al. 2022 (AAD) Table 3 per (defense, track, grid point) from stored Grad-CAM maps."""
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




def summarize(rows: dict[str, np.ndarray], cells: Sequence[int] = (5, 10, 20, 30),
              defense_order: Sequence[str] = (), input_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """Everything results.json holds about the rows; defenses listed "none" first, then in ``defense_order``."""
    rank = {d: i for i, d in enumerate([NONE, *defense_order])}

    def order(entries: list[dict]) -> list[dict]:
        return sorted(entries, key=lambda e: (rank.get(e.get("defense", e.get("attacked")), len(rank)),
                                              TRACK_ORDER.get(e["track"], 9), e.get("grid", 0), e.get("eps", 0)))

    entries = order(accuracy_entries(rows))
    clean = clean_accuracy(rows)
    present = np.unique(rows["index"])
    worst = order(worst_case(rows))
    return {
        "examples": int(len(present)),
        "clean_acc": dict(sorted(clean.items(), key=lambda kv: rank.get(kv[0], len(rank)))),
        "clean_acc_ci": {d: list(accuracy_ci(int(ok[present].sum()), len(present)))
                              for d, ok in clean_ok(rows).items()},
        "attacks": entries,
        "worst_case": worst,
        "interval_overlaps": interval_overlaps(worst),
        "headline": headline(worst),
        "throughput": order(throughput(rows)),
        "attention_iou": order(iou_entries(rows, cells)),
        "masking_flags": masking_flags(entries, rows, input_shape),
    }
