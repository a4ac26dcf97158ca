"""The sweep's report.md: the selected configuration, warnings, the Pareto figure and a table of every trial."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from adv.evaluate.tables import markdown_table
from adv.numbers import Number
from adv.tuning.objective import TrialRecord, pareto_front

_NAMES = {"clean": "clean", "non_adaptive": "non-adaptive", "adaptive": "adaptive"}


def _fmt(num: Number | None) -> str:
    if num is None:
        return "–"
    lo, hi = num.ci95
    return f"{num.value:.3f} [{lo:.3f}, {hi:.3f}] (n={num.n})"


def _rank(r: TrialRecord) -> float:
    """Best first: the adaptive re-check's objective where there is one, failed trials (NaN) last."""
    return -(r.recheck_objective if r.recheck_objective is not None
             else (r.objective if not math.isnan(r.objective) else -9))


def _trial_row(r: TrialRecord, front_ids: set) -> list[str]:
    obj = f"{r.objective:.3f}" + (f" → {r.recheck_objective:.3f}" if r.recheck_objective is not None else "")
    return [f"{r.trial_id}{'*' if r.trial_id in front_ids else ''}", f"`{r.label}`",
            _fmt(r.recheck.get("clean") or r.numbers.get("clean")), _fmt(r.numbers.get("non_adaptive")),
            _fmt(r.recheck.get("adaptive") or r.numbers.get("adaptive")), obj, f"{r.resource:g}", r.status]


def _points(records: list[TrialRecord]) -> list[tuple[TrialRecord, float, float]]:
    out = []
    for r in records:
        clean, adaptive = r.value("clean"), r.value("adaptive")
        if clean is not None and adaptive is not None:
            out.append((r, clean, adaptive))
    return out


def plot_pareto(records: list[TrialRecord], selected: TrialRecord, path: Path, clean_floor: float | None) -> Path:
    """Clean vs adaptive robust accuracy (non-adaptive in grey where no adaptive number exists)."""
    from adv.evaluate.report.figures import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    grey = [(r.value("clean"), r.value("non_adaptive")) for r in records
            if r.value("adaptive") is None and r.value("non_adaptive") is not None]
    if grey:
        ax.scatter(*zip(*grey), marker="x", color="0.6", label="non-adaptive only (not comparable)")
    pts = _points(records)
    if pts:
        ax.scatter([p[1] for p in pts], [p[2] for p in pts], color="tab:blue", label="adaptive")
        front = [pts[i] for i in pareto_front([(p[1], p[2]) for p in pts])]
        ax.plot([p[1] for p in front], [p[2] for p in front], color="tab:blue", lw=1, ls="--", label="Pareto front")
    sel = (selected.value("clean"), selected.value("adaptive") or selected.value("non_adaptive"))
    ax.scatter([sel[0]], [sel[1]], s=160, facecolors="none", edgecolors="tab:red", lw=2, label="selected")
    if clean_floor is not None and not math.isnan(clean_floor):
        ax.axvline(clean_floor, color="tab:red", lw=0.8, ls=":", label="allowed clean accuracy")
    ax.set_xlabel("clean accuracy (validation)")
    ax.set_ylabel("robust accuracy (validation)")
    ax.set_title("Sweep: clean vs robust accuracy,\nadaptive attacks on each trial's own pipeline", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: Path, *, meta: dict[str, Any], records: list[TrialRecord], selected: TrialRecord,
                 warnings: list[str], final: dict[str, Number] | None, bundle: str | None) -> Path:
    """Write report.md, pareto.png and trials.json to ``out_dir``; returns report.md's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    floor = selected.clean_ref - meta["max_clean_drop"] if selected.clean_ref is not None else None
    plot_pareto(records, selected, out_dir / "pareto.png", floor)
    (out_dir / "trials.json").write_text(json.dumps([r.to_json() for r in records], indent=2, default=str))
    front_ids = {_points(records)[i][0].trial_id for i in pareto_front([(p[1], p[2]) for p in _points(records)])}
    lines = [f"# Sweep `{meta['name']}` ({meta['kind']} trials)", "",
             f"- trials: {len(records)}; search: {meta['search']}; scheduler: {meta['scheduler']}",
             f"- validation subset (every trial): {meta['validation']}",
             f"- test subset (final numbers only): {meta['test']}",
             f"- objective: {meta['objective']}",
             f"- attack grid: {meta['grid']}",
             f"- wall time: {meta.get('wall_seconds', 0):.0f} s; versions: {json.dumps(meta['versions'])}", ""]
    if warnings:
        lines += ["## Warnings", ""] + [f"- **warning:** {w}" for w in warnings] + [""]
    lines += ["## Selected configuration", "", f"- trial `{selected.trial_id}`: `{selected.label}`",
              f"- parameters: `{json.dumps(dict(selected.candidate.params), default=str)}`"]
    for t in ("clean", "non_adaptive", "adaptive"):
        num = selected.recheck.get(t) or selected.numbers.get(t)
        if num:
            lines.append(f"- validation {_NAMES[t]}: {_fmt(num)} — {num.label}")
    if final:
        lines += ["", "Final numbers on the **test subset** (disjoint from the validation subset the sweep saw):", ""]
        lines += [f"- {_NAMES[t]}: {_fmt(n)} — {n.label} ({n.subset})" for t, n in final.items()]
    if bundle:
        lines += ["", f"Bundle: `{bundle}` (load it with `adv eval --bundle {bundle}`)."]
    lines += ["", "## Pareto front", "", "![clean vs adaptive robust accuracy](pareto.png)", "",
              "## Every trial", "",
              "Validation numbers with Wilson 95% intervals. *non-adaptive*: adversarials crafted on the undefended "
              "classifier; *adaptive*: crafted on the trial's own pipeline (for stored trials, the adaptive re-check)."
              " `*` marks the Pareto front of clean vs adaptive.", "",
              *markdown_table(["trial", "configuration", "clean", "non-adaptive", "adaptive", "objective", "resource",
                               "status"], [_trial_row(r, front_ids) for r in sorted(records, key=_rank)])]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep_meta(cfg, split, grid, search: str, sched: str, wall: float, versions: dict) -> dict:
    """The report's header facts of the sweep ``cfg`` (``jobs.tune``'s ``TuneConfig``)."""
    objective = (f"maximize adaptive robust accuracy subject to a clean-accuracy drop of at most "
                 f"{cfg.objective.max_clean_drop:g} (penalty: robust - 1 - breach below the allowed clean accuracy)"
                 + (f"; stored trials rank on the non-adaptive number, the best {cfg.objective.recheck} are "
                    "re-checked adaptively and the selection uses the re-check" if cfg.kind == "stored" else "")
                 + ("; training trials marked for catastrophic overfitting (multi-step accuracy collapsing while "
                    "FGSM accuracy rises, Wong et al. 2020) are never selected"
                    if cfg.kind == "training" or cfg.training_sweep is not None else ""))
    kind = cfg.kind + (" + training" if cfg.training_sweep is not None else "")
    return {"name": cfg.name, "kind": kind, "search": search, "scheduler": sched,
            "validation": split.describe("validation"), "test": split.describe("test"), "objective": objective,
            "grid": "; ".join(gp.key for gp in grid), "wall_seconds": wall, "versions": versions,
            "max_clean_drop": cfg.objective.max_clean_drop}


def write_sweep_report(store, meta, records, selected, warnings, final, bundle) -> str:
    """:func:`write_report` into the run's store (an :class:`adv.runs.store.RunStore`, local or a URI)."""
    import tempfile

    local = store.local_dir()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_report(local or Path(tmp), meta=meta, records=records, selected=selected, warnings=warnings,
                            final=final, bundle=bundle)
        if local is None:
            store.put_folder(tmp)
            return f"{store.uri.rstrip('/')}/report.md"
    return str(path)
