"""The detector state owner, Ray-free: one object per application owns every user's state.

It holds the query detector (per-user histories and the global fingerprint
index, :class:`adv.detectors.QueryDetector`) and the :class:`Ledger` (rate
limits, quotas, alarm counts). ``jobs.serve`` runs it as one named actor that
every replica calls, because per-replica memory is neither shared nor kept
across a restart.

Durability is write-ahead: ``observe`` returns only after the detector's log
segment and the ledger are written (fsync'ed locally, one PUT on object
stores), so a decision a client received survives killing the owner or a
replica. On start the owner reloads the snapshot plus log from ``state``.

Layout under ``state`` (a folder or a pyarrow URI)::

    detector/   the QueryDetector's snapshot and log (adv.detectors.state)
    ledger.json  per-user counts, rewritten atomically after each batch (adv.io)
"""

from __future__ import annotations

import json
import time

import numpy as np

from adv.detectors import DetectorConfig, QueryDetector
from adv.detectors.state import StateError, StateStore
from adv.io import atomic_write_json, open_filesystem
from adv.serving.config import ServeConfig
from adv.serving.ledger import ALARMS, Ledger

#: Updates between snapshots; a snapshot compacts the log so a restart replays at most this many.
COMPACT_EVERY = 5000


class DetectorOwner:
    """``observe(x, users, probs) -> answers``, ``admit(user)``, ``stats(user)``; durable before returning."""

    def __init__(self, config: ServeConfig, detector: DetectorConfig):
        self.config = config
        root = config.state.rstrip("/")
        self._det_path = f"{root}/detector"
        if StateStore(self._det_path).exists():
            self.detector = QueryDetector.load(self._det_path)  # its config is the one the state was made with
        else:
            self.detector = QueryDetector(detector)
            self.detector.save(self._det_path)
        try:
            self._fs, self._ledger_path = open_filesystem(f"{root}/ledger.json")
        except (OSError, ValueError) as e:
            raise StateError(f"cannot open state location {root!r}: {e}") from None
        self.ledger = self._load_ledger()
        self._since_snapshot = 0

    def _load_ledger(self) -> Ledger:
        try:
            with self._fs.open_input_stream(self._ledger_path) as f:
                return Ledger.from_json(self.config.rate_limit, json.loads(f.read()))
        except FileNotFoundError:
            return Ledger(self.config.rate_limit)
        except (OSError, ValueError, TypeError) as e:
            raise StateError(f"{self._ledger_path}: unreadable ledger ({type(e).__name__})") from None

    def admit(self, user: str, overrides: dict | None = None, now: float | None = None, cost: int = 1) -> float | None:
        """None when ``user`` may send ``cost`` more images, else the seconds to wait (``Retry-After``);
        :class:`adv.serving.ledger.TooLarge` when no wait would do."""
        return self.ledger.admit(user, time.time() if now is None else now, overrides, cost)

    def observe(self, x: np.ndarray, users: list[str], probs: np.ndarray) -> list[dict]:
        """Decide a batch and make it durable; per query ``{label, probs, blocked, alarms, action}``."""
        now = time.time()
        decisions = self.detector.observe(np.array(x), users, np.array(probs), now=now)  # writable copies
        self.detector.flush()  # write-ahead: durable before anyone is answered
        for d in decisions:
            self.ledger.record(d.user, d.alarms, now)
        self._save_ledger()
        self._since_snapshot += len(decisions)
        if self._since_snapshot >= COMPACT_EVERY:
            self.detector.save()
            self._since_snapshot = 0
        return [{"label": d.label, "probs": d.probs, "blocked": d.action == "block", "alarms": list(d.alarms),
                 "action": d.action} for d in decisions]

    def _save_ledger(self) -> None:
        atomic_write_json(self._ledger_path, self.ledger.to_json(), filesystem=self._fs)

    def stats(self, user: str) -> dict:
        return self.ledger.stats(user)

    def totals(self) -> dict:
        """Queries the ledger and the detector's index hold (compared with acknowledged answers)."""
        return {"queries": self.ledger.total_queries, "index": len(self.detector),
                "users": len(self.ledger.users), "alarms": {a: sum(s.alarms.get(a, 0) for s in
                                                                  self.ledger.users.values()) for a in ALARMS}}
