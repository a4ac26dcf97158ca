"""Each benchmark owns one marked section of docs/benchmarks.md and rewrites only that."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path


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
