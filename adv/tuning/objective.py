"""The sweep's objective, the numbers every trial keeps, the Pareto front and the selection.

**The constraint as one metric.** The scheduler and the searcher see one number,
``objective``: the robust accuracy the trial's track measures (adaptive for
adaptive and training trials, non-adaptive for stored trials, which are then
re-checked adaptively), unless the trial's clean accuracy is below the allowed
floor ``clean_ref - max_clean_drop`` (``clean_ref``: the undefended classifier
on the same examples). Then it is ``robust - 1 - (floor - clean)``: every trial
that breaks the constraint ranks below every trial that keeps it (robust
accuracies lie in [0, 1]), and among those that break it, the smaller breach
ranks higher, so a searcher still gets a gradient toward the feasible region.

Every trial keeps all three numbers (clean, non-adaptive, adaptive), each an
:class:`adv.numbers.Number`: its Wilson 95% interval, its example count, its
label and its data subset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from adv.numbers import Number, accuracy_number
from adv.runs.rows import TRACKS as ROW_TRACKS
from adv.tuning.space import Candidate

#: The Parquet rows' tracks, spelt as metric-name prefixes (``non_adaptive_acc``: Tune's and Python's identifiers).
TRACKS = tuple(t.replace("-", "_") for t in ROW_TRACKS)


def penalized(robust: float, clean: float, clean_ref: float, max_clean_drop: float) -> float:
    """The one metric the scheduler sees (see the module docstring)."""
    floor = clean_ref - max_clean_drop
    return robust if clean >= floor - 1e-12 else robust - 1.0 - (floor - clean)


def numbers_from_counts(counts: dict[str, int], n: int, labels: dict[str, str], subset: str) -> dict[str, Number]:
    """``{track: Number}`` for the tracks present in ``counts``."""
    return {t: accuracy_number(counts[t], n, label=labels[t], subset=subset) for t in TRACKS if t in counts}


def flat_metrics(numbers: dict[str, Number]) -> dict[str, Any]:
    """Tune reports flat scalars: ``clean_acc``, ``clean_lo``, ``clean_hi``, ``clean_n``, ``clean_label``, ..."""
    out: dict[str, Any] = {}
    for t in TRACKS:
        num = numbers.get(t)
        out.update({f"{t}_acc": num.value if num else math.nan, f"{t}_lo": num.ci95[0] if num else math.nan,
                    f"{t}_hi": num.ci95[1] if num else math.nan, f"{t}_n": num.n if num else 0,
                    f"{t}_label": num.label if num else "not measured",
                    f"{t}_subset": num.subset if num else ""})
    return out


def numbers_from_flat(metrics: dict[str, Any]) -> dict[str, Number]:
    """The :class:`Number` of every track :func:`flat_metrics` reported as measured (``<track>_n`` above 0)."""
    out = {}
    for t in TRACKS:
        value = metrics.get(f"{t}_acc")
        if value is None or (isinstance(value, float) and math.isnan(value)) or not metrics.get(f"{t}_n"):
            continue
        out[t] = Number(value=float(value), ci95=(float(metrics[f"{t}_lo"]), float(metrics[f"{t}_hi"])),
                        n=int(metrics[f"{t}_n"]), label=str(metrics[f"{t}_label"]),
                        subset=str(metrics[f"{t}_subset"]))
    return out


@dataclass
class TrialRecord:
    """One trial as the report and the selection see it."""

    trial_id: str
    candidate: Candidate
    numbers: dict[str, Number]
    objective: float
    clean_ref: float
    resource: float
    status: str = "finished"
    checkpoint: str | None = None
    recheck: dict[str, Number] = field(default_factory=dict)
    recheck_objective: float | None = None
    #: The trial's kind (``stored``, ``adaptive``, ``training``): a sweep with training trials mixes two.
    kind: str = ""
    #: Training trials: the catastrophic-overfitting finding (``adv.tuning.overfitting``); such a trial is never
    #: selected.
    overfit: str = ""
    #: The trial's last checkpoint as the runner returned it (a ``tune.Checkpoint`` in jobs.tune); not serialized.
    handle: Any = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        return self.candidate.label

    def value(self, track: str) -> float | None:
        num = self.recheck.get(track) or self.numbers.get(track)
        return num.value if num else None

    def to_json(self) -> dict[str, Any]:
        return {"trial_id": self.trial_id, "candidate": self.candidate.to_dict(), "numbers": _dump(self.numbers),
                "objective": self.objective, "clean_ref": self.clean_ref, "resource": self.resource,
                "status": self.status, "checkpoint": self.checkpoint, "recheck": _dump(self.recheck),
                "recheck_objective": self.recheck_objective, "kind": self.kind, "overfit": self.overfit}


def _dump(numbers: dict[str, Number]) -> dict[str, dict]:
    """Numbers as JSON (``ci95`` a list), as trials.json and the manifest hold them."""
    return {k: v.model_dump(mode="json") for k, v in numbers.items()}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points, maximizing both coordinates (clean, adaptive robust)."""
    front = []
    for i, (a, b) in enumerate(points):
        dominated = any((c >= a and d >= b) and (c > a or d > b) for j, (c, d) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def ranking_warning(by_first: list[TrialRecord], first: str, second_scores: dict[str, float],
                    second: str) -> str | None:
    """A warning when the ``second`` ranking of ``by_first`` (already ordered by ``first``) disagrees."""
    if len(by_first) < 2:
        return None
    order = sorted(by_first, key=lambda r: -second_scores[r.trial_id])
    if [r.trial_id for r in order] == [r.trial_id for r in by_first]:
        return None
    top = by_first[0]
    if order[0].trial_id != top.trial_id:
        return (f"the {first} ranking picks {top.label!r} ({top.trial_id}), but the {second} re-check ranks "
                f"{order[0].label!r} ({order[0].trial_id}) first: the {first} number rewarded what an adaptive "
                f"attacker gets through (gradient masking); the selection uses the {second} number")
    return (f"the {first} and {second} rankings of the re-checked trials disagree below the top "
            f"({', '.join(r.trial_id for r in by_first)} vs {', '.join(r.trial_id for r in order)})")


def select(records: list[TrialRecord], kind: str) -> tuple[TrialRecord, list[str]]:
    """The selected trial and the warnings the report prints.

    Every trial competes on its adaptive objective (adaptive robust accuracy
    under the clean constraint): adaptive and training trials on their own
    number, stored trials on their adaptive re-check (they rank on the
    non-adaptive objective first; a warning when the rankings disagree). A
    sweep with training trials beside its stored ones pools both on the same
    validation images and grid. ``kind`` is the sweep's kind, the default of
    records that do not name theirs. Trials marked for catastrophic
    overfitting are never selected.
    """
    from adv.errors import AdvError

    done = [r for r in records if not math.isnan(r.objective)]
    if not done:
        raise AdvError("no trial reported a result; see the trial errors in the Tune run folder")
    eligible = [r for r in done if not r.overfit]
    if not eligible:
        raise AdvError(f"every trial that reported was marked for catastrophic overfitting ({done[0].overfit}); "
                       "lower the training eps, use a multi-step attack, or add an eps ramp")
    warnings: list[str] = []
    scored: list[tuple[float, TrialRecord]] = []
    for k in dict.fromkeys(r.kind or kind for r in eligible):
        group = [r for r in eligible if (r.kind or kind) == k]
        if k == "stored":
            best, warn = _select_stored(group)
            warnings += warn
            scored.append((best.recheck_objective if best.recheck_objective is not None else best.objective, best))
        else:
            # A trial ASHA stopped early was scored on fewer examples (or epochs): its number is noisier and
            # optimistic by selection, so only trials that reached the full resource compete.
            full = max(r.resource for r in group)
            scored += [(r.objective, r) for r in group if r.resource >= full]
    return max(scored, key=lambda p: p[0])[1], warnings


def _select_stored(done: list[TrialRecord]) -> tuple[TrialRecord, list[str]]:
    """The best stored trial by its adaptive re-check (by its non-adaptive number, with a warning, without one)."""
    rechecked = sorted((r for r in done if r.recheck_objective is not None), key=lambda r: -r.objective)
    if not rechecked:
        best = max(done, key=lambda r: r.objective)
        return best, [f"{best.trial_id} was selected on a non-adaptive number only (no adaptive re-check ran)"]
    warn = ranking_warning(rechecked, "non-adaptive", {r.trial_id: r.recheck_objective for r in rechecked},
                           "adaptive")
    best = max(rechecked, key=lambda r: r.recheck_objective)
    return best, [warn] if warn else []


def records_from(results, full: int, resource: str, space, kind: str) -> list[TrialRecord]:
    """The :class:`TrialRecord` of every finished trial result (Tune's ``Result``: ``metrics``, ``config``,
    ``path``, ``error``, ``checkpoint``), sorted by trial; ``full``: the ASHA budget a finished trial reached."""
    import os

    out = []
    for r in results:
        m = r.metrics or {}
        cand = space.trial_candidate(dict(r.config or {}))
        if "objective" not in m:  # the trial failed before its first report
            out.append(TrialRecord(os.path.basename(r.path or "?"), cand, {}, math.nan, math.nan, 0,
                                   status=f"error: {str(r.error).strip().splitlines()[-1][:160] if r.error else '?'}",
                                   kind=kind))
            continue
        got = m.get(resource, 0)
        status = "finished" if got >= full else f"stopped early by ASHA at {got} {resource}"
        overfit = str(m.get("overfit") or "")
        status = f"{overfit}; never selected ({status})" if overfit else status
        out.append(TrialRecord(m.get("trial_id", "?"), cand, numbers_from_flat(m),
                               float(m["objective"]), float(m["clean_ref"]), float(got), status,
                               r.checkpoint.path if r.checkpoint else None, kind=kind, overfit=overfit,
                               handle=r.checkpoint))
    return sorted(out, key=lambda r: r.trial_id)
