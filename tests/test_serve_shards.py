"""The state owner's one call per batch (admission plus detector update), its group commit, and the sharded state.

The Ray-free tests drive :class:`adv.serving.owner.DetectorOwner` directly.
"""

from __future__ import annotations

import threading

import numpy as np

from adv.serving import RateLimit, ServeConfig
from tests.serve_helpers import SHAPE

SMALL = {"index": {"capacity": 2000}, "features": {"capacity": 2000}}  # quick snapshots


def _owner(tmp_path, **config):
    from adv.detectors import DetectorConfig
    from adv.serving.owner import DetectorOwner

    cfg = ServeConfig(bundle="unused", state=str(tmp_path / "state"), **config)
    return DetectorOwner(cfg, DetectorConfig.model_validate(SMALL))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def _probs(n: int) -> np.ndarray:
    return np.full((n, 10), 0.1, np.float32)


def test_one_step_admits_and_decides_and_a_refused_request_leaves_no_trace(tmp_path):
    from adv.serving.owner import Request

    owner = _owner(tmp_path, rate_limit=RateLimit(rate=0.01, burst=3, quota=5))
    x = _images(6)
    out = owner.step(x, [Request("ann", None, 2), Request("ann", None, 2), Request("ben", {"burst": 1}, 2)],
                     _probs(6))
    assert [sorted(o) for o in out] == [["answers"], ["wait"], ["too_large"]]
    assert len(out[0]["answers"]) == 2 and out[1]["wait"] >= 1 and "limit of 1" in out[2]["too_large"]
    assert owner.stats("ann")["queries"] == 2 and owner.stats("ben")["queries"] == 0  # refused: not observed
    assert owner.totals()["index"] == 2


def test_the_ledger_rides_in_the_detector_log_and_snapshot_quota_windows_too(tmp_path, monkeypatch):
    import adv.serving.owner as owner_mod
    from adv.serving.owner import Request

    owner = _owner(tmp_path, rate_limit=RateLimit(rate=1000, burst=1000, quota=13, quota_window_s=3600))
    x = np.repeat(_images(1, seed=3), 12, axis=0)  # one image again and again: flagged
    for i in range(12):
        owner.step(x[i : i + 1], [Request("eve", None, 1)], _probs(1))
    assert not (tmp_path / "state" / "ledger.json").exists()  # no ledger rewrite per batch any more
    stats = owner.stats("eve")
    assert stats["suspicious"] >= 1 and stats["first_flagged_query"] is not None
    again = _owner(tmp_path, rate_limit=RateLimit(rate=1000, burst=1000, quota=13, quota_window_s=3600))
    assert again.stats("eve") == stats and again.totals()["queries"] == 12
    out = again.step(x[:2], [Request("eve", None, 1), Request("eve", None, 1)], _probs(2))
    assert "answers" in out[0] and "wait" in out[1]  # the quota window survived the restart: 13, not 14
    monkeypatch.setattr(owner_mod, "COMPACT_EVERY", 1)  # a snapshot now: the ledger goes into it
    again.step(_images(1, seed=9), [Request("fay", None, 1)], _probs(1))
    third = _owner(tmp_path, rate_limit=RateLimit(rate=1000, burst=1000, quota=13, quota_window_s=3600))
    assert third.stats("eve") == again.stats("eve") and third.stats("fay")["queries"] == 1


def test_concurrent_steps_share_one_log_write_and_nothing_acknowledged_is_lost(tmp_path, monkeypatch):
    """Group commit: while one step's write is in flight the others decide; the next write takes them all."""
    import time

    from adv.detectors.state import StateStore
    from adv.serving.owner import Request

    owner = _owner(tmp_path)
    writes = []
    real = StateStore.append_log

    def slow_append(store, batch):  # a slow disk: every write takes 50 ms
        time.sleep(0.05)
        writes.append(batch.num_rows)
        return real(store, batch)

    monkeypatch.setattr(StateStore, "append_log", slow_append)
    acked = []

    def client(i: int) -> None:
        out = owner.step(_images(1, seed=100 + i), [Request(f"u{i}", None, 1)], _probs(1))
        acked.append(len(out[0]["answers"]))  # returned: durable

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(acked) == 12 and sum(writes) == 12 and len(writes) < 12  # fewer writes than steps
    again = _owner(tmp_path)
    assert again.totals()["queries"] == 12 and again.totals()["index"] == 12
