"""Seeds that follow the example, not the batch.

A worst-case evaluation runs each attack only on the points still standing,
so the batch an attack sees changes whenever an earlier attack changes. With
one generator per call, every example's random draws then depend on which
other examples happen to share its call: adding an attack in front could make
a later one *weaker* on an example it used to break. :func:`derive_seed`
gives each (run seed, attack label, example index) its own seed,
:func:`example_seeds` builds the :class:`RowSeeds` an evaluation passes to an
attack, and every random draw of the attacks goes through :func:`draw` and
:func:`uniform`: one stream per example with a :class:`RowSeeds`, one joint
stream with a plain ``torch.Generator``.

Shape:
    rows: (m,) int64 positions of the examples in the attacked batch
    draw(..., shape) -> (m, *shape); uniform(..., k) -> (m, k) float64
"""

from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Sequence

import torch

#: Uniforms kept per example for small draws (window positions, signs), so that a draw of a few numbers per
#: example per iteration costs one generator call per example every ``BUFFER`` numbers, not every iteration.
BUFFER = 1024


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, attack label, example index), by sha256 of their text."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _Streams:
    """The per-example generators and their buffered uniforms, shared by a :class:`RowSeeds` and its subsets."""

    def __init__(self, seeds: Sequence[int], device: torch.device):
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.buf = torch.empty((len(seeds), BUFFER), dtype=torch.float64, device=device)
        self.pos = torch.full((len(seeds),), BUFFER, dtype=torch.long)  # all used up: filled on first use

    def uniform(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        for i in ids[self.pos[ids] + k > BUFFER].tolist():  # refill whole buffers, from each row's own stream
            self.buf[i] = torch.rand(BUFFER, generator=self.gens[i], dtype=torch.float64, device=self.buf.device)
            self.pos[i] = 0
        cols = self.pos[ids][:, None] + torch.arange(k)
        self.pos[ids] += k
        return self.buf[ids.to(self.buf.device)[:, None], cols.to(self.buf.device)]

    def ahead(self, ids: torch.Tensor, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``n`` successive ``uniform(ids, k)`` calls would return, without taking them: ``(values (m', n, k),
        fits (m,))`` for the rows whose buffer holds all ``n·k`` (the others would refill on the way)."""
        fits = self.pos[ids] + n * k <= BUFFER
        ids = ids[fits]
        cols = self.pos[ids][:, None] + torch.arange(n * k)
        return self.buf[ids.to(self.buf.device)[:, None], cols.to(self.buf.device)].view(len(ids), n, k), fits

    def skip(self, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """Take ``counts`` (m,) of the uniforms :meth:`ahead` showed (each at most what it showed)."""
        self.pos[ids] += counts.cpu()


class RowSeeds(torch.Generator):
    """A generator that also holds one seed (one stream) per example of the batch it is passed with.

    It is a ``torch.Generator`` (seeded from all the row seeds together), so
    any attack can draw from it as from one stream; the registered attacks
    draw each example's numbers from that example's own stream instead
    (:func:`draw`, :func:`uniform`), which makes an example's result
    independent of the other examples of the batch. :meth:`take` gives the
    generator of a subset of the rows (a restart, a later target class) that
    continues the same streams.
    """

    def __new__(cls, seeds: Iterable[int], device: torch.device | str = "cpu", *, _shared=None):
        return super().__new__(cls, device=torch.device(device))

    def __init__(self, seeds: Iterable[int], device: torch.device | str = "cpu", *,
                 _shared: tuple[_Streams, torch.Tensor] | None = None):
        self.seeds = tuple(int(s) for s in seeds)
        self.manual_seed(derive_seed("joint", *self.seeds))
        # made on first use: the joint stream alone (a custom attack) needs no per-example generators
        self._shared = _shared

    def __len__(self) -> int:
        return len(self.seeds)

    def _pool(self) -> tuple[_Streams, torch.Tensor]:
        if self._shared is None:
            self._shared = (_Streams(self.seeds, self.device), torch.arange(len(self.seeds)))
        return self._shared

    def _ids(self, rows: torch.Tensor | None) -> torch.Tensor:
        ids = self._pool()[1]
        return ids if rows is None else ids[torch.as_tensor(rows).cpu()]

    def streams(self) -> list[torch.Generator]:
        """The per-example generators; each keeps its state, so a second draw for the same example (a
        restart) continues its stream."""
        pool, ids = self._pool()
        return [pool.gens[i] for i in ids.tolist()]

    def take(self, rows: torch.Tensor | Sequence[int]) -> "RowSeeds":
        """The generator of the examples at ``rows`` (positions in this batch), sharing their streams."""
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        pool, ids = self._pool()
        return RowSeeds([self.seeds[i] for i in rows.tolist()], self.device, _shared=(pool, ids[rows]))

    def uniform(self, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``k`` uniforms in [0, 1) per example (those at ``rows``, default all), each from its own stream."""
        if k > BUFFER:
            return self.draw(torch.rand, (k,), rows, torch.float64)
        pool, _ = self._pool()
        return pool.uniform(self._ids(rows), k)

    def tries(self, k: int, n: int, rows: torch.Tensor, accept: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, ``k`` uniforms at a time until ``accept`` takes them, at most ``n`` times: the same numbers and
        the same stream positions as a loop of :meth:`uniform` calls redrawing the rows not yet accepted, in a few
        tensor operations instead of up to ``n`` rounds. ``accept(u (m', n, k), fits) -> (m', n) bool`` judges every
        draw of the rows whose ``n`` draws are already buffered (``fits``, a mask of ``rows``).

        Returns ``(u (m', k), fits)``: each fitting row's accepted draw (its last when none was), its stream
        moved past it; the other rows are left for the caller's loop.
        """
        pool, _ = self._pool()
        ids = self._ids(rows)
        u, fits = pool.ahead(ids, k, n)
        ok = accept(u, fits)
        first = torch.where(ok.any(1), ok.int().argmax(1), n - 1)  # the first accepted draw, else the last
        pool.skip(ids[fits], (first + 1) * k)
        return u[torch.arange(len(u), device=u.device), first.to(u.device)], fits

    def draw(self, fn: Callable, shape: tuple[int, ...], rows: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``fn(shape)`` (``torch.rand``, ``torch.randn``) per example, each from its own stream: (m, *shape)."""
        pool, _ = self._pool()
        gens = [pool.gens[i] for i in self._ids(rows).tolist()]
        if not gens:
            return torch.empty((0, *shape), dtype=dtype, device=self.device)
        return torch.stack([fn(tuple(shape), generator=g, dtype=dtype, device=self.device) for g in gens])


def example_seeds(seed: int, label: str, index: torch.Tensor | Iterable[int],
                  device: torch.device | str = "cpu") -> RowSeeds:
    """The streams of attack ``label`` on the examples at ``index`` in the data (never their batch or the
    attack's position in a sequence): what the evaluation protocol and the Ray job's worker pass as ``seed``."""
    index = index.tolist() if isinstance(index, torch.Tensor) else [int(i) for i in index]
    return RowSeeds([derive_seed(seed, label, i) for i in index], device)


def draw(gen: torch.Generator, fn: Callable, shape: tuple[int, ...], rows: torch.Tensor,
         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``fn`` draws for the examples at ``rows``: per example from a :class:`RowSeeds`, else jointly from ``gen``.

    Shape: -> (len(rows), *shape), on ``gen``'s device
    """
    if isinstance(gen, RowSeeds):
        return gen.draw(fn, shape, rows, dtype)
    return fn((len(rows), *shape), generator=gen, dtype=dtype, device=gen.device)


def uniform(gen: torch.Generator, k: int, rows: torch.Tensor) -> torch.Tensor:
    """``k`` uniforms in [0, 1) per example at ``rows`` (per example from a :class:`RowSeeds`).

    Shape: -> (len(rows), k) float64, on ``gen``'s device
    """
    if isinstance(gen, RowSeeds):
        return gen.uniform(k, rows)
    return torch.rand((len(rows), k), generator=gen, dtype=torch.float64, device=gen.device)


def subset(gen: torch.Generator, rows: torch.Tensor) -> torch.Generator:
    """The generator for the examples at ``rows``: :meth:`RowSeeds.take`, or ``gen`` itself (one joint stream)."""
    return gen.take(rows) if isinstance(gen, RowSeeds) else gen


def randint(u: torch.Tensor, high: int) -> torch.Tensor:
    """Integers in [0, high) from uniforms ``u`` (same shape)."""
    return (u * high).long().clamp_(max=high - 1)


def signs(gen: torch.Generator, shape: tuple[int, ...], rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Random ±1 per example at ``rows``, shaped (len(rows), *shape), with ``like``'s dtype and device."""
    u = uniform(gen, int(torch.Size(shape).numel()), rows)
    return torch.where(u < 0.5, -1.0, 1.0).view(len(rows), *shape).to(like)
