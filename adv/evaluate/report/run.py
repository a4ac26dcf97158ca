"""The report of a stored run: its rows read back (:class:`adv.evaluate.stored.StoredRun`) into report.md,
results.json and the figures, written into the run's folder (or its URI)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from adv.evaluate.report import write_report
from adv.evaluate.stored import StoredRun


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
