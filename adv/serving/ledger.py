"""Per-key bookkeeping the state owner keeps for every replica: rate limits, quotas and alarm counts.

One owner holds it (not each replica), so a key's limits hold across all
replicas. Rate limits are token buckets (``rate`` per second, ``burst``
deep); quotas count requests per fixed window. Alarm counts are what the
admin endpoint shows: queries, suspicious queries, alarms by kind, and
when the user was first flagged. The ledger is saved with the detector
state (``to_json``/``from_json``); the token buckets are not (a restart
refills them, which only ever lets a client send sooner).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from adv.serving.config import RateLimit

ALARMS = ("distance", "prediction", "index")


@dataclass
class UserStats:
    queries: int = 0
    suspicious: int = 0
    alarms: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ALARMS, 0))
    first_flagged_query: int | None = None  # 1-based: the user's n-th query was the first one flagged
    first_flagged_at: float | None = None
    window_start: float = 0.0
    window_requests: int = 0


class Ledger:
    """``admit(user, now) -> None | retry_after_s``; ``record(user, alarms, now)`` per observed query."""

    def __init__(self, limits: RateLimit, users: dict[str, UserStats] | None = None):
        self.limits = limits
        self.users: dict[str, UserStats] = users or {}
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, last refill time)

    def admit(self, user: str, now: float, overrides: dict | None = None) -> float | None:
        """Take one request from ``user``'s bucket and quota; None when allowed, else seconds to wait.

        ``overrides`` (``rate``, ``burst``, ``quota``) are the key's own limits."""
        lim = self.limits.model_copy(update=overrides) if overrides else self.limits
        tokens, last = self._buckets.get(user, (float(lim.burst), now))
        tokens = min(float(lim.burst), tokens + (now - last) * lim.rate)
        if tokens < 1.0:
            self._buckets[user] = (tokens, now)
            return max(1.0, math.ceil((1.0 - tokens) / lim.rate))
        s = self.users.setdefault(user, UserStats())
        if lim.quota is not None:
            if now - s.window_start >= lim.quota_window_s:
                s.window_start, s.window_requests = now, 0
            if s.window_requests >= lim.quota:
                self._buckets[user] = (tokens, now)
                return max(1.0, math.ceil(s.window_start + lim.quota_window_s - now))
            s.window_requests += 1
        self._buckets[user] = (tokens - 1.0, now)
        return None

    def record(self, user: str, alarms: tuple[str, ...], now: float) -> None:
        s = self.users.setdefault(user, UserStats())
        s.queries += 1
        if alarms:
            s.suspicious += 1
            for a in alarms:
                s.alarms[a] = s.alarms.get(a, 0) + 1
            if s.first_flagged_query is None:
                s.first_flagged_query, s.first_flagged_at = s.queries, now

    def stats(self, user: str) -> dict:
        s = self.users.get(user, UserStats())
        out = asdict(s)
        del out["window_start"], out["window_requests"]
        return {"user": user, **out}

    @property
    def total_queries(self) -> int:
        return sum(s.queries for s in self.users.values())

    def to_json(self) -> dict:
        return {"users": {u: asdict(s) for u, s in self.users.items()}}

    @classmethod
    def from_json(cls, limits: RateLimit, doc: dict) -> "Ledger":
        return cls(limits, {u: UserStats(**s) for u, s in doc.get("users", {}).items()})
