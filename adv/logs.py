"""Logging: the library logs through ``logging.getLogger(__name__)`` and prints nothing by itself.

Quiet by default (a library's INFO lines go nowhere until someone asks); an entrypoint asks once: the ``adv``
command for the length of a command (:func:`stderr_logging`), a Ray job for its process
(:func:`jobs.common.logger`). Both print each message as one plain line on stderr, as before there was logging.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

#: The logger every ``adv.*`` module's logger hangs under.
ROOT = "adv"


class StderrLines(logging.StreamHandler):
    """One line per message on whatever ``sys.stderr`` is when it is written (tests and callers may swap it)."""

    def __init__(self, formatter: logging.Formatter | None = None):
        super().__init__()
        self.setFormatter(formatter or logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; sys.stderr is looked up per message
        pass


def to_stderr(name: str = ROOT, formatter: logging.Formatter | None = None) -> logging.Logger:
    """Print INFO and above of logger ``name`` (and its children) on stderr; calling it again changes nothing."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, StderrLines) for h in logger.handlers):
        logger.addHandler(StderrLines(formatter))
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed once here, not again by a handler the application put on the root
    return logger


@contextlib.contextmanager
def stderr_logging(name: str = ROOT) -> Iterator[logging.Logger]:
    """:func:`to_stderr` for the length of a block; the logger is left as the block found it."""
    logger = logging.getLogger(name)
    saved = list(logger.handlers), logger.level, logger.propagate
    try:
        yield to_stderr(name)
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
