"""A transform-robust, account-agnostic near-duplicate index: coarse image features beside Blacklight's hashes.

Blacklight's pixel fingerprint (:mod:`adv.detectors.fingerprint`) is exact on
quantized pixels, so per-query noise of about half a quantization step, a
one-pixel shift or a brightness change breaks every hash (Feng et al., CCS
2023: an adaptive attacker transforms each query to stay under a stateful
detector; our red team's noisy Sybil, ±0.05 uniform noise rotated over 150
accounts, went unflagged). This index compares what such transforms barely
move: each image average-pooled over ``block x block`` pixels per channel
(at most ``max_cells`` cells a side), minus its mean (a brightness offset
cancels). Uniform ±0.05 noise moves a 7x7 pooling
of a 28x28 image by an RMS of about 0.01 (0.0096 at the 99th percentile);
of 1000 distinct test images, 0.5% have another within 0.019 (MNIST) or
0.030 (Fashion-MNIST). The defaults (radius 0.025, a cluster of 4) are
Fashion-MNIST's: there they catch 83% of noisy Sybil attackers and flag no
benign user of any kind; on sparse digits (MNIST) similar images are closer,
and a radius of 0.02 with a cluster of 6 keeps retakes unflagged. Measure
yours with bench.query_detector_noisy (detection and false positives).

A query is flagged when the live stored queries within ``radius`` (RMS
distance) of it, from any account, hold at least ``neighbour_limit`` - 1
distinct images: it sits in a dense cluster. A query attack is such a
cluster (hundreds of queries around one image); benign retakes of one photo
make clusters of two or three. A count, not Blacklight's transitive chain:
a chain grows through any near neighbour, so over a long benign stream it
links similar-looking distinct images (a digit "1" to the next) without
bound. An exact repeat (same 8-bit pixels) gets the decision of what it
repeats, as in the fingerprint index: a popular image is never flagged for
being popular.

Search is exact and brute force over a ring of the last ``capacity`` queries
(one product per query, about 1 ms at 10,000 stored on a loaded 2-core
machine); ``4 * C * cells**2`` bytes per stored query (196 B for 28x28 grey at
7x7 cells), no image kept.

Shape: features(images (N, C, H, W) in [0, 1], config) -> (N, C * cells * cells) float32
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class FeatureIndexConfig(BaseModel):
    """Parameters of the feature index, typed so a tuner can sweep them."""

    model_config = ConfigDict(extra="forbid")

    #: Pixels per pooled cell side (4: a 28x28 image becomes 7x7 cells per channel).
    block: int = Field(4, ge=1, le=64)
    #: At most this many cells a side (bounds the memory and the search for large images).
    max_cells: int = Field(16, ge=2, le=64)
    #: RMS distance (pixel units, [0, 1] images) within which two queries are near-duplicates.
    radius: float = Field(0.025, gt=0, le=1)
    #: Cluster size (this query plus its distinct near neighbours) at which a query is flagged.
    neighbour_limit: int = Field(4, ge=2)
    #: Stored queries; the oldest is dropped beyond this.
    capacity: int = Field(20_000, ge=1, le=2**24)
    #: Seconds a stored query stays matchable; None keeps it until ``capacity`` pushes it out.
    max_age: float | None = Field(86_400.0, gt=0)

    def cells(self, size: tuple[int, int]) -> tuple[int, int]:
        """The pooled grid for images of ``size`` (H, W)."""
        return tuple(max(2, min(self.max_cells, s // self.block)) for s in size)

    def bytes_per_query(self, shape: tuple[int, int, int] = (1, 28, 28)) -> float:
        h, w = self.cells(shape[1:])
        return 4 * shape[0] * h * w + 20


def features(images: np.ndarray, config: FeatureIndexConfig) -> np.ndarray:
    """Mean-free average pooling per channel (torch does the pooling), (N, C * cells**2) float32."""
    x = torch.as_tensor(np.asarray(images, np.float32))
    f = F.adaptive_avg_pool2d(x, config.cells(tuple(x.shape[-2:]))).flatten(1)
    return (f - f.mean(1, keepdim=True)).numpy()


@dataclass(frozen=True)
class FeatureMatch:
    """What the feature index found for one query."""

    #: RMS distance to the nearest live stored query (inf: none stored).
    distance: float
    #: Distinct images in its cluster: this query plus its live near neighbours (1: none).
    cluster: int
    suspicious: bool


class FeatureIndex:
    """``lookup`` then ``insert`` per query, in order; a ring of the last ``capacity`` queries' features.

    Not thread-safe on its own: :class:`adv.detectors.QueryDetector` serialises calls.
    """

    def __init__(self, config: FeatureIndexConfig | None = None, dim: int | None = None):
        self.config = config or FeatureIndexConfig()
        self.dim = dim
        self.vectors = np.zeros((0, 0), np.float32)  # allocated on the first insert, when the dimension is known
        self.norms = np.zeros(0, np.float32)
        self.times = np.zeros(0, np.float64)
        self.clusters = np.zeros(0, np.int32)
        self.digests = np.zeros(0, np.uint64)
        self.next_id = 0
        if dim is not None:
            self._allocate(dim)

    def _allocate(self, dim: int) -> None:
        n = self.config.capacity
        self.dim = dim
        self.vectors = np.zeros((n, dim), np.float32)
        self.norms = np.zeros(n, np.float32)
        self.times = np.zeros(n, np.float64)
        self.clusters = np.zeros(n, np.int32)
        self.digests = np.zeros(n, np.uint64)

    def __len__(self) -> int:
        return min(self.next_id, self.config.capacity)

    def lookup(self, vector: np.ndarray, digest: int, now: float) -> FeatureMatch:
        cfg = self.config
        n = len(self)
        if n == 0 or self.dim != len(vector):
            return FeatureMatch(float("inf"), 1, False)
        rms = self.distances(vector)
        live = self.live(now)
        near = live & (rms <= cfg.radius)
        best = float(rms[live].min()) if live.any() else float("inf")
        if not near.any():
            return FeatureMatch(best, 1, False)
        exact = near & (self.digests[:n] == np.uint64(digest))
        if exact.any():  # a repeat gets the decision of what it repeats: the same answer for the same pixels
            cluster = int(self.clusters[:n][exact].max())
        else:
            cluster = 1 + len(np.unique(self.digests[:n][near]))
        return FeatureMatch(best, cluster, cluster >= cfg.neighbour_limit)

    def distances(self, vector: np.ndarray) -> np.ndarray:
        """RMS distance of ``vector`` to each stored row (the first ``len(self)`` rows)."""
        n = len(self)
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b over the stored rows; einsum, not BLAS: a multi-threaded BLAS
        # matrix-vector product is 20-100x slower on a loaded machine than this single-threaded loop
        d2 = self.norms[:n] + float(vector @ vector) - 2.0 * np.einsum("ij,j->i", self.vectors[:n], vector)
        return np.sqrt(np.maximum(d2, 0.0) / self.dim)

    def live(self, now: float) -> np.ndarray:
        """Which stored rows are young enough to match at ``now`` (``max_age``)."""
        n = len(self)
        return np.ones(n, bool) if self.config.max_age is None else self.times[:n] >= now - self.config.max_age

    def insert(self, vector: np.ndarray, digest: int, now: float, cluster: int) -> None:
        if self.dim is None or not len(self.vectors):
            self._allocate(len(vector))
        slot = self.next_id % self.config.capacity
        self.vectors[slot] = vector
        self.norms[slot] = float(vector @ vector)
        self.times[slot], self.clusters[slot], self.digests[slot] = now, cluster, digest
        self.next_id += 1

    def arrays(self) -> dict[str, np.ndarray]:
        """The state as named arrays (only the filled rows); :meth:`from_arrays` inverts it exactly."""
        n = len(self)
        return {"vectors": self.vectors[:n], "times": self.times[:n], "clusters": self.clusters[:n],
                "digests": self.digests[:n], "next_id": np.array([self.next_id], np.int64)}

    @classmethod
    def from_arrays(cls, config: FeatureIndexConfig, arrays: dict[str, np.ndarray]) -> "FeatureIndex":
        vectors = arrays["vectors"]
        if vectors.ndim != 2 or len(vectors) > config.capacity:
            raise ValueError(f"feature index: stored {vectors.shape} does not fit capacity {config.capacity}")
        index = cls(config, vectors.shape[1] if len(vectors) else None)
        n = len(vectors)
        if n:
            index.vectors[:n] = vectors
            index.norms[:n] = (vectors * vectors).sum(1)
            index.times[:n], index.clusters[:n] = arrays["times"], arrays["clusters"]
            index.digests[:n] = arrays["digests"]
        index.next_id = int(arrays["next_id"][0])
        return index
