"""Files of a json root: reached without following links, written durably, several at once.

Nothing inside a json root is ever followed: a symbolic link planted there
(a channel folder, a key's file, the journal) could otherwise send writes out
of the root or serve a foreign file as a value. So every file and folder below
the root is reached from the root's descriptor through no link (:class:`Root`:
``openat2`` with ``RESOLVE_NO_SYMLINKS``, or one ``O_NOFOLLOW`` open per
level), and files are then read, created, renamed and removed relative to
their folder's descriptor (``openat`` with ``O_NOFOLLOW``, ``renameat``,
``unlinkat``). Checking a path first and then using it could race with a link
swapped in between; reaching it this way cannot. A name that is a link where
chanstore expects its own file or folder is a :class:`PlantedLink` error
naming the path. The root itself may be a link: it is resolved once, when the
first backend of the root is built.

The json backend and its journal (see journal.py) write a key's file the same
way: a temporary file in the key's folder, optionally flushed, renamed over
the key's file, so that a reader, or a crash, sees the old contents or the
new, never a torn file (large files of a batch are written over their folder's
spare and exchanged into place instead: see :mod:`.spare_files`). This module
holds those steps and the thread pool that runs many of them at the same time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import os
import queue
import secrets
import stat
import sys
import threading
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from chanstore.errors import CorruptValue

__all__ = [
    "SYNC_WRITERS",
    "TEMP_PREFIX",
    "PlantedLink",
    "Root",
    "call_each",
    "fdatasync",
    "is_link",
    "libc_function",
    "named",
    "open_folder",
    "read_file",
    "release_replaced",
    "remove_file",
    "rename_over",
    "replace_with",
    "sync_file_system",
    "temp_name",
    "write_all",
    "write_temp",
]

#: Temporary files start so; they have no ``.json`` suffix, so they are never keys.
TEMP_PREFIX = ".chanstore-tmp-"
#: Threads that write and fsync several files at the same time.
SYNC_WRITERS = ThreadPoolExecutor(16, thread_name_prefix="chanstore-json-write")

#: A folder below the root: never through a link.
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A file to read: never through a link, and never waiting on a FIFO planted in its place.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
#: O_EXCL never follows a link either: it fails on any name that exists.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class PlantedLink(CorruptValue):
    """A symbolic link inside a json root where chanstore keeps its own file or folder.

    chanstore never makes one, so it was planted: following it could read a
    foreign file as a value or write outside the root. Its own kind,
    ``planted_link``, counts it apart. It is a :class:`CorruptValue` (data of
    the root that cannot be used), so that a load reports it for its key and
    goes on with the others, and the HTTP API answers it as damaged data.
    """

    kind = "planted_link"

    def __init__(self, path: str) -> None:
        super().__init__(
            f"{path} is a symbolic link inside the json root; chanstore never follows links "
            "there (was it planted?)"
        )
        self.path = path


class Root:
    """A json root folder, opened once; everything below it is reached from its descriptor.

    ``path`` is the root resolved once (it may itself have been a link). The
    root may not exist yet: reads then find nothing, and the first write
    makes it. The descriptor is kept for the root's life (one per root, not
    per backend). Reaching a folder below it costs one ``openat2`` with
    ``RESOLVE_NO_SYMLINKS`` where Linux offers it (5.6 and later: the kernel
    refuses any link on the way, in one call, about 2 µs), else one ``openat``
    per level (about 5 µs for a channel's container folder, three levels).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()

    def fd(self, create: bool = False, fsync: bool = False) -> int | None:
        """The root's descriptor; None if it does not exist (and ``create`` is false)."""
        fd = self._fd
        if fd is not None:
            return fd
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except FileNotFoundError:
                    if not create:
                        return None
                    _make_folders(self.path, fsync)
                    self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            return self._fd

    def folder(
        self,
        parts: Sequence[str],
        *,
        create: bool = False,
        fsync: bool = False,
        encoded: bytes | None = None,
    ) -> int:
        """A new descriptor of the folder ``parts`` below the root; the caller closes it.

        No link on the way is followed: one is a :class:`PlantedLink`. A
        missing level is ``FileNotFoundError``, or, with ``create``, made (its
        parent flushed if ``fsync``, so that the new folder survives a crash).
        Other errors name the full path. ``encoded``, the parts joined by
        ``/`` as bytes, spares a caller that asks often the encoding.
        """
        root = self.fd(create, fsync)
        if root is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.path)
        if not parts:
            return os.dup(root)
        if _openat2 is not None:
            fd = _openat2(root, encoded or os.fsencode(os.path.join(*parts)))
            if fd >= 0:
                return fd
            if fd == -errno.ENOENT and not create:
                path = os.path.join(self.path, *parts)
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            # Anything else is settled one level at a time: made, or named.
        return self._walk(root, parts, create, fsync)

    def _walk(self, root: int, parts: Sequence[str], create: bool, fsync: bool) -> int:
        """:meth:`folder` one level at a time, each opened with ``O_NOFOLLOW``."""
        levels: list[int] = []  # opened here, in order; the last one is the answer
        grown: list[int] = []  # folders that got a new folder
        parent, depth = root, 0
        try:
            for depth, part in enumerate(parts):  # noqa: B007 - depth names a failure
                try:
                    child = os.open(part, _FOLDER, dir_fd=parent)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(part, 0o777, dir_fd=parent)
                    except FileExistsError:
                        pass  # made meanwhile by another writer (or a link: opening tells)
                    else:
                        grown.append(parent)
                    child = os.open(part, _FOLDER, dir_fd=parent)
                levels.append(child)
                parent = child
            if fsync and grown:
                call_each(os.fsync, grown)
        except OSError as exc:
            failed = len(levels) < len(parts)  # on the way down (else: flushing)
            error = named(exc, parent, parts[depth] if failed else "",
                          os.path.join(self.path, *parts[: depth + 1]))  # fmt: skip
            for level in levels:
                os.close(level)
            raise error from None
        for level in levels[:-1]:
            os.close(level)
        return levels[-1]

    def sync(self, paths: Collection[str]) -> None:
        """Flush each file of ``paths`` (relative to the root), then their folders up to the root.

        In parallel, on :data:`SYNC_WRITERS`. A file or folder gone since,
        or a link put in its place, is skipped: nothing of ours to flush there.
        """
        by_folder: dict[str, list[str]] = {}
        for path in paths:
            parent, name = os.path.split(path)
            by_folder.setdefault(parent, []).append(name)
        call_each(self._sync_files, list(by_folder.items()))
        levels = {""}  # the folders and every one above them, up to the root
        for parent in by_folder:
            level = parent
            while level:
                levels.add(level)
                level = os.path.dirname(level)
        call_each(self._sync_folder, sorted(levels, key=len, reverse=True))

    def _sync_files(self, folder_and_names: tuple[str, list[str]]) -> None:
        parent, names = folder_and_names
        folder = self._reach(parent)
        if folder is None:
            return
        try:
            for name in names:
                try:
                    fd = os.open(name, _READ, dir_fd=folder)
                except (FileNotFoundError, IsADirectoryError):
                    continue  # replaced or removed since: what took its place was made durable
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.EMLINK):
                        continue  # a link planted since: not ours to flush
                    raise
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        finally:
            os.close(folder)

    def _sync_folder(self, parent: str) -> None:
        folder = self._reach(parent)
        if folder is not None:
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def _reach(self, parent: str) -> int | None:
        """A descriptor of ``parent`` (relative to the root), or None if it is gone or a link."""
        try:
            return self.folder(parent.split(os.sep) if parent else [])
        except (FileNotFoundError, PlantedLink):
            return None

    def close(self) -> None:
        """Let go of the descriptor; a later use opens the root again."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __repr__(self) -> str:
        return f"Root({self.path!r})"


def libc_function(name: str, restype: Any, argtypes: list[Any]) -> Any | None:
    """Linux's C library's ``name``, typed, keeping errno for ``ctypes.get_errno``; None
    off Linux, or where the library has no such function."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.restype = restype
    function.argtypes = argtypes
    return function


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]  # fmt: skip


_SYS_OPENAT2 = 437  # the same number on every Linux architecture
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


def _load_openat2() -> Callable[[int, bytes], int] | None:
    """``openat2(folder, path)`` of a folder below ``folder`` through no link at all, or None.

    Answers the descriptor, or minus the errno. None where Linux has no
    ``openat2`` (before 5.6, or a sandbox that refuses it): the first
    refusal turns it off for the process.
    """
    syscall = libc_function("syscall", ctypes.c_long, [ctypes.c_long, ctypes.c_int,
                            ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t])  # fmt: skip
    if syscall is None:
        return None
    how = _OpenHow(_FOLDER, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_BENEATH)
    address, size = ctypes.addressof(how), ctypes.sizeof(how)

    def openat2(folder: int, path: bytes, _how: _OpenHow = how) -> int:
        fd = syscall(_SYS_OPENAT2, folder, path, address, size)
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG):
            global _openat2  # noqa: PLW0603 - refused here: never again in this process
            _openat2 = None
        return -code

    return openat2


_openat2 = _load_openat2()


def named(exc: OSError, folder: int, name: str, path: str) -> OSError | PlantedLink:
    """``exc`` (about ``name`` in ``folder``) naming ``path``; a :class:`PlantedLink` if a link.

    Called on failures only: a link fails ``O_NOFOLLOW`` with ``ELOOP``
    (``EMLINK`` on some BSDs) and ``O_DIRECTORY`` with ``ENOTDIR``, and one
    ``lstat`` tells a link from whatever else failed.
    """
    link_errors = (errno.ELOOP, errno.EMLINK, errno.ENOTDIR, errno.EEXIST)
    if name and exc.errno in link_errors and is_link(folder, name):
        return PlantedLink(path)
    if exc.filename == path:
        return exc
    return OSError(exc.errno, exc.strerror, path)


def is_link(folder: int, name: str) -> bool:
    """Whether ``name`` in ``folder`` is a symbolic link (False if it cannot be looked at)."""
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _make_folders(path: str, fsync: bool) -> None:
    """``os.makedirs(path)``; with ``fsync``, each new folder's entry flushed in its parent."""
    missing: list[str] = []
    folder = path
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(path, exist_ok=True)
    if fsync and missing:
        call_each(_sync_folder, sorted({os.path.dirname(new) for new in missing}, key=len))


def _sync_folder(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading, writing, removing in a folder --------------------------------------------


def open_folder(folder: int, name: str, path: str) -> int:
    """A descriptor of the folder ``name`` in ``folder`` (its path ``path``), never through a
    link: :class:`PlantedLink` if it is one; ``FileNotFoundError`` or ``NotADirectoryError``
    if it is gone or not a folder; another ``OSError`` naming ``path``."""
    try:
        return os.open(name, _FOLDER, dir_fd=folder)
    except OSError as exc:
        raise named(exc, folder, name, path) from None


def read_file(folder: int, name: str, where: str) -> bytes:
    """The contents of the regular file ``name`` in ``folder`` (whose path is ``where``).

    ``FileNotFoundError`` if there is none; :class:`PlantedLink` if ``name``
    is a link; another ``OSError`` naming the path if it is not a regular
    file (a folder, a FIFO) or cannot be read.
    """
    try:
        fd = os.open(name, _READ, dir_fd=folder)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise named(exc, folder, name, os.path.join(where, name)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            code = errno.EISDIR if stat.S_ISDIR(info.st_mode) else errno.EINVAL
            raise OSError(code, f"{os.strerror(code)} (not a regular file)",
                          os.path.join(where, name))  # fmt: skip
        # One read for the usual file: a read shorter than asked is its end.
        data = os.read(fd, info.st_size + 1)
        if len(data) != info.st_size:  # it changed size meanwhile: read to its end
            chunks = [data]
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            data = b"".join(chunks)
        return data
    finally:
        os.close(fd)


def write_temp(folder: int, data: bytes, fsync: bool) -> str:
    """The name of a new temporary file in ``folder`` holding ``data`` (flushed if ``fsync``)."""
    # O_EXCL guards against a clash of names (a forked child shares the tag and
    # the counter until it is told): then a random name is tried.
    temp = temp_name()
    try:
        fd = os.open(temp, _CREATE, 0o644, dir_fd=folder)
    except FileExistsError:
        temp = temp_name(clashed=True)
        fd = os.open(temp, _CREATE, 0o644, dir_fd=folder)
    try:
        write_all(fd, data)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=folder)
        raise
    os.close(fd)
    return temp


def temp_name(clashed: bool = False) -> str:
    """A new temporary file name: this process's tag and a counter (no system call for
    randomness per file); after a clash with an existing file, a random one."""
    if clashed:
        return f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    return f"{TEMP_PREFIX}{_TEMP_TAG}{next(_temp_numbers):08x}"


def replace_with(
    folder: int, name: str, data: bytes, fsync: bool, where: str, *, held: list[int] | None = None
) -> None:
    """Write ``data`` to a temporary file in ``folder`` and rename it over ``name``."""
    try:
        temp = write_temp(folder, data, fsync)
    except OSError as exc:
        raise named(exc, folder, "", where) from None
    rename_over(folder, temp, name, where, held)


def rename_over(
    folder: int, temp: str, name: str, where: str, held: list[int] | None = None
) -> None:
    """Rename ``temp`` over ``name``, both in ``folder`` (removing ``temp`` if that fails).

    A link at ``name`` is a :class:`PlantedLink` (the rename would replace
    it, not write through it, but it was planted, and is left for a person
    to look at); finding one costs nothing, since the version being replaced
    is opened (``O_NOFOLLOW``) anyway: it is held open across the rename and
    let go of on :data:`_retired`'s thread, so that freeing its blocks happens
    there. On a file system that discards freed blocks as it frees them (ext4
    mounted with ``discard`` and no journal, as on the VM this was measured
    on) that waits for the device, about half of a rename's time. With
    ``held``, the descriptor is added to it, for the caller to pass to
    :func:`release_replaced` with the others of its batch (one wake-up of
    that thread per batch).
    """
    old = None
    try:
        old = _retired.hold(folder, name)
        os.replace(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=folder)
        if isinstance(exc, PlantedLink):
            raise PlantedLink(os.path.join(where, name)) from None
        if isinstance(exc, OSError):
            raise named(exc, folder, "", os.path.join(where, name)) from None
        raise
    finally:
        if old is not None:
            if held is None:
                _retired.release([old])
            else:
                held.append(old)


def remove_file(folder: int, name: str, where: str) -> None:
    """Remove ``name`` from ``folder``: ``FileNotFoundError`` if absent, never a link.

    ``unlink`` would remove a link itself and touch nothing outside the
    root, but a planted link is reported, not quietly cleaned away: one
    ``lstat`` before the ``unlink`` tells (an absent key costs only that).
    """
    try:
        info = os.stat(name, dir_fd=folder, follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            raise PlantedLink(os.path.join(where, name))
        os.unlink(name, dir_fd=folder)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise named(exc, folder, "", os.path.join(where, name)) from None


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


# -- flushing a whole file system -------------------------------------------------------


_syncfs = libc_function("syncfs", ctypes.c_int, [ctypes.c_int])
#: fsync where the system has no fdatasync (macOS).
fdatasync = getattr(os, "fdatasync", os.fsync)


def sync_file_system(fd: int) -> bool:
    """``syncfs(fd)``: flush the whole file system ``fd`` is on; False if unsupported."""
    if _syncfs is None:
        return False
    if _syncfs(fd) == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.ENOSYS:
        return False
    raise OSError(code, f"syncfs failed: {os.strerror(code)}")


# -- replaced file versions, let go of off the writing thread ------------------------------


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

    def hold(self, folder: int, name: str) -> int | None:
        """A descriptor of ``name`` in ``folder``, or None (none there, or too many held).

        Raises a bare :class:`PlantedLink` (the caller names the path) if
        ``name`` is a link. It counts until the thread closed it: pass it to
        :meth:`release`.
        """
        with self._lock:
            full = self._held >= self.LIMIT
            if not full:
                self._held += 1
        if full:
            if is_link(folder, name):
                raise PlantedLink(name)
            return None
        try:
            return os.open(name, _READ, dir_fd=folder)
        except OSError as exc:
            with self._lock:
                self._held -= 1
            if not isinstance(exc, FileNotFoundError) and is_link(folder, name):
                raise PlantedLink(name) from None
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
