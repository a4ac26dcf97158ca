"""Binomial statistics for accuracies: 95% intervals, overlap notes, and the evidence a flag needs.

An accuracy measured on n examples is a binomial proportion; with n = 500
its 95% Wilson interval is about ±4 points, so a 1-point gap between two
defenses usually says nothing. Every accuracy in a result, a report and a
benchmark table therefore carries its interval, and a comparison says when
the intervals overlap.
"""

from __future__ import annotations

from typing import Mapping, Sequence

#: ``query_beats_whitebox`` needs at least this many points ...
BEATS_MIN_COUNT = 3
#: ... and a query success rate on the white-box survivors significantly above this background rate: even a
#: strong gradient attack leaves a few points a query attack finds, so one or two wins are not masking.
BEATS_BACKGROUND = 0.05
#: One-sided binomial test level for that comparison.
BEATS_ALPHA = 0.01


def accuracy_ci(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of ``correct / n`` (``(0, 1)`` when n is 0)."""
    from adv.metrics import wilson_interval  # adv.metrics loads skimage; results need only this

    return wilson_interval(int(correct), int(n))


def pct(value: float | None, digits: int = 1, *, sign: bool = True, missing: str = "–") -> str:
    """A fraction in percent, ``0.512 -> "51.2%"`` (``sign=False``: ``"51.2"``), ``missing`` for None or NaN:
    the one percentage formatter of the reports, the jobs' stories and the benchmark docs."""
    if value is None or value != value:
        return missing
    return f"{100 * value:.{digits}f}" + ("%" if sign else "")


def fmt_ci(acc: float, ci: Sequence[float] | None) -> str:
    """``"51.0% [46.6, 55.4]"``: an accuracy with its interval, in percent."""
    if ci is None:
        return pct(acc)
    return f"{pct(acc)} [{pct(ci[0], sign=False)}, {pct(ci[1], sign=False)}]"


def intervals_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def overlap_note(intervals: Mapping[str, Sequence[float]]) -> str | None:
    """A sentence naming the pairs whose 95% intervals overlap, or None when every pair is separated."""
    names = list(intervals)
    pairs = [f"{a} and {b}" for i, a in enumerate(names) for b in names[i + 1:]
             if intervals_overlap(intervals[a], intervals[b])]
    if not pairs:
        return None
    return (f"95% intervals overlap for {'; '.join(pairs)}: the difference between them is within sampling noise "
            "at this n")


def beats_whitebox_evidence(fooled: int, survivors: int) -> dict:
    """Is a query attack's success on white-box survivors evidence of masked gradients?

    ``fooled`` of the ``survivors`` (points every earlier white-box attack
    failed on) fell to the query attack. It is evidence when at least
    ``BEATS_MIN_COUNT`` fell and a one-sided binomial test rejects a success
    rate of ``BEATS_BACKGROUND`` at level ``BEATS_ALPHA``. The raw counts stay
    in the returned dict so a user can judge.
    """
    from scipy.stats import binomtest

    fooled, survivors = int(fooled), int(survivors)
    p = binomtest(fooled, survivors, BEATS_BACKGROUND, alternative="greater").pvalue if survivors else 1.0
    return {"fooled": fooled, "survivors": survivors, "share": fooled / survivors if survivors else 0.0,
            "p_value": float(p), "fires": bool(fooled >= BEATS_MIN_COUNT and p < BEATS_ALPHA)}


def interval_note(n: int) -> str:
    """One line for a table whose cells are accuracies over the same ``n`` examples: how wide their intervals are."""
    def half(p: float) -> float:
        lo, hi = accuracy_ci(round(p * n), n)
        return 100 * (hi - lo) / 2

    return (f"Each accuracy is over n = {n} examples: its 95% Wilson interval is about ±{half(0.5):.1f} points at "
            f"50%, ±{half(0.9):.1f} at 10% or 90%, ±{half(0.99):.1f} at 1% or 99%.")
