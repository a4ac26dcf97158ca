"""The report's markdown: tables and the text around them."""

from __future__ import annotations

from pathlib import Path

from adv.evaluate.report.aggregate import clean_acc
from adv.runs.rows import NONE, TRACK_LABEL
from adv.evaluate.stats import fmt_ci, pct
from adv.evaluate.tables import markdown_table

#: The one track of the undefended classifier, in every table: its attacks are crafted on the model they score.
DIRECT = "direct"


def _track(defense: str, track: str) -> str:
    return DIRECT if defense == NONE else TRACK_LABEL[track]

# --- markdown ---------------------------------------------------------------------------------------------
def _num(x: float | None, fmt: str = ".3g") -> str:
    return "–" if x is None else format(x, fmt)


def _pct_ci(x: float | None, ci) -> str:
    """An accuracy with its 95% interval: ``51.0% [46.6, 55.4]``."""
    return pct(x) if x is None or not ci else fmt_ci(x, ci)


def accuracy_markdown(summary: dict) -> list[str]:
    keys = list(dict.fromkeys(e["attack_key"] for e in summary["attacks"]))
    eps_groups = list(dict.fromkeys((w["norm"], w["eps"]) for w in summary["worst_case"]))
    acc = {(e["defense"], e["track"], e["attack_key"]): _pct_ci(e["robust_accuracy"], e.get("robust_accuracy_ci"))
           for e in summary["attacks"]}
    worst = {(w["defense"], w["track"], w["norm"], w["eps"]): _pct_ci(w["robust_accuracy"], w.get("robust_accuracy_ci"))
             for w in summary["worst_case"]}
    clean, clean_ci = clean_acc(summary)
    header = ["defense", "track", "clean", *keys, *(f"worst case {n} eps={e:g}" for n, e in eps_groups)]
    rows = []
    for d, c in clean.items():
        tracks = ["non-adaptive"] + (["adaptive", "any"] if d != NONE and
                                     any(e["defense"] == d and e["track"] == "adaptive" for e in summary["attacks"])
                                     else [])
        for t in tracks:
            rows.append([d, _track(d, t), _pct_ci(c, clean_ci.get(d)), *(acc.get((d, t, k), "–") for k in keys),
                         *(worst.get((d, t, n, e), "–") for n, e in eps_groups)])
    return [*markdown_table(header, rows),
            *(["", "Accuracies carry 95% Wilson intervals (binomial, over the examples).",
               *_overlap_lines(summary.get("interval_overlaps", []))] if rows else [])]


def _overlap_lines(overlaps: list[dict]) -> list[str]:
    """One table for every pair of defenses whose worst-case intervals overlap somewhere (not a bullet each)."""
    if not overlaps:
        return []
    tracks = [t for t in ("non-adaptive", "adaptive", "any") if any(o["track"] == t for o in overlaps)]
    where: dict[tuple[str, str], dict[str, list[str]]] = {}
    for o in overlaps:
        for a, b in o.get("pairs", ()):
            threat = f"{o['norm']} eps={o['eps']:g}"
            where.setdefault((a, b), {}).setdefault(o["track"], []).append(threat)
    return ["", "Worst cases whose 95% intervals overlap: the difference between the two defenses is within "
            "sampling noise at this n, so neither ranks above the other there.", "",
            *markdown_table(["defenses", *(TRACK_LABEL[t] for t in tracks)],
                    [[f"{a} ~ {b}", *(", ".join(w.get(t, [])) or "–" for t in tracks)]
                     for (a, b), w in where.items()])]


def summary_lines(summary: dict) -> list[str]:
    """The report's first three lines: the best defense with its interval, the undefended baseline, the flags."""
    h = summary.get("headline")
    if not h:
        return []
    threat = f"{h['norm']} eps={h['eps']:g}"
    best, none = h["best"], h["undefended"]
    clean, clean_ci = clean_acc(summary)
    if best is None:
        first = "- **Best defense**: none evaluated (only the undefended classifier)."
    else:
        how = {"any": "adaptive and non-adaptive", "adaptive": "adaptive",
               "non-adaptive": "non-adaptive only, no adaptive attack: it may overstate the defense"}[best["track"]]
        first = (f"- **Best defense**: `{best['defense']}`, worst-case robust accuracy "
                 f"{_pct_ci(best['robust_accuracy'], best['robust_accuracy_ci'])} against every {threat} attack "
                 f"({how}; n={summary['examples']})")
        rivals = [f"`{d}`'s" if d != NONE else "the undefended classifier's" for d in h["overlapping"]]
        first += f"; its interval overlaps {', '.join(rivals)}: no clear winner at this n." if rivals else "."
    second = "- **Undefended**: " + (
        f"{_pct_ci(none['robust_accuracy'], none['robust_accuracy_ci'])} against the same attacks; " if none else "")
    shown = [d for d in clean if d == NONE or (best and d == best["defense"])]
    second += "clean accuracy " + ", ".join(
        f"{_pct_ci(clean[d], clean_ci.get(d))} " + ("undefended" if d == NONE else f"with `{d}`") for d in shown) + "."
    return [first, second, "- **Flags**: " + _flag_digest(summary["masking_flags"])]


def _flag_digest(flags: list[dict]) -> str:
    if not flags:
        return "no gradient-masking flag raised."
    counts: dict[str, int] = {}
    for f in flags:
        counts[f["flag"]] = counts.get(f["flag"], 0) + 1
    listed = ", ".join(f"{code} ×{k}" if k > 1 else code for code, k in counts.items())
    return f"{len(flags)} gradient-masking flag{'s' if len(flags) > 1 else ''}: {listed} (see the flags section)."


def render_markdown(summary: dict, meta: dict, figures: dict[str, Path | None]) -> str:
    """report.md: the sections in reading order."""
    lines = [*_intro(summary, meta), *_robust_section(summary, figures), *_attacks_section(summary),
             *_figure_sections(meta, figures), *_iou_section(summary), *_flags_section(summary),
             *_throughput_section(summary, meta), *_run_section(meta)]
    return "\n".join(lines) + "\n"


def _intro(summary: dict, meta: dict) -> list[str]:
    lines = [f"# Robustness report: {meta.get('name', '')}", "", *summary_lines(summary), "",
             f"Run `{meta.get('run_dir', '')}` (config key `{str(meta.get('key', ''))[:12]}`), "
             f"{summary['examples']} examples from {meta.get('layout', {}).get('source', '?')}."]
    if meta.get("reuse_from"):
        lines += ["", f"Adversarials reused from `{meta['reuse_from']}` "
                      "(non-adaptive track only; nothing regenerated)."]
    return lines


def _robust_section(summary: dict, figures: dict[str, Path | None]) -> list[str]:
    lines = ["", "## Robust accuracy", "",
             f"Robust accuracy per defense. *{DIRECT}*: the undefended classifier attacked itself; "
             "*non-adaptive*: adversarials crafted on the undefended classifier, then "
             "fed through the defense; *adaptive*: crafted on the defended pipeline (BPDA/EOT, detector-aware loss; "
             "query attacks query it); *worst of both*: robust against every attack of both tracks. "
             "A detected adversarial counts as defended; a rejected clean input as an error.", "",
             *accuracy_markdown(summary)]
    if figures.get("curves"):
        lines += ["", f"![accuracy vs eps]({figures['curves'].name})"]
    return lines


def _attacks_section(summary: dict) -> list[str]:
    return ["", "## Attacks", "", *markdown_table(
        ["defense", "track", "attack", "robust acc", "success rate", "mean L2", "mean Linf", "SSIM", "PSNR dB",
         "queries", "detected"],
        [[e["defense"], _track(e["defense"], e["track"]), e["attack_key"],
          _pct_ci(e["robust_accuracy"], e.get("robust_accuracy_ci")),
          pct(e["success_rate"]),
          _num(e["mean_l2"]), _num(e["mean_linf"]), _num(e["mean_ssim"]), _num(e["mean_psnr"], ".1f"),
          _num(e["mean_queries"], ".0f"), pct(e["detected_rate"])] for e in summary["attacks"]])]


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
        *markdown_table(
            ["defense", "track", "attack", "n succeed", "n fail", *(f"#cell {c} succeed / fail" for c in cells)],
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
    return ["", "## Throughput", "", *markdown_table(
        ["attack", "track", "attacked model", "images", "actor seconds", "images/s"],
        [[t["attack_key"], t["track"], t["attacked"], t["images"], f"{t['seconds']:.1f}",
          f"{t['images_per_second']:.1f}"] for t in summary["throughput"]]),
        "", "Attempts (a resumed run has several):", "", *markdown_table(
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
