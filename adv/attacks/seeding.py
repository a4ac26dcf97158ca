"""Seeds that follow the example, not the batch.

A worst-case evaluation runs each attack only on the points still standing,
so the batch an attack sees changes whenever an earlier attack changes. With
one generator per call, every example's random start then depends on which
other examples happen to share its call: adding an attack in front could make
a later one *weaker* on an example it used to break. :func:`derive_seed`
gives each (run seed, attack label, example index) its own seed, and
:class:`RowSeeds` carries one stream per example into an attack.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, attack label, example index), by sha256 of their text."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RowSeeds(torch.Generator):
    """A generator that also holds one seed per example of the batch it is passed with.

    It is a ``torch.Generator`` (seeded from all the row seeds together), so
    any attack can draw from it as from one stream; :func:`adv.attacks.core.random_start`
    draws each example's start from that example's own stream instead, which
    makes PGD's and APGD's first start independent of the batch.
    """

    def __new__(cls, seeds: Iterable[int], device: torch.device | str = "cpu"):
        return super().__new__(cls, device=torch.device(device))

    def __init__(self, seeds: Iterable[int], device: torch.device | str = "cpu"):
        self.seeds = tuple(int(s) for s in seeds)
        self.manual_seed(derive_seed("joint", *self.seeds))
        self._streams: list[torch.Generator] | None = None

    def __len__(self) -> int:
        return len(self.seeds)

    def streams(self) -> list[torch.Generator]:
        """The per-example generators (made on first use, on this generator's device); each keeps its state, so
        a second random start of the same rows (a restart) continues their streams."""
        if self._streams is None:
            self._streams = [torch.Generator(device=self.device).manual_seed(s) for s in self.seeds]
        return self._streams
