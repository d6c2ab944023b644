"""Durable file writes: temporary files, renames over, flushes, several at once.

The json backend and its journal (see journal.py) write a key's file the
same way: a temporary file in the key's folder, optionally flushed, renamed
over the key's file, so that a reader, or a crash, sees the old contents or
the new, never a torn file. This module holds those steps and the thread
pool that runs many of them at the same time.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = [
    "SYNC_WRITERS",
    "TEMP_PREFIX",
    "call_each",
    "fsync_file",
    "release_replaced",
    "rename_over",
    "replace_with",
    "sync_folder",
    "write_all",
    "write_temp",
]

#: Temporary files start so; they have no ``.json`` suffix, so they are never keys.
TEMP_PREFIX = ".chanstore-tmp-"
#: Threads that write and fsync several files at the same time.
SYNC_WRITERS = ThreadPoolExecutor(16, thread_name_prefix="chanstore-json-write")


def write_temp(folder: str | os.PathLike[str], data: bytes, fsync: bool) -> str:
    """A new temporary file in ``folder`` holding ``data`` (flushed to disk if ``fsync``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    # A process tag and a counter: unique without a system call for randomness
    # per file. O_EXCL guards against a clash all the same (a forked child
    # shares both): then a random name is tried.
    temp = os.path.join(folder, f"{TEMP_PREFIX}{_TEMP_TAG}{next(_temp_numbers):08x}")
    try:
        fd = os.open(temp, flags, 0o644)
    except FileExistsError:
        temp = os.path.join(folder, f"{TEMP_PREFIX}{secrets.token_hex(8)}")
        fd = os.open(temp, flags, 0o644)
    try:
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    os.close(fd)
    return temp


def replace_with(path: str, data: bytes, fsync: bool, held: list[int] | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it over ``path``."""
    rename_over(write_temp(os.path.dirname(path), data, fsync), path, held)


def rename_over(temp: str, path: str, held: list[int] | None = None) -> None:
    """Rename ``temp`` over ``path`` (removing ``temp`` if that fails).

    The version of ``path`` being replaced is held open across the rename
    and let go of on :data:`_retired`'s thread, so that freeing its blocks
    happens there: on a file system that discards freed blocks as it frees
    them (ext4 mounted with ``discard`` and no journal, as on the VM this was
    measured on) that waits for the device, about half of a rename's time.
    With ``held``, the descriptor is added to it, for the caller to pass to
    :meth:`_Retired.release` with the others of its batch (one wake-up of
    that thread per batch).
    """
    old = _retired.hold(path)
    try:
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        if old is not None:
            if held is None:
                _retired.release([old])
            else:
                held.append(old)


def sync_folder(folder: str | os.PathLike[str]) -> None:
    """Flush ``folder`` itself (its entries: renames, new and removed files)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # replaced or removed since: what took its place was made durable itself
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes, offset: int | None = None) -> None:
    view = memoryview(data)
    while view:
        if offset is None:
            written = os.write(fd, view)
        else:
            written = os.pwrite(fd, view, offset)
            offset += written
        view = view[written:]


def call_each(function: Callable[[Any], None], items: Sequence[Any]) -> None:
    """``function(item)`` for every item at once; the first error once all are done."""
    if not items:
        return
    others = [SYNC_WRITERS.submit(function, item) for item in items[1:]]
    errors: list[BaseException] = []
    try:
        function(items[0])  # this thread does one of them itself
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others
        errors.append(exc)
    for other in others:
        error = other.exception()  # waits for it
        if error is not None:
            errors.append(error)
    if errors:
        raise errors[0]


class _Retired:
    """Closes, on a thread of its own, descriptors of file versions that were replaced."""

    #: Descriptors waiting to be closed at most; past it, a rename frees the old version itself.
    LIMIT = 256

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start afresh (in a forked child, where the thread did not survive)."""
        self._queue: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._held = 0  # descriptors held and not closed yet

    def hold(self, path: str) -> int | None:
        """A descriptor of the file at ``path``, or None (none there, or too many held).

        It counts until the thread closed it: pass it to :meth:`release`.
        """
        with self._lock:
            if self._held >= self.LIMIT:
                return None
            self._held += 1
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            with self._lock:
                self._held -= 1
            return None  # a new key, or not a file we can hold: nothing to do

    def release(self, fds: list[int]) -> None:
        """Close ``fds`` (descriptors from :meth:`hold`) on the thread."""
        if not fds:
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="chanstore-json-retire", daemon=True
                    )
                    self._thread.start()
        self._queue.put(fds)

    def _run(self) -> None:
        while True:
            fds = self._queue.get()
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with self._lock:
                self._held -= len(fds)


_retired = _Retired()


def release_replaced(held: list[int]) -> None:
    """Let go of the replaced versions :func:`rename_over` added to ``held``."""
    _retired.release(held)


_TEMP_TAG = secrets.token_hex(4)
_temp_numbers = itertools.count()


def _after_fork_in_child() -> None:
    # A forked child shares the parent's tag and counter, and not its thread.
    global _TEMP_TAG, _temp_numbers  # noqa: PLW0603 - per process by design
    _TEMP_TAG = secrets.token_hex(4)
    _temp_numbers = itertools.count()
    _retired.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
