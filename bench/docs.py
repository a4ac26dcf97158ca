"""Each benchmark owns one marked section of docs/benchmarks.md and rewrites only that; and its progress log."""

from __future__ import annotations

import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from adv.logs import to_stderr

#: ``[12:03:04] msg``
STAMP = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")


class CpuStamp(logging.Formatter):
    """``[12:03:04 cpu 1.5 min] msg``: the process's CPU time so far (the budget a bench is held to)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"[{time.strftime('%H:%M:%S')} cpu {time.process_time() / 60:.1f} min] {record.getMessage()}"


def logger(name: str, formatter: logging.Formatter | None = None) -> Callable[[str], None]:
    """``log(msg)`` on stderr through the stdlib logger ``name`` (``bench.<module>``): ``[name] msg`` unless a
    ``formatter`` (:data:`STAMP`, :class:`CpuStamp`) says otherwise. A benchmark is an entrypoint, so this also
    turns on the library's own lines (a training epoch), as ``jobs.common.logger`` does for a job."""
    to_stderr("adv")
    return to_stderr(name, formatter or logging.Formatter("[%(name)s] %(message)s")).info


def markers(bench: str) -> tuple[str, str]:
    return f"<!-- bench/{bench}.py:begin -->", f"<!-- bench/{bench}.py:end -->"


def command(bench: str, argv: list[str] | None) -> str:
    """The exact command line that produced a result, as the docs quote it."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([".venv/bin/python", "-m", f"bench.{bench}", *map(shlex.quote, args)])


def write_section(doc: Path, section: str, bench: str) -> None:
    """Replace ``bench``'s section between its markers (append it if absent); others are left alone."""
    begin, end = markers(bench)
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)
