"""Group commit: batches that wait for the journal while it flushes share its next flush.

The journal's lock is held by the test while writers queue up behind it, so
that what each flush holds is known; flushes are counted by wrapping the
real ``fdatasync``, which still runs.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chanstore.backends import journal as journal_module
from chanstore.backends.journal import JOURNAL_NAME, Journal, decode_records
from chanstore.backends.journal_groups import Commit, Waiting, journal_group
from chanstore.backends.jsonfiles import JSONDatabase
from support import crash_journal, wait_until

WAIT = 30.0


def paths_of(group: list[Commit]) -> list[list[str]]:
    return [sorted(commit.paths) for commit in group]


def test_a_group_is_taken_in_arrival_order_up_to_a_file_named_twice():
    waiting = Waiting()
    first, second, again, last = (Commit([("a", b"1"), ("b", b"1")]), Commit([("c", b"2")]),
                                  Commit([("b", b"3")]), Commit([("d", b"4")]))  # fmt: skip
    for commit in (first, second, again, last):
        waiting.add(commit)
    assert paths_of(waiting.take()) == [["a", "b"], ["c"]]
    assert len(waiting) == 2
    assert paths_of(waiting.take()) == [["b"], ["d"]]
    assert waiting.take() == [] and len(waiting) == 0


def test_each_commit_of_a_group_gets_its_own_files_errors_or_the_groups_error():
    failed = OSError("no room")
    written: list[list[tuple[str, bytes]]] = []

    def write(files: list[tuple[str, bytes]]) -> list[Exception | None]:
        written.append(files)
        return [None, failed, None]

    group = [Commit([("a", b"1"), ("b", b"1")]), Commit([("c", b"2")])]
    journal_group(group, write)
    assert written == [[("a", b"1"), ("b", b"1"), ("c", b"2")]]  # one write for the group
    assert group[0].answer() == [None, failed]
    assert group[1].answer() == [None]

    def fail(files: list[tuple[str, bytes]]) -> list[Exception | None]:
        raise failed

    whole = [Commit([("a", b"1")]), Commit([("b", b"1")])]
    journal_group(whole, fail)
    for commit in whole:
        assert commit.done
        with pytest.raises(OSError, match="no room"):
            commit.answer()

    def interrupted(files: list[tuple[str, bytes]]) -> list[Exception | None]:
        raise KeyboardInterrupt

    stopped = [Commit([("a", b"1")]), Commit([("b", b"1")])]
    with pytest.raises(KeyboardInterrupt):  # raised in the thread that journals ...
        journal_group(stopped, interrupted)
    with pytest.raises(KeyboardInterrupt):  # ... and in every other caller of the group
        stopped[1].answer()


@pytest.fixture
def flushes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors the journal flushed, in order (the real flush still runs)."""
    flushed: list[int] = []
    real = journal_module.fdatasync

    def counting(fd: int) -> None:
        flushed.append(fd)
        real(fd)

    monkeypatch.setattr(journal_module, "fdatasync", counting)
    return flushed


class Writers:
    """Threads that each make one ``set_many_together`` call, queued behind a held lock."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.threads: list[threading.Thread] = []
        self.answers: dict[int, object] = {}

    def queue(self, parts: list[tuple[JSONDatabase, dict]]) -> None:
        """Start one writer and wait until its batch waits for the journal."""
        index = len(self.threads)
        waiting_before = len(self.journal._waiting)

        def write() -> None:
            try:
                self.answers[index] = JSONDatabase.set_many_together(parts)
            except Exception as exc:  # noqa: BLE001 - the test reads it
                self.answers[index] = exc

        thread = threading.Thread(target=write, name=f"writer-{index}")
        self.threads.append(thread)
        thread.start()
        wait_until(lambda: len(self.journal._waiting) > waiting_before, WAIT,
                   f"writer {index} to queue for the journal")  # fmt: skip

    def finish(self) -> list[object]:
        for thread in self.threads:
            thread.join(WAIT)
            assert not thread.is_alive(), f"{thread.name} still waits for the journal"
        return [self.answers[index] for index in range(len(self.threads))]


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Callable[[str], JSONDatabase]]:
    made: list[JSONDatabase] = []

    def backend(domain: str) -> JSONDatabase:
        made.append(JSONDatabase(domain=domain, root_dir=str(tmp_path)))
        return made[-1]

    yield backend
    for backend_made in made:
        backend_made.close()


def test_batches_waiting_for_the_journal_share_one_flush(tmp_path, backends, flushes):
    channels = [backends(f"svc.c{n}.box") for n in range(4)]
    channels[0].set_many({"before": 0})  # the journal exists: its first flush is not counted
    journal = channels[0]._journal
    flushes.clear()
    writers = Writers(journal)
    with journal._lock:  # a batch being flushed, as far as the writers can tell
        for number, channel in enumerate(channels):
            writers.queue([(channel, {"k": number, "big": "x" * 20_000})])
    assert writers.finish() == [[None]] * 4
    assert len(flushes) == 1
    for number, channel in enumerate(channels):
        assert channel.get_value("k") == (True, number)
        assert json.loads((channel.path / "k.json").read_text()) == number
    records, _damage = decode_records((tmp_path / JOURNAL_NAME).read_bytes())
    assert [os.path.basename(path) for path, _data in records] == ["before.json"] + ["k.json",
                                                                   "big.json"] * 4  # fmt: skip
    # Each was acknowledged durable in the journal: a crash now brings all of them back.
    for channel in channels:
        (channel.path / "k.json").unlink()
    crash_journal(channels[0])
    for number in range(4):
        again = backends(f"svc.c{number}.box")
        assert again.get_value("k") == (True, number)


def test_a_file_written_twice_waits_for_the_next_group_and_the_later_value_stays(
    tmp_path, backends, flushes
):
    box, other = backends("svc.c1.box"), backends("svc.c2.box")
    box.set_many({"before": 0})
    journal = box._journal
    flushes.clear()
    writers = Writers(journal)
    with journal._lock:
        writers.queue([(box, {"k": "first", "a": 1})])
        writers.queue([(box, {"k": "second"})])  # names a file of the batch ahead of it
        writers.queue([(other, {"k": "other"})])
    assert writers.finish() == [[None]] * 3
    assert len(flushes) == 2  # the first batch alone, then the other two together
    assert (box.get_value("k"), box.get_value("a")) == ((True, "second"), (True, 1))
    assert other.get_value("k") == (True, "other")
    (box.path / "k.json").write_text('"torn"')
    crash_journal(box)
    assert backends("svc.c1.box").get_value("k") == (True, "second")  # replayed in order


def test_a_large_file_in_a_group_is_written_directly_beside_the_journaled_ones(backends, flushes):
    large = "y" * (journal_module.DIRECT_BYTES + 1000)
    box, other = backends("svc.c1.box"), backends("svc.c2.box")
    box.set_many({"before": 0})
    journal = box._journal
    writers = Writers(journal)
    with journal._lock:
        writers.queue([(box, {"large": large})])
        writers.queue([(other, {"small": 1})])
    assert writers.finish() == [[None], [None]]
    assert box.get_value("large") == (True, large)
    assert other.get_value("small") == (True, 1)
    assert journal.pending == 2  # "before" and "small": the large file skipped the journal


def test_a_journal_that_cannot_be_written_fails_every_batch_of_the_group(tmp_path, backends):
    box, other = backends("svc.c1.box"), backends("svc.c2.box")
    box.set_many({"k": "before"})
    journal = box._journal
    journal.checkpoint()
    planted = tmp_path / JOURNAL_NAME
    planted.unlink()
    planted.symlink_to(tmp_path / "elsewhere")
    writers = Writers(journal)
    with journal._lock:
        writers.queue([(box, {"k": "after"})])
        writers.queue([(other, {"k": "after"})])
    answers = writers.finish()
    assert [[error.kind for error in answer] for answer in answers] == [["planted_link"]] * 2
    assert box.get_value("k") == (True, "before")
    assert other.get_value("k")[0] is False
    assert not (tmp_path / "elsewhere").exists()
    planted.unlink()
    assert JSONDatabase.set_many_together([(box, {"k": "later"})]) == [None]
    assert box.get_value("k") == (True, "later")
