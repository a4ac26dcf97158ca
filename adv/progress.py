"""Progress for long work, on stderr so stdout stays clean for --json output.

On a terminal (or in a notebook) it is a tqdm bar. When stderr is redirected to a file or a pipe (``make main >
log 2>&1``, a CI job, a Ray worker's log) a bar's ``\\r`` redraws would pile up as hundreds of kilobytes, so
:class:`LineProgress` prints whole lines instead: one each time another ~10% is done, one more within a 10% step
after 30 s without a line (so slow work still shows life), and a last one at the end: at most ~21 lines per loop,
however slow the machine. Without a known total it prints after 30 s, 60 s, 120 s, ... ``ADV_NO_PROGRESS=1``
turns all progress off.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

from tqdm.asyncio import tqdm as console_tqdm
from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

T = TypeVar("T")

#: Line mode: a new line after this fraction of the total, or after this many seconds.
LINE_FRACTION, LINE_SECONDS = 0.1, 30.0


def interactive(stream: IO) -> bool:
    """True where a redrawn bar renders: a terminal, or a notebook (tqdm.auto picked its widget bar)."""
    isatty = getattr(stream, "isatty", None)
    return auto_tqdm is not console_tqdm or bool(isatty and isatty())


def progress(iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None, disable: bool = False,
             file: IO | None = None, **kw):
    """A tqdm bar on stderr, or a :class:`LineProgress` when stderr is not a terminal.

    Both iterate over ``iterable`` (or count ``update`` calls towards ``total`` when it is None) and take
    ``set_postfix``, ``set_description``, ``update`` and ``close``.
    """
    disable = disable or os.environ.get("ADV_NO_PROGRESS") == "1"
    stream = file if file is not None else sys.stderr
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if disable or not interactive(stream):
        return LineProgress(iterable, desc=desc, total=total, file=stream, disable=disable, unit=kw.get("unit", "it"))
    return auto_tqdm(iterable, desc=desc, total=total, file=stream, mininterval=1.0, dynamic_ncols=True,
                     leave=False, **kw)


class LineProgress:
    """tqdm's interface, written as whole lines for logs (see the module docstring); tqdm formats each line."""

    def __init__(self, iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None,
                 file: IO | None = None, disable: bool = False, unit: str = "it", *,
                 fraction: float = LINE_FRACTION, seconds: float = LINE_SECONDS, clock=time.monotonic):
        self.iterable, self.desc, self.total, self.disable, self.unit = iterable, desc, total, disable, unit
        self._file = file if file is not None else sys.stderr
        self._fraction, self._seconds, self._clock = fraction, seconds, clock
        self.n, self._postfix, self._last_postfix, self._closed = 0, "", "", False
        self._start = self._last_time = clock()
        self._last_n = self._mark_n = 0  # at the last line; at the last 10% line
        self._beat = False  # a time line was written since the last 10% line

    def __iter__(self) -> Iterator[T]:
        try:
            for item in self.iterable if self.iterable is not None else ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kw) -> None:
        items = {**(ordered_dict or {}), **kw}
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def refresh(self) -> None:
        """Nothing to redraw: lines are written by :meth:`update` and :meth:`close`."""

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or self._closed:
            return
        now = self._clock()
        if self.total and self.n - self._mark_n >= self._fraction * self.total:
            self._write(now)
            self._mark_n, self._beat = self.n, False
        elif now - self._last_time >= self._seconds and not self._beat:
            self._write(now)
            if self.total:
                self._beat = True  # one per 10% step
            else:
                self._seconds *= 2  # no steps to count: ever rarer lines

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and (self.n, self._postfix) != (self._last_n, self._last_postfix):
            self._write(self._clock())

    def _write(self, now: float) -> None:
        line = std_tqdm.format_meter(self.n, self.total, now - self._start, prefix=self.desc,
                                     unit=self.unit, postfix=self._postfix or None, ncols=0)
        print(line, file=self._file, flush=True)
        self._last_n, self._last_time, self._last_postfix = self.n, now, self._postfix
