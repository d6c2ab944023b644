"""Links planted inside a json root are never followed: attacked as an attacker would.

Each test plants a symbolic link where chanstore keeps a file or folder of its
own (a key's file, a service, channel or container folder, the journal),
pointing out of the root (at a file, at a folder, at nothing) or at another
channel's folder, then shows that nothing outside the root is read, written
or deleted (contents and mtimes compared before and after), and that each
operation fails with the kind ``planted_link``, naming the path. The previous
release followed every one of these links: a read served the target's
content as the value, writes and deletes went through to the target.

Every test runs twice: with ``openat2`` (the kernel resolves a folder through
no link, in one call) and with the walk of ``O_NOFOLLOW`` opens that chanstore
uses where Linux has no ``openat2``.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from chanstore.backends import files as files_module
from chanstore.backends.files import PlantedLink
from chanstore.backends.journal_records import JOURNAL_NAME, encode_record
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.errors import BackendError, IntegrityProblem
from chanstore.instrumentation import attach
from support import files_under

OWNER = ("svc", "a", "box")
LEVELS = {"service": 0, "channel": 1, "container": 2}


@pytest.fixture(params=["openat2", "walk"], autouse=True)
def resolver(request, monkeypatch):
    """How folders are reached: openat2 (where Linux has it), or one O_NOFOLLOW open per level."""
    if request.param == "openat2" and files_module._openat2 is None:
        pytest.skip("this kernel (or its sandbox) has no openat2")
    if request.param == "walk":
        monkeypatch.setattr(files_module, "_openat2", None)
    return request.param


class Outside:
    """A folder outside the root, with files a followed link would reach; watched for changes."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "tree" / "a" / "box").mkdir(parents=True)
        (folder / "tree" / "box").mkdir(parents=True)
        (folder / "secret.json").write_text('"outside secret"')
        for keys in (folder / "tree" / "a" / "box", folder / "tree" / "box", folder / "tree"):
            (keys / "k.json").write_text('{"stolen": true}')
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        """Every file outside: contents and modification time."""
        return {
            name: ((self.folder / name).read_bytes(), (self.folder / name).stat().st_mtime_ns)
            for name in files_under(self.folder)
        }

    def untouched(self) -> bool:
        return self.snapshot() == self.before


@pytest.fixture
def outside(tmp_path):
    return Outside(tmp_path / "outside")


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "root"
    folder.mkdir()
    return folder


@pytest.fixture
def open_backend(root, metrics):
    """``open_backend(domain, fsync=True)``: a backend of ``root``, reporting to ``metrics``."""
    opened: list[JSONDatabase] = []

    def make(domain: str, fsync: bool = True) -> JSONDatabase:
        backend = JSONDatabase(domain=domain, root_dir=str(root), fsync=fsync)
        attach(backend, container="box", metrics=metrics)
        opened.append(backend)
        return backend

    yield make
    for backend in opened:
        backend.close()


def planted_errors(metrics, operation: str) -> float:
    value = metrics.registry.get_sample_value(
        "chanstore_backend_operation_errors_total",
        {"backend": "json", "container": "box", "operation": operation, "error": "planted_link"},
    )
    return value or 0


def assert_planted(answer, path: Path) -> None:
    """``answer``, a ``(ok, failure)`` of a get, set or delete, is the planted link at ``path``."""
    ok, failure = answer
    assert ok is False
    assert failure.kind == "planted_link"
    assert str(path) in failure


def still_a_link(path: Path, target: Path) -> bool:
    return path.is_symlink() and os.readlink(path) == str(target)


# -- a key's file ----------------------------------------------------------------------


def test_a_planted_key_file_is_never_read_through(open_backend, root, outside, metrics):
    db = open_backend("svc.chan.box")
    db.set_value("good", 1)
    link = db.path / "k.json"
    link.symlink_to(outside.folder / "secret.json")

    with capture_logs() as events:
        answer = db.get_value("k")
    # The previous release answered (True, "outside secret"): the target's content as the value.
    assert_planted(answer, link)
    failed = [e for e in events if e["event"] == "backend_operation_failed"]
    assert [(e["error_kind"], str(link) in e["error"]) for e in failed] == [("planted_link", True)]
    assert planted_errors(metrics, "get") == 1

    with capture_logs() as events:
        assert sorted(db.all_keys()) == ["good", "k"]  # listed, not skipped
    assert [e["path"] for e in events if e["event"] == "json_planted_link"] == [str(link)]
    (problem,) = db.integrity_problems()
    assert problem.kind == "planted_link" and str(link) in problem.message
    assert db.all_keys() and db.integrity_problems() == []  # told once

    loaded = db.load_all()  # the other keys load; the planted one is its error, never a value
    assert loaded["good"] == 1
    assert isinstance(loaded["k"], PlantedLink) and loaded["k"].kind == "planted_link"
    assert planted_errors(metrics, "load_all") == 1
    assert isinstance(db.get_many(["k"])["k"], PlantedLink)
    assert outside.untouched()


@pytest.mark.parametrize("fsync", [True, False], ids=["journal", "no-fsync"])
def test_a_planted_key_file_is_never_written_nor_deleted_through(
    open_backend, outside, metrics, fsync
):
    db = open_backend("svc.chan.box", fsync=fsync)
    db.set_value("good", 1)
    target = outside.folder / "secret.json"
    link = db.path / "k.json"
    link.symlink_to(target)

    assert_planted(db.set_value("k", "overwritten?"), link)
    with pytest.raises(BackendError) as raised:
        db.set_many({"other": 2, "k": "overwritten?"})
    assert raised.value.kind == "planted_link" and raised.value.done == ["other"]
    assert_planted(db.delete_key("k"), link)
    with pytest.raises(BackendError) as raised:
        db.delete_many(["good", "k"])
    assert raised.value.kind == "planted_link" and raised.value.done == ["good"]

    assert outside.untouched()
    assert still_a_link(link, target)  # left for a person to look at, not quietly replaced
    assert sorted(os.listdir(db.path)) == ["k.json", "other.json"]  # no temp file left behind
    assert db.get_value("other") == (True, 2)
    counted = {op: planted_errors(metrics, op) for op in ("set", "set_many", "delete",
                                                          "delete_many")}  # fmt: skip
    assert counted == {"set": 1, "set_many": 1, "delete": 1, "delete_many": 1}


def test_a_planted_long_key_file_is_reported_not_listed(open_backend, outside):
    db = open_backend("svc.chan.box")
    key = "long " + "k" * 300  # stored as %H<sha256>.json, holding the key beside the value
    db.set_value(key, 1)
    (stored,) = db.path.iterdir()
    stored.unlink()
    stored.symlink_to(outside.folder / "secret.json")
    # Its key is inside the file: listing it would mean following the link.
    assert db.all_keys() == []
    (problem,) = db.integrity_problems()
    assert problem.kind == "planted_link" and str(stored) in problem.message
    assert_planted(db.get_value(key), stored)
    assert outside.untouched()


def test_a_fifo_in_a_keys_place_is_an_error_not_a_hang(open_backend):
    db = open_backend("svc.chan.box")
    db.set_value("good", 1)
    os.mkfifo(db.path / "k.json")
    started = time.monotonic()
    ok, failure = db.get_value("k")
    assert (ok, failure.kind) == (False, "io")
    assert "not a regular file" in failure
    assert time.monotonic() - started < 5


# -- a folder --------------------------------------------------------------------------


def plant_folder(root: Path, outside: Outside, level: int, target: str) -> tuple[str, Path, Path]:
    """A link at ``level`` of a domain beside OWNER's: its domain, the link and its target.

    The target is a folder outside the root holding what the rest of the
    domain's path would find (``outside``), nothing (``dangling``), or the
    folder of the same level of OWNER, a domain with data (``another channel``).
    """
    victim = list(OWNER)
    victim[level] += "x"
    link = root.joinpath(*victim[: level + 1])
    link.parent.mkdir(parents=True, exist_ok=True)
    if target == "outside":
        destination = outside.folder / "tree"  # tree/[a/][box/]k.json: what following finds
    elif target == "dangling":
        destination = outside.folder / "nothing-here"
    else:
        destination = root.joinpath(*OWNER[: level + 1])
    link.symlink_to(destination, target_is_directory=True)
    return ".".join(victim), link, destination


@pytest.mark.parametrize("target", ["outside", "dangling", "another channel"])
@pytest.mark.parametrize("level", list(LEVELS), ids=list(LEVELS))
@pytest.mark.parametrize("fsync", [True, False], ids=["journal", "no-fsync"])
def test_a_planted_folder_sends_nothing_out_of_its_place(
    open_backend, root, outside, metrics, level, target, fsync
):
    owner = open_backend(".".join(OWNER))
    owner.set_value("k", "mine")
    owner_files = {name: (root / name).read_bytes() for name in files_under(root)}
    owner_mtime = (owner.path / "k.json").stat().st_mtime_ns
    domain, link, destination = plant_folder(root, outside, LEVELS[level], target)
    db = open_backend(domain, fsync=fsync)
    bystander = open_backend("svc.fine.box", fsync=fsync)

    # Reads: never the outside file, nor another channel's value, nor "absent".
    assert_planted(db.get_value("k"), link)
    for read in (db.all_keys, db.load_all, lambda: db.get_many(["k"])):
        with pytest.raises(BackendError) as raised:
            read()
        assert raised.value.kind == "planted_link" and str(link) in str(raised.value)
    with pytest.raises(PlantedLink):
        db.check_available()  # readiness names the kind
    # Writes and deletes: nothing goes through.
    assert_planted(db.set_value("new", 1), link)
    with pytest.raises(BackendError) as raised:
        db.set_many({"new": 1, "k": "overwritten?"})
    assert raised.value.kind == "planted_link"
    errors = JSONDatabase.set_many_together([(db, {"new": 1}), (bystander, {"k": 2})])
    assert errors[0].kind == "planted_link" and errors[1] is None
    assert bystander.get_value("k") == (True, 2)  # a planted link fails its own part only
    assert_planted(db.delete_key("k"), link)
    with pytest.raises(BackendError) as raised:
        db.delete_many(["k"])
    assert raised.value.kind == "planted_link"

    assert outside.untouched()
    assert not (outside.folder / "nothing-here").exists()  # a dangling link made nothing
    assert still_a_link(link, destination)
    after = {name: (root / name).read_bytes() for name in files_under(root)
             if not name.startswith((os.path.join("svc", "fine"), JOURNAL_NAME))
             and not (root / name).is_symlink()}  # fmt: skip
    assert after == owner_files  # nothing written, nothing deleted, no temp file
    assert (owner.path / "k.json").stat().st_mtime_ns == owner_mtime
    assert owner.get_value("k") == (True, "mine")
    assert planted_errors(metrics, "get") == 1 and planted_errors(metrics, "set_many") == 2


def test_a_folder_swapped_for_a_link_mid_writes_never_sends_a_write_out(open_backend, root,
                                                                        outside):  # fmt: skip
    """An attacker swaps a channel folder for a link and back while writes go on: a check
    made before each write would race; reaching the folder without following cannot."""
    db = open_backend("svc.b.box", fsync=False)
    db.set_value("k", 0)
    channel = root / "svc" / "b"
    stop = threading.Event()
    swaps = [0]

    spare = [0]

    def clear_way() -> None:
        """A write made the folder again meanwhile: the attacker moves it out of the way."""
        spare[0] += 1
        channel.rename(root / "svc" / f"b.made{spare[0]}")

    def swap() -> None:
        while not stop.is_set():
            channel.rename(root / "svc" / "b.real")
            while True:
                try:
                    channel.symlink_to(outside.folder / "tree", target_is_directory=True)
                    break
                except FileExistsError:
                    clear_way()
            time.sleep(0.0005)
            channel.unlink()
            while True:
                try:
                    (root / "svc" / "b.real").rename(channel)
                    break
                except OSError:
                    clear_way()
            swaps[0] += 1

    swapper = threading.Thread(target=swap)
    swapper.start()
    kinds: set[str] = set()
    try:
        deadline = time.monotonic() + 1.5
        n = 0
        while time.monotonic() < deadline:
            n += 1
            for ok, answer in (db.set_value("k", n), db.set_value(f"k{n % 7}", n),
                               db.delete_key(f"k{(n + 3) % 7}")):  # fmt: skip
                if not ok:
                    kinds.add(answer.kind)
            try:
                db.set_many({"k": n, "j": n})
            except BackendError as exc:
                kinds.add(exc.kind)
    finally:
        stop.set()
        swapper.join()
    assert swaps[0] > 10
    assert "planted_link" in kinds
    assert kinds <= {"planted_link", "not_found", "io"}
    assert outside.untouched()


# -- the journal -----------------------------------------------------------------------


def test_a_planted_journal_is_never_read_nor_overwritten(root, outside, metrics):
    # A journal outside the root, holding a valid record: replaying it would store "evil".
    target = outside.folder / "journal"
    target.write_bytes(encode_record(7, 0, os.path.join("svc", "chan", "box", "k.json"),
                                     b'"evil"') + bytes(64))  # fmt: skip
    outside.before = outside.snapshot()
    (root / "svc" / "chan" / "box").mkdir(parents=True)
    (root / "svc" / "chan" / "box" / "k.json").write_text('"mine"')
    link = root / JOURNAL_NAME
    link.symlink_to(target)

    with capture_logs() as events:
        db = JSONDatabase(domain="svc.chan.box", root_dir=str(root))
    attach(db, container="box", metrics=metrics)
    assert db.get_value("k") == (True, "mine")  # the planted journal was not replayed
    assert [e["path"] for e in events if e["event"] == "json_planted_link"] == [str(link)]
    (problem,) = db.integrity_problems()
    assert problem == IntegrityProblem(kind="planted_link", message=problem.message)
    assert str(link) in problem.message

    with pytest.raises(BackendError) as raised:
        db.set_many({"a": 1, "b": 2})  # a batch would append to the journal: it fails instead
    assert raised.value.kind == "planted_link" and str(link) in str(raised.value)
    assert planted_errors(metrics, "set_many") == 1
    assert db.set_value("single", 1) == (True, "single")  # writes that need no journal go on
    assert outside.untouched()
    assert still_a_link(link, target)
    assert sorted(os.listdir(db.path)) == ["k.json", "single.json"]

    link.unlink()  # an operator removed it: batches journal again
    db.set_many({"a": 1})
    assert (root / JOURNAL_NAME).is_file() and not (root / JOURNAL_NAME).is_symlink()
    db.close()
    assert outside.untouched()


def test_a_journal_swapped_for_a_link_while_in_use_is_never_written(root, outside, metrics):
    db = JSONDatabase(domain="svc.chan.box", root_dir=str(root))
    attach(db, container="box", metrics=metrics)
    db.set_many({"a": 1})  # the journal is made, owned, and holds a record
    journal = root / JOURNAL_NAME
    journal.rename(root / "journal.moved")
    journal.symlink_to(outside.folder / "secret.json")

    with pytest.raises(BackendError) as raised:
        db.set_many({"b": 2})
    assert raised.value.kind == "planted_link"
    # A write of a journaled file must empty the journal first: it cannot, so it is refused.
    assert_planted(db.set_value("a", 3), journal)
    assert db.get_value("a") == (True, 1) and db.get_value("b")[0] is False
    assert outside.untouched() and still_a_link(journal, outside.folder / "secret.json")

    journal.unlink()  # an operator removed it: a new journal is started
    db.set_many({"b": 2})
    assert journal.is_file() and not journal.is_symlink()
    assert db.load_all() == {"a": 1, "b": 2}

    journal.rename(root / "journal.moved-again")
    journal.symlink_to(outside.folder / "secret.json")
    with capture_logs() as events:
        db.close()  # its checkpoint cannot empty the journal: told, and no crash
    assert [e["event"] for e in events] == ["json_journal_checkpoint_failed"]
    assert outside.untouched()


def test_a_dangling_journal_link_creates_nothing(root, outside):
    link = root / JOURNAL_NAME
    link.symlink_to(outside.folder / "journal-to-be")
    db = JSONDatabase(domain="svc.chan.box", root_dir=str(root))
    with pytest.raises(BackendError) as raised:
        db.set_many({"a": 1, "b": 2})
    assert raised.value.kind == "planted_link"
    assert not (outside.folder / "journal-to-be").exists()
    assert [p.kind for p in db.integrity_problems()] == ["planted_link"]
    db.close()
    assert not (outside.folder / "journal-to-be").exists()


# -- the root --------------------------------------------------------------------------


def test_the_root_itself_may_be_a_link(tmp_path):
    real = tmp_path / "real-data"
    real.mkdir()
    link = tmp_path / "data"
    link.symlink_to(real, target_is_directory=True)
    db = JSONDatabase(domain="svc.chan.box", root_dir=str(link))
    assert db.path == real / "svc" / "chan" / "box"  # resolved once, when the backend opens
    db.set_value("k", 1)
    db.set_many({"a": 2, "b": 3})
    assert db.load_all() == {"k": 1, "a": 2, "b": 3}
    assert (real / "svc" / "chan" / "box" / "a.json").read_text() == "2"
    assert (real / JOURNAL_NAME).is_file()
    assert db.integrity_problems() == []
    db.close()


def test_integrity_problems_are_told_once_by_any_backend_of_the_root(open_backend, outside):
    first = open_backend("svc.one.box")
    second = open_backend("svc.two.box")
    first.set_value("k", 1)
    (first.path / "planted.json").symlink_to(outside.folder / "secret.json")
    assert "planted" in first.all_keys()
    assert [p.kind for p in second.integrity_problems()] == ["planted_link"]  # any of the root
    assert first.integrity_problems() == []
    first.all_keys()  # found again: already told
    assert first.integrity_problems() == second.integrity_problems() == []
