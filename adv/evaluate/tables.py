"""The one markdown-table formatter of the reports, the jobs' stories and the benchmark docs.

Hand-written rather than ``tabulate``: it is a few lines, and tabulate's pipe format pads columns and writes
``|:-----|`` rules, so every existing table in the docs and reports would change.
"""

from __future__ import annotations

from typing import Any, Sequence

#: The separator cell of each alignment: left (GitHub's default, written ``---``) or right.
RULES = {"l": "---", "r": "---:"}


def _row(cells: Sequence[Any]) -> str:
    # An empty cell is one space wide (``| |``), as the hand-written tables had it.
    return "|" + "|".join(f" {c} " if c else " " for c in map(_cell, cells)) + "|"


def _cell(value: Any) -> str:
    """``str(value)`` with ``|`` escaped as ``\\|`` (GitHub's escape, which holds inside a code span too), so a
    defense spec or a label with a pipe stays in its column instead of splitting the row."""
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[Any], rows: Sequence[Sequence[Any]] = (),
                   align: str | Sequence[str] | None = None) -> list[str]:
    """A GitHub markdown table as lines: ``| a | b |``, ``|---|---:|``, then one line per row.

    ``align`` gives each column ``"l"`` (``---``, the default) or ``"r"`` (``---:``), e.g. ``"lrr"``. Cells are
    written with ``str``; a ``|`` inside one is escaped. A row of another width than the header is an error.
    """
    align = "l" * len(header) if align is None else align
    if len(align) != len(header) or any(a not in RULES for a in align):
        raise ValueError(f"align must give 'l' or 'r' for each of the {len(header)} columns, got {align!r}")
    for r in rows:
        if len(r) != len(header):
            raise ValueError(f"a table row has {len(r)} cells for {len(header)} columns: {list(r)!r}")
    return [_row(header), "|" + "".join(RULES[a] + "|" for a in align), *(_row(r) for r in rows)]
