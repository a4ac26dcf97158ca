"""The report of a stored run: its rows read back (:class:`adv.runs.stored.StoredRun`) into report.md,
results.json and the figures, written into the run's folder (or its URI)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from adv.runs.layout import Layout
from adv.evaluate.report import write_report
from adv.runs.store import RunStore
from adv.runs.stored import StoredRun


def run_meta(store: RunStore, cfg, layout: Layout, versions: dict) -> dict[str, Any]:
    """The report's facts about the run of ``cfg`` (``jobs.evaluate``'s ``EvalConfig``) in ``store``: its key and
    config as stored, seeds, attempts, layout, defenses, the driver's model checks, the report options."""
    run_info = store.read_json("run.json")
    checks = store.read_json("checks.json") if store.exists("checks.json") else {}
    return {
        "name": cfg.name, "key": run_info["key"], "run_dir": store.uri, "config": run_info["config"],
        "versions": versions, "seeds": {"dataset": cfg.dataset.seed if cfg.dataset else None, "attacks": cfg.seed},
        "attempts": store.attempts(),
        "layout": {"n": layout.n, "shards": layout.shards, "chunk_size": layout.chunk_size, "source": layout.source,
                   "classes": layout.classes},
        "skipped": layout.skipped, "reuse_from": cfg.reuse_from, "defenses": [d.label for d in cfg.defenses],
        "input_shape": checks.get("input_shape"), "model_checks": checks.get("flags", []),
        "report": cfg.report.model_dump(),
    }


def write_run_report(run: StoredRun, meta: dict[str, Any], examples: int) -> tuple[str, dict]:
    """Write the report of ``run`` (its grids show the first ``examples`` examples); its path and summary."""
    rows, first = run.report_rows(examples)
    store = run.store
    with tempfile.TemporaryDirectory() as tmp:
        local = store.local_dir() or Path(tmp)
        summary = write_report(rows, first, meta, local)
        if store.local_dir() is None:
            store.put_folder(tmp)
    path = store.path("report.md") if store.local else f"{store.uri.rstrip('/')}/report.md"
    return path, summary
