"""One waiting policy for the project's polls and retries: a deadline, and delays that grow to a cap.

The driver waiting for a deployment, the red team waiting for a reconfigured endpoint and a replica retrying a
restarting state owner all wait the same way; a few lines here rather than tenacity, whose decorators do not fit
an ``await`` inside a loop that also re-resolves an actor handle.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator


def delays(start: float = 0.05, cap: float = 0.25, factor: float = 2.0) -> Iterator[float]:
    """``start, start*factor, ...`` up to ``cap``, then ``cap`` for ever."""
    delay = start
    while True:
        yield delay
        delay = min(delay * factor, cap)


def wait_until(check: Callable[[], bool], timeout_s: float, interval: float = 0.5) -> bool:
    """Call ``check`` until it returns true (then True) or ``timeout_s`` has passed (then False).

    ``check`` may raise to stop the wait early (a deployment that failed for good).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return True
        if time.monotonic() + interval > deadline:
            return False
        time.sleep(interval)
