"""The json backend: the original's file layout, atomic files, torn files, long keys."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from chanstore import CachedDict, MoobiusStorage
from chanstore.backends.json_layout import NAME_FILE
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.cache import ABSENT
from chanstore.errors import BackendError, BackendUnavailable, CorruptValue, WriteRefused
from support import ODD_KEYS, Point, files_under, unwritable


@pytest.fixture
def db(tmp_path):
    return JSONDatabase(domain="svc.chan.box", root_dir=str(tmp_path))


# -- layout --------------------------------------------------------------------


def test_one_file_per_key_in_the_domain_folders(db, tmp_path):
    db.set_value("HP", {"alice": 100})
    path = tmp_path / "svc" / "chan" / "box" / "HP.json"
    assert path.read_text() == json.dumps({"alice": 100}, indent=2)
    assert files_under(tmp_path) == [os.path.join("svc", "chan", "box", "HP.json")]


def test_a_dataclass_file_is_the_original_type_mark(db):
    db.set_value("p", Point(1, 2))
    expected = {"_moobius_type": "support.Point", "_moobius_val": {"x": 1, "y": 2}}
    assert (db.path / "p.json").read_text() == json.dumps(expected, indent=2)


def test_root_dir_defaults_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    JSONDatabase(domain="here").set_value("k", 1)
    assert (tmp_path / "here" / "k.json").read_text() == "1"


def test_odd_keys_never_leave_the_domain_folder(db, tmp_path):
    for key in ODD_KEYS:
        db.set_value(key, key)
    inside = os.path.join("svc", "chan", "box") + os.sep
    for name in files_under(tmp_path):
        assert name.startswith(inside)
        assert os.sep not in name[len(inside) :]
    assert len(files_under(tmp_path)) == len(ODD_KEYS)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=st.text(
        st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1
    ).filter(lambda k: len(k.encode()) <= 1024)
)
def test_any_key_round_trips_as_one_file(tmp_path, key):
    db = JSONDatabase(domain="any.key", root_dir=str(tmp_path))
    try:
        assert db.set_value(key, [key]) == (True, key)
        assert db.get_value(key) == (True, [key])
        assert list(db.all_keys()) == [key]
        assert len(os.listdir(db.path)) == 1
    finally:
        db.delete_key(key)


@pytest.mark.parametrize(
    "domain", ["a/b", "../up", "a..b", ".lead", "trail.", "ctl\x01x", "a.%H" + "0" * 64]
)
def test_unsafe_domains_are_refused(tmp_path, domain):
    with pytest.raises(ValueError, match="not a safe folder name"):
        JSONDatabase(domain=domain, root_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


# -- reads create nothing ------------------------------------------------------------


def tree(folder):
    """Every folder and file below ``folder``, relative to it."""
    return sorted(
        os.path.relpath(os.path.join(where, name), folder)
        for where, dirs, files in os.walk(folder)
        for name in [*dirs, *files]
    )


@pytest.mark.parametrize("fsync", [True, False])
def test_reads_never_create_a_folder(tmp_path, metrics, fsync):
    """A scan of channels that were never written leaves the tree as it was."""
    root = tmp_path / "root"
    (root / "service_s").mkdir(parents=True)
    before = tree(tmp_path)
    for n in range(5):
        db = JSONDatabase(domain=f"service_s.channel_{n}.box", root_dir=str(root), fsync=fsync)
        assert db.get_value("k")[1].kind == "not_found"
        assert db.all_keys() == []
        assert db.load_all() == {}
        assert db.get_many(["a", "b"]) == {}
        assert db.delete_key("k")[1].kind == "not_found"
        assert db.delete_many(["a"]) == []
        assert db.check_available() is None
        box = CachedDict(db, strict_mode=True, name="box", metrics=metrics)
        assert box.fetch("k") is ABSENT
        assert "k" not in box
        assert len(box) == 0
        box.load()
        box.clear()
        assert box.copy() == {}
        db.close()
    # Nor does opening a channel's containers, loaded or cleared as db_config says.
    entries = [{"implementation": "json", "name": name, "load": load, "clear": clear,
                "settings": {"root_dir": str(root), "fsync": fsync}}
               for name, load, clear in [("a", True, False), ("b", False, True)]]  # fmt: skip
    storage = MoobiusStorage("s", "never-written", entries, strict_mode=True, metrics=metrics)
    assert storage.a.get("k") is None
    storage.close()
    # A new root_dir is not made either.
    missing = JSONDatabase(domain="a.b", root_dir=str(tmp_path / "none"), fsync=fsync)
    assert missing.load_all() == {}
    missing.check_available()
    missing.close()
    assert tree(tmp_path) == before


@pytest.mark.parametrize("write", ["set_value", "set_many", "together"])
@pytest.mark.parametrize("fsync", [True, False])
def test_the_first_write_makes_the_folders(tmp_path, write, fsync):
    root = tmp_path / "new-root"
    db = JSONDatabase(domain="svc.chan.box", root_dir=str(root), fsync=fsync)
    assert not root.exists()
    if write == "set_value":
        assert db.set_value("k", 1) == (True, "k")
    elif write == "set_many":
        db.set_many({"k": 1, "j": 2})
    else:
        assert JSONDatabase.set_many_together([(db, {"k": 1})]) == [None]
    assert db.get_value("k") == (True, 1)
    assert (root / "svc" / "chan" / "box" / "k.json").read_text() == "1"
    db.close()


def test_check_available_looks_at_the_folder_a_write_would_be_made_in(open_tmp_path):
    db = JSONDatabase(domain="svc.chan", root_dir=str(open_tmp_path / "data"))
    db.check_available()
    with unwritable(open_tmp_path), pytest.raises(BackendUnavailable, match="not writable"):
        db.check_available()
    (open_tmp_path / "data").write_text("a file where the root should be")
    with pytest.raises(BackendUnavailable, match="not a folder"):
        db.check_available()
    assert db.set_value("k", 1)[0] is False


# -- long keys -----------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["k" * 251, "k" * 300, "é" * 500, "z" * 1024, "/" * 100], ids=str.__len__
)
def test_long_keys_get_hashed_file_names_and_round_trip(db, key):
    assert db.set_value(key, {"long": True}) == (True, key)
    (name,) = os.listdir(db.path)
    assert len(name.encode()) <= 255
    assert name.startswith("%H")
    assert db.get_value(key) == (True, {"long": True})
    assert list(JSONDatabase(domain=db.domain, root_dir=db.root_dir).all_keys()) == [key]
    assert db.load_all() == {key: {"long": True}}
    assert db.delete_key(key) == (True, key)
    assert os.listdir(db.path) == []


def test_long_keys_with_a_common_prefix_are_distinct(db):
    first, second = "p" * 400 + "1", "p" * 400 + "2"
    db.set_value(first, 1)
    db.set_value(second, 2)
    assert db.get_many([first, second]) == {first: 1, second: 2}
    assert sorted(db.all_keys()) == sorted([first, second])


def test_the_longest_key_that_keeps_its_name(db):
    key = "k" * (255 - len(".json"))
    db.set_value(key, 1)
    assert os.listdir(db.path) == [key + ".json"]


def test_a_hashed_file_holding_another_key_is_corrupt(db):
    db.set_value("a" * 300, 1)
    (path,) = db.path.iterdir()
    path.write_text(json.dumps({"_chanstore_key": "b" * 300, "_chanstore_val": 1}))
    ok, failure = db.get_value("a" * 300)
    assert ok is False
    assert failure.kind == "corrupt"
    assert str(path) in failure


def test_long_domain_parts_get_hashed_folder_names(tmp_path):
    db = JSONDatabase(domain="svc." + "c" * 300, root_dir=str(tmp_path))
    db.set_value("k", 1)
    (folder,) = (tmp_path / "svc").iterdir()
    assert folder.name.startswith("%H")
    # Beside the key, the part the folder is named for: what a listing reads back.
    assert sorted(os.listdir(folder)) == [NAME_FILE, "k.json"]
    assert (folder / NAME_FILE).read_text("utf-8") == "c" * 300
    assert db.all_keys() == ["k"]
    assert JSONDatabase(domain="svc." + "c" * 300, root_dir=str(tmp_path)).get_value("k") == (
        True,
        1,
    )


# -- torn and foreign files ----------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b'{"hp": 10', b"", b"\x00\x00\x00", b"not json at all", b"\xff\xfe{", b'{"a": 1}}'],
    ids=["torn", "empty", "zeros", "text", "binary", "trailing"],
)
def test_an_unreadable_file_is_corrupt_for_its_key_only(db, content):
    db.set_value("good", {"ok": 1})
    db.set_value("other", [2])
    bad = db.path / "bad.json"
    bad.write_bytes(content)
    ok, failure = db.get_value("bad")
    assert ok is False
    assert failure.kind == "corrupt"
    assert str(bad) in failure
    loaded = db.load_all()
    assert loaded["good"] == {"ok": 1}
    assert loaded["other"] == [2]
    assert isinstance(loaded["bad"], CorruptValue)
    assert str(bad) in str(loaded["bad"])
    assert db.get_many(["bad", "good"])["good"] == {"ok": 1}


def test_a_container_with_a_torn_file_still_loads(db, metrics):
    db.set_value("good", 1)
    bad = db.path / "bad.json"
    bad.write_text('{"torn": ')
    box = CachedDict(db, name="torn", metrics=metrics)
    with capture_logs() as events:
        box.load()
    assert box.loaded
    # Listed and readable as what it is: damaged, never absent (see test_cache.py).
    assert sorted(box) == ["bad", "good"]
    assert box["good"] == 1
    with pytest.raises(CorruptValue):
        box["bad"]
    failed = [e for e in events if e["event"] == "backend_operation_failed"]
    assert len(failed) == 1
    assert failed[0]["key"] == "bad"
    assert failed[0]["error_kind"] == "corrupt"
    assert str(bad) in failed[0]["error"]
    errors = {
        sample.labels["operation"]: sample.value
        for family in metrics.registry.collect()
        if family.name == "chanstore_backend_operation_errors"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["error"] == "corrupt"
    }
    assert sum(errors.values()) == 1  # counted once, not once per layer


def test_a_read_that_fails_is_an_error_not_an_absent_key(db, metrics):
    (db.path / "dir.json").mkdir(parents=True)  # a key whose "file" cannot be read
    ok, failure = db.get_value("dir")
    assert ok is False
    assert failure.kind == "io"
    box = CachedDict(db, name="io", metrics=metrics)
    with pytest.raises(BackendError, match=r"dir\.json") as raised:
        box.get("dir")
    assert raised.value.kind == "io"


# -- what is not a key -----------------------------------------------------------


def test_temp_files_and_other_files_are_never_keys(db):
    db.set_value("real", 1)
    (db.path / ".chanstore-tmp-0123456789abcdef").write_text('{"half": ')
    (db.path / ".chanstore-tmp-fedcba9876543210").write_text("2")
    (db.path / "notes.txt").write_text("not a key")
    (db.path / "sub").mkdir()
    assert list(db.all_keys()) == ["real"]
    assert db.load_all() == {"real": 1}


def test_writes_leave_no_temp_files(db):
    db.set_value("a", 1)
    db.set_many({"b": 2, "c": 3})
    db.set_value("a", 4)
    with pytest.raises(Exception, match="cannot be stored"):
        db.set_many({"d": 1, "e": object()})
    assert sorted(os.listdir(db.path)) == ["a.json", "b.json", "c.json"]


def test_a_key_that_looks_like_a_temp_file_is_a_key(db):
    key = ".chanstore-tmp-0123456789abcdef"
    db.set_value(key, "mine")
    assert list(db.all_keys()) == [key]
    assert db.load_all() == {key: "mine"}


# -- a folder that cannot be written ------------------------------------------------


def test_an_unwritable_folder_refuses_writes_and_still_reads(open_tmp_path, metrics):
    db = JSONDatabase(domain="ro", root_dir=str(open_tmp_path))
    db.set_value("k", "before")
    box = CachedDict(db, strict_mode=True, name="ro", metrics=metrics)
    box.load()
    with unwritable(db.path):
        ok, failure = db.set_value("k", "after")
        assert ok is False
        assert failure.kind in {"permission", "read_only"}
        ok, failure = db.delete_key("k")
        assert (ok, failure.kind) == (False, "permission")
        assert db.get_value("k") == (True, "before")
        with pytest.raises(BackendUnavailable, match="not writable"):
            db.check_available()
        with pytest.raises(WriteRefused) as raised:
            box["k"] = "after"
        assert raised.value.kind == "permission"
        with pytest.raises(WriteRefused):
            box["new"] = 1
        assert dict(box.items()) == {"k": "before"}
    assert os.listdir(db.path) == ["k.json"]
    assert db.get_value("k") == (True, "before")
