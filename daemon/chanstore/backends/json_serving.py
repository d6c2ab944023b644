"""A json root as a daemon serves it: the mark that says a daemon serves it, and whether
it can take writes now.

**The mark.** A daemon answers a json container's reads from memory and
hears of no write another process makes to the root's files: a json root has
no invalidations, unlike Redis. So ``chanstore import`` or ``migrate``
writing into a root that a daemon serves would report its keys stored while
the daemon went on answering the old values, and its change feed never told
of them. Every daemon process serving a root holds a shared ``flock`` on the
root's ``.chanstore-served`` (:func:`mark_served`) for as long as it serves
it; a transfer about to write there asks :func:`served` first, and refuses,
as a daemon does before it serves a root (at start, and at a reload that
brings a root in): one daemon serves a json root.

Shared, because several holders are right: a daemon's ``--workers``, each
serving a share of the channels, and, during a reload, a container's old and
new copies in one process. The lock goes with the holder's descriptor, so a
daemon that dies, however it dies, serves nothing any more. The mark stays (an
empty file) and holds no data; neither a domain's keys nor the listing of
domains ever take a file of the root for one of theirs.

**Whose mark.** A shared lock does not say whose it is, and a worker of a
group that reloads a config bringing in a root must tell a sibling that
marked it a moment before (its own daemon) from another daemon. So each
holder also takes a read lock (an open file description's, ``F_OFD_SETLK``)
on one byte of the mark: its daemon's, a number drawn at random for a daemon
on its own and shared by a group's workers (:func:`new_daemon_key`,
:func:`serve_for`), taken before the shared lock and let go after it.
Asking, a process looks for another daemon's byte, then at the shared lock
(which also tells of a daemon of an earlier release, which locks no byte),
then at the bytes again (see :func:`_served_by_bytes`): only its own
daemon's, and the root is not served elsewhere. Where open file description
locks are missing (not Linux), a daemon's workers are not told apart and a
root this process marks is not served elsewhere for it.

The in-process library takes no mark: several processes of one service
writing a root, uncoordinated, is the original SDK's contract, kept.

**Writes.** :func:`check_writable` is the readiness probe's question of a
folder of the root: could a write succeed there now?
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from chanstore.backends.files import PlantedLink, Root, named
from chanstore.backends.integrity import report_planted
from chanstore.errors import BackendUnavailable

__all__ = [
    "MARK_NAME",
    "check_writable",
    "mark_served",
    "new_daemon_key",
    "root_of",
    "serve_for",
    "served",
    "served_by_daemon",
]

#: The mark's name in the root.
MARK_NAME = ".chanstore-served"
#: How long taking the shared lock waits for a transfer that holds it exclusively, as
#: :func:`served` does for an instant while it asks.
_MARK_WAIT = 2.0
_MARK_RETRY = 0.01
#: The roots this process marks (resolved), and how many marks it holds on each.
_held: Counter[str] = Counter()
_held_lock = threading.Lock()
#: ``struct flock`` of a 64-bit Linux, for the byte locks: type, whence, start, length, pid.
_FLOCK = struct.Struct("hhqqi4x")
#: Whether holders lock their daemon's byte (see "Whose mark").
BYTE_LOCKS = hasattr(fcntl, "F_OFD_SETLK") and sys.maxsize > 2**32
#: How often :func:`served` looks at a mark whose shared lock it found held and no byte
#: locked (see :func:`_served_by_bytes`).
_LOOKS = 3
#: Daemon keys are drawn from 1 to this; two daemons drawing one are told apart by
#: nothing, at odds of one in a trillion.
_KEYS = 2**40


def new_daemon_key() -> int:
    """A number for a daemon: the byte of every mark its processes hold."""
    return random.SystemRandom().randint(1, _KEYS)


#: This process's daemon: its own, until :func:`serve_for` says it is a group's worker.
_daemon_key = new_daemon_key()


def serve_for(daemon_key: int) -> None:
    """Mark roots, and ask of them, as a process of the daemon ``daemon_key`` from now on:
    a group's workers, with their supervisor's key."""
    global _daemon_key  # noqa: PLW0603 - one daemon per process, set once at a worker's start
    _daemon_key = daemon_key


def mark_served(root: str) -> Callable[[], None]:
    """Mark ``root`` served by this process (made if missing); the function it gives
    takes the mark back. Raises ``OSError`` when the mark cannot be taken (a
    read-only file system), and :class:`~chanstore.backends.files.PlantedLink`
    for a link in its place, reported as the root's integrity problem too."""
    try:
        fd = _open_mark(root, create=True)
    except PlantedLink as exc:
        report_planted(os.path.realpath(root), exc.path, "marking the root served")
        raise
    if fd is None:  # cannot happen: the root was just made
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), root)
    try:
        # The byte first: a sibling that sees this process's shared lock must see whose it
        # is (a read lock fails only against a write lock, which nobody takes).
        if BYTE_LOCKS:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, _daemon_key, 1))
        _share(fd)
    except BaseException:
        os.close(fd)
        raise
    key = os.path.realpath(root)
    with _held_lock:
        _held[key] += 1
    return _unmarking(key, fd)


def served(root: str) -> bool:
    """Whether another daemon serves ``root`` now: a process of another daemon holds its
    mark (this process's own marks, and its group's workers', are not another's).

    False, and the link reported, where a link was planted in the mark's place:
    no daemon marks a root through one; False for a root that cannot be reached
    (a file in its place, no permission): nor could a daemon mark it. What uses
    the root then meets that failure itself.
    """
    key = os.path.realpath(root)
    with _held_lock:
        marked_here = bool(_held[key])
    if marked_here and not BYTE_LOCKS:
        return False  # the shared lock cannot tell this process's own from another's
    try:
        fd = _open_mark(root, create=False)
    except PlantedLink as exc:  # no daemon marks through a link: none marked this root
        report_planted(key, exc.path, "asking whether a daemon serves the root")
        return False
    except OSError:  # a root that cannot be reached cannot have been marked either
        return False
    if fd is None:
        return False
    try:
        return _served_by_bytes(fd, marked_here) if BYTE_LOCKS else _shared_lock_held(fd)
    finally:
        os.close(fd)


def served_by_daemon(root: str) -> str | None:
    """What :meth:`~chanstore.backends.base.DatabaseInterface.served_elsewhere` says of
    ``root``: None when no process serves it."""
    if not served(root):
        return None
    return f"a running chanstore daemon serves its json root {root} from memory"


def root_of(settings: Mapping[str, Any]) -> str:
    """The root folder a json backend's ``settings`` name, as a backend built with them
    resolves it."""
    return os.path.abspath(settings.get("root_dir") or ".")


def check_writable(fd: int, path: str) -> None:
    """Raise BackendUnavailable, of the kind a write would meet, unless a write can succeed
    in the folder ``fd``: its file system mounted writable and not full, the folder
    writable by this process."""
    stats = os.fstatvfs(fd)
    if stats.f_flag & os.ST_RDONLY:
        error = BackendUnavailable(f"json folder {path} is on a read-only file system")
        error.kind = "read_only"
        raise error
    if stats.f_bavail == 0 or stats.f_favail == 0:
        error = BackendUnavailable(f"json folder {path} is on a full file system")
        error.kind = "disk_full"
        raise error
    # The process writes with its effective ids; os.access checks the real ones unless told.
    effective = os.access in os.supports_effective_ids
    if not os.access(".", os.W_OK | os.X_OK, dir_fd=fd, effective_ids=effective):
        raise BackendUnavailable(f"json folder {path} is not writable")


def _unmarking(key: str, fd: int) -> Callable[[], None]:
    """What takes one mark back: once, however often it is called (the descriptor's
    number may be another file's afterwards)."""
    taken_back = False

    def unmark() -> None:
        nonlocal taken_back
        with _held_lock:
            if taken_back:
                return
            taken_back = True
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        # The shared lock before the byte (which goes with the descriptor): while this
        # process holds the one, it holds the other (see _served_by_bytes).
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    return unmark


def _open_mark(root: str, create: bool) -> int | None:
    """A descriptor of the root's mark; None when the root or the mark does not exist
    (and ``create`` is false). No link is followed."""
    folder = Root(os.path.realpath(root))
    try:
        root_fd = folder.fd(create=create, fsync=create)
        if root_fd is None:
            return None
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            return os.open(MARK_NAME, flags, 0o644, dir_fd=root_fd)
        except FileNotFoundError:
            if create:
                raise
            return None
        except OSError as exc:
            raise named(exc, root_fd, MARK_NAME, os.path.join(folder.path, MARK_NAME)) from None
    finally:
        folder.close()


def _served_by_bytes(fd: int, marked_here: bool) -> bool:
    """Whether a process of another daemon holds the mark ``fd``, as its byte locks tell.

    Each holder takes its byte before the shared lock and lets it go after it,
    so a holder of the shared lock holds its byte. The two are looked at one
    after the other, not at once: the shared lock held and no byte locked a
    moment later is a holder that let go in between, or a daemon of an
    earlier release, which locks no byte. Looked at again, the first is gone;
    after :data:`_LOOKS` looks, the second is taken for what it is.
    """
    for _ in range(_LOOKS):
        if _other_daemons_byte(fd):
            return True
        if not _shared_lock_held(fd):
            return False
        if _other_daemons_byte(fd):
            return True
        if marked_here or _locked(fd, _daemon_key, 1):
            return False  # this daemon's processes hold it, and no other daemon's
    return True


def _other_daemons_byte(fd: int) -> bool:
    return _locked(fd, 0, _daemon_key) or _locked(fd, _daemon_key + 1, 0)


def _shared_lock_held(fd: int) -> bool:
    """Whether any process holds the mark ``fd``'s shared lock (the exclusive one that
    asks is let go at once)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _flock(kind: int, start: int, length: int) -> bytes:
    """A ``struct flock`` of ``length`` bytes from ``start`` (0: to the end, and beyond)."""
    return _FLOCK.pack(kind, os.SEEK_SET, start, length, 0)


def _locked(fd: int, start: int, length: int) -> bool:
    """Whether another open file description of the mark ``fd`` locks a byte of the range."""
    found = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, start, length))
    return _FLOCK.unpack(found)[0] != fcntl.F_UNLCK


def _share(fd: int) -> None:
    """Take the shared lock, waiting out a :func:`served` that holds it for an instant."""
    deadline = time.monotonic() + _MARK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise BlockingIOError(
                    errno.EWOULDBLOCK,
                    f"another process held the json root's mark {MARK_NAME} exclusively "
                    f"for {_MARK_WAIT:g}s",
                ) from None
            time.sleep(_MARK_RETRY)
