"""The json backend's write-ahead journal: records, replay, checkpoints, ordering, crashes.

Real files throughout. A "crash" in this process is simulated by letting go
of a journal without its checkpoint (closing its descriptor, as the kernel
would for a killed process); the subprocess tests kill a real writer with
SIGKILL, once at a random moment and once between a batch's journal flush and
its renames, so that only the replay can bring the batch back.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from chanstore.backends import journal as journal_module
from chanstore.backends.files import TEMP_PREFIX
from chanstore.backends.journal import (
    JOURNAL_NAME,
    Journal,
    decode_records,
    encode_record,
)
from chanstore.backends.journal_direct import DIRECT_BYTES
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.errors import BulkWriteError, UnstorableValue
from chanstore.instrumentation import attach
from chanstore.metrics import Metrics
from support import crash_journal, reaped, sigkill_after, wait_until

GENERATION = 0x1234_5678_9ABC_DEF0


def journal_records(root: Path) -> list[tuple[str, bytes]]:
    return decode_records((root / JOURNAL_NAME).read_bytes())[0]


def encoded(files: list[tuple[str, bytes]], generation: int = GENERATION) -> bytes:
    """``files`` as the records of one generation, numbered from 0."""
    return b"".join(encode_record(generation, number, path, body)
                    for number, (path, body) in enumerate(files))  # fmt: skip


def read(root: Path, domain: str, key: str):
    backend = JSONDatabase(domain=domain, root_dir=str(root))
    try:
        return backend.get_value(key)
    finally:
        backend.close()


# -- the journal in the root ------------------------------------------------------------


def test_bulk_sets_go_through_the_journal_of_the_root(tmp_path):
    first = JSONDatabase(domain="svc.c1.box", root_dir=str(tmp_path))
    second = JSONDatabase(domain="svc.c2.box", root_dir=str(tmp_path))
    assert first._journal is second._journal
    assert first.together_key == second.together_key
    errors = JSONDatabase.set_many_together([(first, {"a": 1, "b": [2]}), (second, {"a": "x"})])
    assert errors == [None, None]
    assert first._journal.owned and first._journal.pending == 3
    paths = sorted(path for path, _data in journal_records(tmp_path))
    assert paths == sorted([os.path.join("svc", "c1", "box", "a.json"),
                            os.path.join("svc", "c1", "box", "b.json"),
                            os.path.join("svc", "c2", "box", "a.json")])  # fmt: skip
    # The files are written at once, in the original layout, with no temp file left.
    assert (first.path / "b.json").read_text() == json.dumps([2], indent=2)
    assert sorted(os.listdir(first.path)) == ["a.json", "b.json"]
    assert second.get_value("a") == (True, "x")
    first.close()
    assert second._journal.pending == 3  # the journal stays while a backend of the root is open
    second.close()
    assert journal_records(tmp_path) == []  # the last one checkpointed


def test_the_journal_is_never_a_key_even_in_the_root_domain(tmp_path):
    root = JSONDatabase(domain="", root_dir=str(tmp_path))
    root.set_many({"k": 1, ".chanstore-journal": 2, "j": 3})
    assert JOURNAL_NAME in os.listdir(tmp_path)
    assert sorted(root.all_keys()) == [".chanstore-journal", "j", "k"]
    assert root.load_all() == {"k": 1, ".chanstore-journal": 2, "j": 3}
    root.close()


def test_fsync_off_does_not_journal(tmp_path):
    quick = JSONDatabase(domain="q", root_dir=str(tmp_path), fsync=False)
    quick.set_many({"a": 1, "b": 2})
    assert JSONDatabase.set_many_together([(quick, {"c": 3})]) == [None]
    assert not (tmp_path / JOURNAL_NAME).exists()
    assert quick.load_all() == {"a": 1, "b": 2, "c": 3}
    quick.close()


def test_an_unstorable_value_fails_only_its_part(tmp_path):
    metrics = Metrics(CollectorRegistry())
    good, bad, other = (JSONDatabase(domain=f"s.{name}", root_dir=str(tmp_path))
                        for name in ("good", "bad", "other"))  # fmt: skip
    for backend in (good, bad, other):
        attach(backend, container="box", metrics=metrics)
    errors = JSONDatabase.set_many_together(
        [(good, {"k": 1}), (bad, {"fine": 1, "wrong": object()}), (other, {"k": 2})]
    )
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], UnstorableValue)
    assert bad.all_keys() == []  # not even its storable value
    assert (good.get_value("k"), other.get_value("k")) == ((True, 1), (True, 2))
    failed = metrics.registry.get_sample_value(
        "chanstore_backend_operation_errors_total",
        {"backend": "json", "container": "box", "operation": "set_many",
         "error": "invalid_value"},
    )  # fmt: skip
    assert failed == 1
    measured = metrics.registry.get_sample_value(
        "chanstore_backend_operation_duration_seconds_count",
        {"backend": "json", "container": "box", "operation": "set_many"},
    )
    assert measured == 3
    for backend in (good, bad, other):
        backend.close()


# -- replay --------------------------------------------------------------------------------


def test_replay_restores_what_a_crash_left_unwritten(tmp_path):
    folder = tmp_path / "svc" / "chan" / "box"
    folder.mkdir(parents=True)
    (folder / "kept.json").write_text("0")
    (folder / "old.json").write_text('"before"')
    records = [
        (os.path.join("svc", "chan", "box", "old.json"), b'"first"'),
        (os.path.join("svc", "chan", "box", "new.json"), b"[1, 2]"),
        # A folder whose creation the crash lost is made again.
        (os.path.join("svc", "gone", "box", "k.json"), b"7"),
        (os.path.join("svc", "chan", "box", "old.json"), b'"last"'),  # the last record wins
    ]
    data = encoded(records)
    kept = os.path.join("svc", "chan", "box", "kept.json")
    torn = encode_record(GENERATION, len(records), kept, b"9")
    stale = encode_record(GENERATION - 1, len(records) + 1, kept, b"8")
    (tmp_path / JOURNAL_NAME).write_bytes(data + torn[:-3] + stale + bytes(1000))

    backend = JSONDatabase(domain="svc.chan.box", root_dir=str(tmp_path))
    assert backend.load_all() == {"kept": 0, "old": "last", "new": [1, 2]}
    assert read(tmp_path, "svc.gone.box", "k") == (True, 7)
    assert journal_records(tmp_path) == []  # replayed, then reset
    assert not [name for name in os.listdir(folder) if name.startswith(TEMP_PREFIX)]
    backend.close()


def test_a_simulated_crash_after_journaled_sets_is_replayed(tmp_path):
    backend = JSONDatabase(domain="svc.chan.box", root_dir=str(tmp_path))
    backend.set_many({"a": 1, "b": 2})
    backend.set_many({"b": 3})
    # The files were written without a flush; a machine crash may lose them.
    (backend.path / "a.json").unlink()
    (backend.path / "b.json").write_text("torn")
    crash_journal(backend)
    assert read(tmp_path, "svc.chan.box", "a") == (True, 1)
    assert read(tmp_path, "svc.chan.box", "b") == (True, 3)


def test_checkpoint_makes_the_journal_empty(tmp_path, monkeypatch):
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    backend.set_many({"a": 1, "b": 2})
    journal = backend._journal
    assert journal.pending == 2
    journal.checkpoint()
    assert journal.pending == 0
    assert journal_records(tmp_path) == []
    assert backend.load_all() == {"a": 1, "b": 2}
    # The bound checkpoints by itself, inline.
    monkeypatch.setattr(journal_module, "CHECKPOINT_RECORDS", 5)
    for n in range(4):
        backend.set_many({f"k{n}": n, f"j{n}": n})
        assert journal.pending <= 5
    assert len(journal_records(tmp_path)) == journal.pending
    # A crash now replays only what followed the last checkpoint, harmlessly.
    crash_journal(backend)
    again = JSONDatabase(domain="d", root_dir=str(tmp_path))
    assert again.load_all() == {"a": 1, "b": 2} | {f"{p}{n}": n for n in range(4) for p in "kj"}
    again.close()


def test_a_journal_grows_past_its_first_allocation_and_shrinks_back(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "KEEP_ALLOCATION", 256 << 10)
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    big = "x" * (DIRECT_BYTES // 2)  # journaled, not written directly
    for n in range(10):
        backend.set_many({f"k{n}": big, "small": n})
    assert (tmp_path / JOURNAL_NAME).stat().st_size > journal_module.KEEP_ALLOCATION
    assert len(journal_records(tmp_path)) == 20
    backend._journal.checkpoint()
    assert (tmp_path / JOURNAL_NAME).stat().st_size == 0
    backend.set_many({"small": "again"})
    crash_journal(backend)
    assert read(tmp_path, "d", "small") == (True, "again")
    assert read(tmp_path, "d", "k9") == (True, big)


# -- ordering against writes that bypass the journal ----------------------------------------


def test_a_delete_after_a_journaled_set_is_never_undone(tmp_path):
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    backend.set_many({"gone": 1, "kept": 2})
    assert backend.delete_key("gone") == (True, "gone")
    backend.set_many({"also": 3})
    assert backend.delete_many(["also", "absent"]) == ["also"]
    crash_journal(backend)
    again = JSONDatabase(domain="d", root_dir=str(tmp_path))
    assert again.load_all() == {"kept": 2}
    again.close()


def test_a_single_set_after_a_journaled_set_is_never_undone(tmp_path):
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    backend.set_many({"k": "journaled", "other": 1})
    assert backend.set_value("k", "newer") == (True, "k")
    quick = JSONDatabase(domain="d", root_dir=str(tmp_path), fsync=False)
    backend.set_many({"other": 2})
    quick.set_many({"other": 3})  # fsync off bypasses the journal too
    crash_journal(backend)
    again = JSONDatabase(domain="d", root_dir=str(tmp_path))
    assert again.load_all() == {"k": "newer", "other": 3}
    again.close()


def test_a_bypassing_write_of_other_files_does_not_checkpoint(tmp_path):
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    backend.set_many({"a": 1, "b": 2})
    backend.set_value("c", 3)
    backend.delete_key("c")
    assert backend._journal.pending == 2
    backend.close()


def test_concurrent_batches_end_consistent(tmp_path):
    domains = [f"svc.c{n}.box" for n in range(4)]
    backends = [JSONDatabase(domain=domain, root_dir=str(tmp_path)) for domain in domains]
    rounds = 40
    failures = []

    def together(worker: int) -> None:
        try:
            for seq in range(rounds):
                parts = [(backend, {f"w{worker}-k{key}": seq for key in range(3)})
                         for backend in backends]  # fmt: skip
                assert JSONDatabase.set_many_together(parts) == [None] * len(parts)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    def single(worker: int) -> None:
        try:
            backend = backends[worker % len(backends)]
            for seq in range(rounds):
                backend.set_many({f"s{worker}": seq, f"s{worker}-b": seq})
                backend.set_value(f"s{worker}", seq + 1000)  # the same key, bypassing
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=together, args=(n,)) for n in range(3)]
    threads += [threading.Thread(target=single, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures
    expected = {}
    for index, domain in enumerate(domains):
        values = {f"w{w}-k{k}": rounds - 1 for w in range(3) for k in range(3)}
        for worker in range(3):
            if worker % len(domains) == index:
                values |= {f"s{worker}": rounds - 1 + 1000, f"s{worker}-b": rounds - 1}
        expected[domain] = values
    for backend, domain in zip(backends, domains, strict=True):
        assert backend.load_all() == expected[domain]
    crash_journal(backends[0])  # and a replay of what is left changes nothing
    for domain in domains:
        again = JSONDatabase(domain=domain, root_dir=str(tmp_path))
        assert again.load_all() == expected[domain]
        again.close()


def test_racing_a_bypassing_write_of_the_same_key_the_replay_keeps_the_last(tmp_path):
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    stop = threading.Event()

    def journaled() -> None:
        seq = 0
        while not stop.is_set():
            seq += 1
            backend.set_many({"hot": f"j{seq}", "side": seq})

    thread = threading.Thread(target=journaled)
    thread.start()
    try:
        for seq in range(200):
            backend.set_value("hot", f"s{seq}")
    finally:
        stop.set()
        thread.join(timeout=60)
    final = backend.get_value("hot")
    crash_journal(backend)
    assert read(tmp_path, "d", "hot") == final


# -- processes --------------------------------------------------------------------------------


LOCK_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.read()
    """
)


def test_another_process_journals_the_root_so_this_one_writes_directly(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / JOURNAL_NAME)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert holder.stdout.readline() == b"locked\n"
        backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
        backend.set_many({"a": 1, "b": 2})
        assert not backend._journal.owned
        assert journal_records(tmp_path) == []
        assert backend.load_all() == {"a": 1, "b": 2}
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    backend.set_many({"a": 3, "c": 4})  # the owner is gone: this process takes over
    assert backend._journal.owned
    assert len(journal_records(tmp_path)) == 2
    backend.close()


def test_the_owner_holds_an_exclusive_lock(tmp_path):
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    backend.set_many({"a": 1})
    fd = os.open(tmp_path / JOURNAL_NAME, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        backend.close()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # closed: released
    finally:
        os.close(fd)


WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from chanstore.backends import journal
    from chanstore.backends.jsonfiles import JSONDatabase

    root, log_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    backends = [JSONDatabase(domain=f"svc.c{n}.box", root_dir=root) for n in range(3)]
    keys = [f"k{n}" for n in range(6)]
    pad = "x" * 2000
    log = open(log_path, "a", buffering=1)
    seq = int(sys.argv[4])
    if mode == "in-apply":
        # Die between a batch's journal flush and its renames: only a replay brings it back.
        real = journal.replace_with
        renamed = [0]

        def replace_with(*args, **kwargs):
            renamed[0] += 1
            if renamed[0] == 40:
                log.write("killing\\n")
                os.kill(os.getpid(), signal.SIGKILL)
            real(*args, **kwargs)

        journal.replace_with = replace_with
    while True:
        seq += 1
        parts = [(backend, {key: {"seq": seq, "pad": pad} for key in keys})
                 for backend in backends]
        log.write(f"sent\\t{seq}\\n")
        errors = JSONDatabase.set_many_together(parts)
        assert errors == [None] * len(parts), errors
        log.write(f"acked\\t{seq}\\n")
    """
)


def run_writer(root: Path, log_path: Path, mode: str, first: int) -> subprocess.Popen:
    script = root.parent / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(root), str(log_path), mode,
                             str(first)], stderr=subprocess.PIPE)  # fmt: skip


def ledger(log_path: Path) -> tuple[int, int]:
    """The last sequence number acknowledged, and the last one sent."""
    acked = sent = 0
    if not log_path.exists():
        return acked, sent
    for line in log_path.read_text().splitlines():
        kind, _tab, seq = line.partition("\t")
        if seq.isdigit():
            if kind == "acked":
                acked = int(seq)
            elif kind == "sent":
                sent = int(seq)
    return acked, sent


def check_read_back(root: Path, acked: int, sent: int) -> set[int]:
    seen = set()
    for n in range(3):
        backend = JSONDatabase(domain=f"svc.c{n}.box", root_dir=str(root))
        try:
            values = backend.load_all()
        finally:
            backend.close()
        assert sorted(values) == [f"k{k}" for k in range(6)]
        for key, value in values.items():
            assert value["pad"] == "x" * 2000
            assert acked <= value["seq"] <= sent, (n, key, value["seq"], acked, sent)
            seen.add(value["seq"])
    return seen


@pytest.mark.slow
def test_sigkill_at_random_loses_no_acknowledged_set(tmp_path):
    root = tmp_path / "data"
    log_path = tmp_path / "writes.log"
    rnd = random.Random()
    for round_number in range(3):
        with reaped(run_writer(root, log_path, "random", round_number * 1_000_000)) as writer:
            first = round_number * 1_000_000
            wait_until(
                lambda first=first, writer=writer: (
                    ledger(log_path)[0] > first + 5 or writer.poll() is not None
                ),
                30,
                "the writer to store a few batches",
            )  # fmt: skip
            assert writer.poll() is None, writer.stderr.read().decode()
            sigkill_after(writer, rnd.uniform(0.0, 0.3))
        acked, sent = ledger(log_path)
        assert acked > round_number * 1_000_000
        check_read_back(root, acked, sent)


@pytest.mark.slow
def test_sigkill_between_the_journal_and_the_renames_is_replayed(tmp_path):
    root = tmp_path / "data"
    log_path = tmp_path / "writes.log"
    with reaped(run_writer(root, log_path, "in-apply", 0)) as writer:
        assert writer.wait(timeout=60) == -signal.SIGKILL, writer.stderr.read().decode()
    assert log_path.read_text().splitlines()[-1] == "killing"
    acked, sent = ledger(log_path)
    assert sent == acked + 1  # killed inside a batch, after its journal flush
    # Some files of that batch still hold the batch before: only the journal has it.
    on_disk = {json.loads(path.read_text())["seq"] for path in root.rglob("k*.json")}
    assert on_disk == {acked, sent}
    pending = journal_records(root)
    assert len(pending) >= 18  # this batch's records (and maybe earlier ones)
    assert check_read_back(root, acked, sent) == {sent}  # replayed: the whole batch
    assert journal_records(root) == []


def test_a_journal_object_refuses_work_once_closed(tmp_path):
    journal = Journal(str(tmp_path))
    journal.close()
    with pytest.raises(journal_module.NotJournaling):
        journal.write([("k.json", b"1")])
    assert journal.write([]) == []


def test_a_failed_rename_after_the_flush_is_reported_and_not_replayed(tmp_path, monkeypatch):
    backend = JSONDatabase(domain="d", root_dir=str(tmp_path))
    backend.set_many({"a": 0, "b": 0})
    real = journal_module.replace_with

    def flaky(folder, name, *args, **kwargs):
        if name == "b.json":
            raise OSError(28, "No space left on device")
        real(folder, name, *args, **kwargs)

    monkeypatch.setattr(journal_module, "replace_with", flaky)
    with pytest.raises(BulkWriteError) as raised:
        backend.set_many({"a": 1, "b": 1, "c": 1})
    assert raised.value.kind == "disk_full"
    assert sorted(raised.value.done) == ["a", "c"]
    assert backend._journal.pending == 0  # checkpointed at once
    monkeypatch.undo()
    crash_journal(backend)
    assert read(tmp_path, "d", "b") == (True, 0)  # reported failed, and not brought back
    assert read(tmp_path, "d", "a") == (True, 1)


# -- a disk that is full or read-only --------------------------------------------------------


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs (root only: a file mode cannot refuse root a write), unmounted after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = _mount("-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        _mount("-o", "remount,rw", str(disk))
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30, check=False)


def fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with pytest.raises(OSError, match="No space"):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


def test_a_journal_that_cannot_grow_fails_every_part_and_writes_nothing(small_disk):
    first = JSONDatabase(domain="s.a", root_dir=str(small_disk))
    second = JSONDatabase(domain="s.b", root_dir=str(small_disk))
    first.set_value("kept", "before")  # written the usual way: the journal does not exist yet
    fill(small_disk)
    errors = JSONDatabase.set_many_together([(first, {"kept": 1, "x": 2}), (second, {"y": 3})])
    assert [error.kind for error in errors] == ["disk_full", "disk_full"]
    assert first.load_all() == {"kept": "before"}
    assert second.load_all() == {}
    leftovers = [p.name for p in small_disk.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert leftovers == []
    (small_disk / "filler").unlink()
    assert JSONDatabase.set_many_together([(first, {"x": 2}), (second, {"y": 3})]) == [None, None]
    crash_journal(first)
    assert read(small_disk, "s.a", "x") == (True, 2)
    assert read(small_disk, "s.a", "kept") == (True, "before")


def test_files_that_cannot_be_written_after_the_flush_fail_and_are_not_replayed(small_disk):
    backend = JSONDatabase(domain="s", root_dir=str(small_disk))
    backend.set_many({"kept": "before", "other": 0})  # the journal exists, with room to spare
    fill(small_disk)
    with pytest.raises(BulkWriteError) as raised:
        backend.set_many({"kept": "x" * 5000, "new": "y" * 5000})
    assert raised.value.kind == "disk_full"
    assert backend.load_all() == {"kept": "before", "other": 0}
    assert backend._journal.pending == 0  # checkpointed: the failed records are gone
    (small_disk / "filler").unlink()
    crash_journal(backend)
    assert read(small_disk, "s", "kept") == (True, "before")
    assert read(small_disk, "s", "new")[0] is False


def test_a_read_only_root_fails_every_part_and_keeps_its_data(small_disk):
    first = JSONDatabase(domain="s.a", root_dir=str(small_disk))
    second = JSONDatabase(domain="s.b", root_dir=str(small_disk))
    assert JSONDatabase.set_many_together([(first, {"k": 1}), (second, {"k": 2})]) == [None, None]
    first._journal.checkpoint()
    done = _mount("-o", "remount,ro", str(small_disk))
    assert done.returncode == 0, done.stderr  # the journal holds no descriptor open for writing
    errors = JSONDatabase.set_many_together([(first, {"k": 3}), (second, {"k": 4, "j": 5})])
    assert [error.kind for error in errors] == ["read_only", "read_only"]
    assert (first.get_value("k"), second.load_all()) == ((True, 1), {"k": 2})
    assert _mount("-o", "remount,rw", str(small_disk)).returncode == 0
    assert JSONDatabase.set_many_together([(first, {"k": 3})]) == [None]
    assert first.get_value("k") == (True, 3)
    first.close()
    second.close()


def test_the_lanes_count_the_keys_a_part_did_store(tmp_path, monkeypatch):
    from types import SimpleNamespace  # noqa: PLC0415

    from chanstore.engine.batches import apply_batch  # noqa: PLC0415

    first = JSONDatabase(domain="s.a", root_dir=str(tmp_path))
    second = JSONDatabase(domain="s.b", root_dir=str(tmp_path))
    real = journal_module.replace_with

    def flaky(folder, name, data, fsync, where, **kwargs):
        if os.path.join(where, name).endswith(os.path.join("a", "bad.json")):
            raise OSError(28, "No space left on device")
        real(folder, name, data, fsync, where, **kwargs)

    monkeypatch.setattr(journal_module, "replace_with", flaky)
    writes = [(first, "good", 1), (first, "bad", 2), (second, "other", 3)]
    batch = [SimpleNamespace(backend=backend, key=key, value=value, delete=False, condition=None)
             for backend, key, value in writes]  # fmt: skip
    results = apply_batch(batch)
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], BulkWriteError) and results[1].kind == "disk_full"
    assert first.load_all() == {"good": 1}
    assert second.load_all() == {"other": 3}
