"""Which examples a run holds and where each one goes: its shards (the unit of resume) and chunks (of seeding).

Fixed at a run's first attempt and stored as ``layout.json`` (:mod:`adv.runs.store`); resumed attempts and
runs that reuse the stored rows read it back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from adv.errors import DataNotFoundError


@dataclass
class Layout:
    n: int
    chunk_size: int
    #: shard of each chunk; chunks are ``index // chunk_size``.
    chunk_shard: list[int]
    classes: list[str]
    source: str
    #: Per example: the file path (image folders) or stored ``index`` (Parquet); empty for in-memory sets.
    keys: list[Any] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)

    @classmethod
    def build(cls, n: int, shards: int, chunk_size: int, **kw) -> "Layout":
        if n < 1:
            raise DataNotFoundError(f"no examples to evaluate in {kw.get('source', 'the dataset')}")
        chunks = math.ceil(n / chunk_size)
        groups = np.array_split(np.arange(chunks), min(shards, chunks))
        chunk_shard = [0] * chunks
        for k, g in enumerate(groups):
            for c in g:
                chunk_shard[int(c)] = k
        return cls(n=n, chunk_size=chunk_size, chunk_shard=chunk_shard, **kw)

    @property
    def shards(self) -> int:
        return max(self.chunk_shard) + 1

    def chunk_of(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(index) // self.chunk_size

    def shard_of(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.chunk_shard)[self.chunk_of(index)]

    def indices(self, shards: list[int]) -> np.ndarray:
        mask = np.isin(self.shard_of(np.arange(self.n)), shards)
        return np.flatnonzero(mask)

    def examples_per_shard(self) -> list[int]:
        return np.bincount(self.shard_of(np.arange(self.n)), minlength=self.shards).tolist()

    def to_json(self) -> dict:
        return asdict(self)
