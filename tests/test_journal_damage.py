"""A damaged json journal: every record that verifies is replayed, and the loss is told.

Real files. A journal of many records is left behind by a crash (simulated in
this process, or a writer process killed with SIGKILL in the middle of its
writes), the key files it names are then lost, as a power loss can lose them
(the journal is then their only durable copy), and the journal is damaged at
its start, middle or end. The previous release replayed up to the damage and
stopped, silently: a flipped bit in record 0 replayed nothing, one in the
middle dropped every later record, and the damaged journal was then
overwritten. Here every other record is replayed, the loss is logged at error
(``json_journal_damaged``) and handed over once as an integrity problem
(``journal_damaged``), and the damaged journal is kept aside. A torn last
record, which a crash during a batch leaves, stays quiet.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from chanstore.backends import journal_recovery
from chanstore.backends.journal_records import DAMAGED_SUFFIX, JOURNAL_NAME, decode_records
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.errors import IntegrityProblem
from support import (
    JournalRecord,
    crash_journal,
    journal_records,
    reaped,
    sigkill_after,
    wait_until,
)


def lose_files(root: Path, records: list[JournalRecord]) -> None:
    """What a power loss may do to files written since the last checkpoint: gone."""
    for record in records:
        (root / record.path).unlink(missing_ok=True)


def damage(root: Path, record: JournalRecord) -> bytes:
    """Flip one bit in the middle of ``record``; the damaged journal's bytes."""
    path = root / JOURNAL_NAME
    data = bytearray(path.read_bytes())
    data[(record.start + record.end) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return bytes(data)


def asides(root: Path) -> list[Path]:
    return sorted(root.glob(JOURNAL_NAME + DAMAGED_SUFFIX + "*"))


def read_back(root: Path, record: JournalRecord) -> bytes | None:
    try:
        return (root / record.path).read_bytes()
    except FileNotFoundError:
        return None


def write_journal(root: Path, batches: int = 40, keys: int = 5) -> list[JournalRecord]:
    """A journal of ``batches * keys`` records, each its own file, left by a simulated crash."""
    backends = [JSONDatabase(domain=f"svc.c{n}.box", root_dir=str(root)) for n in range(3)]
    for batch in range(batches):
        parts = [(backend, {f"b{batch}-k{k}": {"batch": batch, "k": k} for k in range(keys)})
                 for backend in backends[batch % 2 :]]  # fmt: skip
        assert JSONDatabase.set_many_together(parts) == [None] * len(parts)
    for backend in backends:
        crash_journal(backend)
    return journal_records((root / JOURNAL_NAME).read_bytes())


def reopen(root: Path) -> tuple[JSONDatabase, list[dict]]:
    """The first backend of the root after the crash (it recovers the journal), and the log."""
    with capture_logs() as events:
        backend = JSONDatabase(domain="svc.c0.box", root_dir=str(root))
    return backend, events


POSITIONS = {"start": lambda n: 0, "middle": lambda n: n // 2, "end": lambda n: n - 2}


def check_truthful_replay(root: Path, records: list[JournalRecord], lost: JournalRecord,
                          damaged: bytes, backend: JSONDatabase,
                          events: list[dict]) -> None:  # fmt: skip
    """Every record but ``lost`` replayed; the loss logged, kept aside, told once."""
    # The old lie is gone: every record after the damaged one is replayed too (the previous
    # release stopped at the damage, and at record 0 replayed nothing at all).
    after = [record for record in records if record.start > lost.start]
    assert all(read_back(root, record) == record.data for record in after)
    assert all(read_back(root, r) == r.data for r in records if r is not lost)
    assert read_back(root, lost) is None  # lost with the crash, and only in the damaged record

    (event,) = [e for e in events if e["event"] == "json_journal_damaged"]
    assert event["log_level"] == "error"
    assert (event["records_lost"], event["bytes_lost"]) == (1, lost.end - lost.start)
    assert event["stretches"] == [(lost.start, lost.end, 1)]
    assert event["replayed"] == len(records) - 1
    (kept,) = asides(root)
    assert event["kept"] == str(kept)
    assert kept.read_bytes() == damaged.rstrip(b"\0")  # for inspection, as it was found
    (problem,) = backend.integrity_problems()
    assert problem == IntegrityProblem(kind="journal_damaged", message=problem.message)
    assert f"1 records ({lost.end - lost.start} bytes, at offsets {lost.start}-{lost.end})" in (
        problem.message)  # fmt: skip
    assert str(kept) in problem.message
    assert backend.integrity_problems() == []  # told once
    assert decode_records((root / JOURNAL_NAME).read_bytes())[0] == []  # emptied, durably


@pytest.mark.parametrize("where", list(POSITIONS))
def test_replay_goes_on_past_a_damaged_record(tmp_path, where):
    records = write_journal(tmp_path)
    assert len(records) == 20 * 3 * 5 + 20 * 2 * 5  # batches alternate 3 and 2 parts
    lost = records[POSITIONS[where](len(records))]
    lose_files(tmp_path, records)
    damaged = damage(tmp_path, lost)

    backend, events = reopen(tmp_path)
    check_truthful_replay(tmp_path, records, lost, damaged, backend, events)
    # The root goes on as usual; the next start is quiet and keeps the earlier copy.
    backend.set_many({"after": 1})
    crash_journal(backend)
    again, events = reopen(tmp_path)
    assert not [e for e in events if e["event"] == "json_journal_damaged"]
    assert len(asides(tmp_path)) == 1 and again.integrity_problems() == []
    assert again.get_value("after") == (True, 1)
    again.close()


def test_a_torn_last_record_is_quiet(tmp_path):
    records = write_journal(tmp_path, batches=10)
    lose_files(tmp_path, records)
    last = records[-1]
    path = tmp_path / JOURNAL_NAME
    data = bytearray(path.read_bytes())
    cut = last.start + (last.end - last.start) // 3
    data[cut : last.end] = bytes(last.end - cut)  # the crash cut the last write short
    path.write_bytes(bytes(data))

    backend, events = reopen(tmp_path)
    assert all(read_back(tmp_path, record) == record.data for record in records[:-1])
    assert read_back(tmp_path, last) is None  # never acknowledged
    assert [e["log_level"] for e in events] == ["warning"]
    (replayed,) = events
    assert replayed["event"] == "json_journal_replayed" and replayed["torn_bytes"] > 0
    assert replayed["records"] == len(records) - 1
    assert asides(tmp_path) == [] and backend.integrity_problems() == []
    backend.close()


def test_a_lost_sector_loses_only_the_records_in_it(tmp_path):
    records = write_journal(tmp_path)
    lose_files(tmp_path, records)
    path = tmp_path / JOURNAL_NAME
    data = bytearray(path.read_bytes())
    sector = 4096 * 2
    data[sector : sector + 4096] = bytes(4096)
    path.write_bytes(bytes(data))
    hit = [r for r in records if r.start < sector + 4096 and r.end > sector]

    backend, events = reopen(tmp_path)
    assert [read_back(tmp_path, r) is None for r in records] == [r in hit for r in records]
    (event,) = [e for e in events if e["event"] == "json_journal_damaged"]
    assert event["records_lost"] == len(hit)
    assert event["stretches"] == [(hit[0].start, hit[-1].end, len(hit))]
    assert [p.kind for p in backend.integrity_problems()] == ["journal_damaged"]
    backend.close()


def test_a_damaged_journal_never_overwrites_an_earlier_copy(tmp_path, monkeypatch):
    moment = time.gmtime()
    monkeypatch.setattr(journal_recovery.time, "gmtime", lambda: moment)  # the same second
    copies = []
    for _round in range(3):
        records = write_journal(tmp_path, batches=6)
        damaged = damage(tmp_path, records[2])
        backend, _events = reopen(tmp_path)
        copies.append(damaged.rstrip(b"\0"))
        backend.close()
    kept = asides(tmp_path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", moment)
    assert [path.name for path in kept] == [
        f"{JOURNAL_NAME}{DAMAGED_SUFFIX}{stamp}{suffix}" for suffix in ("", "-2", "-3")
    ]
    assert [path.read_bytes() for path in kept] == copies
    root_domain = JSONDatabase(domain="", root_dir=str(tmp_path))
    assert root_domain.all_keys() == []  # the copies beside the journal are never keys
    root_domain.close()


def test_any_backend_of_the_root_tells_the_damage_once(tmp_path):
    records = write_journal(tmp_path, batches=6)
    damage(tmp_path, records[0])
    first, _events = reopen(tmp_path)  # the one that replayed
    other = JSONDatabase(domain="svc.elsewhere.box", root_dir=str(tmp_path))
    assert [p.kind for p in other.integrity_problems()] == ["journal_damaged"]
    assert first.integrity_problems() == other.integrity_problems() == []
    first.close()
    other.close()


# -- a writer killed with SIGKILL in the middle of its writes ----------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from chanstore.backends import journal
    from chanstore.backends.jsonfiles import JSONDatabase

    # Every batch stays in the journal, as between two checkpoints, however fast the disk.
    journal.CHECKPOINT_RECORDS = journal.CHECKPOINT_BYTES = 1 << 40
    root, log_path = sys.argv[1], sys.argv[2]
    backends = [JSONDatabase(domain=f"svc.c{n}.box", root_dir=root) for n in range(3)]
    log = open(log_path, "a", buffering=1)
    seq = 0
    while True:
        seq += 1
        parts = [(backend, {f"s{seq}-k{k}": {"seq": seq, "k": k, "pad": "p" * 300}
                            for k in range(4)}) for backend in backends]
        errors = JSONDatabase.set_many_together(parts)
        assert errors == [None] * len(parts), errors
        log.write(f"acked\\t{seq}\\n")
    """
)


def acked(log_path: Path) -> int:
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    done = [int(seq) for kind, _tab, seq in (line.partition("\t") for line in lines)
            if kind == "acked" and seq.isdigit()]  # fmt: skip
    return max(done, default=0)


@pytest.mark.slow
@pytest.mark.parametrize("where", list(POSITIONS))
def test_sigkill_mid_writes_then_damage_replays_every_record_that_verifies(tmp_path, where):
    root = tmp_path / "data"
    log_path = tmp_path / "acked.log"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(root), str(log_path)],
                              stderr=subprocess.PIPE)  # fmt: skip
    with reaped(writer):
        wait_until(lambda: acked(log_path) >= 30 or writer.poll() is not None, 60,
                   "the writer to store a few batches")  # fmt: skip
        assert writer.poll() is None, writer.stderr.read().decode()
        sigkill_after(writer, random.uniform(0.0, 0.2))
    last_acked = acked(log_path)

    records = journal_records((root / JOURNAL_NAME).read_bytes())  # up to a torn last batch, if any
    assert len(records) >= 30 * 12  # nothing checkpointed yet: every batch is in it
    journaled = {record.path for record in records}
    for seq in range(1, last_acked + 1):  # every acknowledged write is in the journal
        assert all(f"svc/c{n}/box/s{seq}-k{k}.json" in journaled
                   for n in range(3) for k in range(4))  # fmt: skip
    lost = records[POSITIONS[where](len(records))]
    lose_files(root, records)
    damaged = damage(root, lost)

    backend, events = reopen(root)
    check_truthful_replay(root, records, lost, damaged, backend, events)
    backend.close()
