"""Progress bars for long work: tqdm on stderr, so stdout stays clean for --json output."""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str = "", total: int | None = None, disable: bool = False, **kw) -> tqdm:
    """A tqdm bar on stderr; ``ADV_NO_PROGRESS=1`` turns every bar off (CI logs)."""
    disable = disable or os.environ.get("ADV_NO_PROGRESS") == "1"
    return tqdm(
        iterable, desc=desc, total=total, disable=disable, file=sys.stderr,
        mininterval=1.0, dynamic_ncols=True, leave=False, **kw,
    )
