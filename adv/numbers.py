"""One accuracy number in one typed form, from a sweep's trial to its report and the bundle's manifest.

A :class:`Number` is an accuracy with its Wilson 95% interval, the number of examples, what it measures and on
which data. Trials build them from counts (:func:`accuracy_number`), Tune carries them as flat scalars
(``adv.tuning.objective.flat_metrics``: Tune metrics must be scalars), and files hold
``number.model_dump(mode="json")`` (``ci95`` a list). Here, below the tuning code and the bundle, so that
neither imports the other for it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Number(BaseModel):
    """One accuracy with its 95% interval, the number of examples, what it measures and on which data."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: float = Field(ge=0.0, le=1.0)
    ci95: tuple[float, float]
    n: int = Field(ge=0)
    label: str = Field(min_length=1, description="what was measured, e.g. 'adaptive (BPDA+PGD, eps=0.1)'")
    subset: str = Field(min_length=1, description="the data it was measured on, e.g. 'test[seed=0,n=500]'")

    @field_validator("ci95")
    @classmethod
    def _ordered(cls, v):
        lo, hi = v
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"ci95 must satisfy 0 <= lo <= hi <= 1, got {list(v)}")
        return v


def accuracy_number(correct: int, n: int, *, label: str, subset: str) -> Number:
    """The accuracy ``correct / n`` with its Wilson 95% interval (0 with the interval (0, 1) when ``n == 0``)."""
    from adv.metrics import wilson_interval  # adv.metrics loads skimage; a number needs only this

    lo, hi = wilson_interval(correct, n)
    return Number(value=correct / n if n else 0.0, ci95=(lo, hi), n=int(n), label=label, subset=subset)
