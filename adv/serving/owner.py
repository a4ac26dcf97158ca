"""The detector state owner, Ray-free: one object per application owns every user's state.

It holds the query detector (per-user histories and the global fingerprint
index, :class:`adv.detectors.QueryDetector`) and the :class:`Ledger` (rate
limits, quotas, alarm counts). ``jobs.serve`` runs it as one named actor that
every replica calls, because per-replica memory is neither shared nor kept
across a restart.

Durability is write-ahead with group commit: :meth:`DetectorOwner.step` (one
call per batch: admission, then the detector update of what was admitted)
returns only after its updates are in the detector's log, fsync'ed locally or
one PUT on object stores. Concurrent steps (a threaded actor) decide one at a
time in memory and then share the log write: whichever step reaches the log
first writes every pending update (its own and those decided meanwhile) in
one append and one fsync, and the others find theirs already written. So a
decision a client received survives killing the owner or a replica. The
ledger rides in the same write (each logged update carries its alarms and,
under a quota, the user's quota window in its tag) and in the same snapshot,
so there is one durable write per group, not a ledger rewrite per batch. On
start the owner reloads the snapshot plus log from ``state``.

Layout under ``state`` (a folder or a pyarrow URI)::

    detector/    the QueryDetector's snapshot and log (adv.detectors.state), the ledger inside both
    ledger.json  the ledger as states written before it was logged kept it (read once, never written)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from adv.detectors import DetectorConfig, QueryDetector
from adv.detectors.state import StateError, StateStore
from adv.io import open_filesystem
from adv.serving.config import ServeConfig
from adv.serving.ledger import ALARMS, Ledger, TooLarge

log = logging.getLogger(__name__)

#: Updates between snapshots; a snapshot compacts the log so a restart replays at most this many.
COMPACT_EVERY = 5000


@dataclass(frozen=True)
class Request:
    """One request of a step: its user, the key's own limits, and how many of the step's images are its."""

    user: str
    overrides: dict | None
    images: int


def admit(ledger: Ledger, requests, n: int, now: float) -> tuple[list, np.ndarray, list[str]]:
    """Each request's admission (None, ``{"wait": s}`` or ``{"too_large": reason}``), the mask of the ``n``
    images that were admitted, and the user of each admitted image, in order."""
    outcome, keep, start = [], np.zeros(n, bool), 0
    for r in requests:
        try:
            wait = ledger.admit(r.user, now, r.overrides, r.images)
            outcome.append(None if wait is None else {"wait": wait})
        except TooLarge as e:
            outcome.append({"too_large": str(e)})
        keep[start : start + r.images] = outcome[-1] is None
        start += r.images
    return outcome, keep, [r.user for r, o in zip(requests, outcome) if o is None for _ in range(r.images)]


def answer(d) -> dict:
    """What a replica gets back for one query (an :class:`adv.detectors.Decision`): only plain values."""
    return {"label": d.label, "probs": d.probs, "blocked": d.action == "block", "alarms": list(d.alarms),
            "action": d.action}


class DetectorOwner:
    """``step(x, requests, probs)`` (admission plus detector update, durable before returning), ``stats(user)``."""

    def __init__(self, config: ServeConfig, detector: DetectorConfig):
        self.config = config
        root = config.state.rstrip("/")
        self._det_path = f"{root}/detector"
        self._lock = threading.Lock()  # admission, detector update and ledger decide one step at a time
        try:
            self._fs, self._ledger_path = open_filesystem(f"{root}/ledger.json")
        except (OSError, ValueError) as e:
            raise StateError(f"cannot open state location {root!r}: {e}") from None
        self.ledger = Ledger(config.rate_limit)
        t0, cpu0 = time.perf_counter(), time.process_time()
        if StateStore(self._det_path).exists():  # its config is the one the state was made with
            self.detector = QueryDetector.load(self._det_path, replay=self._replay)
        else:
            self.detector = QueryDetector(detector)
            self.detector.save(self._det_path, extra=self._ledger_arrays())
        self._since_snapshot = 0
        # a restart's time is this load plus the process start: the log says which part took it
        log.info("detector state %s in %.2f s (%.2f s CPU), %d stored queries", self._det_path,
                 time.perf_counter() - t0, time.process_time() - cpu0, len(self.detector))

    # ---- durable ledger ---------------------------------------------------------------------------------

    def _ledger_arrays(self) -> dict[str, np.ndarray]:
        return {"ledger": np.frombuffer(json.dumps(self.ledger.to_json()).encode(), np.uint8)}

    def _replay(self, extra: dict[str, np.ndarray], records: list[dict]) -> None:
        """The ledger from the snapshot (or a legacy ledger.json) plus every logged update after it."""
        try:
            doc = json.loads(extra["ledger"].tobytes()) if "ledger" in extra else self._legacy_ledger()
            self.ledger = Ledger.from_json(self.config.rate_limit, doc)
        except (ValueError, TypeError, KeyError) as e:
            raise StateError(f"{self._det_path}: unreadable ledger in the snapshot ({type(e).__name__})") from None
        for r in records:
            if r["alarms"] is None:  # logged before the ledger was: ledger.json already counts it
                continue
            self.ledger.record(r["user"], r["alarms"], r["time"])
            if r["tag"]:
                self.ledger.set_window(r["user"], *json.loads(r["tag"]))

    def _legacy_ledger(self) -> dict:
        try:
            with self._fs.open_input_stream(self._ledger_path) as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StateError(f"{self._ledger_path}: unreadable ledger ({type(e).__name__})") from None

    # ---- the one call per batch -------------------------------------------------------------------------

    def admit(self, user: str, overrides: dict | None = None, now: float | None = None, cost: int = 1) -> float | None:
        """None when ``user`` may send ``cost`` more images, else the seconds to wait (``Retry-After``);
        :class:`adv.serving.ledger.TooLarge` when no wait would do."""
        with self._lock:
            return self.ledger.admit(user, time.time() if now is None else now, overrides, cost)

    def step(self, x: np.ndarray, requests: list[Request], probs: np.ndarray) -> list[dict]:
        """Admit each request (rate limit, quota; images counted) and decide the admitted ones' images, durable
        before returning. ``x`` and ``probs`` hold the requests' images in order. Per request one of
        ``{"wait": seconds}`` (429), ``{"too_large": reason}`` (413) or ``{"answers": [...]}`` (see observe)."""
        if sum(r.images for r in requests) != len(x):
            raise ValueError(f"{len(requests)} requests hold {sum(r.images for r in requests)} images, not {len(x)}")
        with self._lock:
            now = time.time()
            outcome, keep, users = admit(self.ledger, requests, len(x), now)
            answers = self._decide(x[keep], users, probs[keep], now) if keep.any() else []
        if keep.any():
            self.detector.flush()  # group commit: this step's updates and any decided meanwhile, one write
        it = iter(answers)
        return [o if o is not None else {"answers": [next(it) for _ in range(r.images)]}
                for r, o in zip(requests, outcome)]

    def observe(self, x: np.ndarray, users: list[str], probs: np.ndarray) -> list[dict]:
        """Decide a batch (already admitted) and make it durable; per query ``{label, probs, blocked, alarms,
        action}``."""
        with self._lock:
            answers = self._decide(x, users, probs, time.time())
        self.detector.flush()
        return answers

    def _decide(self, x: np.ndarray, users: list[str], probs: np.ndarray, now: float) -> list[dict]:
        """The detector update and the ledger, in memory (under the lock); the caller flushes."""
        tags = [self._window_tag(u) for u in users]
        decisions = self.detector.observe(np.array(x), users, np.array(probs), now=now, tags=tags)  # writable copies
        for d in decisions:
            self.ledger.record(d.user, d.alarms, now)
        self._since_snapshot += len(decisions)
        if self._since_snapshot >= COMPACT_EVERY:  # the snapshot holds these updates: no flush needed for them
            self.detector.save(extra=self._ledger_arrays())
            self._since_snapshot = 0
        return [answer(d) for d in decisions]

    def _window_tag(self, user: str) -> str | None:
        """The user's quota window after admission, logged so a restart keeps quotas (None without quotas)."""
        if self.config.rate_limit.quota is None and not self.ledger.has_window(user):
            return None
        return json.dumps(self.ledger.window(user))

    def stats(self, user: str) -> dict:
        with self._lock:
            return self.ledger.stats(user)

    def totals(self) -> dict:
        """Queries the ledger and the detector's index hold (compared with acknowledged answers)."""
        with self._lock:
            return {"queries": self.ledger.total_queries, "index": len(self.detector),
                    "users": len(self.ledger.users), "alarms": {a: sum(s.alarms.get(a, 0) for s in
                                                                      self.ledger.users.values()) for a in ALARMS}}
