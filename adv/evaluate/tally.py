"""The driver's view of an evaluation attempt: part metadata per shard, shard commits, per-node work. Never rows.

The workers write their result rows as parts (:mod:`adv.runs.store`) and return one metadata row per part
(:data:`PART_COLUMNS`); :class:`Tally` counts them and, the moment a shard has all its examples, starts its
commit through the injected ``submit`` (``jobs.evaluate`` makes it a Ray task) and later waits for it with
``wait``. :class:`Arrivals` separates the pool's start-up from its steady throughput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from adv.runs.layout import Layout
from adv.runs.store import RunStore

#: What a worker returns per part written: metadata only, never result rows.
PART_COLUMNS = ("shard", "part", "rows", "examples", "node", "compute_seconds", "write_seconds")
#: The sort order of a shard's rows (each part is sorted; parts are committed in order of their first example).
ROW_ORDER = [("index", "ascending"), ("track", "ascending"), ("defense", "ascending"), ("grid", "ascending")]


def write_parts(store: RunStore, table: pa.Table, attempt: int, node: str, seconds: float) -> dict[str, np.ndarray]:
    """Write a worker's result rows as one part per shard they belong to (``seconds``: the time it spent on
    them, shared out by rows); the metadata rows (:data:`PART_COLUMNS`)."""
    shard_col = table.column("shard").to_numpy()
    meta: dict[str, list] = {c: [] for c in PART_COLUMNS}
    for k in np.unique(shard_col).tolist():
        part = table.filter(pa.array(shard_col == k)).sort_by(ROW_ORDER)
        t0 = time.perf_counter()
        name = store.write_part(k, part, attempt)
        meta["write_seconds"].append(time.perf_counter() - t0)
        meta["shard"].append(k)
        meta["part"].append(name)
        meta["rows"].append(part.num_rows)
        meta["examples"].append(len(np.unique(part.column("index").to_numpy())))
        meta["node"].append(node)
        meta["compute_seconds"].append(seconds * part.num_rows / table.num_rows)
    return {c: np.asarray(v) for c, v in meta.items()}


@dataclass
class Arrivals:
    """When result rows reached the driver, to separate the pool's start-up from its steady throughput."""

    t0: float
    first: float | None = None  # seconds from the stage start to the first result block
    last: float | None = None
    rows_after_first: int = 0  # rows that arrived after the first block

    def add(self, rows: int) -> None:
        now = time.perf_counter() - self.t0
        if self.first is None:
            self.first = now
        else:
            self.rows_after_first += rows
        self.last = now

    def record(self, per_example: int) -> dict[str, float | None]:
        steady = None
        if self.first is not None and self.last > self.first:
            steady = self.rows_after_first / per_example / (self.last - self.first)
        return {"first_result_seconds": self.first, "steady_images_per_second": steady}


@dataclass
class Tally:
    """Part metadata per shard, the commits started (``submit(shard, parts, info)`` returns a handle that
    ``wait(handle)`` turns into the commit's seconds), and per-node work."""

    layout: Layout
    per_example: int
    attempt: int
    arrivals: Arrivals
    submit: Callable[[int, list[str], dict], Any]
    wait: Callable[[Any], float]
    log: Callable[[str], None] = lambda msg: None
    parts: dict[int, list[str]] = field(default_factory=dict)
    examples: dict[int, int] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)
    nodes: dict[str, dict[str, float]] = field(default_factory=dict)
    commits: dict[int, Any] = field(default_factory=dict)  # shard -> commit handle
    committed: list[int] = field(default_factory=list)
    commit_seconds: list[float] = field(default_factory=list)
    write_seconds: list[float] = field(default_factory=list)

    def add(self, meta: dict[str, np.ndarray]) -> None:
        """One block of part metadata (:data:`PART_COLUMNS`); starts the commit of every shard it completes."""
        expected = self.layout.examples_per_shard()
        self.arrivals.add(int(np.sum(meta["rows"])))
        for i, k in enumerate(meta["shard"].tolist()):
            self.parts.setdefault(k, []).append(str(meta["part"][i]))
            self.examples[k] = self.examples.get(k, 0) + int(meta["examples"][i])
            self.rows[k] = self.rows.get(k, 0) + int(meta["rows"][i])
            self.write_seconds.append(float(meta["write_seconds"][i]))
            node = self.nodes.setdefault(str(meta["node"][i]), {"parts": 0, "examples": 0, "compute_seconds": 0.0})
            node["parts"] += 1
            node["examples"] += int(meta["examples"][i])
            node["compute_seconds"] += float(meta["compute_seconds"][i])
            if self.examples[k] > expected[k] or len(set(self.parts[k])) < len(self.parts[k]):
                raise RuntimeError(f"shard {k}: {self.examples[k]} examples in {len(self.parts[k])} parts, "
                                   f"expected {expected[k]} (duplicate batches?)")
            if self.examples[k] == expected[k]:
                if self.rows[k] != expected[k] * self.per_example:
                    raise RuntimeError(f"shard {k}: {self.rows[k]} rows, expected {expected[k] * self.per_example}")
                self.commits[k] = self.submit(k, sorted(self.parts.pop(k)), {"attempt": self.attempt})

    def settle(self, raise_errors: bool = True) -> None:
        """Wait for the commits started so far; the shards they committed join ``committed``."""
        for k, handle in sorted(self.commits.items()):
            try:
                seconds = self.wait(handle)
            except Exception:
                if raise_errors:
                    raise
                continue
            self.committed.append(k)
            self.commit_seconds.append(seconds)
            self.log(f"shard {k} committed ({len(self.committed)} this attempt, "
                     f"{time.perf_counter() - self.arrivals.t0:.1f} s, commit {seconds:.2f} s)")
        self.commits.clear()

    def check_complete(self, pending: list[int]) -> None:
        incomplete = {k: (self.examples.get(k, 0), self.layout.examples_per_shard()[k])
                      for k in pending if k not in self.committed}
        if incomplete:
            raise RuntimeError(f"shards {sorted(incomplete)} did not receive all examples (got, expected): "
                               f"{incomplete}; rerun to resume")

    def record(self) -> dict[str, Any]:
        """Per-node work and commit/write times, as the attempt's record keeps them."""
        nodes = {}
        for node, n in self.nodes.items():
            rate = n["examples"] / n["compute_seconds"] if n["compute_seconds"] > 0 else None
            nodes[node] = {**n, "examples_per_compute_second": rate}
        return {"nodes": nodes, "commit_seconds": stats(self.commit_seconds),
                "part_write_seconds": stats(self.write_seconds)}


def stats(xs: list[float]) -> dict[str, float] | None:
    """Count, median, max and total of a list of durations (None when empty)."""
    return {"n": len(xs), "median": float(np.median(xs)), "max": float(np.max(xs)), "total": float(np.sum(xs))} \
        if xs else None
