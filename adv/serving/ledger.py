"""Per-key bookkeeping the state owner keeps for every replica: rate limits, quotas and alarm counts.

One owner holds it (not each replica), so a key's limits hold across all
replicas. Both count *images*, not requests (a 16-image request costs 16):
rate limits are token buckets (``rate`` images per second, ``burst`` deep);
quotas count images per fixed window. A request of more images than the
key's ``burst`` could never be admitted, so it is refused outright (413). Alarm counts are what the
admin endpoint shows: queries, suspicious queries, alarms by kind, and
when the user was first flagged. The ledger is saved with the detector
state (``to_json``/``from_json`` in its snapshot, each update in its log);
the token buckets are not (a restart refills them, which only ever lets a
client send sooner).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from adv.serving.config import RateLimit

ALARMS = ("distance", "prediction", "index", "features")


@dataclass
class UserStats:
    queries: int = 0
    suspicious: int = 0
    alarms: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ALARMS, 0))
    first_flagged_query: int | None = None  # 1-based: the user's n-th query was the first one flagged
    first_flagged_at: float | None = None
    window_start: float = 0.0
    window_requests: int = 0  # images admitted in the current quota window


def largest_request(limits: RateLimit, overrides: dict | None = None) -> int:
    """The most images one request may carry under these limits (the bucket and the quota must hold it)."""
    lim = limits.model_copy(update=overrides) if overrides else limits
    return min(lim.burst, lim.quota or lim.burst)


class TooLarge(ValueError):
    """One request holds more images than the key's burst or quota allows (413)."""


class Ledger:
    """``admit(user, now) -> None | retry_after_s``; ``record(user, alarms, now)`` per observed query."""

    def __init__(self, limits: RateLimit, users: dict[str, UserStats] | None = None):
        self.limits = limits
        self.users: dict[str, UserStats] = users or {}
        self._buckets: dict[str, tuple[float, float]] = {}  # user -> (tokens, last refill time)

    def admit(self, user: str, now: float, overrides: dict | None = None, cost: int = 1) -> float | None:
        """Take ``cost`` images from ``user``'s bucket and quota; None when allowed, else seconds to wait.

        ``overrides`` (``rate``, ``burst``, ``quota``) are the key's own limits. Raises :class:`TooLarge`
        when ``cost`` exceeds the key's burst or quota (no wait would ever admit it)."""
        lim = self.limits.model_copy(update=overrides) if overrides else self.limits
        cost = max(1, int(cost))
        if cost > largest_request(lim):
            raise TooLarge(f"{cost} images in one request exceed this key's limit of {largest_request(lim)}; "
                           "send fewer per request")
        tokens, last = self._buckets.get(user, (float(lim.burst), now))
        tokens = min(float(lim.burst), tokens + (now - last) * lim.rate)
        if tokens < cost:
            self._buckets[user] = (tokens, now)
            return max(1.0, math.ceil((cost - tokens) / lim.rate))
        s = self.users.setdefault(user, UserStats())
        if lim.quota is not None:
            if now - s.window_start >= lim.quota_window_s:
                s.window_start, s.window_requests = now, 0
            if s.window_requests + cost > lim.quota:
                self._buckets[user] = (tokens, now)
                return max(1.0, math.ceil(s.window_start + lim.quota_window_s - now))
            s.window_requests += cost
        self._buckets[user] = (tokens - cost, now)
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

    def has_window(self, user: str) -> bool:
        """Whether ``user`` has a quota window in force (a quota, global or the key's own, admitted images)."""
        s = self.users.get(user)
        return s is not None and s.window_requests > 0

    def window(self, user: str) -> list:
        """``[window_start, images admitted in it]`` of ``user``'s quota window (logged with each update)."""
        s = self.users.get(user, UserStats())
        return [s.window_start, s.window_requests]

    def set_window(self, user: str, start: float, requests: int) -> None:
        """Restore ``user``'s quota window from the log (see :meth:`window`)."""
        s = self.users.setdefault(user, UserStats())
        s.window_start, s.window_requests = float(start), int(requests)

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
