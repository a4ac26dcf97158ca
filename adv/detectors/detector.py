"""One owner of query-attack detection: the per-user layer and the global fingerprint index, combined.

Two detectors, two threat models:

* the **per-user layer** (Echeberria-Barrio et al. 2022, §4.3;
  :class:`PredictionSimilarityLayer`) compares a query with the same
  account's earlier images (SSIM) and predictions. It sees a walk toward
  the decision boundary, but only inside one account;
* the **global index** (Li et al. 2022, "Blacklight";
  :class:`FingerprintIndex`) compares a query's fingerprint with every
  account's recent queries, so a Sybil attacker who rotates accounts is
  still one near-duplicate chain. It keeps hashes, not images;
* the **feature index** (:class:`FeatureIndex`) does the same on coarse,
  mean-free pooled images, which per-query noise, small shifts and
  brightness changes barely move: the adaptive Sybil who transforms each
  query (Feng et al., CCS 2023) breaks Blacklight's exact hashes, not this.

A query is suspicious when either raises an alarm; the action applies to that
query. Under ``flag``, ``deceive`` and ``fallback`` the answer has the same
fields, types and status as a normal one (an attacker must not learn that it
was flagged: Feng et al., CCS 2023, show that a visible rejection is itself an
oracle an adaptive attacker samples against); ``deceive`` returns the model's
probabilities with the top two classes swapped, a plausible vector for the
deceptive class. ``block`` refuses openly (``status: "refused"``): the
honest choice, at the price of telling the attacker which queries were caught.

The per-user history of one account never affects another account's
decisions; only the index spans accounts. ``observe`` is thread-safe: a
lock serialises the updates (a batch at a time), and the fingerprints are
computed outside it.

Shape:
    x: (N, C, H, W) in [0, 1]; users: N strings; probs: (N, K) rows summing to 1
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from adv.detectors.feature_index import FeatureIndex, FeatureIndexConfig, FeatureMatch, features
from adv.detectors.fingerprint import FingerprintIndex, IndexConfig, IndexMatch, digests, fingerprints
from adv.detectors.query_similarity import (
    ACTIONS, PredictionSimilarityLayer, QueryDecision, SimilarityConfig, serve, stored_image,
)
from adv.detectors.state import StateError, StateStore, corrupt
from adv.errors import ConfigError


#: The query-stream detectors and when to use which (shown by ``adv info``).
QUERY_DETECTORS = {
    "per-user": "prediction-similarity layer (Echeberria-Barrio et al. 2020 §4.3): SSIM against the same "
                "account's recent images plus a prediction alarm; sees one account walk to the boundary, blind to "
                "an attacker rotating accounts; keeps (optionally downscaled) images per user",
    "index": "Blacklight fingerprint index (Li et al. 2022): near-duplicate chains across all accounts, so a Sybil "
             "attacker is still caught; O(top_k) lookups, ~0.4 KB of hashes per stored query, no images; evaded "
             "by per-query noise of about half a quantization step, at a cost in attack success",
    "features": "feature index: near-duplicate chains across all accounts on mean-free pooled images, robust to "
                "per-query noise, small shifts and brightness changes (the adaptive Sybil of Feng et al. 2023); "
                "exact nearest-neighbour search over a ring of recent queries, ~0.2 KB per stored 28x28 query",
    "combined": "QueryDetector(DetectorConfig()): all three, one action (flag/deceive/block/fallback), thread-safe "
                "batched observe, durable state (atomic snapshot + log on any pyarrow filesystem); use it to serve",
}


class DetectorConfig(BaseModel):
    """Both detectors and the action; ``None`` switches a detector off. Validated at the boundary."""

    model_config = ConfigDict(extra="forbid")

    #: Per-user prediction-similarity layer (its own ``action`` is unused: ``action`` below decides). SSIM on the
    #: 4 nearest earlier images by MSE, not 16: each SSIM costs 0.1-0.4 ms, and the nearest by MSE is nearly
    #: always among the 4; one day of retention.
    per_user: SimilarityConfig | None = Field(
        default_factory=lambda: SimilarityConfig(candidates=4, max_age=86_400.0))
    #: Global Blacklight index.
    index: IndexConfig | None = Field(default_factory=IndexConfig)
    #: Global feature index, robust to transformed queries (noise, shifts, brightness).
    features: FeatureIndexConfig | None = Field(default_factory=FeatureIndexConfig)
    action: Literal[ACTIONS] = "deceive"


@dataclass(frozen=True)
class Decision:
    """The detector's verdict on one query and the answer to return."""

    user: str
    suspicious: bool
    #: Alarms that fired: "distance", "prediction" (per-user layer), "index" (global index), "features".
    alarms: tuple[str, ...]
    action: str  # "none" unless suspicious
    predicted: int  # the model's class
    label: int  # the class to return; -1 when blocked
    probs: np.ndarray  # the probabilities to return, (K,) float32; empty when blocked
    per_user: QueryDecision | None
    index: IndexMatch | None
    features: FeatureMatch | None = None

    def response(self) -> dict:
        """What the caller sees: the same keys and types whatever the decision; ``block`` says "refused"."""
        status = "refused" if self.action == "block" else "ok"
        return {"status": status, "label": int(self.label), "probabilities": [float(v) for v in self.probs]}


class QueryDetector:
    """``detector.observe(x, users, probs, now=None) -> list[Decision]``; state saved with ``save``/``flush``.

    ``fallback`` (a model, for ``action="fallback"``) answers flagged queries.
    """

    def __init__(self, config: DetectorConfig | None = None, *, fallback: nn.Module | None = None):
        self.config = config if config is not None else DetectorConfig()
        if not isinstance(self.config, DetectorConfig):
            raise ConfigError(f"config must be a DetectorConfig, got {type(self.config).__name__}")
        if self.config.action == "fallback" and fallback is None:
            raise ConfigError("action 'fallback' needs a fallback model: QueryDetector(config, fallback=model)")
        self.fallback = fallback
        cfg = self.config
        self.users = PredictionSimilarityLayer(None, cfg.per_user) if cfg.per_user else None
        self.index = FingerprintIndex(cfg.index) if cfg.index else None
        self.features = FeatureIndex(cfg.features) if cfg.features else None
        self._lock = threading.Lock()  # guards the state and the pending log
        self._flush_lock = threading.Lock()  # orders log writes
        self._pending: list[dict] = []
        self._store: StateStore | None = None
        self._latest: float | None = None  # the latest ``now`` observed: the clock save() expires against

    # ---- observing ----------------------------------------------------------------------------------------

    def observe(self, x, users: list[str], probs, now: float | None = None,
                tags: list[str | None] | None = None) -> list[Decision]:
        """Record a batch of queries in order and decide each one.

        ``tags``: one opaque string (or None) per query, logged with its update and handed back on
        :meth:`load` (``replay``): how a caller keeps its own bookkeeping in the same durable write."""
        x, probs = _check(x, users, probs)
        if tags is not None and len(tags) != len(x):
            raise ConfigError(f"{len(x)} images need {len(x)} tags, got {len(tags)}")
        users = [str(u) for u in users]
        now = time.time() if now is None else float(now)
        hashes, digest, feats, stored = prepare(x, self.config)
        with self._lock:
            self._latest = now if self._latest is None else max(self._latest, now)
            per_user = self.users.observe(x, users, probs, now=now) if self.users else [None] * len(x)
            matches, near = [], []
            for i in range(len(x)):
                match = fmatch = None
                if self.index is not None:
                    match = self.index.lookup(hashes[i], int(digest[i]), now)
                    self.index.insert(hashes[i], int(digest[i]), now, match.chain)
                if self.features is not None:
                    fmatch = self.features.lookup(feats[i], int(digest[i]), now)
                    self.features.insert(feats[i], int(digest[i]), now, fmatch.cluster)
                matches.append(match)
                near.append(fmatch)
                self._pending.append(_record(users[i], now, hashes[i] if self.index else None, int(digest[i]),
                                             match, per_user[i], stored[i] if stored else None, probs[i],
                                             feats[i] if feats is not None else None, fmatch,
                                             query_alarms(self.config, per_user[i], match, fmatch),
                                             tags[i] if tags is not None else None))
        return [decide(self.config, self.fallback, u, x[i : i + 1], probs[i], p, m, f)
                for i, (u, p, m, f) in enumerate(zip(users, per_user, matches, near))]

    def __len__(self) -> int:
        """Queries the index holds (0 without an index)."""
        return len(self.index) if self.index is not None else 0

    # ---- persistence --------------------------------------------------------------------------------------

    def save(self, path: str | None = None, *, log_mode: Literal["auto", "append", "objects"] = "auto",
             extra: dict[str, np.ndarray] | None = None) -> None:
        """Write a snapshot atomically to ``path`` (a local path or any pyarrow URI) and log there from now on.

        Without ``path``, snapshot where the detector already logs (compacting the log). ``extra``: a caller's
        own arrays, written in the same snapshot (so they are exactly as current as the detector's) and handed
        back on :meth:`load` (``replay``).
        """
        with self._flush_lock, self._lock:
            store = StateStore(path, log_mode) if path is not None else self._store
            if store is None:
                raise StateError("save() needs a path the first time (a local path or a URI such as s3://b/k)")
            if self.users is not None and self._latest is not None:  # retention: expired images leave the state
                self.users.history.expire(self._latest)
            arrays = {**self._arrays(), **{f"extra.{k}": v for k, v in (extra or {}).items()}}
            store.write_snapshot({"config": self.config.model_dump(mode="json")}, arrays)
            self._store, self._pending = store, []

    def flush(self) -> int:
        """Make every update so far durable in the log (one appended segment, or one object); returns rows."""
        with self._flush_lock:
            with self._lock:
                if self._store is None:
                    raise StateError("flush() needs a state location: call save(path) or QueryDetector.load first")
                pending, self._pending = self._pending, []
            if not pending:
                return 0
            try:
                self._store.append_log(_batch(pending))
            except Exception:
                with self._lock:  # not written: keep them for the next flush, in order
                    self._pending = pending + self._pending
                raise
            return len(pending)

    @classmethod
    def load(cls, path: str, on_corrupt: Literal["fail", "empty"] = "fail", *, fallback: nn.Module | None = None,
             log_mode: Literal["auto", "append", "objects"] = "auto",
             replay: Callable[[dict[str, np.ndarray], list[dict]], None] | None = None) -> "QueryDetector":
        """Snapshot plus log from ``path``. A damaged state raises :class:`StateError` naming the file, or with
        ``on_corrupt="empty"`` warns and starts empty (same config when the manifest is readable) at ``path``.

        ``replay(extra, records)``: the snapshot's ``extra`` arrays (see :meth:`save`) and, in log order, each
        logged update's ``{"user", "time", "alarms", "tag"}`` (``alarms`` None in logs written before alarms
        were logged), for a caller rebuilding its own bookkeeping; not called when starting empty."""
        if on_corrupt not in ("fail", "empty"):
            raise ConfigError(f"on_corrupt must be 'fail' or 'empty', got {on_corrupt!r}")
        store = StateStore(path, log_mode)
        config = None
        try:
            config = _manifest_config(store, store.read_manifest())
            arrays, batches = store.read()
            det = cls(config, fallback=fallback)
            det._restore(arrays, store.snapshot_path(store.generation))
            det._replay(batches, store.location)
            if replay is not None:
                replay({k[6:]: v for k, v in arrays.items() if k.startswith("extra.")}, _logged(batches))
        except StateError as e:
            if on_corrupt == "fail" or "no detector state" in str(e):
                raise
            warnings.warn(f"{e}; starting empty", RuntimeWarning, stacklevel=2)
            det = cls(config, fallback=fallback)
            store.write_snapshot({"config": det.config.model_dump(mode="json")}, det._arrays(), keep_previous=True)
        det._store = store
        return det

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {}
        if self.index is not None:
            out.update({f"index.{k}": v for k, v in self.index.arrays().items()})
        if self.features is not None:
            out.update({f"features.{k}": v for k, v in self.features.arrays().items()})
        if self.users is not None:
            out.update({f"users.{k}": v for k, v in self.users.history.arrays().items()})
        return out

    def _restore(self, arrays: dict[str, np.ndarray], path: str) -> None:
        try:
            if self.index is not None:
                part = {k[6:]: v for k, v in arrays.items() if k.startswith("index.")}
                self.index = FingerprintIndex.from_arrays(self.config.index, part, copy=False)  # ours: read above
            if self.features is not None:
                part = {k[9:]: v for k, v in arrays.items() if k.startswith("features.")}
                if part:  # a state saved before the feature index existed starts it empty
                    self.features = FeatureIndex.from_arrays(self.config.features, part)
            if self.users is not None:
                part = {k[6:]: v for k, v in arrays.items() if k.startswith("users.")}
                self.users.history.restore(part)
        except (KeyError, ValueError, IndexError) as e:
            raise corrupt(path, f"snapshot does not fit the config: {e}") from None

    def _replay(self, batches: list[pa.RecordBatch], location: str) -> None:
        """Redo the logged updates in order: the same inserts and adds, so the same state."""
        try:
            for batch in batches:
                self._replay_batch(batch)
        except (KeyError, ValueError, TypeError) as e:
            raise corrupt(f"{location} (log)", f"log record does not fit the config: {e}") from None

    def _replay_batch(self, batch: pa.RecordBatch) -> None:
        # columns as numpy rows, not to_pylist: each logged image as 784 Python floats made replaying a few
        # thousand updates cost seconds of an owner's restart
        col = {k: batch.column(k) for k in batch.schema.names}
        hashes, feats, images, probs = (_rows(col.get(k), batch.num_rows) for k in ("hashes", "features", "image",
                                                                                    "probs"))
        users, times, digest = col["user"].to_pylist(), col["time"].to_pylist(), col["digest"].to_pylist()
        chain = col["chain"].to_pylist()
        fcluster = col["fcluster"].to_pylist() if "fcluster" in col else [0] * batch.num_rows
        distance, walked = col["distance"].to_pylist(), col["prediction"].to_pylist()
        top_k = self.config.index.top_k if self.index is not None else 0
        for i in range(batch.num_rows):
            if self.index is not None and hashes[i] is not None:
                h = np.zeros(top_k, np.uint64)
                h[: len(hashes[i])] = hashes[i]
                self.index.insert(h, digest[i], times[i], chain[i])
            if self.features is not None and feats[i] is not None:
                self.features.insert(feats[i], digest[i], times[i], fcluster[i])
            if self.users is not None and images[i] is not None:
                self.users.history.add(users[i], images[i], probs[i], distance[i], walked[i], times[i])


def _rows(column: pa.Array | None, n: int) -> list[np.ndarray | None]:
    """A list column as one numpy row per record (views of the column's values; None where null or absent)."""
    if column is None:
        return [None] * n
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    null = column.is_null().to_numpy(zero_copy_only=False)
    return [None if null[i] else values[offsets[i] : offsets[i + 1]] for i in range(n)]


def prepare(x: torch.Tensor, config: DetectorConfig) -> tuple:
    """What a query contributes to each detector, computed from the images alone (outside any lock, or in
    another process): Blacklight fingerprints (N, top_k), 8-byte digests (N,), pooled features (N, F) and the
    per-user layer's stored images (N flat arrays); None for a detector that is off."""
    xn = x.numpy()
    hashes = fingerprints(xn, config.index)[0] if config.index is not None else None
    digest = digests(xn) if config.index is not None or config.features is not None else np.zeros(len(x), np.uint64)
    feats = features(xn, config.features) if config.features is not None else None
    stored = ([stored_image(im, config.per_user.downscale).flatten().numpy() for im in x]
              if config.per_user is not None else None)
    return hashes, digest, feats, stored


def query_alarms(config: DetectorConfig, pu: QueryDecision | None, match: IndexMatch | None,
                 fmatch: FeatureMatch | None) -> tuple[str, ...]:
    """The alarms one query raised: per-user layer limits reached, index chain, feature cluster."""
    alarms = []
    if pu is not None and pu.suspicious:
        limits = config.per_user
        alarms += ["distance"] * (pu.distance_alarms >= limits.distance_alarm_limit)
        alarms += ["prediction"] * (pu.prediction_alarms >= limits.prediction_alarm_limit)
    if match is not None and match.suspicious:
        alarms.append("index")
    if fmatch is not None and fmatch.suspicious:
        alarms.append("features")
    return tuple(alarms)


def decide(config: DetectorConfig, fallback: nn.Module | None, user: str, x: torch.Tensor, probs: torch.Tensor,
           pu: QueryDecision | None, match: IndexMatch | None, fmatch: FeatureMatch | None = None) -> Decision:
    """The decision on one query from what each detector found (``x``: the query, (1, C, H, W))."""
    alarms = query_alarms(config, pu, match, fmatch)
    suspicious = bool(alarms)
    action = config.action if suspicious else "none"
    served_by = None
    if action == "fallback":
        with torch.no_grad():
            served_by = fallback(x).softmax(1)[0].float()
    served = serve(action, probs, served_by)
    blocked = action == "block"
    return Decision(user=user, suspicious=suspicious, alarms=alarms, action=action,
                    predicted=int(probs.argmax()), label=-1 if blocked else int(served.argmax()),
                    probs=np.zeros(0, np.float32) if blocked else served.numpy().astype(np.float32),
                    per_user=pu, index=match, features=fmatch)


def _logged(batches: list[pa.RecordBatch]) -> list[dict]:
    """What :meth:`QueryDetector.load` hands ``replay``: user, time, alarms (a tuple, or None) and tag."""
    out = []
    for batch in batches:
        names = batch.schema.names
        cols = {k: (batch.column(k).to_pylist() if k in names else [None] * batch.num_rows)
                for k in ("user", "time", "alarms", "tag")}
        out += [{"user": u, "time": t, "alarms": None if a is None else tuple(x for x in a.split(",") if x),
                 "tag": g} for u, t, a, g in zip(cols["user"], cols["time"], cols["alarms"], cols["tag"])]
    return out


def _check(x, users, probs) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x).detach().cpu().float()
    probs = torch.as_tensor(probs).detach().cpu().float()
    if x.ndim != 4:
        raise ConfigError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    if len(users) != len(x) or probs.ndim != 2 or len(probs) != len(x):
        raise ConfigError(f"{len(x)} images need {len(x)} users and probs (N, K); got {len(users)} users, "
                          f"probs of shape {tuple(probs.shape)}")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise ConfigError("images must lie in [0, 1]")
    return x, probs


def _record(user, now, hashes, digest, match, pu, image, probs, feats=None, fmatch=None, alarms=(), tag=None) -> dict:
    """One logged update: the index inserts and the per-user add this query made (None: that detector is off),
    the alarms it raised and the caller's tag."""
    return {"user": user, "time": now, "alarms": ",".join(alarms), "tag": tag, "features": feats,
            "fcluster": fmatch.cluster if fmatch is not None else 0,
            "hashes": None if hashes is None else hashes[hashes != 0], "digest": digest,
            "chain": match.chain if match is not None else 0,
            "image": image, "probs": probs.numpy() if image is not None else None,
            "distance": bool(pu.near_duplicate) if pu is not None else False,
            "prediction": bool(pu.walked) if pu is not None else False}


def list_column(values: list, dtype, pa_type) -> pa.Array:
    """A list column from numpy rows (None = null) without going through Python floats."""
    lengths = np.array([0 if v is None else len(v) for v in values], np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    parts = [np.asarray(v, dtype).ravel() for v in values if v is not None]
    flat = pa.array(np.concatenate(parts) if parts else np.zeros(0, dtype), pa_type)
    mask = pa.array([v is None for v in values])
    return pa.ListArray.from_arrays(offsets, flat, mask=mask)


def _batch(records: list[dict]) -> pa.RecordBatch:
    col = {k: [r[k] for r in records] for k in records[0]}
    return pa.RecordBatch.from_pydict({
        "user": pa.array(col["user"], pa.string()), "time": pa.array(col["time"], pa.float64()),
        "hashes": list_column(col["hashes"], np.uint64, pa.uint64()), "digest": pa.array(col["digest"], pa.uint64()),
        "chain": pa.array(col["chain"], pa.int32()),
        "image": list_column(col["image"], np.float32, pa.float32()),
        "probs": list_column(col["probs"], np.float32, pa.float32()),
        "distance": pa.array(col["distance"], pa.bool_()), "prediction": pa.array(col["prediction"], pa.bool_()),
        "features": list_column(col["features"], np.float32, pa.float32()),
        "fcluster": pa.array(col["fcluster"], pa.int32()),
        "alarms": pa.array(col["alarms"], pa.string()), "tag": pa.array(col["tag"], pa.string()),
    })


def _manifest_config(store: StateStore, manifest: dict) -> DetectorConfig:
    try:
        return DetectorConfig.model_validate(manifest["config"])
    except (KeyError, ValidationError) as e:
        raise corrupt(store.path("manifest.json"), f"bad config: {json.dumps(str(e))[:200]}") from None
