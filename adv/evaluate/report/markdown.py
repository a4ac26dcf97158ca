"""The report's markdown: tables and the text around them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from adv.evaluate.rows import NONE, TRACK_LABEL

# --- markdown ---------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "–" if x is None else format(x, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def _pct_ci(x: float | None, ci) -> str:
    """An accuracy with its 95% interval: ``51.0% [46.6, 55.4]``."""
    return _pct(x) if x is None or not ci else f"{_pct(x)} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def accuracy_markdown(summary: dict) -> list[str]:
    keys = list(dict.fromkeys(e["attack_key"] for e in summary["attacks"]))
    eps_groups = list(dict.fromkeys((w["norm"], w["eps"]) for w in summary["worst_case"]))
    acc = {(e["defense"], e["track"], e["attack_key"]): _pct_ci(e["robust_accuracy"], e.get("robust_accuracy_ci"))
           for e in summary["attacks"]}
    worst = {(w["defense"], w["track"], w["norm"], w["eps"]): _pct_ci(w["robust_accuracy"], w.get("robust_accuracy_ci"))
             for w in summary["worst_case"]}
    clean_ci = summary.get("clean_accuracy_ci", {})
    header = ["defense", "track", "clean", *keys, *(f"worst case {n} eps={e:g}" for n, e in eps_groups)]
    rows = []
    for d, clean in summary["clean_accuracy"].items():
        tracks = ["non-adaptive"] + (["adaptive", "any"] if d != NONE and
                                     any(e["defense"] == d and e["track"] == "adaptive" for e in summary["attacks"])
                                     else [])
        for t in tracks:
            label = "white-box" if d == NONE else TRACK_LABEL[t]
            rows.append([d, label, _pct_ci(clean, clean_ci.get(d)), *(acc.get((d, t, k), "–") for k in keys),
                         *(worst.get((d, t, n, e), "–") for n, e in eps_groups)])
    notes = [f"- {TRACK_LABEL[o['track']]}, {o['norm']} eps={o['eps']:g}: {o['note']}."
             for o in summary.get("interval_overlaps", [])]
    return [*_table(header, rows), *(["", "Accuracies carry 95% Wilson intervals (binomial, over the examples).",
                                      *notes] if rows else [])]


def render_markdown(summary: dict, meta: dict, figures: dict[str, Path | None]) -> str:
    """report.md: the sections in reading order."""
    lines = [*_intro(summary, meta), *_robust_section(summary, figures), *_attacks_section(summary),
             *_figure_sections(meta, figures), *_iou_section(summary), *_flags_section(summary),
             *_throughput_section(summary, meta), *_run_section(meta)]
    return "\n".join(lines) + "\n"


def _intro(summary: dict, meta: dict) -> list[str]:
    lines = [f"# Robustness report: {meta.get('name', '')}", "",
             f"Run `{meta.get('run_dir', '')}` (config key `{str(meta.get('key', ''))[:12]}`), "
             f"{summary['examples']} examples from {meta.get('layout', {}).get('source', '?')}."]
    if meta.get("reuse_from"):
        lines += ["", f"Adversarials reused from `{meta['reuse_from']}` (non-adaptive track only; nothing regenerated)."]
    return lines


def _robust_section(summary: dict, figures: dict[str, Path | None]) -> list[str]:
    lines = ["", "## Robust accuracy", "",
             "Robust accuracy per defense. *non-adaptive*: adversarials crafted on the undefended classifier, then "
             "fed through the defense; *adaptive*: crafted on the defended pipeline (BPDA/EOT, detector-aware loss; "
             "query attacks query it); *worst of both*: robust against every attack of both tracks. "
             "A detected adversarial counts as defended; a rejected clean input as an error.", "",
             *accuracy_markdown(summary)]
    if figures.get("curves"):
        lines += ["", f"![accuracy vs eps]({figures['curves'].name})"]
    return lines


def _attacks_section(summary: dict) -> list[str]:
    return ["", "## Attacks", "", *_table(
        ["defense", "track", "attack", "robust acc", "success rate", "mean L2", "mean Linf", "SSIM", "PSNR dB",
         "queries", "detected"],
        [[e["defense"], e["track"], e["attack_key"], _pct_ci(e["robust_accuracy"], e.get("robust_accuracy_ci")),
          _pct(e["success_rate"]),
          _num(e["mean_l2"]), _num(e["mean_linf"]), _num(e["mean_ssim"]), _num(e["mean_psnr"], ".1f"),
          _num(e["mean_queries"], ".0f"), _pct(e["detected_rate"])] for e in summary["attacks"]])]


def _figure_sections(meta: dict, figures: dict[str, Path | None]) -> list[str]:
    lines = []
    if figures.get("examples"):
        lines += ["", "## Examples", "", "Clean, adversarial, and the perturbation magnified "
                  f"x{meta.get('report', {}).get('magnify', 30):g} (shown as 0.5 + k·δ), as in Himbitski et al. 2024. "
                  "Red titles: misclassified.", "", f"![examples]({figures['examples'].name})"]
    if figures.get("gradcam"):
        lines += ["", "## Grad-CAM before and after the defense", "",
                  f"![grad-cam]({figures['gradcam'].name})"]
    return lines


def _iou_section(summary: dict) -> list[str]:
    lines = ["", "## Attention IoU (Wu et al. 2022 (AAD), Table 3)", ""]
    if not summary["attention_iou"]:
        return lines + ["Not computed: add `gradcam` to `features`."]
    cells = sorted({c for e in summary["attention_iou"] for c in e["cells"]})
    return lines + [
        "Mean IoU of the top-N Grad-CAM cells of the clean vs the adversarial image, among examples "
        "correct before the attack, for successful (succeed) and failed (fail) attacks; pairs of two "
        "all-zero maps have no attention area and are left out.", "",
        *_table(["defense", "track", "attack", "n succeed", "n fail", *(f"#cell {c} succeed / fail" for c in cells)],
                [[e["defense"], e["track"], e["attack_key"], e["n_succeed"], e["n_fail"],
                  *(f"{_num(e['cells'].get(c, {}).get('succeed'))} / {_num(e['cells'].get(c, {}).get('fail'))}"
                    for c in cells)] for e in summary["attention_iou"]])]


def _flags_section(summary: dict) -> list[str]:
    return ["", "## Gradient-masking flags", "",
            *([f"- **{f['flag']}**: {f['where']}: {f['detail']}" for f in summary["masking_flags"]]
              or ["None raised (model outputs, gradients, eps and step sweeps, query vs white-box, one-step vs "
                  "iterative, unbounded attacks, adaptive vs non-adaptive: see "
                  "adv/evaluate/report/flags.py masking_flags)."])]


def _throughput_section(summary: dict, meta: dict) -> list[str]:
    return ["", "## Throughput", "", *_table(
        ["attack", "track", "attacked model", "images", "actor seconds", "images/s"],
        [[t["attack_key"], t["track"], t["attacked"], t["images"], f"{t['seconds']:.1f}",
          f"{t['images_per_second']:.1f}"] for t in summary["throughput"]]),
        "", "Attempts (a resumed run has several):", "", *_table(
        ["attempt", "shards", "examples", "wall s", "first result s", "images/s (whole grid)",
         "steady images/s", "actors", "GPUs/actor"],
        [[a.get("attempt"), len(a.get("shards", [])), a.get("examples"), f"{a.get('wall_seconds', 0):.1f}",
          _num(a.get("first_result_seconds"), ".1f"), _num(a.get("images_per_second"), ".2f"),
          _num(a.get("steady_images_per_second"), ".2f"), a.get("actors"), a.get("gpus_per_actor")]
         for a in meta.get("attempts", [])]),
        "", "*First result*: seconds until the first result reached the driver (actor start-up: process, "
        "imports, model load, first batch). *Steady*: images/s after that; the whole-grid rate includes it."]


def _run_section(meta: dict) -> list[str]:
    skipped = meta.get("skipped", [])
    wall = sum(a.get("wall_seconds", 0) for a in meta.get("attempts", []))
    lines = ["", "## Run", "", f"- wall time (all attempts, attack stage): {wall:.1f} s",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items()),
             "- seeds: " + ", ".join(f"{k} {v}" for k, v in meta.get("seeds", {}).items()),
             f"- shards: {meta.get('layout', {}).get('shards')}, chunk size {meta.get('layout', {}).get('chunk_size')}",
             f"- skipped (corrupt or unreadable) images: {len(skipped)}"]
    lines += [f"  - `{p}`: {reason}" for p, reason in skipped[:20]]
    if len(skipped) > 20:
        lines += [f"  - ... and {len(skipped) - 20} more (results.json lists all)"]
    return lines
