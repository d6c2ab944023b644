"""The journal's record format: every record that verifies is read back, damage is measured.

Bytes only, no files: :func:`scan` is what recovery replays from (see
test_journal_damage.py for the files). The previous release's reader stopped
at the first record that did not verify, so a flipped bit in the middle of a
journal hid every record after it, and one in record 0 hid them all.
"""

from __future__ import annotations

import os
import struct
import zlib

import pytest

from chanstore.backends.journal_records import (
    HEADER_SIZE,
    Damage,
    decode_records,
    encode_record,
    scan,
)

GENERATION = 0x1234_5678_9ABC_DEF0
FILES = [(f"s{n % 3}/c/k{n}.json", b'{"n": %d, "pad": "%s"}' % (n, b"x" * (n % 17)))
         for n in range(40)]  # fmt: skip


def encoded(files=FILES, generation=GENERATION, first=0) -> list[bytes]:
    return [
        encode_record(generation, first + n, path, body) for n, (path, body) in enumerate(files)
    ]


def spans(records: list[bytes]) -> list[tuple[int, int]]:
    """Where each record starts and ends in their concatenation."""
    found, offset = [], 0
    for record in records:
        found.append((offset, offset + len(record)))
        offset += len(record)
    return found


def flipped(data: bytes, at: int, bit: int = 0x10) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= bit
    return bytes(damaged)


def test_records_round_trip():
    files = [("a.json", b"1"), (os.path.join("s", "c", "k.json"), b'{"x": [1, 2]}'),
             ("é %2F.json", bytes(range(256))), ("empty.json", b"")]  # fmt: skip
    data = b"".join(encoded(files))
    found = scan(data + bytes(4096))  # zeros: the preallocated space
    assert (found.records, found.end, found.damage, found.torn) == (files, len(data), [], 0)
    assert decode_records(data) == (files, len(data))


def test_a_torn_last_record_is_no_record_and_no_damage():
    records = encoded()
    good = b"".join(records[:-1])
    for cut in range(1, len(records[-1])):
        # Any prefix of the last record (a batch a crash cut short: never acknowledged).
        found = scan(good + records[-1][:cut] + bytes(100))
        assert found.records == FILES[:-1]
        assert found.damage == []
        assert found.torn == len(records[-1][:cut].rstrip(b"\0"))
    # A last record whose bytes are all there but do not verify looks the same.
    found = scan(flipped(b"".join(records), len(good) + 30))
    assert (found.records, found.damage) == (FILES[:-1], [])


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("part", ["header", "payload"])
def test_records_after_a_damaged_one_are_read_back(where, part):
    records = encoded()
    data = b"".join(records)
    index = {"start": 0, "middle": len(records) // 2, "end": len(records) - 2}[where]
    start, end = spans(records)[index]
    at = start + (12 if part == "header" else HEADER_SIZE + 5)  # a sequence bit, or the path's
    found = scan(flipped(data, at))
    # The previous release read up to the damage only: nothing at all for record 0.
    assert len(found.records) == len(FILES) - 1
    assert found.records == FILES[:index] + FILES[index + 1 :]
    assert found.damage == [Damage(start, end, 1)]
    assert (found.lost_records, found.lost_bytes) == (1, end - start)
    assert found.end == len(data) and found.torn == 0


def test_a_flipped_length_does_not_swallow_the_records_it_claims():
    records = encoded()
    data = b"".join(records)
    start, end = spans(records)[10]
    at = start + 4 + 8 + 4 + 1  # the length field's second byte: the record "grows" by 256 bytes
    found = scan(flipped(data, at, 0x01))
    assert found.records == FILES[:10] + FILES[11:]
    assert found.damage == [Damage(start, end, 1)]


def test_a_zeroed_stretch_loses_exactly_the_records_in_it():
    records = encoded()
    data = bytearray(b"".join(records))
    first, last = 5, 12
    start, end = spans(records)[first][0] + 3, spans(records)[last][0] + 1
    data[start:end] = bytes(end - start)  # records 5 to 12 overlap it
    found = scan(bytes(data))
    assert found.records == FILES[:first] + FILES[last + 1 :]
    assert found.lost_records == last - first + 1
    assert found.damage == [Damage(spans(records)[first][0], spans(records)[last + 1][0],
                                   last - first + 1)]  # fmt: skip


def test_several_damaged_stretches_are_each_measured():
    records = encoded()
    data = b"".join(records)
    for index in (3, 4, 20, 39 - 1):
        data = flipped(data, spans(records)[index][0] + HEADER_SIZE + 3)
    found = scan(data)
    assert [d.records for d in found.damage] == [2, 1, 1]
    assert found.lost_records == 4 and len(found.records) == len(FILES) - 4


def test_a_reset_journal_holds_no_records():
    assert scan(bytes(1 << 16)).records == []
    # A reset zeroes every record; a crash during it may leave some, already made durable.
    data = bytearray(b"".join(encoded()))
    data[: len(data) // 2] = bytes(len(data) // 2)
    assert scan(bytes(data)).records  # harmless to replay: read back, nothing older


def test_a_record_of_another_generation_or_out_of_sequence_is_no_record():
    records = encoded()
    impostor = encode_record(GENERATION + 1, 20, "s0/c/evil.json", b'"evil"')
    replayed = encode_record(GENERATION, 3, "s0/c/evil.json", b'"evil"')  # a sequence gone by
    for odd in (impostor, replayed):
        found = scan(b"".join(records[:20]) + odd + b"".join(records[20:]))
        assert ("s0/c/evil.json", b'"evil"') not in found.records
        assert found.records == FILES


@pytest.mark.parametrize("path", ["../escape.json", "/abs.json", "a//b.json", "./a.json", ""])
def test_records_never_name_a_file_outside_the_root(path):
    assert scan(encode_record(GENERATION, 0, path, b"1")).records == []
    # Between two records that verify, it is damage: never replayed.
    data = b"".join([encode_record(GENERATION, 0, "a.json", b"1"),
                     encode_record(GENERATION, 1, path, b"1"),
                     encode_record(GENERATION, 2, "b.json", b"2")])  # fmt: skip
    found = scan(data)
    assert found.records == [("a.json", b"1"), ("b.json", b"2")]
    assert found.lost_records == 1


# -- the previous release's journals (CSJ2) ---------------------------------------------


def legacy_record(generation: int, path: str, data: bytes) -> bytes:
    """A record as the previous release wrote it: no sequence number."""
    name = path.encode()
    payload = struct.pack("<H", len(name)) + name + data
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<QI", generation, len(payload))))
    return struct.pack("<4sQII", b"CSJ2", generation, len(payload), crc) + payload


LEGACY = [legacy_record(GENERATION, path, body) for path, body in FILES[:10]]
#: What an earlier generation left behind the current records (that release zeroed only a header).
STALE = [legacy_record(GENERATION - 1, f"s0/c/k{n}.json", b'"stale"') for n in range(10)]


def test_a_legacy_journal_is_read_with_its_first_records_generation():
    found = scan(b"".join(LEGACY + STALE) + bytes(100))
    assert found.legacy and found.records == FILES[:10] and found.damage == []


def test_a_legacy_journal_that_was_reset_holds_nothing():
    data = bytearray(b"".join(LEGACY + STALE))
    data[:20] = bytes(20)  # what that release's reset did
    found = scan(bytes(data))
    assert (found.records, found.damage) == ([], [])


def test_a_damaged_legacy_record_hides_no_later_one_of_its_generation():
    data = b"".join(LEGACY + STALE)
    start = len(b"".join(LEGACY[:4]))
    found = scan(flipped(data, start + 30))
    assert found.records == FILES[:4] + FILES[5:10]  # not the stale ones after them
    assert found.damage == [Damage(start, start + len(LEGACY[4]), None)]
    assert found.lost_records is None  # that format cannot count them


def test_a_legacy_journal_whose_first_header_is_lost_replays_nothing_and_says_so():
    # Its generation is unknown: a later record may be current or an earlier generation's.
    data = b"".join(LEGACY + STALE)
    found = scan(b"XXXX" + data[4:])
    assert found.records == []
    assert found.damaged and found.lost_records is None
