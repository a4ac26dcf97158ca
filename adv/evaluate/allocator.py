"""Keep freed CPU memory in the process during an evaluation, instead of giving it back to the OS each step.

An attack step allocates and frees the same activation-sized buffers (a LeNet's
conv maps at batch 46 are ~5 MB) every iteration. glibc's malloc serves blocks
above its mmap threshold with fresh ``mmap`` pages and trims the heap top on
free, so each step pays page faults again: on the suite's MNIST runs a third of
the CPU time at batch 256 was system time, and time grew faster than the
number of standing images. PyTorch's CPU tuning guide names the cure (keep
freed memory: jemalloc/tcmalloc, or glibc's ``M_MMAP_THRESHOLD`` and
``M_TRIM_THRESHOLD``); this sets the glibc knobs once, through ``mallopt``,
because an environment variable would have to be set before the process
starts. It changes no number an attack computes; elsewhere than glibc it does
nothing.

It is a process-wide setting (the process keeps up to ``TRIM_THRESHOLD`` of freed memory), so a caller can
refuse it: ``ADV_KEEP_FREED_MEMORY=0``, or glibc's own ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``/
``GLIBC_TUNABLES`` set in the environment, leave the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's largest mmap threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit): blocks below it come from the heap.
MMAP_THRESHOLD = 32 << 20
#: Freed memory kept at the heap top before it is trimmed.
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (once per process); True when they were set."""
    if os.environ.get("ADV_KEEP_FREED_MEMORY", "1") == "0" or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False  # the user chose the allocator's settings
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc thresholds %s", "set" if ok else "refused")
    return ok
