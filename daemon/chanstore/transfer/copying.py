"""Copying keys into a backend without writing any twice, and checking the copy.

Every write of a transfer goes through :func:`store_batch`: it reads what the
target holds for a batch of keys (one ``get_many``), compares stored forms,
and writes only the keys that differ (one ``set_many``). So a transfer run
again, after it finished or after it was killed at any point, writes only what
is still missing, and an import of the same file twice writes nothing the
second time. Values travel as :class:`~chanstore.codec.Document`\\ s, in their
stored form: nothing is revived, so a dataclass that only the service
registers crosses unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from chanstore import codec
from chanstore.backends.base import DatabaseInterface
from chanstore.config import ContainerSpec
from chanstore.errors import CorruptValue
from chanstore.transfer.places import Place
from chanstore.transfer.tally import Tally

__all__ = ["DEFAULT_BATCH_SIZE", "Backends", "copy_place", "reconcile_place", "store_batch",
           "verify_place"]  # fmt: skip

_ABSENT: Any = object()

#: Keys read or written per backend call.
DEFAULT_BATCH_SIZE = 1000


class Backends:
    """Opens the backend of each place, in stored-form mode.

    The first backend of each container stays open until :meth:`close`, so
    that what the backends of one container share (a Redis connection pool,
    a json root's journal) is not closed and opened again for every channel.
    """

    def __init__(self) -> None:
        self._anchors: dict[str, DatabaseInterface] = {}

    @contextlib.contextmanager
    def opened(self, spec: ContainerSpec, domain: str) -> Iterator[DatabaseInterface]:
        """The backend of ``domain`` for container ``spec``, closed after the block."""
        backend = spec.engine(domain=domain, **spec.settings)
        backend.revive_values = False
        anchored = self._anchors.setdefault(spec.name, backend) is backend
        try:
            yield backend
        finally:
            if not anchored:
                backend.close()

    def close(self) -> None:
        """Close the backends kept open."""
        anchors, self._anchors = self._anchors, {}
        for backend in anchors.values():
            backend.close()


def store_batch(
    target: DatabaseInterface, items: Mapping[str, Any], tally: Tally, *, write: bool = True
) -> None:
    """Store those ``items`` whose stored form ``target`` does not hold already.

    With ``write`` false, only counts what would be stored.
    """
    if not items:
        return
    held = target.get_many(list(items))
    changed = {key: value for key, value in items.items()
               if not _same(held.get(key, _ABSENT), value)}  # fmt: skip
    if changed and write:
        target.set_many(changed)
    tally.copied += len(changed)
    tally.unchanged += len(items) - len(changed)


def copy_place(
    place: Place, source: DatabaseInterface, target: DatabaseInterface, tally: Tally, *,
    batch_size: int = DEFAULT_BATCH_SIZE, write: bool = True,
) -> set[str]:  # fmt: skip
    """Copy every key of ``source`` that ``target`` lacks or holds differently; the
    keys read (one domain's: the only thing held beyond a batch). A damaged source
    value is counted and named, never copied."""
    read: set[str] = set()
    for batch in source.scan_items(batch_size):
        read.update(batch)
        store_batch(target, _readable(place, batch, tally), tally, write=write)
    tally.keys += len(read)
    return read


def reconcile_place(
    place: Place, target: DatabaseInterface, source_keys: set[str], tally: Tally, *,
    delete_extra: bool = False, write: bool = True,
) -> None:  # fmt: skip
    """Count the keys ``target`` holds against ``source_keys``, noting the channel when
    they differ; with ``delete_extra``, first delete the target's keys the source
    does not hold (keys deleted from the source since an earlier copy)."""
    held = set(target.all_keys())
    extra = held - source_keys
    if extra and delete_extra:
        if write:
            target.delete_many(sorted(extra))
        tally.deleted += len(extra)
        held -= extra
    if not write:
        return
    tally.target_keys = (tally.target_keys or 0) + len(held)
    if len(held) != len(source_keys):
        tally.count_mismatches += 1
        tally.note(f"channel {place.channel!r}: the source holds {len(source_keys):,} keys, "
                   f"the target {len(held):,}")  # fmt: skip


def verify_place(
    place: Place, source: DatabaseInterface, target: DatabaseInterface, tally: Tally, *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> None:  # fmt: skip
    """Compare every value of ``source`` with ``target``'s, noting each that differs."""
    for batch in source.scan_items(batch_size):
        readable = {key: value for key, value in batch.items()
                    if not isinstance(value, CorruptValue)}  # fmt: skip
        held = target.get_many(list(readable))
        for key, value in readable.items():
            if not _same(held.get(key, _ABSENT), value):
                tally.value_mismatches += 1
                tally.note(f"channel {place.channel!r} key {key[:200]!r}: the target's value "
                           "differs from the source's")  # fmt: skip


def _readable(place: Place, batch: Mapping[str, Any], tally: Tally) -> dict[str, Any]:
    readable: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, CorruptValue):
            tally.damaged += 1
            tally.note(f"channel {place.channel!r} key {key[:200]!r}: {value}")
        else:
            readable[key] = value
    return readable


def _same(held: Any, value: Any) -> bool:
    """Whether ``held`` (what the target answered, or _ABSENT) stores as ``value`` does."""
    if held is _ABSENT or isinstance(held, CorruptValue):
        return False
    return codec.encode_bytes(held) == _stored(value)


def _stored(value: Any) -> bytes:
    """``value``'s stored form, kept on a Document so that its write does not make it again."""
    stored = codec.encode_bytes(value)
    if value.__class__ is codec.Document:
        value.keep_stored(stored)
    return stored
