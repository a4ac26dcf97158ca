"""The evaluation report: tables, curves, example grids, attention IoU and gradient-masking flags.

Ray-free: the job (``jobs.evaluate``) reads the Parquet store and hands this
module plain numpy columns (the row layout of :mod:`adv.runs.rows`,
docs/parquet-schema.md). Writes ``report.md``, ``results.json`` and PNGs.

Conventions:

* robust accuracy follows AutoAttack: an example counts when the defended
  model accepts and classifies it correctly clean *and* it is still
  correct (or detected) under the attack;
* worst case: per example, robust against every attack of the same norm and
  ε (per track, and over both tracks);
* the attention IoU is Wu et al. 2022 (AAD)'s Table 3 (top-N Grad-CAM cells of the clean
  vs the adversarial map, each explaining its own prediction), among examples
  correct before the attack, split by attack success;
* the example grid is Himbitski et al. 2024's: clean, adversarial, perturbation ×30.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from adv.evaluate.report.aggregate import accuracy_entries, clean_accuracy, summarize, worst_case  # noqa: F401
from adv.evaluate.report.figures import plot_curves, plot_examples, plot_gradcam
from adv.evaluate.report.flags import masking_flags  # noqa: F401
from adv.evaluate.report.markdown import render_markdown


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
