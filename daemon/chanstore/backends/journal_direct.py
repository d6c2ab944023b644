"""Large files of a journaled batch: written the usual durable way, not journaled.

A file journaled is written twice (its record, flushed, then the file itself)
and fills the journal, whose checkpoint (a flush of every file written since,
then zeros over the journal, flushed) comes every :data:`CHECKPOINT_BYTES
<chanstore.backends.journal.CHECKPOINT_BYTES>`: at 900 KB a value, every few
writes. Past :data:`DIRECT_BYTES` the usual way is cheaper: the file written
and flushed apart (over the folder's spare, see
:mod:`chanstore.backends.spare_files`), put in the key's file's place, and the
folder flushed (``bench/json_crossover.py`` measures where). It is as safe: the
exchange is atomic, and the write is acknowledged only once file and folder are
durable.

The journal's rules still hold (see :mod:`chanstore.backends.journal`): the
journal calls :func:`write_directly` under its lock, after a checkpoint if it
holds a record of one of these files (rule 4), so a replay can never bring
back an older value over one written here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from chanstore.backends.files import (
    SYNC_WRITERS,
    PlantedLink,
    Root,
)
from chanstore.backends.spare_files import replace_keeping_spare

__all__ = ["DIRECT_BYTES", "write_directly"]

#: Files of at least this many bytes skip the journal. Measured on this project's
#: 2-core VM (ext4). One-key batches (``bench/json_crossover.py``): the journal wins
#: at 16 KiB (direct costs 1.3x), the direct write from somewhere between 64 and
#: 256 KiB by run. Through the daemon, 8 writers of chat messages, once bodies were
#: no longer parsed: the journal still served 1.09x and 1.06x the PUTs at 34 and 68 KB
#: files, direct writes 1.3x at 87 KB and 1.2x at 114 KB.
DIRECT_BYTES = 64 << 10


def write_directly(root: Root, files: Sequence[tuple[str, bytes]]) -> list[Exception | None]:
    """Write each ``(path relative to the root, contents)`` durably; each one's error.

    Each file: written over its folder's spare, or into a new temporary file,
    flushed, put in the file's place, then its folder flushed (see
    :mod:`chanstore.backends.spare_files`; a folder made for it is flushed
    into its parent as it is made), so that the new value survives a machine
    crash once this returns without an error for it. Several files are
    written at once, on :data:`~chanstore.backends.files.SYNC_WRITERS`:
    concurrent flushes share the file system's commits.
    """
    others = [SYNC_WRITERS.submit(_write_one, root, path, data) for path, data in files[1:]]
    errors = [_write_one(root, *files[0])] if files else []
    errors.extend(other.result() for other in others)
    return errors


def _write_one(root: Root, path: str, data: bytes) -> Exception | None:
    parent, name = os.path.split(path)
    try:
        folder = root.folder(parent.split(os.sep) if parent else [], create=True, fsync=True)
    except (OSError, PlantedLink) as exc:
        return exc
    try:
        replace_keeping_spare(folder, name, data, os.path.join(root.path, parent))
    except (OSError, PlantedLink) as exc:
        return exc
    finally:
        os.close(folder)
    return None
