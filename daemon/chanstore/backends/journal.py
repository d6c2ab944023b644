"""Group commit for the json backend: one write-ahead journal per json root folder.

Why
---
Writing a key durably the usual way costs a flush of the disk for the key's
file (``fsync`` of a temporary file before it is renamed over the key's
file) and one for its folder (so that the rename survives). A daemon's write
lane stores many keys at once, but on common disks concurrent fsyncs of many
small files barely merge, so a batch still costs about one flush per file.
With a journal a batch costs one flush: every file of the batch is appended
to one file, flushed once (``fdatasync``), and only then are the key files
written and renamed, without a flush of their own. Making those files
durable is deferred to a *checkpoint*, which flushes all files written since
the last one at once, then empties the journal.

The journal matters only when the machine stops (power loss, kernel crash):
a process that is killed leaves its files complete in the page cache.
After a machine crash, a key file written since the last checkpoint may
hold its old value, or a torn or empty one, until the journal is replayed,
which chanstore does before it reads the root again.

The journal
-----------
``<root>/.chanstore-journal`` (:data:`JOURNAL_NAME`), beside the domain
folders of the root. It can never be taken for data: key files end in
``.json`` (this name does not), and domain folder names never hold a ``.``
(a domain's parts are split at dots). Listing a domain, even the root's own
domain ``""``, therefore never shows it.

It holds records, each one key file's complete new contents, in the format
of :mod:`chanstore.backends.journal_records`: a magic, the generation (new
at each reset), a sequence number and a checksum per record, so that reading
it back finds every record that verifies, even past a damaged one.

The file is preallocated: it is filled with zeros ahead of the records (64
KiB at first, growing by doubling up to 1 MiB at a time) and never shrinks
below that, so that appending changes neither its size nor its blocks and
``fdatasync`` flushes only the data (about half the cost of flushing an
append that grows the file, measured here; on a journaling file system it
also spares a commit). Emptying it (a *reset*) overwrites every record of
the generation with zeros, flushes that, and starts a new generation at
offset 0: no record of an older generation is ever left to be taken for a
current one.

The journal is a file chanstore owns inside the root, reached like every
other one (see :mod:`chanstore.backends.files`): opened with ``O_NOFOLLOW``
relative to the root's descriptor, so a link planted in its place is never
read nor overwritten. It is reported (``planted_link``) and batches fail
until it is gone.

The protocol
------------
1. **Commit** (:meth:`Journal.write`, under the journal's lock). Every value
   is encoded before anything is written. The batch's records are written
   at the journal's end in one ``pwrite`` and flushed once; an error there
   (disk full, read-only, I/O) fails the whole batch, no key file is
   touched, and the batch's first record header is zeroed (as well as
   anything can be after a failed flush). Then each file is written
   to a temporary file *without* fsync and renamed over the key's file, so
   key files always hold a whole value in the original SDK's layout and any
   reader sees the new value at once. A write is acknowledged only after
   the journal's flush. Batches that wait for the lock meanwhile share
   the next flush (see :mod:`.journal_groups`).
2. **Checkpoint** (:meth:`Journal.checkpoint`), when the journal holds more
   than :data:`CHECKPOINT_BYTES` or :data:`CHECKPOINT_RECORDS` (done inline
   by the batch that crosses the bound: amortized over thousands of
   writes), when the last backend of the root closes, and before a write
   that bypasses the journal (rule 4). Every file written since the last
   checkpoint, and their folders, are made durable at once: ``syncfs`` of
   the root's file system where Linux offers it (one writeback and one
   flush for all of them; measured about a hundred times faster than
   fsyncing a thousand files, even in parallel), else, and for a few files
   (:data:`SYNC_EACH_MAX`, whose cost should not depend on what else the
   file system has to write), an fsync of each file and of their folders
   up to the root, in parallel on :data:`SYNC_WRITERS`. Then the journal is
   reset *and that is flushed*, so a later replay cannot bring back what a
   following delete removed.
3. **Recovery** (:meth:`Journal.open`, from the registry when the first
   backend of a root is built in a process, and so before the process reads
   or writes anything there; plain library users go through the same
   constructor). If the journal holds records a crash happened after they
   were acknowledged: each file's last record that verifies is written back
   the normal durable way (temporary file, fsync, rename, fsync of each
   folder), in journal order, and the journal is then reset. Replaying is
   idempotent, so a crash during recovery is recovered by the next one. A
   damaged journal (records lost between records that verify) is replayed
   all the same, then copied aside as ``.chanstore-journal.damaged-<UTC
   time>`` in the root (never over an earlier copy) before the reset, logged
   at error (``json_journal_damaged``: how many records and bytes, where)
   and handed over once as an integrity problem (``journal_damaged``, see
   :meth:`~chanstore.backends.base.DatabaseInterface.integrity_problems`).
   A torn last record is what a crash during a batch leaves: it was never
   acknowledged, and it is dropped quietly.
4. **Writes that bypass the journal** (``set_value``, deletes, json
   backends with fsync off, a process that does not own the journal) go
   through :meth:`Journal.bypassing`: before the write, if the journal
   holds a record for one of its files, it checkpoints; after the write, it
   checks again (a batch may have journaled the same file meanwhile) and
   checkpoints if so. So a replay never overwrites a file with a value older
   than a write that bypassed the journal, and never brings back a deleted
   file: a replayed record is always the newest acknowledged value of its
   file. (Paths are marked as journaled *before* their records are
   written, so the quick look without the lock before the write cannot miss
   a record already in the journal; one written during the write is seen
   by the look after it, which takes the lock and so waits for that batch
   to finish its renames.)

Invariants
----------
* A record in the journal is newer than anything else ever written to its
  file, except by a later record (rules 1 and 4); so replaying in order
  restores exactly the acknowledged values.
* Writes to one file are journaled in the order they are applied: batches
  hold the journal's lock from their records' write to their last rename
  (and the daemon's write lanes never put one key twice in a batch, nor in
  two batches at once).
* Only a reset removes records, and it follows a flush of every file the
  journal names (or a replay of them): a record is never lost before its
  file is durable.
* Only one process journals a root: the one holding an exclusive ``flock``
  on the journal file (a read-only descriptor, so that the file system can
  still be remounted read-only). Another process finds it locked and writes
  the usual durable way instead, and never replays a live process's
  journal; it takes the journal over (replaying it first) once the lock is
  free, that is once the owner exited. Several processes writing the *same
  files* of one root at the same time were never coordinated, and are not
  now: a crashed owner's replay could then overwrite another process's
  later write of the same file.

Failures after the flush
------------------------
If writing or renaming a key's file fails after the journal was flushed
(the disk filled up between the two), that file keeps its old value and its
write is reported failed (in a part of several keys, a
:class:`~chanstore.errors.BulkWriteError` naming those that were written);
the journal is then checkpointed at once, which drops the failed records,
so a later replay cannot apply a write that was reported failed. Should
that checkpoint fail too, the records stay and a replay may still apply
them: the write was reported failed, and it may still land, as with a
backend that timed out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import threading
from collections.abc import Collection, Iterator, Sequence

from chanstore import logs
from chanstore.backends.files import (
    PlantedLink,
    Root,
    fdatasync,
    named,
    release_replaced,
    replace_with,
    sync_file_system,
    write_all,
)
from chanstore.backends.integrity import report_planted
from chanstore.backends.journal_direct import DIRECT_BYTES, write_directly
from chanstore.backends.journal_groups import Commit, Waiting, journal_group
from chanstore.backends.journal_records import JOURNAL_NAME, decode_records, encode_record
from chanstore.backends.journal_recovery import recover

__all__ = [
    "CHECKPOINT_BYTES",
    "CHECKPOINT_RECORDS",
    "JOURNAL_NAME",
    "SYNC_EACH_MAX",
    "Journal",
    "NotJournaling",
    "decode_records",
    "encode_record",
    "journals",
]

#: A checkpoint empties the journal once it holds more than this many bytes...
CHECKPOINT_BYTES = 4 << 20
#: ... or more than this many records.
CHECKPOINT_RECORDS = 8192
#: A checkpoint of at most this many files fsyncs each (and their folders), not syncfs.
SYNC_EACH_MAX = 32

#: The journal file's first preallocation, and the most it grows by at once.
FIRST_ALLOCATION = 64 << 10
MAX_GROWTH = 1 << 20
#: A reset truncates a journal that a huge batch made larger than this.
KEEP_ALLOCATION = 2 * CHECKPOINT_BYTES
_BLOCK = 4096

#: What a checkpoint may fail with: the file system, or a link in the journal's place.
_FAILURES = (OSError, PlantedLink)

log = logs.get_logger(backend="json")


class NotJournaling(Exception):
    """This process cannot journal the root now: write the usual durable way."""


# -- the journal -----------------------------------------------------------------------


class Journal:
    """The journal of one json root folder; shared through :data:`journals`."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.path = os.path.join(root, JOURNAL_NAME)
        #: The root folder, reached once: every file of the root is opened from it.
        self.folder = Root(root)
        #: Backends of this root that hold this journal (see :class:`_Journals`).
        self.users = 0
        self._lock = threading.Lock()
        #: Batches waiting for the lock; its holder journals them together.
        self._waiting = Waiting()
        # A read-only descriptor of the journal holding its flock, while we own it.
        self._fd: int | None = None
        self._owner = False
        self._closed = False
        self._generation = _new_generation()
        self._sequence = 0  # the next record's sequence number
        self._offset = 0  # where this generation's records end
        self._allocated = 0  # the journal file's size
        self._records = 0  # records since the last reset
        # Paths (relative to the root) that may have records in the journal.
        self._journaled: set[str] = set()

    # -- opening, recovery, closing -------------------------------------------------

    def open(self) -> None:
        """Replay what a crash left in the journal, if this process can own it.

        A link in the journal's place is reported, never followed: the
        backends of the root are built all the same (reads go on), and
        batches fail until it is gone.
        """
        with self._lock:
            root = self.folder.fd()
            if root is None:
                return  # no root yet: the first write makes it
            try:
                info = os.stat(JOURNAL_NAME, dir_fd=root, follow_symlinks=False)
            except FileNotFoundError:
                return
            try:
                if stat.S_ISLNK(info.st_mode):
                    raise PlantedLink(self.path)
                self._own(create=False)
            except PlantedLink:
                report_planted(self.root, self.path, "opening the journal")

    def close(self) -> None:
        """Checkpoint and let go of the journal; writes bypass it afterwards."""
        with self._lock:
            if self._owner:
                try:
                    self._checkpoint()
                except _FAILURES as exc:
                    # The records stay; the next open replays them (which is harmless).
                    log.error("json_journal_checkpoint_failed", root=self.root, error=str(exc))
            self._closed = True
            self._owner = False
            if self._fd is not None:
                os.close(self._fd)  # and with it the flock
                self._fd = None
            self.folder.close()

    def _own(self, create: bool) -> bool:
        """Whether this process owns the journal, taking it (and recovering it) if it can."""
        if self._owner:
            return True
        if self._closed:
            return False
        root = self.folder.fd(create, fsync=True)
        if root is None:
            return False
        if self._fd is None:
            flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
            try:
                self._fd = os.open(JOURNAL_NAME, flags, 0o644, dir_fd=root)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise named(exc, root, JOURNAL_NAME, self.path) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # another process journals this root
        except OSError as exc:  # a file system without locks: never journal there
            log.warning("json_journal_unavailable", root=self.root, error=str(exc))
            self._closed = True
            return False
        self._owner = True
        try:
            os.fsync(root)  # the journal's own name must survive a crash
            self._recover()
        except BaseException:
            self._owner = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            raise
        return True

    def _recover(self) -> None:
        """Replay what a crash left (see :func:`~.journal_recovery.recover`), then reset."""
        assert self._fd is not None
        self._allocated = os.fstat(self._fd).st_size
        # Every byte written in it is zeroed by the reset: older records included.
        self._offset = recover(self.folder, self._fd, self._allocated)
        if self._offset:
            self._reset()

    # -- writing ---------------------------------------------------------------------

    def write(self, files: Sequence[tuple[str, bytes]]) -> list[Exception | None]:
        """Journal then write each ``(path relative to the root, contents)``; each one's error.

        Raises :class:`NotJournaling` if this process cannot journal the root
        (nothing was written), and the ``OSError`` of the journal (or a
        :class:`PlantedLink` in its place) if writing or flushing it failed
        (nothing was written either). Otherwise every write is durable in
        the journal, and the answer says which files could not be written
        (see the module's "Failures after the flush"). Batches waiting
        meanwhile share the flush, and its errors (:mod:`.journal_groups`).
        """
        if not files:
            return []
        commit = Commit(files)
        self._waiting.add(commit)
        with self._lock:
            while not commit.done:  # a group taken ahead of ours may have stopped before it
                journal_group(self._waiting.take(), self._write_group)
        return commit.answer()

    def _write_group(self, files: list[tuple[str, bytes]]) -> list[Exception | None]:
        if any(len(data) >= DIRECT_BYTES for _path, data in files):
            return self._write_split(files)
        return self._write(files)

    def _write_split(self, files: Sequence[tuple[str, bytes]]) -> list[Exception | None]:
        """Small files journaled, large ones written directly (see :mod:`.journal_direct`)."""
        small = [index for index, (_path, data) in enumerate(files) if len(data) < DIRECT_BYTES]
        large = [index for index, (_path, data) in enumerate(files) if len(data) >= DIRECT_BYTES]
        errors: list[Exception | None] = [None] * len(files)
        if not self._own(create=True):
            raise NotJournaling(self.root)
        if not self._journaled.isdisjoint(files[index][0] for index in large):
            self._checkpoint()  # rule 4: no replay may undo what is written here
        if small:
            for index, error in zip(small, self._write([files[i] for i in small]), strict=True):
                errors[index] = error
        written = write_directly(self.folder, [files[index] for index in large])
        for index, error in zip(large, written, strict=True):
            errors[index] = error
        return errors

    def _write(self, files: Sequence[tuple[str, bytes]]) -> list[Exception | None]:
        if not self._own(create=True):
            raise NotJournaling(self.root)
        # Marked before the records exist: see bypassing().
        self._journaled.update(path for path, _data in files)
        try:
            self._append(self._encode(files))
        except FileNotFoundError:
            self._start_over()  # the journal's name lost our file: a new one, then again
            self._append(self._encode(files))
        self._sequence += len(files)
        self._records += len(files)
        # Durable in the journal: now the files, in order.
        errors = self._apply(files)
        if any(error is not None for error in errors):
            self._checkpoint_quietly("drop the records of files that could not be written")
        elif self._offset > CHECKPOINT_BYTES or self._records > CHECKPOINT_RECORDS:
            self._checkpoint_quietly("the journal is full")
        return errors

    def _encode(self, files: Sequence[tuple[str, bytes]]) -> bytes:
        generation, first = self._generation, self._sequence
        return b"".join([encode_record(generation, first + number, path, data)
                         for number, (path, data) in enumerate(files)])  # fmt: skip

    def _start_over(self) -> None:
        """Journal in a new file: the name no longer holds ours (moved, or a link removed).

        What ours held is made durable first, so that dropping it loses
        nothing; then the name is taken as at the first write.
        """
        if self._records:
            self._sync_written()
        assert self._fd is not None
        os.close(self._fd)  # and with it the flock on the file that went away
        self._fd = None
        self._owner = False
        self._allocated = self._offset = self._records = self._sequence = 0
        self._generation = _new_generation()
        if not self._own(create=True):
            raise NotJournaling(self.root)

    def _apply(self, files: Sequence[tuple[str, bytes]]) -> list[Exception | None]:
        """Write each file (unflushed: the journal holds it), reaching each folder once."""
        errors: list[Exception | None] = []
        folders: dict[str, int | Exception] = {}
        held: list[int] = []
        try:
            for path, data in files:
                parent, name = os.path.split(path)
                folder = folders.get(parent)
                if folder is None:
                    parts = parent.split(os.sep) if parent else []
                    try:
                        # Made unflushed if missing: a checkpoint flushes it, a replay remakes it.
                        folder = self.folder.folder(parts, create=True)
                    except (OSError, PlantedLink) as exc:
                        folder = exc
                    folders[parent] = folder
                if isinstance(folder, Exception):
                    errors.append(folder)
                    continue
                try:
                    where = os.path.join(self.root, parent)
                    replace_with(folder, name, data, False, where, held=held)
                except (OSError, PlantedLink) as exc:
                    errors.append(exc)
                else:
                    errors.append(None)
        finally:
            release_replaced(held)
            for folder in folders.values():
                if isinstance(folder, int):
                    os.close(folder)
        return errors

    def _open_for_writing(self) -> int:
        root = self.folder.fd()
        if root is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.root)
        try:
            return os.open(JOURNAL_NAME, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=root)
        except OSError as exc:
            raise named(exc, root, JOURNAL_NAME, self.path) from None

    def _append(self, records: bytes) -> None:
        """Write ``records`` after the journal's last one and flush them."""
        end = self._offset + len(records)
        fd = self._open_for_writing()
        try:
            try:
                if end > self._allocated:
                    # Zeros after the records, so that later batches do not grow the file.
                    grown = _grown(self._allocated, end)
                    _write_zeros(fd, max(self._allocated, end), grown)
                    self._allocated = grown
                write_all(fd, records, self._offset)
                fdatasync(fd)
            except OSError:
                # Whatever of the batch reached the file must not read as records.
                with contextlib.suppress(OSError):
                    _write_zeros(fd, self._offset, end)
                raise
        finally:
            os.close(fd)
        self._offset = end

    # -- checkpoints -----------------------------------------------------------------

    def checkpoint(self) -> None:
        """Make every file written through the journal durable, then empty the journal."""
        with self._lock:
            self._checkpoint()

    def _checkpoint(self) -> None:
        if not self._owner:
            return
        if self._records == 0:
            self._journaled.clear()  # only batches that failed before their flush marked these
            return
        self._sync_written()
        self._reset()

    def _sync_written(self) -> None:
        """Make every file written through the journal durable, with its folders."""
        assert self._fd is not None
        # A few files are flushed one by one: the cost stays theirs, whatever
        # else the file system has to write. Many at once: one syncfs.
        if len(self._journaled) <= SYNC_EACH_MAX or not sync_file_system(self._fd):
            self.folder.sync(self._journaled)

    def _checkpoint_quietly(self, why: str) -> None:
        try:
            self._checkpoint()
        except _FAILURES as exc:
            log.error("json_journal_checkpoint_failed", root=self.root, reason=why,
                      error=str(exc))  # fmt: skip

    def _reset(self) -> None:
        """Empty the journal, durably: every record of the generation becomes zeros."""
        fd = self._open_for_writing()
        try:
            if self._allocated > KEEP_ALLOCATION:
                os.ftruncate(fd, 0)  # a huge batch grew it: give the space back
                os.fsync(fd)
                self._allocated = 0
            else:
                _write_zeros(fd, 0, self._offset)
                fdatasync(fd)
        finally:
            os.close(fd)
        self._generation = _new_generation()
        self._sequence = 0
        self._offset = 0
        self._records = 0
        self._journaled.clear()

    # -- writes that bypass the journal ----------------------------------------------

    @contextlib.contextmanager
    def bypassing(self, paths: Collection[str]) -> Iterator[None]:
        """Around a write of ``paths`` (relative to the root) that is not journaled.

        Checkpoints first if the journal may hold a record of one of them, so
        that no replay can undo the write; and again afterwards if a batch
        journaled one of them meanwhile. A checkpoint's error is raised: a
        write whose safety is not settled must not be acknowledged.
        """
        self._settle(paths)
        try:
            yield
        except BaseException:
            # Settled all the same (the write may have been done in part), but
            # the write's own error is the answer.
            with contextlib.suppress(*_FAILURES):
                self._settle(paths)
            raise
        self._settle(paths)

    def _settle(self, paths: Collection[str]) -> None:
        journaled = self._journaled
        if not journaled or journaled.isdisjoint(paths):  # the usual case, without the lock
            return
        with self._lock:
            if not self._journaled.isdisjoint(paths):
                self._checkpoint()

    def forget(self) -> None:
        """Stop owning the journal without a checkpoint: the owner is another process now.

        For a forked child, whose descriptor (and so flock) it shares with its
        parent: closing it there releases nothing, and it writes the usual
        durable way from then on.
        """
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._waiting = Waiting()  # and left its batch waiting
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self._owner = False
        self._closed = True
        self._journaled = set()
        self._records = 0

    # -- for tests and tools -----------------------------------------------------------

    @property
    def owned(self) -> bool:
        """Whether this process journals the root (holds the journal's lock)."""
        return self._owner

    @property
    def pending(self) -> int:
        """Records in the journal since the last checkpoint."""
        return self._records

    def __repr__(self) -> str:
        return f"Journal(root={self.root!r}, owned={self._owner}, records={self._records})"


def _new_generation() -> int:
    return int.from_bytes(os.urandom(8), "little")


def _grown(allocated: int, needed: int) -> int:
    """The journal's next size: doubled (at most by MAX_GROWTH), and enough for ``needed``."""
    size = max(FIRST_ALLOCATION, allocated + min(allocated, MAX_GROWTH), needed)
    return -(-size // _BLOCK) * _BLOCK


#: Zeros written a slice at a time. One small buffer for the process: a zeroed
#: megabyte made per reset pushed glibc's mmap threshold up, and the daemon
#: then kept 3.5 MiB more after idle channels left (tests/reliability/test_memory).
_ZEROS = memoryview(bytes(64 * 1024))


def _write_zeros(fd: int, start: int, end: int) -> None:
    while start < end:
        size = min(len(_ZEROS), end - start)
        write_all(fd, _ZEROS[:size], start)
        start += size


class _Journals:
    """The journal of each json root in this process, shared and counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, Journal] = {}

    def acquire(self, root: str | os.PathLike[str]) -> Journal:
        """The journal of ``root``, recovered on first use in this process."""
        key = os.path.realpath(root)
        with self._lock:
            journal = self._open.get(key)
            if journal is None:
                journal = Journal(key)
                try:
                    journal.open()
                except BaseException:
                    journal.close()
                    raise
                self._open[key] = journal
            journal.users += 1
            return journal

    def release(self, journal: Journal) -> None:
        """One backend of the journal's root closed; the last one checkpoints and closes it."""
        with self._lock:
            journal.users -= 1
            if journal.users > 0:
                return
            if self._open.get(journal.root) is journal:
                del self._open[journal.root]
            journal.close()

    def after_fork(self) -> None:
        """In a forked child: the parent owns its journals (the flock is shared), not the child."""
        self._lock = threading.Lock()
        for journal in self._open.values():
            journal.forget()


#: The process's journals, by resolved root folder.
journals = _Journals()


os.register_at_fork(after_in_child=journals.after_fork)
