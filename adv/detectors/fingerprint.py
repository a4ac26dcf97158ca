"""An account-agnostic near-duplicate index of queries (Li et al., USENIX Security 2022, "Blacklight").

A query-based attack sends hundreds of near-identical images; spreading them
over many accounts (Sybil) hides them from per-user history, but not from an
index of *all* queries. Blacklight's probabilistic fingerprint:

1. quantize the pixels (step ``quantization`` on the 0-255 scale);
2. slide a window of ``window`` values over the flattened image (HWC order);
3. hash every window and keep the ``top_k`` largest distinct hashes: the
   fingerprint. Two images that share most windows share most of it.

A query whose fingerprint shares at least ``match_threshold`` hashes with an
earlier query's (from any account) is a near-duplicate of it. Near-duplicates
form chains; a query is flagged when its chain reaches ``chain_limit``
queries. An *exact* repeat (same 8-bit pixels) gets the chain length, and so the
decision, of what it repeats: the model's answer is deterministic, so a
repeat tells an attacker nothing new, and a popular image uploaded by many
users is never flagged for that alone.

Departures from the paper, each for a reason:

* a query is flagged at a chain of ``chain_limit`` = 4 queries, not at its
  first near-duplicate (Blacklight's rule, a limit of 2): a benign user who
  sends a photo again after a mild crop, mirror or lighting change makes
  near-duplicates too (two such retakes with the same crop and mirror share
  27-45 of the 50 hashes). A photo sent ``v`` times makes a chain of at most
  ``v`` (its versions link only to each other), so a limit of 4 never flags
  up to three versions of one photo; an attack walk's chain grows by one with
  each near-duplicate query, so the price is two more queries before the
  first flag. Chosen on validation images, disjoint from the benchmarks'
  (``bench.query_detector_validate``, docs/benchmarks.md): at 2, 21% of
  users sending retakes were flagged (64% at four retakes per photo); at 4,
  none, and Square's, Square L2's and HopSkipJump's Sybil attackers were
  still detected as often, give or take one image in 20, later (a median of
  9 queries instead of 4 for Square);

* windows whose quantized values are all equal are skipped ("no content"):
  on plain backgrounds (Fashion-MNIST) they hash alike in nearly every image
  and would make unrelated images match;
* the hash table is a fixed array of buckets of ``bucket_size`` slots, each a
  ring that overwrites its oldest entry: a hash common to many images cannot
  grow without bound, and a lookup reads ``top_k`` buckets whatever the
  number of stored queries (O(``top_k`` x ``bucket_size``));
* stored queries expire by count (``capacity``, a ring) and age
  (``max_age`` seconds); expired entries are ignored at lookup and
  overwritten later, never scanned.

What is kept: per stored query its 32-bit id, time, chain length and an
8-byte digest (24 bytes), plus ``top_k`` table slots of 8 bytes (a 32-bit
hash check and the id) at ``table_load`` slots per hash: about
``24 + 8 * top_k * table_load`` bytes (424 B at the defaults). No image is kept.

Shape:
    images: (N, C, H, W) in [0, 1] -> fingerprints (N, top_k) uint64 (0 = unused), counts (N,)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

_U64 = np.uint64
_MASK32 = (1 << 32) - 1
#: Multiplier of the polynomial window hash (odd, so invertible modulo 2**64).
_P = _U64(0x9E3779B97F4A7C15)
_P_INV = _U64(pow(int(_P), -1, 1 << 64))


class IndexConfig(BaseModel):
    """Blacklight parameters, typed and validated so a tuner can sweep them."""

    model_config = ConfigDict(extra="forbid")

    #: Quantization step on the 0-255 scale (Blacklight: 50).
    quantization: int = Field(50, ge=1, le=255)
    #: Values per sliding window of the flattened HWC image (Blacklight: 20 for 32x32 images, 50 for 224x224).
    window: int = Field(20, ge=2)
    #: Hashes kept per query (Blacklight: 50).
    top_k: int = Field(50, ge=1, le=1024)
    #: Shared hashes that make two queries near-duplicates (Blacklight: 25 of 50).
    match_threshold: int = Field(25, ge=1)
    #: Chain length (queries linked by near-duplicate matches) at which a query is flagged. Blacklight's rule is 2
    #: (the first near-duplicate); 4 lets a benign photo be sent three times (see the module docstring).
    chain_limit: int = Field(4, ge=2)
    #: Stored queries; the oldest is dropped beyond this.
    capacity: int = Field(100_000, ge=1, le=2**31)
    #: Seconds a stored query stays matchable; None keeps it until ``capacity`` pushes it out.
    max_age: float | None = Field(86_400.0, gt=0)
    #: Slots per hash-table bucket (a ring): caps how many queries one hash can point to.
    bucket_size: int = Field(8, ge=1, le=255)
    #: Table slots per stored hash; below ~1 buckets overflow and forget old entries early.
    table_load: float = Field(1.0, ge=0.25, le=8.0)

    @model_validator(mode="after")
    def _check(self):
        if self.match_threshold > self.top_k:
            raise ValueError(f"match_threshold ({self.match_threshold}) cannot exceed top_k ({self.top_k})")
        return self

    def bytes_per_query(self) -> float:
        return 24 + 8 * self.top_k * self.table_load


def bucket_count(config: IndexConfig) -> int:
    """Buckets of the hash table (a power of two): ``capacity * top_k * table_load / bucket_size``."""
    buckets = max(1, int(config.capacity * config.top_k * config.table_load / config.bucket_size))
    return 1 << (buckets - 1).bit_length()


def hash_partition(hashes: np.ndarray, config: IndexConfig, parts: int) -> np.ndarray:
    """Which of ``parts`` index parts holds each hash's bucket (``partition`` of :class:`FingerprintIndex`)."""
    return ((hashes & _U64(bucket_count(config) - 1)) % _U64(parts)).astype(np.int64)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: spreads the polynomial hash so "the largest k" is a pseudo-random choice."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> _U64(27))) * _U64(0x94D049BB133111EB)
        return h ^ (h >> _U64(31))


def _window_hashes(q: np.ndarray, window: int) -> np.ndarray:
    """Hash of every length-``window`` run of ``q`` (uint8 levels), via prefix sums of a polynomial hash.

    Hand-written rather than hashlib per window: a 224x224x3 image has 150k windows, ~0.15 s in Python.
    """
    n = len(q) - window + 1
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(q) + 1, _U64)
        np.cumsum((q.astype(_U64) + _U64(1)) * _powers(len(q), False), out=prefix[1:])
        return _mix((prefix[window : window + n] - prefix[:n]) * _powers(n, True))


@lru_cache(maxsize=32)
def _powers(n: int, inverse: bool) -> np.ndarray:
    """P**i (or P**-i) modulo 2**64 for i < n."""
    with np.errstate(over="ignore"):
        step = np.full(n - 1, _P_INV if inverse else _P, _U64)
        return np.cumprod(np.concatenate([np.ones(1, _U64), step]), dtype=_U64)


def quantize(images: np.ndarray, step: int) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] -> (N, H*W*C) uint8 levels (HWC order, as an image file is laid out)."""
    levels = np.floor(np.clip(images, 0.0, 1.0) * 255.0 / step + 1e-6).astype(np.uint8)
    return levels.transpose(0, 2, 3, 1).reshape(len(images), -1)


def digests(images: np.ndarray) -> np.ndarray:
    """An 8-byte digest of each image's 8-bit pixels: equal for exact repeats."""
    pixels = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.array([int.from_bytes(hashlib.blake2b(p.tobytes(), digest_size=8).digest(), "little")
                     for p in pixels], dtype=_U64)


def fingerprints(images: np.ndarray, config: IndexConfig) -> tuple[np.ndarray, np.ndarray]:
    """Blacklight fingerprints of a batch: (N, top_k) uint64 hashes, largest first, 0-padded; (N,) counts."""
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {images.shape}")
    levels = quantize(images, config.quantization)
    if levels.shape[1] < config.window:
        raise ValueError(f"window {config.window} is longer than an image ({levels.shape[1]} values)")
    out = np.zeros((len(images), config.top_k), _U64)
    counts = np.zeros(len(images), np.int64)
    for i, q in enumerate(levels):
        h = _window_hashes(q, config.window)
        # a window has content when some neighbouring pair of its values differs
        changes = np.concatenate([[0], np.cumsum(q[1:] != q[:-1])])
        h = h[changes[config.window - 1 :] - changes[: len(h)] > 0]
        top = _top_distinct(h, config.top_k)
        out[i, : len(top)], counts[i] = top, len(top)
    return out, counts


def _top_distinct(h: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest distinct values of ``h``, largest first."""
    if len(h) > 8 * k:  # partition first: sorting all 150k windows of a large image costs ~10 ms
        h = np.partition(h, len(h) - 8 * k)[len(h) - 8 * k :]
        u = np.unique(h)
        if len(u) < k:  # many repeated windows among the largest: fall back to all of them
            return _top_distinct_all(h, k)
        return u[::-1][:k]
    return _top_distinct_all(h, k)


def _top_distinct_all(h: np.ndarray, k: int) -> np.ndarray:
    return np.unique(h)[::-1][:k]


@dataclass(frozen=True)
class IndexMatch:
    """What the index found for one query."""

    #: Most hashes shared with one stored query (0: no candidate).
    shared: int
    #: Length of the near-duplicate chain this query ends (1: no near-duplicate).
    chain: int
    #: True when it repeats a stored query's exact pixels.
    exact_repeat: bool
    suspicious: bool


class FingerprintIndex:
    """A bounded, account-agnostic store of fingerprints: ``lookup`` then ``insert`` per query, in order.

    Not thread-safe on its own: :class:`adv.detectors.QueryDetector` serialises calls.

    ``partition=(s, n)``: this index is part ``s`` of ``n`` of one logical index (``adv.serving.shards``): its
    hash table holds only the buckets ``b`` with ``b % n == s`` (:func:`hash_partition` routes a hash there), so
    ``n`` parts together hold the same table as one index; the per-query ring is whole in every part.
    """

    def __init__(self, config: IndexConfig | None = None, partition: tuple[int, int] | None = None):
        self.config = cfg = config or IndexConfig()
        self.partition = partition or (0, 1)
        self.ring = 1 << max(int(cfg.capacity - 1).bit_length(), 0)  # a power of two: slot = id mod ring
        # np.zeros maps untouched pages lazily, so a large default costs nothing until used
        self.ids = np.zeros(self.ring, np.uint32)  # 32-bit query id stored in each slot
        self.times = np.zeros(self.ring, np.float64)
        self.chains = np.zeros(self.ring, np.int32)
        self.digests = np.zeros(self.ring, _U64)
        self.buckets = bucket_count(cfg)  # of the whole logical table
        rows = -(-self.buckets // self.partition[1])  # this part's buckets
        self.keys = np.zeros((rows, cfg.bucket_size), np.uint32)  # high hash bits, 0 = empty
        self.refs = np.zeros((rows, cfg.bucket_size), np.uint32)  # query id
        self.heads = np.zeros(rows, np.uint8)
        self.next_id = 0  # ids ever issued; the live ones are the last ``capacity`` of them

    def __len__(self) -> int:
        return min(self.next_id, self.config.capacity)

    def _split(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        bucket = (hashes & _U64(self.buckets - 1)).astype(np.int64) // self.partition[1]  # this part's row
        check = ((hashes >> _U64(32)) | _U64(1)).astype(np.uint32)
        return bucket, check

    def candidates(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored query ids sharing any of ``hashes`` (nonzero, all routed to this part) and how many each
        shares; live or not (see :meth:`live`)."""
        hashes = hashes[hashes != 0]
        bucket, check = self._split(hashes)
        hit = self.keys[bucket] == check[:, None]
        return np.unique(self.refs[bucket][hit], return_counts=True)

    def live(self, cand: np.ndarray, now: float) -> np.ndarray:
        """Which of the query ids ``cand`` are still stored (see :meth:`_live`)."""
        return self._live(cand, np.zeros(len(cand)), now)[0] if len(cand) else cand

    def lookup(self, hashes: np.ndarray, digest: int, now: float) -> IndexMatch:
        """Match one fingerprint (the nonzero ``hashes``) against the live stored queries."""
        cfg = self.config
        cand, shared = self.candidates(hashes)
        best = int(shared.max()) if len(shared) else 0
        keep = shared >= cfg.match_threshold
        cand, shared = cand[keep], shared[keep]
        if len(cand):
            cand, shared = self._live(cand, shared, now)
        if not len(cand):
            return IndexMatch(best, 1, False, False)
        slots = (cand & np.uint32(self.ring - 1)).astype(np.int64)
        exact = self.digests[slots] == _U64(digest)
        # a repeat gets the decision of what it repeats: the same answer for the same pixels
        chain = int(self.chains[slots][exact].max()) if exact.any() else int(self.chains[slots].max()) + 1
        return IndexMatch(best, chain, bool(exact.any()), chain >= cfg.chain_limit)

    def _live(self, cand: np.ndarray, shared: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray]:
        """Candidates still stored: their slot holds them, they are among the last ``capacity``, not too old."""
        slots = (cand & np.uint32(self.ring - 1)).astype(np.int64)
        age = (np.uint32(self.next_id & _MASK32) - cand).astype(np.int64)  # queries since, modulo 2**32
        ok = (self.ids[slots] == cand) & (age >= 1) & (age <= self.config.capacity)
        if self.config.max_age is not None:
            ok &= self.times[slots] >= now - self.config.max_age
        return cand[ok], shared[ok]

    def insert(self, hashes: np.ndarray, digest: int, now: float, chain: int) -> int:
        """Store one query; returns its id. Overwrites the oldest slot of the ring and of each bucket."""
        qid = np.uint32(self.next_id & _MASK32)
        slot = self.next_id & (self.ring - 1)
        self.ids[slot], self.times[slot], self.chains[slot], self.digests[slot] = qid, now, chain, digest
        bucket, check = self._split(hashes[hashes != 0])
        if len(np.unique(bucket)) == len(bucket):  # nearly always: one write per array, not a loop per hash
            head = self.heads[bucket]
            self.keys[bucket, head], self.refs[bucket, head] = check, qid
            self.heads[bucket] = (head + 1) % self.config.bucket_size
        else:  # two hashes share a bucket: each takes the next slot of its ring, in order
            for b, c in zip(bucket.tolist(), check.tolist()):
                h = self.heads[b]
                self.keys[b, h], self.refs[b, h] = c, qid
                self.heads[b] = (h + 1) % self.config.bucket_size
        self.next_id += 1
        return int(qid)

    def arrays(self) -> dict[str, np.ndarray]:
        """The whole state as named arrays (for snapshots); :meth:`from_arrays` inverts it exactly."""
        return {"ids": self.ids, "times": self.times, "chains": self.chains, "digests": self.digests,
                "keys": self.keys, "refs": self.refs, "heads": self.heads,
                "next_id": np.array([self.next_id], np.int64)}

    @classmethod
    def from_arrays(cls, config: IndexConfig, arrays: dict[str, np.ndarray],
                    partition: tuple[int, int] | None = None, *, copy: bool = True) -> "FingerprintIndex":
        """``copy=False`` adopts ``arrays`` (the caller's own, writable, e.g. just read from a snapshot) instead of
        copying them: a default index is ~70 MB, and a copy of it is seconds of a restart on a loaded machine."""
        index = cls(config, partition)
        for name, value in arrays.items():
            if name == "next_id":
                continue
            mine = getattr(index, name)
            if mine.shape != value.shape or mine.dtype != value.dtype:
                raise ValueError(f"index array {name!r}: stored {value.dtype}{value.shape}, "
                                 f"config needs {mine.dtype}{mine.shape}")
            if copy or not (value.flags.writeable and value.flags.c_contiguous):
                mine[...] = value
            else:
                setattr(index, name, value)
        index.next_id = int(arrays["next_id"][0])
        return index
