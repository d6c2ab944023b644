"""Giving the memory of channels that left back to the system.

Three things keep freed memory in the process:

* Python's small-object allocator (pymalloc) carves objects out of 1 MiB
  arenas and gives an arena back only once every object in it is freed. A
  burst of channels fills new arenas, and the few objects made meanwhile
  that live on (a metric's value, a timer, a connection's last request)
  keep nearly all of them: 10,000 channels touched once left the daemon
  11 to 22 MiB above its baseline for good, with Python's live objects back
  at it. On the C allocator such an object keeps a page, not a MiB, so the
  daemon runs on it (:func:`exec_with_malloc`); a cached read costs the same
  within a few per cent.
* Python keeps freed objects of its commonest types (tuples, dicts, floats,
  contexts) for reuse, thousands of them spread over the heap; a full
  garbage collection empties these free lists.
* glibc's malloc returns only the top of its heaps by itself: the pages
  freed inside them stay resident until ``malloc_trim`` releases them.

:func:`release_free_memory` sees to the last two after channels left memory.

What stays is mostly the pages under the freed chunks that glibc keeps for
reuse, up to seven of each size per thread (its tcache): 2 to 5.5 MiB after
bursts of 10,000 channels. ``GLIBC_TUNABLES=glibc.malloc.tcache_count=0`` in
the daemon's environment brings that to under 1 MiB, for some 10% more CPU
per request.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
import time
from collections.abc import Callable

__all__ = ["ReleaseSchedule", "exec_with_malloc", "release_free_memory"]

#: Channels that leave memory, while channels keep leaving, between two returns
#: of freed memory to the system.
RELEASE_AFTER_CHANNELS = 256
#: Seconds between two returns at least: each one is a full garbage collection
#: and a walk of the C heap.
RELEASE_INTERVAL = 1.0


class ReleaseSchedule:
    """When to give back what channels that left memory freed.

    Once they stopped leaving (a sweep that drops none after some were
    dropped), and every :data:`RELEASE_AFTER_CHANNELS` while they keep
    leaving; never twice within :data:`RELEASE_INTERVAL` seconds (a due
    return waits for a later sweep).
    """

    def __init__(self) -> None:
        self._left = 0  # channels that left since memory was last given back
        self._released = time.monotonic()

    def swept(self, dropped: int) -> bool:
        """Note a sweep that dropped ``dropped`` channels; whether to release now."""
        self._left += dropped
        due = self._left >= RELEASE_AFTER_CHANNELS or (self._left > 0 and dropped == 0)
        if not due or time.monotonic() - self._released < RELEASE_INTERVAL:
            return False
        self._left = 0
        self._released = time.monotonic()
        return True


def release_free_memory() -> bool:
    """Give the memory freed since the last call back to the system; whether it could.

    A full garbage collection (which also empties Python's free lists), then
    ``malloc_trim``: together some tens of milliseconds for a heap of a few
    hundred MiB, during which the event loop waits.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    gc.collect()
    trim(0)
    return True


def exec_with_malloc() -> None:
    """Restart this process on the C allocator (``PYTHONMALLOC=malloc``) unless it is on it.

    The same process (``exec`` keeps the PID, which systemd and supervisors
    watch) with the same arguments: call it before anything else started.
    It does nothing when ``PYTHONMALLOC`` is set already (an operator's
    choice wins, and it is how the restarted process knows), when Python
    ignores the environment (``-E``, ``-I``: it would restart forever), in
    development mode (which has its own debug allocator), or where the C
    library is not glibc (no ``malloc_trim`` to give pages back).
    """
    if (
        "PYTHONMALLOC" in os.environ
        or sys.flags.ignore_environment
        or sys.flags.dev_mode
        or not sys.executable
        or _malloc_trim() is None
    ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, PYTHONMALLOC="malloc")
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the interpreter is linked to
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
