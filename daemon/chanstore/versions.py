"""ETags: the version of a stored value, and the expectations conditional writes check.

A value's ETag is the SHA-1 of its compact stored form (:func:`chanstore.codec.encode`,
the bytes the redis backend holds), in hex. Whoever computes it from the
same stored value gets the same ETag: every daemon sharing a backend, a
Redis script (``redis.sha1hex``), a client that hashes what it read. It
changes whenever the stored value changes; a value that goes A → B → A has
A's ETag again, so a write conditional on A's ETag succeeds then (the value
*is* A; the change feed is what tells the two A's apart).

An *expectation* is what a conditional write requires of a key: an ETag
(it must hold exactly that version), :data:`ANY` (it must exist) or None (it
must be absent).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chanstore import codec
from chanstore.errors import CorruptValue

__all__ = [
    "ANY",
    "UNREADABLE",
    "Change",
    "Expectation",
    "conflicts",
    "etag_of",
    "etag_of_stored",
    "etags_of",
    "holds",
    "stored_with_etag",
]

#: The expectation "the key exists, whatever its version" (``If-Match: *``).
ANY = "*"
#: The ETag reported for a stored value that cannot be read: it exists, but no
#: expectation of a version can hold for it.
UNREADABLE = "unreadable"
#: An ETag, ANY, or None ("must be absent").
Expectation = str | None


def etag_of_stored(data: bytes | str) -> str:
    """The ETag of a value stored as ``data`` (its compact type-marked JSON)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def stored_with_etag(value: Any) -> tuple[bytes, str]:
    """``value``'s stored bytes and their ETag. A :class:`~chanstore.codec.Document` being
    written through the daemon carries both (:meth:`~chanstore.codec.Document.keep_stored`):
    the daemon answers the ETag and the backend stores the bytes, and hashing a large value
    twice would be waste."""
    stored = codec.encode_bytes(value)
    if value.__class__ is codec.Document and value.etag is not None and value.stored is stored:
        return stored, value.etag
    return stored, etag_of_stored(stored)


def etag_of(value: Any) -> str:
    """The ETag of ``value`` once stored; :data:`UNREADABLE` for a damaged one."""
    if isinstance(value, CorruptValue):
        return UNREADABLE
    return etag_of_stored(codec.encode_bytes(value))


def etags_of(values: Mapping[str, Any]) -> dict[str, str]:
    """The ETag of each value (as :meth:`DatabaseInterface.get_many` answers them)."""
    return {key: etag_of(value) for key, value in values.items()}


def holds(expected: Expectation, current: str | None) -> bool:
    """Whether a key whose ETag is ``current`` (None: absent) meets ``expected``."""
    if expected is None:
        return current is None
    if expected == ANY:
        return current is not None
    return current == expected and current != UNREADABLE


def conflicts(
    expect: Mapping[str, Expectation], current: Mapping[str, str]
) -> dict[str, str | None]:
    """The keys of ``expect`` that ``current`` (ETags of the keys that exist) fails,
    each with its current ETag or None."""
    return {key: current.get(key) for key, expected in expect.items()
            if not holds(expected, current.get(key))}  # fmt: skip


@dataclass
class Change:
    """Changes to one domain that are made together, or not at all.

    ``sets`` are stored and ``deletes`` removed only if every key of
    ``expect`` meets its expectation (see
    :meth:`~chanstore.backends.base.DatabaseInterface.apply_if`).
    """

    sets: Mapping[str, Any] = field(default_factory=dict)
    deletes: Sequence[str] = ()
    expect: Mapping[str, Expectation] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sets) + len(self.deletes)
