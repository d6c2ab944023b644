"""The DatabaseInterface contract, run against every storing backend.

Every test here takes ``backend`` or ``backend_factory`` (see conftest.py),
which is parametrized over json (fsync on and off), redis and a third-party
backend that implements only the four abstract methods. A new backend is
tested by adding one param there.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from chanstore.backends.null import NullDatabase
from chanstore.codec import Document
from chanstore.errors import (
    BackendError,
    BulkWriteError,
    ChanstoreError,
    CorruptValue,
    ListingUnsupported,
    UnstorableValue,
)
from chanstore.instrumentation import Failure
from support import ODD_KEYS, VALUES, DictDatabase, Point, assert_same


def assert_absent(answer: tuple[bool, object]) -> None:
    ok, message = answer
    assert ok is False
    assert isinstance(message, str)
    assert isinstance(message, Failure)
    assert message.kind == "not_found"


# -- the four ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(VALUES))
def test_every_value_kind_round_trips(backend_factory, kind):
    value = VALUES[kind]
    writer = backend_factory("round.trip")
    assert writer.set_value("k", value) == (True, "k")
    ok, read = writer.get_value("k")
    assert ok is True
    assert_same(read, value)
    # A second instance reads what the first stored, not a copy it kept in memory.
    ok, reread = backend_factory("round.trip").get_value("k")
    assert ok is True
    assert_same(reread, value)


def test_set_overwrites(backend):
    assert backend.set_value("k", {"v": 1}) == (True, "k")
    assert backend.set_value("k", [2]) == (True, "k")
    assert backend.get_value("k") == (True, [2])
    assert list(backend.all_keys()) == ["k"]


def test_get_of_absent_key_is_false_with_not_found(backend):
    assert_absent(backend.get_value("never-set"))


def test_delete(backend):
    backend.set_value("gone", 1)
    backend.set_value("kept", 2)
    assert backend.delete_key("gone") == (True, "gone")
    assert_absent(backend.get_value("gone"))
    assert list(backend.all_keys()) == ["kept"]


def test_delete_of_absent_key_is_false_with_not_found(backend):
    assert_absent(backend.delete_key("never-set"))
    backend.set_value("once", 1)
    backend.delete_key("once")
    assert_absent(backend.delete_key("once"))


def test_all_keys_lists_exactly_the_stored_keys(backend):
    assert list(backend.all_keys()) == []
    keys = {f"key-{n}" for n in range(25)}
    for key in keys:
        backend.set_value(key, key)
    assert sorted(backend.all_keys()) == sorted(keys)
    backend.delete_key("key-3")
    assert sorted(backend.all_keys()) == sorted(keys - {"key-3"})


def test_none_is_a_value_not_an_absence(backend):
    backend.set_value("nothing", None)
    assert backend.get_value("nothing") == (True, None)
    assert list(backend.all_keys()) == ["nothing"]


def containing_itself() -> list[Any]:
    value: list[Any] = []
    value.append({"me": value})
    return value


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    [object(), float("nan"), float("inf"), {1: "int key"}, [1, {2: "nested int key"}], b"bytes",
     containing_itself(), nested(5000)],
    ids=["object", "nan", "inf", "int-dict-key", "nested-int-key", "bytes", "contains-itself",
         "nested-5000-deep"],
)  # fmt: skip
def test_unstorable_value_is_refused_and_stores_nothing(backend, value):
    backend.set_value("k", "old")
    ok, message = backend.set_value("k", value)
    assert ok is False
    assert message.kind == "invalid_value"
    assert backend.get_value("k") == (True, "old")
    assert list(backend.all_keys()) == ["k"]


def test_a_document_is_stored_as_given_and_read_back_revived(backend_factory):
    """What an HTTP PUT stores: the stored form itself, its marks not escaped."""
    doc = {"tags": {"_moobius_type": "builtins.set", "_moobius_val": ["a"]}, "n": [1, None]}
    writer = backend_factory("documents")
    for key in ("k", "long" * 100):  # the json backend's hashed file too
        assert writer.set_value(key, Document(doc)) == (True, key)
        assert backend_factory("documents").get_value(key) == (
            True,
            {"tags": {"a"}, "n": [1, None]},
        )
    writer.set_many({"many": Document(doc)})
    assert backend_factory("documents").get_value("many") == (True, {"tags": {"a"}, "n": [1, None]})
    for key in ("nan", "long" * 101):
        ok, failure = writer.set_value(key, Document({"x": float("nan")}))
        assert (ok, failure.kind) == (False, "invalid_value")
    assert sorted(writer.all_keys()) == sorted(["k", "long" * 100, "many"])


# -- domains -------------------------------------------------------------------


def test_same_key_in_two_domains_is_two_entries(backend_factory):
    first, second = backend_factory("iso.first"), backend_factory("iso.second")
    first.set_value("shared", "one")
    second.set_value("shared", "two")
    first.set_value("only-first", 1)
    assert first.get_value("shared") == (True, "one")
    assert second.get_value("shared") == (True, "two")
    assert sorted(first.all_keys()) == ["only-first", "shared"]
    assert list(second.all_keys()) == ["shared"]
    assert_absent(second.get_value("only-first"))
    first.delete_key("shared")
    assert second.get_value("shared") == (True, "two")


def test_nested_domains_do_not_see_each_other(backend_factory):
    parent, child = backend_factory("svc.chan"), backend_factory("svc.chan.name")
    parent.set_value("name", "a key named like the child domain")
    child.set_value("k", "child")
    assert list(parent.all_keys()) == ["name"]
    assert list(child.all_keys()) == ["k"]
    assert parent.load_all() == {"name": "a key named like the child domain"}
    assert child.load_all() == {"k": "child"}


# -- keys ----------------------------------------------------------------------


@pytest.mark.parametrize("key", ODD_KEYS, ids=range(len(ODD_KEYS)))
def test_odd_key_round_trips(backend_factory, key):
    backend = backend_factory("odd.keys")
    assert backend.set_value(key, {"key": key}) == (True, key)
    assert backend.get_value(key) == (True, {"key": key})
    assert list(backend_factory("odd.keys").all_keys()) == [key]
    assert backend.delete_key(key) == (True, key)
    assert_absent(backend.get_value(key))
    assert list(backend.all_keys()) == []


def test_odd_keys_do_not_collide(backend_factory):
    backend = backend_factory("odd.together")
    for index, key in enumerate(ODD_KEYS):
        backend.set_value(key, index)
    reopened = backend_factory("odd.together")
    assert sorted(reopened.all_keys()) == sorted(ODD_KEYS)
    assert reopened.load_all() == {key: index for index, key in enumerate(ODD_KEYS)}
    # Nothing spilled into a neighbouring domain.
    assert list(backend_factory("odd").all_keys()) == []


# -- bulk operations -------------------------------------------------------------


def test_set_many_and_get_many(backend):
    items = {"a": 1, "b": {"x": [1, 2]}, "c": (1, (2, 3)), "p": Point(1, 2), "odd/key": None}
    assert backend.set_many(items) is None
    found = backend.get_many(["a", "c", "missing", "p", "odd/key"])
    assert_same(found, {"a": 1, "c": (1, (2, 3)), "p": Point(1, 2), "odd/key": None})
    assert backend.get_many(iter(["b"])) == {"b": {"x": [1, 2]}}
    assert backend.get_many([]) == {}
    assert sorted(backend.all_keys()) == sorted(items)


def test_load_all(backend):
    assert backend.load_all() == {}
    items = {f"k{n}": {"n": n} for n in range(30)}
    backend.set_many(items)
    loaded = backend.load_all()
    assert loaded == items
    assert_same(loaded["k7"], {"n": 7})


def test_delete_many_returns_the_keys_that_existed(backend):
    backend.set_many({"a": 1, "b": 2, "c": 3})
    assert sorted(backend.delete_many(["a", "missing", "c"])) == ["a", "c"]
    assert list(backend.all_keys()) == ["b"]
    assert backend.delete_many([]) == []
    assert backend.delete_many(iter(["b"])) == ["b"]
    assert backend.load_all() == {}


def test_set_many_with_an_unstorable_value(backend):
    backend.set_value("before", 0)
    with pytest.raises(ChanstoreError) as raised:
        backend.set_many({"a": 1, "bad": object(), "c": 3})
    assert raised.value.kind == "invalid_value"
    # Either nothing was written, or the error says exactly what was.
    done = raised.value.done if isinstance(raised.value, BulkWriteError) else []
    assert isinstance(raised.value, BackendError | UnstorableValue)
    assert sorted(backend.all_keys()) == sorted(["before", *done])


def test_set_many_empty_is_a_no_op(backend):
    backend.set_many({})
    assert list(backend.all_keys()) == []


# -- several domains at once ----------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_set_many_together_stores_each_part(backend_factory, flavour):
    """Parts of one together_key in one call; an unstorable part fails alone."""
    backends = [backend_factory(f"together.n{n}") for n in range(3)]
    cls = type(backends[0])
    assert len({backend.together_key for backend in backends}) in (1, 3)
    parts = [(backends[0], {"a": 1, "b": (2,)}), (backends[1], {"c": object()}),
             (backends[2], {"d": {"e": None}})]  # fmt: skip
    if flavour == "async":
        errors = asyncio.run(cls.set_many_together_async(parts))
    else:
        errors = cls.set_many_together(parts)
    assert errors[0] is None
    assert errors[2] is None
    assert isinstance(errors[1], ChanstoreError)
    assert errors[1].kind == "invalid_value"
    assert_same(backend_factory("together.n0").load_all(), {"a": 1, "b": (2,)})
    assert backend_factory("together.n1").load_all() == {}
    assert backend_factory("together.n2").load_all() == {"d": {"e": None}}


def test_stores_on_loop_is_a_class_flag(backend):
    assert isinstance(type(backend).stores_on_loop, bool)


# -- listing -----------------------------------------------------------------

#: Keys a scan must give back as they are: a slash, dots, non-ASCII, 300 bytes.
SCANNED_KEYS = ["a/b", "..", "../up", ".", "ünïcödé 汉字 🎉", "x" * 300, "%H" + "0" * 64,
                ".chanstore-tmp-0123456789abcdef", *(f"k{n}" for n in range(20))]  # fmt: skip


def scanned(backend, batch_size):
    """Every batch of ``backend.scan_items(batch_size)``, checked for its shape, merged."""
    merged: dict = {}
    for batch in backend.scan_items(batch_size):
        assert isinstance(batch, dict)
        assert 0 < len(batch) <= batch_size
        assert not merged.keys() & batch.keys(), "a key came twice"
        merged.update(batch)
    return merged


@pytest.mark.parametrize("batch_size", [1, 3, 1000])
def test_scan_items_gives_exactly_the_domains_items(backend_factory, batch_size):
    items = {key: {"key": key, "n": n, "tags": {n}} for n, key in enumerate(SCANNED_KEYS)}
    backend = backend_factory("scan.items")
    backend.set_many(items)
    # Neighbours: a parent, a child, a longer name, the same keys elsewhere.
    for domain in ("scan", "scan.items.child", "scan.itemsx", "other.items"):
        backend_factory(domain).set_many({"k0": "not mine", "elsewhere": 1})
    reader = backend_factory("scan.items")
    merged = scanned(reader, batch_size)
    assert_same(dict(sorted(merged.items())), dict(sorted(items.items())))
    assert list(backend_factory("scan.empty").scan_items(batch_size)) == []


def test_scan_items_answers_as_get_many(backend_factory):
    """Stored documents when values are not revived; the same values as load_all either way."""
    backend = backend_factory("scan.documents")
    backend.set_many({"s": {1, 2}, "p": Point(1, 2), "n": None})
    assert_same(scanned(backend, 2), backend.load_all())
    backend.revive_values = False
    if backend_factory.kind == "dict":
        return  # DictDatabase, as a third party may, always revives
    merged = scanned(backend, 2)
    assert all(isinstance(value, Document) for value in merged.values())
    assert merged == backend.load_all()
    assert merged["s"].doc == {"_moobius_type": "builtins.set", "_moobius_val": [1, 2]}


def damage(backend_factory, backend, key):
    """Store an unreadable value under ``key`` behind ``backend``'s back."""
    if backend_factory.kind.startswith("json"):
        (backend.path / f"{key}.json").write_bytes(b'{"torn": ')
    elif backend_factory.kind == "redis":
        settings = backend_factory.settings
        client = redis.Redis(host=settings["host"], port=settings["port"])
        client.hset(backend.hash_name, key, b'{"torn": ')
        client.close()
    else:
        raise AssertionError(backend_factory.kind)


def test_scan_items_gives_a_damaged_value_as_corrupt(backend_factory):
    if backend_factory.kind == "dict":
        pytest.skip("a third party says what damage is (DictDatabase raises, as get_many does)")
    backend = backend_factory("scan.damaged")
    backend.set_many({f"k{n}": n for n in range(5)})
    damage(backend_factory, backend, "bad")
    merged = scanned(backend, 2)
    assert sorted(merged) == ["bad", "k0", "k1", "k2", "k3", "k4"]
    assert isinstance(merged.pop("bad"), CorruptValue)
    assert merged == {f"k{n}": n for n in range(5)}


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True, "10"])
def test_scan_items_refuses_a_batch_size_that_is_not_one_or_more(backend, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        next(iter(backend.scan_items(batch_size)))


def test_list_domains_finds_the_written_domains_under_a_prefix(backend_factory):
    engine, settings = backend_factory.engine, backend_factory.settings
    if backend_factory.kind == "dict":
        with pytest.raises(ListingUnsupported):
            engine.list_domains("service_a.", **settings)
        return
    written = {"service_a.channel_1.stats", "service_a.channel_2.stats",
               "service_a.channel_2.inventory", "service_a.channel_10.stats",
               "service_a.channel_" + "é" * 100 + ".stats"}  # fmt: skip
    others = {"service_b.channel_1.stats", "service_ab.channel_1.stats", "service_a"}
    for domain in written | others:
        backend_factory(domain).set_value("k", 1)
    emptied = backend_factory("service_a.channel_3.stats")
    emptied.set_many({"k": 1, "j": 2})
    emptied.delete_many(["k", "j"])
    backend_factory("service_a.channel_4.stats").get_value("k")  # built and read, never written

    listed = list(engine.list_domains("service_a.", **settings))
    assert len(listed) == len(set(listed)), "a domain came twice"
    assert set(listed) == written
    assert set(engine.list_domains("service_a.channel_1", **settings)) == {
        "service_a.channel_1.stats", "service_a.channel_10.stats"}  # fmt: skip
    assert set(engine.list_domains("", **settings)) == written | others
    assert set(engine.list_domains(**settings)) == written | others
    assert list(engine.list_domains("service_c.", **settings)) == []
    assert list(engine.list_domains("service_a.channel_2.stats", **settings)) == [
        "service_a.channel_2.stats"]  # fmt: skip


def test_a_backend_that_cannot_list_says_what_to_implement():
    """DictDatabase implements only the four: the listing has no default to fall back on."""
    with pytest.raises(ListingUnsupported) as raised:
        DictDatabase.list_domains("service_a.", store={})
    error = raised.value
    assert isinstance(error, BackendError)
    assert isinstance(error, NotImplementedError)
    assert error.kind == "unsupported"
    message = str(error)
    assert "DictDatabase cannot list its domains" in message
    assert "list_domains(prefix, **settings)" in message
    # Its scan works: the default, from the four.
    store: dict = {}
    backend = DictDatabase("d", store)
    for n in range(7):
        backend.set_value(f"k{n}", n)
    assert scanned(backend, 3) == {f"k{n}": n for n in range(7)}


# -- life cycle ----------------------------------------------------------------


def test_data_outlives_close(backend_factory):
    backend = backend_factory("life")
    backend.set_value("k", [1, 2, 3])
    backend.close()
    assert backend_factory("life").get_value("k") == (True, [1, 2, 3])


def test_check_available(backend):
    assert backend.check_available() is None


# -- the null backend ----------------------------------------------------------


def test_null_backend_stores_nothing_and_answers_none():
    null = NullDatabase(domain="any.thing")
    assert null.get_value("k") == (True, None)
    assert null.set_value("k", {"v": 1}) == (True, "k")
    assert null.get_value("k") == (True, None)
    assert list(null.all_keys()) == []
    assert null.delete_key("k") == (True, "k")
    assert null.delete_key("never") == (True, "never")
    assert null.load_all() == {}
    assert null.get_many(["a", "b"]) == {"a": None, "b": None}
    null.set_many({"a": 1})
    assert list(null.all_keys()) == []
    assert null.delete_many(["a"]) == ["a"]
    assert list(null.scan_items()) == []
    assert list(NullDatabase.list_domains("any")) == []
    assert list(NullDatabase.list_domains()) == []
    null.close()
