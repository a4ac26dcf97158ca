"""The detector state split over ``n`` owners (shards): per-user state by user, the indexes by hash, Ray-free.

One owner (:class:`adv.serving.owner.DetectorOwner`) holds every user's
state and the whole index, so it is the ceiling of a cluster. Here shard
``s`` of ``n`` holds:

* the users ``u`` with :func:`user_shard` ``(u) == s``: their rate limits,
  quotas and alarm counts (:class:`Ledger`) and their per-user history (the
  prediction-similarity layer);
* the Blacklight buckets ``b`` with ``b % n == s`` (:func:`hash_partition`):
  a query's hashes go to their shards, each counts the hashes its stored
  queries share with it, and the counts are summed (merged) per query;
  every shard keeps the small per-query ring (id, time, chain, digest: 24
  bytes a query), so liveness is decided the same way everywhere;
* the feature-index rows of the queries whose random id falls on it; every
  shard searches its own rows for every query and the neighbours are merged.

A batch (one replica's ``@serve.batch``) is decided by :func:`protocol`, a
generator of three rounds of parallel calls, one per shard that has work:
``admit`` (the users' shards: rate limit and quota, then the per-user
layer), ``lookup`` (every shard: lookup then insert of its part of each
admitted query, in batch order) and ``commit`` (the chains and clusters the
merge decided, the ledger's records; durable before returning, one log write
per shard for all the commits that arrive together: group commit). Nothing
is answered before every shard's ``commit`` returned, so nothing acknowledged
is lost when one shard restarts; a round that fails or meets a restarted
shard that lost the round before (:class:`StepLost`) fails the batch (503),
and a retried round that did run returns its first result (idempotent by
step id). With the same order of batches, decisions are those of one owner
(tests/test_serve_shards.py checks it query by query). Concurrent batches on
different shards may see each other's index updates in part (a round apart);
see docs/serving.md for what that costs and for the sizes at 10**6 users and
10**8 stored queries.

Shape: x (N, C, H, W) in [0, 1]; probs (N, K); one Request per run of images of one request.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from adv.detectors import DetectorConfig
from adv.detectors.detector import decide, list_column, prepare
from adv.detectors.feature_index import FeatureIndex, FeatureMatch
from adv.detectors.fingerprint import FingerprintIndex, IndexMatch, hash_partition
from adv.detectors.query_similarity import PredictionSimilarityLayer, stored_image
from adv.detectors.state import StateStore, corrupt
from adv.errors import AdvError
from adv.serving.config import ServeConfig
from adv.serving.ledger import ALARMS, Ledger
from adv.serving.owner import COMPACT_EVERY, Request, admit, answer

#: Log record kinds: a per-user add (admit), an index insert (index), a chain/cluster (commit), a ledger record.
USER, INSERT, CHAIN, LEDGER = 0, 1, 2, 3
#: Steps a shard remembers (results of its rounds, for a retried call; the rounds it applied).
REMEMBERED = 20_000


class StepLost(AdvError):
    """A shard restarted in the middle of a batch and lost (or already durably applied) one of its rounds."""


def user_shard(user: str, n: int) -> int:
    """The shard holding ``user``'s limits, counts and history (a stable hash, not Python's salted one)."""
    return int.from_bytes(hashlib.blake2b(user.encode(), digest_size=8).digest(), "little") % n


def shard_location(config: ServeConfig, shard: int) -> str:
    return f"{config.state.rstrip('/')}/shards-{config.shards}/{shard}"


# ---- one shard -------------------------------------------------------------------------------------------

class Shard:
    """Shard ``shard`` of ``config.shards``: ``admit``, ``lookup`` and ``commit`` rounds, durable state at
    :func:`shard_location`. Thread-safe (a threaded actor runs concurrent rounds)."""

    def __init__(self, config: ServeConfig, detector: DetectorConfig, shard: int):
        if not 0 <= shard < config.shards:
            raise ValueError(f"shard {shard} of {config.shards}")
        self.config, self.shard, self.n = config, shard, config.shards
        self.store = StateStore(shard_location(config, shard))
        self._lock = threading.Lock()  # the state and the pending log
        self._flush_lock = threading.Lock()  # orders log writes
        self._pending: list[dict] = []
        self._since_snapshot = 0
        if self.store.exists():
            manifest = self.store.read_manifest()
            if (manifest.get("shard"), manifest.get("shards")) != (shard, self.n):
                raise corrupt(self.store.path("manifest.json"), f"holds shard {manifest.get('shard')} of "
                                                                f"{manifest.get('shards')}, not {shard} of {self.n}")
            self._empty(DetectorConfig.model_validate(manifest["config"]))
            arrays, batches = self.store.read()
            self._restore(arrays)
            self._replay(batches)
        else:
            self._empty(detector)
            self.save()

    def _empty(self, detector: DetectorConfig) -> None:
        self.detector = cfg = detector
        self.ledger = Ledger(self.config.rate_limit)
        self.users = PredictionSimilarityLayer(None, cfg.per_user) if cfg.per_user else None
        self.index = FingerprintIndex(cfg.index, (self.shard, self.n)) if cfg.index else None
        self.uids = np.zeros(self.index.ring if self.index is not None else 0, np.uint64)  # random id per ring slot
        self.features = FeatureIndex(cfg.features) if cfg.features else None
        rows = cfg.features.capacity if cfg.features else 0
        self.row_seq = np.zeros(rows, np.int64)  # per feature row: the query's position in this shard's stream
        self.row_uid = np.zeros(rows, np.uint64)
        self.seen = 0  # queries this shard has indexed (its stream position; the index's next_id when on)
        self._slots: OrderedDict[int, tuple[int, int]] = OrderedDict()  # uid -> (ring slot, feature row), pending
        # step -> rounds applied (bits: admit 1, index 2, commit 4)
        self._applied: OrderedDict[int, int] = OrderedDict()
        self._results: OrderedDict[tuple[int, str], object] = OrderedDict()  # (step, round) -> result (retries)

    # ---- rounds ---------------------------------------------------------------------------------------------

    def admit(self, step: int, requests: list[Request], x: np.ndarray, probs: np.ndarray, now: float) -> tuple:
        """Rate limit and quota per request (images counted), then the per-user layer on the admitted images.
        Returns (per request None | {"wait": s} | {"too_large": reason}, per admitted image a QueryDecision or
        None)."""
        with self._lock:
            if (hit := self._repeat(step, "admit", 1)) is not None:
                return hit
            outcome, keep, users = admit(self.ledger, requests, len(x), now)
            per_user = [None] * len(users)
            if self.users is not None and users:
                xt, pt = torch.from_numpy(np.array(x[keep])), torch.from_numpy(np.array(probs[keep]))
                per_user = self.users.observe(xt, users, pt, now=now)
                for u, im, p, d in zip(users, xt, pt.numpy(), per_user):
                    self._log(USER, step, user=u, time=now, probs=p,
                              image=stored_image(im, self.detector.per_user.downscale).flatten().numpy(),
                              distance=bool(d.near_duplicate),                              prediction=bool(d.walked))
            return self._done(step, "admit", 1, (outcome, per_user))

    def lookup(self, step: int, uids: np.ndarray, hashes: list[np.ndarray] | None, digests: np.ndarray,
              feats: np.ndarray | None, now: float) -> list[dict]:
        """For each admitted query in order: look up its hashes routed here (``hashes[i]``) and its features
        among this shard's rows, then insert them (its feature row only when its id falls here). Per query
        what the merge needs (see :func:`merge_index`, :func:`merge_features`)."""
        with self._lock:
            if (hit := self._repeat(step, "lookup", 2)) is not None:
                return hit
            out = []
            for i, uid in enumerate(uids.tolist()):
                found = {}
                slot = row = -1
                if self.index is not None:
                    found.update(self._index_part(hashes[i], now))
                    slot = self.index.insert(hashes[i], int(digests[i]), now, 0) & (self.index.ring - 1)
                    self.uids[slot] = uid
                if self.features is not None:
                    found.update(self._feature_part(feats[i], int(digests[i]), now))
                    if uid % self.n == self.shard:
                        row = self.features.next_id % self.features.config.capacity
                        self.features.insert(feats[i], int(digests[i]), now, 0)
                        self.row_seq[row], self.row_uid[row] = self.seen, uid
                self._slots[uid] = (slot, row)
                self._log(INSERT, step, time=now, uid=uid, digest=int(digests[i]),
                          hashes=hashes[i] if self.index is not None else None,
                          features=feats[i] if row >= 0 else None)
                self.seen += 1
                out.append(found)
            while len(self._slots) > REMEMBERED:  # a batch that never committed: its chains stay pending
                self._slots.popitem(last=False)
            self._since_snapshot += len(uids)
            return self._done(step, "lookup", 2, out)

    def _index_part(self, hashes: np.ndarray, now: float) -> dict:
        cand, shared = self.index.candidates(hashes)
        live = np.isin(cand, self.index.live(cand, now))
        slots = (cand & np.uint32(self.index.ring - 1)).astype(np.int64)
        return {"cand": self.uids[slots], "shared": shared, "live": live, "digest": self.index.digests[slots],
                "chain": self.index.chains[slots]}

    def _feature_part(self, vector: np.ndarray, digest: int, now: float) -> dict:
        f = self.features
        n = len(f)
        if n == 0 or f.dim != len(vector):
            return {"fbest": float("inf"), "fnear": np.zeros(0, np.uint64), "fexact": np.zeros(0, np.uint64),
                    "fclusters": np.zeros(0, np.int32)}
        rms = f.distances(vector)
        live = f.live(now) & (self.seen - self.row_seq[:n] <= f.config.capacity)  # the last `capacity` queries
        near = live & (rms <= f.config.radius)
        exact = near & (f.digests[:n] == np.uint64(digest))
        return {"fbest": float(rms[live].min()) if live.any() else float("inf"),
                "fnear": np.unique(f.digests[:n][near]), "fexact": self.row_uid[:n][exact],
                "fclusters": f.clusters[:n][exact]}

    def commit(self, step: int, marks: list[tuple[int, int, int]], records: list[tuple[str, tuple, float]]) -> int:
        """Set the chains and clusters the merge decided (``(uid, chain, cluster)``) and record the ledger's
        ``(user, alarms, time)`` for this shard's users; durable before returning. Raises :class:`StepLost`
        when this shard lost the step's lookup round (a restart in between)."""
        with self._lock:
            if (hit := self._repeat(step, "commit", 4)) is not None:
                return hit
            if any(uid not in self._slots for uid, _, _ in marks):
                raise StepLost(f"shard {self.shard} restarted during this batch; retry")
            for uid, chain, cluster in marks:
                slot, row = self._slots.pop(uid)
                self._mark(uid, slot, row, chain, cluster)
                self._log(CHAIN, step, uid=uid, chain=chain, fcluster=cluster)
            for user, alarms, at in records:
                self.ledger.record(user, tuple(alarms), at)
                window = self.ledger.window(user) if self.ledger.has_window(user) else None
                self._log(LEDGER, step, user=user, time=at, alarms=",".join(alarms),
                          tag=json.dumps(window) if window else None)
            self._done(step, "commit", 4, len(records))
            compact = self._since_snapshot >= COMPACT_EVERY
        if compact:
            self.save()  # the snapshot holds everything decided so far, this step's updates included
        else:
            self.flush()  # group commit: this step's records and any written meanwhile, one append
        return len(records)

    def _mark(self, uid: int, slot: int, row: int, chain: int, cluster: int) -> None:
        if slot >= 0 and self.uids[slot] == uid:
            self.index.chains[slot] = chain
        if row >= 0 and self.row_uid[row] == uid:
            self.features.clusters[row] = cluster

    def _repeat(self, step: int, name: str, bit: int):
        """A retried round's first result; :class:`StepLost` when it ran before a restart (result gone)."""
        if (step, name) in self._results:
            return self._results[(step, name)]
        if self._applied.get(step, 0) & bit:
            raise StepLost(f"shard {self.shard} restarted after this batch's {name} round; retry")
        return None

    def _done(self, step: int, name: str, bit: int, result):
        self._applied[step] = self._applied.get(step, 0) | bit
        self._applied.move_to_end(step)
        self._results[(step, name)] = result
        for memo in (self._applied, self._results):
            while len(memo) > REMEMBERED:
                memo.popitem(last=False)
        return result

    # ---- reads ----------------------------------------------------------------------------------------------

    def stats(self, user: str) -> dict:
        with self._lock:
            return self.ledger.stats(user)

    def totals(self) -> dict:
        with self._lock:
            return {"queries": self.ledger.total_queries, "index": len(self.index) if self.index else 0,
                    "users": len(self.ledger.users),
                    "alarms": {a: sum(s.alarms.get(a, 0) for s in self.ledger.users.values()) for a in ALARMS}}

    # ---- durability -----------------------------------------------------------------------------------------

    def _log(self, kind: int, step: int, **fields) -> None:
        self._pending.append({"kind": kind, "step": step, **fields})

    def flush(self) -> None:
        """Append every pending record in one write (group commit); on failure keep them for the next."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, []
            if not pending:
                return
            try:
                self.store.append_log(_batch(pending))
            except Exception:
                with self._lock:
                    self._pending = pending + self._pending
                raise

    def save(self) -> None:
        """Snapshot the whole shard (a new generation: the log starts empty)."""
        with self._flush_lock, self._lock:
            if self.users is not None and self.seen:
                self.users.history.expire(time.time())
            meta = {"config": self.detector.model_dump(mode="json"), "shard": self.shard, "shards": self.n}
            self.store.write_snapshot(meta, self._arrays())
            self._pending, self._since_snapshot = [], 0

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {"seen": np.array([self.seen], np.int64), "uids": self.uids,
               "ledger": np.frombuffer(json.dumps(self.ledger.to_json()).encode(), np.uint8),
               "pending.uid": np.array(list(self._slots), np.uint64),
               "pending.slots": np.array(list(self._slots.values()), np.int64).reshape(-1, 2),
               "applied.step": np.array(list(self._applied), np.uint64),
               "applied.bits": np.array(list(self._applied.values()), np.int64)}
        if self.index is not None:
            out.update({f"index.{k}": v for k, v in self.index.arrays().items()})
        if self.features is not None:
            n = len(self.features)
            out.update({f"features.{k}": v for k, v in self.features.arrays().items()})
            out.update({"rows.seq": self.row_seq[:n], "rows.uid": self.row_uid[:n]})
        if self.users is not None:
            out.update({f"users.{k}": v for k, v in self.users.history.arrays().items()})
        return out

    def _restore(self, arrays: dict[str, np.ndarray]) -> None:
        path = self.store.snapshot_path(self.store.generation)
        try:
            def part(prefix: str) -> dict:
                return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

            self.seen = int(arrays["seen"][0])
            self.ledger = Ledger.from_json(self.config.rate_limit, json.loads(arrays["ledger"].tobytes()))
            if self.index is not None:
                self.index = FingerprintIndex.from_arrays(self.detector.index, part("index."), (self.shard, self.n))
                self.uids[:] = arrays["uids"]
            if self.features is not None:
                self.features = FeatureIndex.from_arrays(self.detector.features, part("features."))
                n = len(arrays["rows.seq"])
                self.row_seq[:n], self.row_uid[:n] = arrays["rows.seq"], arrays["rows.uid"]
            if self.users is not None:
                self.users.history.restore(part("users."))
            self._slots = OrderedDict((int(u), (int(a), int(b))) for u, (a, b) in
                                      zip(arrays["pending.uid"], arrays["pending.slots"]))
            self._applied = OrderedDict(zip(arrays["applied.step"].tolist(), arrays["applied.bits"].tolist()))
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise corrupt(path, f"shard snapshot does not fit the config: {e}") from None

    def _replay(self, batches: list[pa.RecordBatch]) -> None:
        """Redo the logged records in order (the same inserts, marks and records, so the same state)."""
        bits = {USER: 1, INSERT: 2, CHAIN: 4, LEDGER: 4}
        try:
            for batch in batches:
                for r in batch.to_pylist():
                    self._redo(r)
                    self._applied[r["step"]] = self._applied.get(r["step"], 0) | bits[r["kind"]]
        except (KeyError, ValueError, TypeError) as e:
            raise corrupt(f"{self.store.location} (log)", f"log record does not fit the config: {e}") from None
        while len(self._applied) > REMEMBERED:
            self._applied.popitem(last=False)

    def _redo(self, r: dict) -> None:
        kind = r["kind"]
        if kind == USER and self.users is not None:
            self.users.history.add(r["user"], np.asarray(r["image"], np.float32), np.asarray(r["probs"], np.float32),
                                   r["distance"], r["prediction"], r["time"])
        elif kind == INSERT:
            slot = row = -1
            if self.index is not None:
                h = np.asarray(r["hashes"] or [], np.uint64)
                slot = self.index.insert(h, r["digest"], r["time"], 0) & (self.index.ring - 1)
                self.uids[slot] = r["uid"]
            if self.features is not None and r["features"] is not None:
                row = self.features.next_id % self.features.config.capacity
                self.features.insert(np.asarray(r["features"], np.float32), r["digest"], r["time"], 0)
                self.row_seq[row], self.row_uid[row] = self.seen, r["uid"]
            self._slots[r["uid"]] = (slot, row)
            self.seen += 1
            self._since_snapshot += 1
        elif kind == CHAIN and r["uid"] in self._slots:
            slot, row = self._slots.pop(r["uid"])
            self._mark(r["uid"], slot, row, r["chain"], r["fcluster"])
        elif kind == LEDGER:
            self.ledger.record(r["user"], tuple(a for a in r["alarms"].split(",") if a), r["time"])
            if r["tag"]:
                self.ledger.set_window(r["user"], *json.loads(r["tag"]))


_COLUMNS = {"kind": pa.int8(), "step": pa.uint64(), "user": pa.string(), "time": pa.float64(), "uid": pa.uint64(),
            "digest": pa.uint64(), "distance": pa.bool_(), "prediction": pa.bool_(), "chain": pa.int32(),
            "fcluster": pa.int32(), "alarms": pa.string(), "tag": pa.string()}
_LISTS = {"hashes": (np.uint64, pa.uint64()), "features": (np.float32, pa.float32()),
          "image": (np.float32, pa.float32()), "probs": (np.float32, pa.float32())}


def _batch(records: list[dict]) -> pa.RecordBatch:
    cols = {k: pa.array([r.get(k) for r in records], t) for k, t in _COLUMNS.items()}
    cols.update({k: list_column([r.get(k) for r in records], dt, t) for k, (dt, t) in _LISTS.items()})
    return pa.RecordBatch.from_pydict(cols)


# ---- the batch protocol ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One shard's part of a round: ``method(*args)`` on shard ``shard``."""

    shard: int
    method: str
    args: tuple


def protocol(config: DetectorConfig, n: int, x: np.ndarray, requests: list[Request], probs: np.ndarray,
             now: float | None = None, seed: int | None = None):
    """A generator: yields each round's :class:`Call` list, is sent the results (a list in the same order),
    and returns per request what :meth:`adv.serving.owner.DetectorOwner.step` returns. ``run`` drives it
    in-process; ``jobs.serve`` drives it with one parallel actor call per shard and round."""
    now = time.time() if now is None else now
    rng = np.random.default_rng(seed)
    step = int(rng.integers(1, 2**63))
    xt, pt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(probs))
    hashes, digest, feats, _ = prepare(xt, config)
    home = [user_shard(r.user, n) for r in requests]
    starts = np.cumsum([0] + [r.images for r in requests])
    parts = {s: [i for i, h in enumerate(home) if h == s] for s in sorted(set(home))}
    calls = []
    for s, mine in parts.items():
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in mine])
        calls.append(Call(s, "admit", (step, [requests[i] for i in mine], x[rows], probs[rows], now)))
    admitted = yield calls
    outcome, per_user = [None] * len(requests), {}
    for (s, mine), (out, pu) in zip(parts.items(), admitted):
        it = iter(pu)
        for i, o in zip(mine, out):
            outcome[i] = o
            if o is None:
                per_user.update({j: next(it) for j in range(starts[i], starts[i + 1])})
    rows = np.array(sorted(per_user), np.int64)
    if not len(rows):
        return outcome
    uids = rng.integers(1, 2**63, len(rows), dtype=np.int64).astype(np.uint64)
    route = hash_partition(hashes[rows], config.index, n) if hashes is not None else None
    found = yield [Call(s, "lookup", (step, uids, None if route is None else
                                    [h[(p == s) & (h != 0)] for h, p in zip(hashes[rows], route)],
                                    digest[rows], None if feats is None else feats[rows], now)) for s in range(n)]
    decisions, marks, chains, clusters = [], [], {}, {}
    users = {j: requests[i].user for i in range(len(requests)) for j in range(starts[i], starts[i + 1])}
    for k, j in enumerate(rows.tolist()):
        parts_k = [f[k] for f in found]
        match = merge_index(parts_k, int(digest[j]), config, chains) if hashes is not None else None
        fmatch = merge_features(parts_k, config, clusters) if feats is not None else None
        uid = int(uids[k])
        chains[uid], clusters[uid] = (match.chain if match else 0), (fmatch.cluster if fmatch else 0)
        marks.append((uid, chains[uid], clusters[uid]))
        decisions.append(decide(config, None, users[j], xt[j : j + 1], pt[j], per_user[j], match, fmatch))
    records = {}
    for j, d in zip(rows.tolist(), decisions):
        records.setdefault(user_shard(d.user, n), []).append((d.user, d.alarms, now))
    yield [Call(s, "commit", (step, marks, records.get(s, []))) for s in range(n)]
    it = iter(decisions)
    return [o if o is not None else {"answers": [answer(next(it)) for _ in range(r.images)]}
            for r, o in zip(requests, outcome)]


def merge_index(parts: list[dict], digest: int, config: DetectorConfig, decided: dict[int, int]) -> IndexMatch:
    """One query's Blacklight match from every shard's counts: :meth:`FingerprintIndex.lookup` on the whole
    table. ``decided``: chains this batch already decided (a shard holds them as pending, 0)."""
    cfg = config.index
    uids = np.concatenate([p["cand"] for p in parts])
    if not len(uids):
        return IndexMatch(0, 1, False, False)
    u, first, inverse = np.unique(uids, return_index=True, return_inverse=True)
    total = np.bincount(inverse, weights=np.concatenate([p["shared"] for p in parts])).astype(np.int64)
    live = np.bincount(inverse, weights=~np.concatenate([p["live"] for p in parts])) == 0  # live everywhere
    best = int(total.max())
    keep = (total >= cfg.match_threshold) & live
    if not keep.any():
        return IndexMatch(best, 1, False, False)
    digests = np.concatenate([p["digest"] for p in parts])[first][keep]
    stored = np.concatenate([p["chain"] for p in parts])[first][keep]
    chains = np.array([decided.get(int(q), max(int(c), 1)) for q, c in zip(u[keep], stored)])  # pending: 1
    exact = digests == np.uint64(digest)
    chain = int(chains[exact].max()) if exact.any() else int(chains.max()) + 1
    return IndexMatch(best, chain, bool(exact.any()), chain >= cfg.chain_limit)


def merge_features(parts: list[dict], config: DetectorConfig, decided: dict[int, int]) -> FeatureMatch:
    """One query's feature-index match from every shard's rows: :meth:`FeatureIndex.lookup` on all rows."""
    best = min(p["fbest"] for p in parts)
    near = np.unique(np.concatenate([p["fnear"] for p in parts]))
    if not len(near):
        return FeatureMatch(best, 1, False)
    exact = [(int(q), int(c)) for p in parts for q, c in zip(p["fexact"].tolist(), p["fclusters"].tolist())]
    cluster = max(decided.get(q, max(c, 1)) for q, c in exact) if exact else 1 + len(near)
    return FeatureMatch(best, cluster, cluster >= config.features.neighbour_limit)


def run(shards: list[Shard], gen) -> list[dict]:
    """Drive :func:`protocol` in-process (tests, benchmarks): each round's calls one after another."""
    try:
        calls = next(gen)
        while True:
            calls = gen.send([getattr(shards[c.shard], c.method)(*c.args) for c in calls])
    except StopIteration as done:
        return done.value


def totals(parts: list[dict]) -> dict:
    """The shards' totals as one owner's: users and queries summed; every shard indexes every query."""
    return {"queries": sum(p["queries"] for p in parts), "index": max(p["index"] for p in parts),
            "users": sum(p["users"] for p in parts),
            "alarms": {a: sum(p["alarms"][a] for p in parts) for a in ALARMS}}
