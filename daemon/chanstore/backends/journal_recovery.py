"""Recovering a json root's journal after a crash: replay what verifies, keep damage aside.

The journal (see :mod:`chanstore.backends.journal`) is read back when a
process first takes it over. Every record that verifies is replayed, in
order, even past a damaged one (:func:`chanstore.backends.journal_records.scan`
finds them), because a flipped bit in one record must not cost the records
after it, nor, in record 0, all of them. What could not be replayed is never
passed off as fine:

* damage (records lost between records that verify) is logged at error
  (``json_journal_damaged``: how many records and bytes, at which offsets),
  handed over once as an integrity problem ``journal_damaged`` (the daemon's
  readiness probe counts it in ``chanstore_integrity_problems_total``), and
  the damaged journal is copied aside as ``.chanstore-journal.damaged-<UTC
  time>`` in the root, never over an earlier copy, before the journal is
  emptied;
* a record whose file a planted link stands in the way of is not replayed
  through it: the link is reported (``planted_link``) and the journal kept
  aside the same way;
* bytes after the last record that verifies are a torn last write, which a
  crash during a batch leaves (the batch was never acknowledged): dropped
  quietly, beside the replay's own warning (``torn_bytes``).
"""

from __future__ import annotations

import os
import time

from chanstore import logs
from chanstore.backends.files import (
    PlantedLink,
    Root,
    call_each,
    replace_with,
    write_all,
)
from chanstore.backends.integrity import problems, report_planted
from chanstore.backends.journal_records import DAMAGED_SUFFIX, JOURNAL_NAME, Scan, scan
from chanstore.errors import IntegrityProblem

__all__ = ["recover"]

#: Folders a replay holds open at most before flushing them.
REPLAY_FOLDERS = 256

log = logs.get_logger(backend="json")


def recover(root: Root, journal: int, size: int) -> int:
    """Replay the journal open at ``journal`` (``size`` bytes) into ``root``.

    Returns how many bytes of it were ever written (the caller zeroes them):
    0 for an empty or reset journal. Raises the ``OSError`` of a replay
    that failed (a full disk): the journal stays as it is for the next try.
    """
    used = _used_size(journal, size)
    if not used:
        return 0  # a reset journal: its zeros are not read into memory at all
    data = _read_all(journal, used)
    found = scan(data)
    planted = _replay(root, found.records) if found.records else []
    if found.records:
        log.warning("json_journal_replayed", root=root.path, records=len(found.records),
                    files=len(dict(found.records)), bytes=found.end,
                    torn_bytes=found.torn)  # fmt: skip
    if found.damaged or planted:
        kept = _keep_aside(root, data[:used])
        if found.damaged:
            _report_damage(root, found, kept)
        for path in planted:
            report_planted(root.path, path, f"replaying the journal (kept as {kept})")
    return used


def _replay(root: Root, records: list[tuple[str, bytes]]) -> list[str]:
    """Write each file's last record back durably; the paths a planted link kept out."""
    planted: list[str] = []
    folders: dict[str, int] = {}  # folder relative to the root -> its descriptor
    try:
        for path, contents in dict(records).items():  # the last record of each file wins
            parent, name = os.path.split(path)
            try:
                folder = folders.get(parent)
                if folder is None:
                    if len(folders) >= REPLAY_FOLDERS:
                        _flush_folders(folders)
                    parts = parent.split(os.sep) if parent else []
                    # A folder whose creation the crash lost is made again, durably.
                    folder = folders[parent] = root.folder(parts, create=True, fsync=True)
                replace_with(folder, name, contents, True, os.path.join(root.path, parent))
            except PlantedLink:
                planted.append(os.path.join(root.path, path))
        _flush_folders(folders)  # each folder's renames
    finally:
        for folder in folders.values():
            os.close(folder)
    return planted


def _flush_folders(folders: dict[str, int]) -> None:
    """Flush every folder of ``folders`` (descriptors) at once, then close and forget them."""
    try:
        call_each(os.fsync, list(folders.values()))
    finally:
        for folder in folders.values():
            os.close(folder)
        folders.clear()


def _keep_aside(root: Root, data: bytes) -> str:
    """A durable copy of the damaged journal beside it, never over an earlier one; its path.

    A copy, not a rename: the journal file keeps its name and its lock, so
    no other process can take the journal over while it is being emptied.
    """
    folder = root.fd()
    assert folder is not None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    attempt = 1
    while True:
        name = f"{JOURNAL_NAME}{DAMAGED_SUFFIX}{stamp}" + (f"-{attempt}" if attempt > 1 else "")
        try:
            fd = os.open(name, flags, 0o644, dir_fd=folder)
        except FileExistsError:
            attempt += 1
            continue
        break
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(folder)
    return os.path.join(root.path, name)


def _report_damage(root: Root, found: Scan, kept: str) -> None:
    """Log at error what could not be replayed, and keep it as an integrity problem."""
    journal = os.path.join(root.path, JOURNAL_NAME)
    lost = found.lost_records
    stretches = [(stretch.start, stretch.end, stretch.records) for stretch in found.damage]
    shown = ", ".join(f"{start}-{end}" for start, end, _records in stretches[:8])
    more = f" and {len(stretches) - 8} more" if len(stretches) > 8 else ""
    count = "an unknown number of" if lost is None else str(lost)
    message = (
        f"the journal {journal} was damaged: {count} records ({found.lost_bytes} bytes, at "
        f"offsets {shown}{more}) could not be replayed, {len(found.records)} were; the damaged "
        f"journal is kept as {kept}"
    )
    log.error("json_journal_damaged", root=root.path, journal=journal, records_lost=lost,
              bytes_lost=found.lost_bytes, stretches=stretches[:100],
              replayed=len(found.records), kept=kept, summary=message)  # fmt: skip
    problems.add(root.path, IntegrityProblem(kind="journal_damaged", message=message))


#: Bytes read at a time while looking for the end of a journal's records.
_SCAN_CHUNK = 64 * 1024


def _used_size(fd: int, size: int) -> int:
    """Where the last byte of the journal that is not zero ends, read from its end a
    slice at a time. A journal is preallocated in zeros and reset to zeros, so the
    usual answer is 0; reading megabytes of zeros whole at every reopen kept the
    daemon's memory up (glibc's threshold for giving large blocks back grows with
    the largest one freed)."""
    end = size
    while end > 0:
        start = max(0, end - _SCAN_CHUNK)
        chunk = os.pread(fd, end - start, start)
        stripped = len(chunk.rstrip(b"\0"))
        if stripped:
            return start + stripped
        end = start
    return 0


def _read_all(fd: int, size: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
