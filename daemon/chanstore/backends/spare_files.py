"""Spare files: the blocks of a large file's replaced version, written over by the next write.

A large file written the usual way (a new temporary file, flushed, renamed
over the key's file) makes the file system allocate the new file's blocks and
free the old version's; on a disk mounted with ``discard``, as on the VM
this was measured on, freeing them waits for the device. Writing over blocks
that are already allocated costs the device only the data:
``bench/spare_files.py`` wrote batches of four 114 KB files, one per folder,
at 1,883 files/s as new files and 3,235 over spares (the raw loop of
temporary file, fsync and rename: 1,706).

So a folder keeps one spare, :data:`SPARE_NAME`: the version the last direct
write there replaced (see :mod:`chanstore.backends.journal_direct`). The
next direct write in the folder takes it (renames it to a temporary name, so
that no other writer can), writes the new contents over it and flushes them,
then exchanges it with the key's file in one atomic step (``renameat2`` with
``RENAME_EXCHANGE``): the key's file is the old version or the new one, never
neither and never torn, as with a rename. Once the folder is flushed, and not
before, the version it replaced becomes the folder's spare: until the
exchange is on disk, a crash could leave that version the key's file there,
so another write of the folder (a batch writes its files at once) must not
write over it yet. Where there is no spare yet, a new temporary file is
written and exchanged the same way.

A spare is written over only when nobody else can see it change:

- it is a regular file with one link: a hard link elsewhere (a backup made
  with ``cp -al``) would see the next value's bytes;
- nobody has it open: Linux grants a write lease (``F_SETLEASE``) only then,
  so a reader that opened the key's file before it was replaced goes on
  reading the old version whole.

Otherwise the spare is removed and a new file is written. Where the system
has no ``RENAME_EXCHANGE``, the new file is renamed over the key's file as
before and no spare is kept. The cost: at most one spare per folder a large
value was written to, as large as the value it held. It is never a key (it
has no ``.json``); a crash may leave it, or the temporary name of one being
written, as it may leave any temporary file.

The C extension ``_spare_files`` makes the whole write one call that lets go
of the GIL once: in Python each of its dozen system calls takes the GIL back,
and in the daemon the event loop holds it half the time. Beside a thread that
ran Python half the time, the same benchmark wrote 1,995 files/s in C and
1,511 in Python. The same steps in Python are used where it was not built.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Callable

from chanstore.backends.files import (
    PlantedLink,
    fdatasync,
    libc_function,
    named,
    temp_name,
    write_all,
    write_temp,
)
from chanstore.compiled import extension

__all__ = ["SPARE_NAME", "replace_keeping_spare"]

#: A folder's spare: the version of a large file that the last direct write replaced.
SPARE_NAME = ".chanstore-spare"
_RENAME_EXCHANGE = 2
_SPARE = os.fsencode(SPARE_NAME)
#: What ``_spare_files.replace`` answers: done, or the step that failed (see its source).
_DONE, _CREATE, _WRITE, _LINK, _RENAME, _FOLDER, _UNSUPPORTED = range(7)
_compiled = extension("_spare_files")
_OPEN = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_SET_LEASE = getattr(fcntl, "F_SETLEASE", 1024)  # Linux's, where Python does not name it


def _load_exchange() -> Callable[[int, str, str], int] | None:
    """``renameat2(folder, a, folder, b, RENAME_EXCHANGE)``: 0, or minus the errno; None
    where the C library has no ``renameat2`` (not Linux, or glibc before 2.28)."""
    renameat2 = libc_function("renameat2", ctypes.c_int, [ctypes.c_int, ctypes.c_char_p,
                              ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])  # fmt: skip
    if renameat2 is None:
        return None

    def exchange(folder: int, first: str, second: str) -> int:
        if renameat2(folder, os.fsencode(first), folder, os.fsencode(second), _RENAME_EXCHANGE):
            return -ctypes.get_errno()
        return 0

    return exchange


_exchange = _load_exchange()


def replace_keeping_spare(folder: int, name: str, data: bytes, where: str) -> bool:
    """Write ``data`` as ``name`` in ``folder`` durably, over the folder's spare if it may be
    written over (else into a new file); the version it replaces becomes the spare.

    Durably: the data flushed before it takes ``name``'s place, the folder
    flushed after. ``where`` is the folder's path, for errors. Answers whether
    the spare was written over. Raises what writing fails with (nothing is
    left behind, and the key's file is as it was), what flushing the folder
    fails with (the new version is in place),
    :class:`~chanstore.backends.files.PlantedLink` for a link at ``name``, and
    ``IsADirectoryError`` for a folder (or anything else but a file) there:
    both are left for a person to look at, as a rename would have failed.
    """
    if _compiled is None:
        return _replace_in_python(folder, name, data, where)
    step, code, used = _compiled.replace(folder, _SPARE, os.fsencode(temp_name()),
                                         os.fsencode(name), data)  # fmt: skip
    if step == _CREATE and code == errno.EEXIST:  # a forked child's name: a random one
        temp = os.fsencode(temp_name(clashed=True))
        step, code, used = _compiled.replace(folder, _SPARE, temp, os.fsencode(name), data)
    if step == _DONE:
        return used
    if step == _UNSUPPORTED:
        return _replace_in_python(folder, name, data, where)
    path = os.path.join(where, name)
    if step == _LINK:
        raise PlantedLink(path)
    if step == _RENAME:
        raise named(OSError(code, os.strerror(code)), folder, name, path)
    raise OSError(code, os.strerror(code), where)


def _replace_in_python(folder: int, name: str, data: bytes, where: str) -> bool:
    """:func:`replace_keeping_spare`, step by step in Python."""
    temp = _written_over_spare(folder, data)
    used = temp is not None
    if temp is None:
        try:
            temp = write_temp(folder, data, True)
        except OSError as exc:
            raise named(exc, folder, "", where) from None
    try:
        exchanged = _swap_in(folder, temp, name, where)
    except BaseException:
        _remove(folder, temp)
        raise
    try:
        os.fsync(folder)
    except BaseException:
        if exchanged:
            _remove(folder, temp)
        raise
    if exchanged:  # durable now: the replaced version may become the spare
        try:
            os.rename(temp, SPARE_NAME, src_dir_fd=folder, dst_dir_fd=folder)
        except OSError:
            _remove(folder, temp)
    return used


def _written_over_spare(folder: int, data: bytes) -> str | None:
    """The spare, under a temporary name, holding ``data`` flushed; None if there is no
    spare that may be written over (one that may not is removed)."""
    if _exchange is None:
        return None  # no spare is kept where versions cannot be exchanged
    temp = temp_name()
    try:  # taken: no other writer can take it now
        os.rename(SPARE_NAME, temp, src_dir_fd=folder, dst_dir_fd=folder)
    except OSError:
        return None  # none
    try:
        if _write_unseen(folder, temp, data):
            return temp
    except OSError:
        pass  # it could not be written over: a new file will be, which says why if it fails
    try:
        os.unlink(temp, dir_fd=folder)
    except OSError:  # a folder in its place: left alone
        with contextlib.suppress(OSError):
            os.rename(temp, SPARE_NAME, src_dir_fd=folder, dst_dir_fd=folder)
    return None


def _write_unseen(folder: int, temp: str, data: bytes) -> bool:
    """Write ``data`` over ``temp`` and flush it, if nobody else can see it; else False."""
    try:
        fd = os.open(temp, _OPEN, dir_fd=folder)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ETXTBSY):
            return False  # a link, a folder, a socket, a running program: not a spare of ours
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or not _lease(fd):
            return False
        write_all(fd, data, 0)
        if info.st_size > len(data):
            os.ftruncate(fd, len(data))
        fdatasync(fd)  # its blocks were allocated: the data, and a new size, is what to flush
        return True
    finally:
        os.close(fd)  # lets go of the lease too


def _lease(fd: int) -> bool:
    """A write lease on ``fd``: Linux grants it only if no other open file has the file."""
    try:
        fcntl.fcntl(fd, _SET_LEASE, fcntl.F_WRLCK)
    except OSError:
        return False  # someone has it open (EAGAIN), or no leases here: never guess
    return True


def _swap_in(folder: int, temp: str, name: str, where: str) -> bool:
    """Put ``temp`` in ``name``'s place; True if exchanged (``temp`` holds the version it
    replaced), False if renamed (there was none, or no exchange here)."""
    global _exchange  # noqa: PLW0603 - refused here: never again in this process
    path = os.path.join(where, name)
    there = _mode_of(folder, name)
    if stat.S_ISLNK(there):
        raise PlantedLink(path)
    if there and not stat.S_ISREG(there):  # foreign: an exchange would move it aside
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    code = _exchange(folder, temp, name) if _exchange is not None else -errno.ENOSYS
    if code in (-errno.EINVAL, -errno.ENOSYS, -errno.EPERM):
        _exchange = None  # no RENAME_EXCHANGE on this file system, or none at all
    if code == 0:
        return True
    if code not in (-errno.ENOENT, -errno.EINVAL, -errno.ENOSYS, -errno.EPERM):
        raise OSError(-code, os.strerror(-code), path)
    try:  # no version yet, or no exchange here: a plain rename
        os.rename(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except OSError as exc:
        raise named(exc, folder, "", path) from None
    return False


def _mode_of(folder: int, name: str) -> int:
    """The mode of ``name`` in ``folder``, not following a link; 0 if there is none."""
    try:
        return os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return 0


def _remove(folder: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=folder)
