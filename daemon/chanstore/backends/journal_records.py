"""The json journal's record format, and reading back every record that verifies.

A record is one key file's complete new contents::

    "CSJ3" | generation (u64) | sequence (u32) | payload length (u32) | crc32 (u32) | payload
    payload = path length (u16) | path (relative to the root) | file bytes
    (integers little-endian; the crc32 covers generation, sequence, length and payload)

Records are appended one after the other from offset 0. ``generation`` is
random, new at each reset of the journal; ``sequence`` counts the records of
a generation from 0. A reset zeroes every byte its generation wrote, so a
journal never holds records of an older generation (a crash during a reset
leaves some of them, all already made durable: replaying them is harmless).

Why a magic per record and a sequence: a damaged record (a flipped bit, a
lost sector) must not hide the records after it. Reading goes on at the next
place where the magic starts a record that verifies (:func:`scan`), and the
sequence numbers say how many records were lost between two that verify, so
that the loss is reported exactly. Only a stretch that is followed by a
verified record is damage: bytes after the last verified record are a torn
last write (a crash during a batch that was never acknowledged), which is
normal after a crash.

The previous release's records (:data:`LEGACY_MAGIC`, "CSJ2") have no
sequence, and its resets zeroed only the first header, so older generations'
records stay behind the current ones. They are read with the generation of
the record at offset 0 (a magic and a header, even if its checksum fails), so
that another generation's records are never taken for current ones; a damaged
record 0 whose generation cannot be read loses what follows it, and says so.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field

__all__ = [
    "DAMAGED_SUFFIX",
    "HEADER_SIZE",
    "JOURNAL_NAME",
    "LEGACY_MAGIC",
    "MAGIC",
    "Damage",
    "Scan",
    "decode_records",
    "encode_record",
    "scan",
]

#: The journal's name in its root. Never a key (no ``.json``) nor a domain folder (a dot).
JOURNAL_NAME = ".chanstore-journal"
#: A damaged journal is kept aside as JOURNAL_NAME + this + a UTC time (+ "-2", "-3"...).
DAMAGED_SUFFIX = ".damaged-"
MAGIC = b"CSJ3"
LEGACY_MAGIC = b"CSJ2"
_HEADER = struct.Struct("<4sQIII")  # magic, generation, sequence, payload length, crc32
_CHECKED = struct.Struct("<QII")  # generation, sequence, payload length: covered by the crc32
_LEGACY_HEADER = struct.Struct("<4sQII")  # magic, generation, payload length, crc32
_LEGACY_CHECKED = struct.Struct("<QI")
_PATH_LENGTH = struct.Struct("<H")
HEADER_SIZE = _HEADER.size


def encode_record(generation: int, sequence: int, path: str, data: bytes) -> bytes:
    """The record of ``data`` as the new contents of ``path`` (relative to the root)."""
    name = os.fsencode(path)
    payload = _PATH_LENGTH.pack(len(name)) + name + data
    crc = zlib.crc32(payload, zlib.crc32(_CHECKED.pack(generation, sequence, len(payload))))
    return _HEADER.pack(MAGIC, generation, sequence, len(payload), crc) + payload


@dataclass(frozen=True)
class Damage:
    """A stretch of the journal that holds no verified record, followed by one that does.

    ``records`` is how many records it held (None when the format cannot
    tell: the previous release's records have no sequence).
    """

    start: int
    end: int
    records: int | None

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class Scan:
    """What a journal holds: every record that verifies, in order, and what does not."""

    records: list[tuple[str, bytes]] = field(default_factory=list)
    #: Where the last verified record ends (0 if there is none).
    end: int = 0
    #: Stretches that lost records before a verified one (or, with ``lost_after``, the rest).
    damage: list[Damage] = field(default_factory=list)
    #: Bytes after the last verified record that are not zeros: a torn last write.
    torn: int = 0
    #: Whether the previous release wrote it.
    legacy: bool = False

    @property
    def damaged(self) -> bool:
        return bool(self.damage)

    @property
    def lost_records(self) -> int | None:
        """Records that could not be replayed; None if unknown (the previous release's format)."""
        counts = [stretch.records for stretch in self.damage]
        return None if None in counts else sum(c for c in counts if c is not None)

    @property
    def lost_bytes(self) -> int:
        return sum(stretch.size for stretch in self.damage)


def scan(data: bytes) -> Scan:
    """Every record of ``data`` (a whole journal) that verifies, and the damage between them."""
    if data.find(MAGIC) < 0 and data.find(LEGACY_MAGIC) >= 0:
        return _scan_legacy(data)
    found = Scan()
    generation: int | None = None
    expected = 0  # the sequence the next record should carry
    gap: int | None = None  # where the stretch without a verified record began
    offset = 0
    while offset < len(data):
        record = _record_at(data, offset, generation)
        if record is None:
            if gap is None:
                gap = offset
            offset = data.find(MAGIC, offset + 1)
            if offset < 0:
                break
            continue
        generation, sequence, path, body, end = record
        if sequence < expected:  # not this journal's next record: an impostor
            gap = offset if gap is None else gap
            offset = data.find(MAGIC, offset + 1)
            if offset < 0:
                break
            continue
        if gap is not None or sequence > expected:
            found.damage.append(Damage(offset if gap is None else gap, offset, sequence - expected))
        gap = None
        found.records.append((path, body))
        expected = sequence + 1
        found.end = offset = end
    found.torn = _non_zero(data, found.end)
    return found


def _record_at(
    data: bytes, offset: int, generation: int | None
) -> tuple[int, int, str, bytes, int] | None:
    """``(generation, sequence, path, file bytes, end)`` of the record at ``offset``, if it
    verifies (and is of ``generation``, when that is known)."""
    if offset + _HEADER.size > len(data):
        return None
    magic, found, sequence, length, crc = _HEADER.unpack_from(data, offset)
    start = offset + _HEADER.size
    end = start + length
    if magic != MAGIC or end > len(data) or (generation is not None and found != generation):
        return None
    checked = zlib.crc32(_CHECKED.pack(found, sequence, length))
    body = _payload(data, start, end, crc, checked)
    if body is None:
        return None
    return found, sequence, body[0], body[1], end


def _payload(data: bytes, start: int, end: int, crc: int, checked: int) -> tuple[str, bytes] | None:
    """The path and file bytes of the payload ``data[start:end]``, if its checksum verifies."""
    payload = memoryview(data)[start:end]
    if len(payload) < _PATH_LENGTH.size or zlib.crc32(payload, checked) != crc:
        return None
    (name_length,) = _PATH_LENGTH.unpack_from(payload)
    name_end = _PATH_LENGTH.size + name_length
    if name_end > len(payload):
        return None
    path = os.fsdecode(bytes(payload[_PATH_LENGTH.size : name_end]))
    if not _inside(path):
        return None
    return path, bytes(payload[name_end:])


def _scan_legacy(data: bytes) -> Scan:
    """:func:`scan` for the previous release's journal ("CSJ2": no sequence numbers)."""
    found = Scan(legacy=True)
    header = data[: _LEGACY_HEADER.size]
    if len(header) < _LEGACY_HEADER.size or not header.strip(b"\0"):
        return found  # emptied by a reset: what follows is older generations' leftovers
    magic, generation = _LEGACY_HEADER.unpack_from(data)[:2]
    if magic != LEGACY_MAGIC:
        # The generation cannot be read: no later record can be told from a leftover.
        following = data.find(LEGACY_MAGIC, 1)
        if following >= 0:
            found.damage.append(Damage(0, len(data), None))
        else:
            found.torn = _non_zero(data, 0)
        return found
    gap: int | None = None
    offset = 0
    while offset < len(data):
        record = _legacy_record_at(data, offset, generation)
        if record is None:
            gap = offset if gap is None else gap
            offset = data.find(LEGACY_MAGIC, offset + 1)
            if offset < 0:
                break
            continue
        if gap is not None:
            found.damage.append(Damage(gap, offset, None))
            gap = None
        path, body, end = record
        found.records.append((path, body))
        found.end = offset = end
    found.torn = _non_zero(data, found.end)
    return found


def _legacy_record_at(data: bytes, offset: int, generation: int) -> tuple[str, bytes, int] | None:
    if offset + _LEGACY_HEADER.size > len(data):
        return None
    magic, found, length, crc = _LEGACY_HEADER.unpack_from(data, offset)
    start = offset + _LEGACY_HEADER.size
    end = start + length
    if magic != LEGACY_MAGIC or found != generation or end > len(data):
        return None
    body = _payload(data, start, end, crc, zlib.crc32(_LEGACY_CHECKED.pack(found, length)))
    return None if body is None else (body[0], body[1], end)


def decode_records(data: bytes) -> tuple[list[tuple[str, bytes]], int]:
    """The records of ``data`` that verify, and where the last one ends."""
    found = scan(data)
    return found.records, found.end


def _non_zero(data: bytes, start: int) -> int:
    """How many bytes from ``start`` to the last byte of ``data`` that is not zero."""
    return max(0, len(data.rstrip(b"\0")) - start)


def _inside(path: str) -> bool:
    """Whether ``path`` is a plain relative path that stays inside the root."""
    if not path or os.path.isabs(path):
        return False
    return all(part not in ("", ".", "..") for part in path.split(os.sep))
