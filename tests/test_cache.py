"""CachedDict: every mapping operation agrees with the backend, on every backend.

What it holds in memory (the CacheMemory seam, races with writes, damaged
values, hit counts) is tested in test_cache_memory.py.
"""

from __future__ import annotations

import copy
import errno
import random
import threading

import pytest
from structlog.testing import capture_logs

from chanstore import CachedDict
from chanstore.backends.null import NullDatabase
from chanstore.cache import NullMemory
from chanstore.errors import (
    BackendError,
    InvalidKey,
    UnstorableValue,
    WriteRefused,
)
from support import DictDatabase, Point

DOMAIN = "cache.test"


@pytest.fixture
def seeded(backend_factory):
    """Three keys stored behind the back of any cache, and the factory to open more."""
    backend_factory(DOMAIN).set_many({"a": 1, "b": [2], "c": None})
    return backend_factory


def cached(factory, metrics, *, load=False, strict=False, name="box"):
    box = CachedDict(factory(DOMAIN), strict, name=name, metrics=metrics)
    if load:
        box.load()
    return box


def stored(factory):
    """What the backend holds, read by an instance that shares no memory with the cache."""
    return factory(DOMAIN).load_all()


def assert_agrees(box, factory):
    assert dict(box.items()) == stored(factory)


def cache_entries(metrics, container):
    return metrics.registry.get_sample_value("chanstore_cache_entries", {"container": container})


def held(box):
    """What the cache holds in memory (read through its public seam)."""
    held_keys = box.memory.keys()  # a list: CacheMemory is not a mapping
    return {key: box.memory.peek(key) for key in held_keys}


# -- reading -------------------------------------------------------------------


def test_reads_see_keys_that_were_never_loaded(seeded, metrics):
    box = cached(seeded, metrics)
    assert not box.loaded
    assert box["a"] == 1
    assert box.get("b") == [2]
    assert box.get("c", "default") is None
    assert "c" in box
    assert box.get("missing") is None
    assert box.get("missing", 5) == 5
    assert "missing" not in box
    with pytest.raises(KeyError):
        box["missing"]
    assert len(box) == 3
    assert sorted(box) == ["a", "b", "c"]
    assert sorted(box.keys()) == ["a", "b", "c"]
    assert dict(box.items()) == {"a": 1, "b": [2], "c": None}
    assert sorted(map(repr, box.values())) == sorted(map(repr, [1, [2], None]))
    assert box == {"a": 1, "b": [2], "c": None}


def test_len_and_iteration_of_a_partly_cached_dict(seeded, metrics):
    box = cached(seeded, metrics)
    box["d"] = 4  # cached, and stored
    assert box["a"] == 1  # cached by a read
    assert len(box) == 4
    assert sorted(box) == ["a", "b", "c", "d"]


def test_invalid_keys_read_as_absent(seeded, metrics):
    box = cached(seeded, metrics)
    for key in ["", "a\x00", "x" * 1025, 1, None]:
        assert key not in box
        assert box.get(key) is None
        with pytest.raises(KeyError):
            box[key]


def test_load_reads_the_whole_domain(seeded, metrics):
    box = cached(seeded, metrics, load=True)
    assert box.loaded
    assert held(box) == {"a": 1, "b": [2], "c": None}
    assert "missing" not in box


def test_a_loaded_dict_answers_from_memory(seeded, metrics):
    box = cached(seeded, metrics, load=True)
    backend = box.database

    def calls(operation):
        return metrics.registry.get_sample_value(
            "chanstore_backend_operation_duration_seconds_count",
            {"backend": type(backend).engine_name, "container": "box", "operation": operation},
        )

    before = {op: calls(op) for op in ("get", "all_keys", "load_all")}
    assert box["a"] == 1
    assert "missing" not in box
    assert box.get("missing") is None
    assert len(box) == 3
    assert sorted(box) == ["a", "b", "c"]
    assert dict(box.items()) == {"a": 1, "b": [2], "c": None}
    assert {op: calls(op) for op in before} == before


# -- writing -------------------------------------------------------------------


def test_set_and_overwrite(seeded, metrics):
    box = cached(seeded, metrics)
    box["a"] = {"new": True}
    box["z"] = Point(1, 2)
    assert box["a"] == {"new": True}
    assert box["z"] == Point(1, 2)
    assert stored(seeded) == {"a": {"new": True}, "b": [2], "c": None, "z": Point(1, 2)}
    assert_agrees(box, seeded)


def test_update_and_ior(seeded, metrics):
    box = cached(seeded, metrics)
    box.update({"a": 10, "n1": 1}, n2=2)
    box.update([("n3", 3)])
    box |= {"b": "replaced", "n4": (4,)}
    assert stored(seeded) == {
        "a": 10, "b": "replaced", "c": None, "n1": 1, "n2": 2, "n3": 3, "n4": (4,),
    }  # fmt: skip
    assert_agrees(box, seeded)
    box.update({})
    assert_agrees(box, seeded)


def test_or_gives_a_plain_dict_and_changes_nothing(seeded, metrics):
    box = cached(seeded, metrics)
    merged = box | {"a": "other", "x": 1}
    assert type(merged) is dict
    assert merged == {"a": "other", "b": [2], "c": None, "x": 1}
    assert stored(seeded) == {"a": 1, "b": [2], "c": None}


def test_setdefault_returns_a_stored_value_never_loaded(seeded, metrics):
    box = cached(seeded, metrics)
    assert box.setdefault("a", "default") == 1
    assert box.setdefault("c", "default") is None
    assert box.setdefault("new", [0]) == [0]
    assert stored(seeded) == {"a": 1, "b": [2], "c": None, "new": [0]}
    assert_agrees(box, seeded)


def test_pop(seeded, metrics):
    box = cached(seeded, metrics)
    assert box.pop("b") == [2]  # never loaded
    assert box.pop("b", "gone") == "gone"
    assert box.pop("missing", None) is None
    with pytest.raises(KeyError):
        box.pop("missing")
    assert stored(seeded) == {"a": 1, "c": None}
    assert_agrees(box, seeded)


def test_popitem_takes_keys_that_were_never_loaded(seeded, metrics):
    box = cached(seeded, metrics)
    seen = {}
    for _ in range(3):
        key, value = box.popitem()
        seen[key] = value
        assert key not in stored(seeded)
    assert seen == {"a": 1, "b": [2], "c": None}
    with pytest.raises(KeyError):
        box.popitem()
    assert stored(seeded) == {}
    assert len(box) == 0


def test_del(seeded, metrics):
    box = cached(seeded, metrics)
    del box["a"]  # never loaded
    box["x"] = 1
    del box["x"]
    with pytest.raises(KeyError):
        del box["missing"]
    with pytest.raises(KeyError):
        del box["a"]
    assert stored(seeded) == {"b": [2], "c": None}
    assert_agrees(box, seeded)
    box.load()
    with pytest.raises(KeyError):
        del box["missing"]
    assert_agrees(box, seeded)


def test_clear_deletes_keys_that_were_never_loaded(seeded, metrics):
    box = cached(seeded, metrics)
    box["cached"] = 1
    box.clear()
    assert stored(seeded) == {}
    assert len(box) == 0
    assert "a" not in box
    assert list(box) == []


@pytest.mark.parametrize("strict", [False, True])
def test_invalid_writes_raise_and_change_nothing(seeded, metrics, strict):
    box = cached(seeded, metrics, strict=strict)
    with pytest.raises(InvalidKey):
        box[""] = 1
    with pytest.raises(InvalidKey):
        box["x" * 1025] = 1
    with pytest.raises(InvalidKey):
        box.update({"ok": 1, "bad\x00": 2})
    with pytest.raises(UnstorableValue):
        box["a"] = object()
    with pytest.raises(UnstorableValue), box.editing("b") as value:
        value.append(object())
    with pytest.raises(UnstorableValue), box.editing("b") as value:
        value.append(value)  # a caller's mistake, never "kept in memory only"
    assert stored(seeded) == {"a": 1, "b": [2], "c": None}
    assert_agrees(box, seeded)
    # A bulk write may have stored some items before the bad one (the base
    # class's default set_many does); the cache holds exactly what was stored.
    with pytest.raises(UnstorableValue):
        box.update({"b": 5, "d": {1: "int key"}})
    assert "d" not in stored(seeded)
    assert_agrees(box, seeded)


# -- in-place changes --------------------------------------------------------------


def test_save_persists_an_in_place_change(backend_factory, metrics):
    box = cached(backend_factory, metrics)
    box["p"] = {"hp": 10, "log": []}
    box["p"]["hp"] -= 1
    box["p"]["log"].append("hit")
    assert stored(backend_factory) == {"p": {"hp": 10, "log": []}}
    box.save("p")
    assert stored(backend_factory) == {"p": {"hp": 9, "log": ["hit"]}}
    with pytest.raises(KeyError):
        box.save("missing")


def test_editing_saves_when_the_block_ends(backend_factory, metrics):
    box = cached(backend_factory, metrics)
    box["p"] = {"hp": 10}
    with box.editing("p") as player:
        player["hp"] = 5
        assert stored(backend_factory) == {"p": {"hp": 10}}
    assert stored(backend_factory) == {"p": {"hp": 5}}
    with box.editing("new", default={"n": 0}) as new:
        new["n"] += 1
    assert stored(backend_factory) == {"p": {"hp": 5}, "new": {"n": 1}}
    with pytest.raises(KeyError), box.editing("missing"):
        pass
    assert_agrees(box, backend_factory)


def test_editing_abandoned_by_an_exception_saves_nothing(backend_factory, metrics):
    box = cached(backend_factory, metrics)
    box["p"] = {"hp": 10}
    with pytest.raises(RuntimeError, match="boom"), box.editing("p") as player:
        player["hp"] = 0
        raise RuntimeError("boom")
    assert stored(backend_factory) == {"p": {"hp": 10}}
    # The cache must not keep the half-made change that the backend never got.
    assert box["p"] == {"hp": 10}
    assert_agrees(box, backend_factory)


# -- forget, close, repr -------------------------------------------------------------


def test_forget_drops_memory_not_data(seeded, metrics):
    box = cached(seeded, metrics, load=True)
    box.forget()
    assert not box.loaded
    assert held(box) == {}
    assert box["a"] == 1


def test_close_keeps_the_data(seeded, metrics):
    box = cached(seeded, metrics, load=True)
    box["d"] = 4
    box.close()
    assert cached(seeded, metrics, load=True) == {"a": 1, "b": [2], "c": None, "d": 4}


def test_repr_names_the_container(seeded, metrics):
    box = cached(seeded, metrics, name="stats")
    assert "stats" in repr(box)
    assert "partial" in repr(box)
    box.load()
    assert "loaded" in repr(box)


def test_without_a_database_it_is_null_and_keeps_nothing(metrics):
    """The null backend stores nothing, so its memory keeps nothing: every key reads None."""
    box = CachedDict(metrics=metrics)
    assert isinstance(box.database, NullDatabase)
    assert isinstance(box.memory, NullMemory)
    box["x"] = {"v": 1}  # acknowledged...
    assert box["x"] is None  # ... and forgotten (it used to read back from memory)
    assert box.get("never") is None  # null answers every key with None, as in the original
    assert "never" in box  # no key is absent: "in" agrees with [] and get
    assert (len(box), list(box), box.copy()) == (0, [], {})
    box.load()  # complete, and still nothing held
    assert box["zz"] is None  # a loaded null container used to raise KeyError here
    del box["x"]  # acknowledged like any write
    box.update({"a": 1})
    assert (box.memory.keys(), len(box.memory), dict(box.items())) == ([], 0, {})
    assert cache_entries(metrics, "unnamed") == 0


# -- refused writes ------------------------------------------------------------


class RefusingDatabase(DictDatabase):
    """A backend that, once ``refusing`` is set, refuses every write."""

    engine_name = "refusing"
    refusing = False

    def set_value(self, key, value):
        if self.refusing:
            return False, "quota exceeded"
        return super().set_value(key, value)

    def delete_key(self, key):
        if self.refusing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().delete_key(key)


@pytest.fixture
def refusing(metrics):
    store: dict[str, dict[str, str]] = {}
    backend = RefusingDatabase("refuse.test", store)
    backend.set_many({"a": 1, "b": {"n": 2}})
    backend.refusing = True
    return backend, store


def test_strict_mode_raises_and_changes_nothing(refusing, metrics):
    backend, store = refusing
    box = CachedDict(backend, strict_mode=True, name="strict", metrics=metrics)
    box.load()
    before = dict(box.items())
    attempts = {
        "set new": lambda: box.__setitem__("new", 1),
        "overwrite": lambda: box.__setitem__("a", 2),
        "del": lambda: box.__delitem__("a"),
        "pop": lambda: box.pop("a"),
        "popitem": box.popitem,
        "update": lambda: box.update({"a": 5, "c": 6}),
        "ior": lambda: box.__ior__({"c": 7}),
        "setdefault": lambda: box.setdefault("z", 1),
        "clear": box.clear,
        "save": lambda: box.save("a"),
    }
    for what, attempt in attempts.items():
        with pytest.raises(WriteRefused) as raised:
            attempt()
        assert "strict" in str(raised.value), what
        assert held(box) == before, what
        assert dict(box.items()) == before, what
        assert RefusingDatabase("refuse.test", store).load_all() == before, what
    assert raised.value.kind == "refused"  # the last attempt, save, is a refused set
    with pytest.raises(WriteRefused) as raised:
        del box["b"]
    assert raised.value.kind == "disk_full"
    assert "No space left" in str(raised.value)


def test_strict_editing_refused_at_the_end_leaves_the_cache_as_stored(refusing, metrics):
    backend, _store = refusing
    box = CachedDict(backend, strict_mode=True, name="strict", metrics=metrics)
    with pytest.raises(WriteRefused), box.editing("b") as value:
        value["n"] = 99
    assert box["b"] == {"n": 2}


def test_non_strict_mode_logs_counts_and_keeps_the_change_in_memory(refusing, metrics):
    backend, store = refusing
    box = CachedDict(backend, strict_mode=False, name="lenient", metrics=metrics)
    with capture_logs() as events:
        box["new"] = "only in memory"
    assert box["new"] == "only in memory"
    assert RefusingDatabase("refuse.test", store).load_all() == {"a": 1, "b": {"n": 2}}
    kept = [e for e in events if e["event"] == "write_kept_in_memory_only"]
    assert len(kept) == 1
    assert kept[0]["log_level"] == "error"
    assert kept[0]["key"] == "new"
    assert kept[0]["operation"] == "set"
    assert "quota exceeded" in kept[0]["error"]
    failed = [e for e in events if e["event"] == "backend_operation_failed"]
    assert [(e["operation"], e["key"], e["error_kind"]) for e in failed] == [
        ("set", "new", "refused")
    ]

    def errors(operation, error):
        return metrics.registry.get_sample_value(
            "chanstore_backend_operation_errors_total",
            {"backend": "refusing", "container": "lenient", "operation": operation,
             "error": error},
        )  # fmt: skip

    assert errors("set", "refused") == 1
    with capture_logs() as events:
        del box["a"]
    assert "a" not in held(box)
    assert errors("delete", "disk_full") == 1
    assert [e["key"] for e in events if e["event"] == "write_kept_in_memory_only"] == ["a"]


def test_a_read_the_backend_fails_is_an_error_not_an_absent_key(metrics):
    class Broken(DictDatabase):
        engine_name = "broken"

        def get_value(self, key):
            raise ConnectionResetError("peer went away")

    box = CachedDict(Broken("broken.test"), name="broken", metrics=metrics)
    for read in (lambda: box["k"], lambda: box.get("k"), lambda: "k" in box):
        with pytest.raises(BackendError, match="peer went away") as raised:
            read()
        assert raised.value.kind == "unavailable"


# -- metrics -------------------------------------------------------------------


def test_metrics(seeded, metrics):
    box = cached(seeded, metrics, name="counted")
    engine = type(box.database).engine_name

    def value(name, **labels):
        return metrics.registry.get_sample_value(name, labels) or 0.0

    def requests(result):
        return value("chanstore_cache_requests_total", container="counted", result=result)

    def operations(operation):
        return value(
            "chanstore_backend_operation_duration_seconds_count",
            backend=engine, container="counted", operation=operation,
        )  # fmt: skip

    def entries():
        return value("chanstore_cache_entries", container="counted")

    assert box["a"] == 1
    assert (requests("miss"), requests("hit"), operations("get")) == (1, 0, 1)
    assert box["a"] == 1
    assert "a" in box
    assert (requests("miss"), requests("hit"), operations("get")) == (1, 2, 1)
    assert box.get("missing") is None
    assert (requests("miss"), operations("get")) == (2, 2)
    assert entries() == 1
    box.load()
    assert operations("load_all") == 1
    assert entries() == 3
    assert box.get("missing") is None  # a complete cache answers without the backend
    assert (requests("miss"), requests("hit"), operations("get")) == (2, 3, 2)
    box["d"] = 4
    assert (entries(), operations("set")) == (4, 1)
    del box["a"]
    assert (entries(), operations("delete")) == (3, 1)
    box.update({"e": 5, "f": 6})
    assert (entries(), operations("set_many")) == (5, 1)
    box.clear()
    assert entries() == 0
    box["g"] = 7
    box.forget()
    assert entries() == 0
    # Nothing here failed: an absent key is an answer, not an error.
    errors = [
        sample
        for family in metrics.registry.collect()
        if family.name == "chanstore_backend_operation_errors"
        for sample in family.samples
    ]
    assert errors == []


def test_entries_gauge_sums_the_containers_of_one_name(backend_factory, metrics):
    first = CachedDict(backend_factory("one.box"), name="shared", metrics=metrics)
    second = CachedDict(backend_factory("two.box"), name="shared", metrics=metrics)
    first.update({"a": 1, "b": 2})
    second["c"] = 3
    assert (
        metrics.registry.get_sample_value("chanstore_cache_entries", {"container": "shared"}) == 3
    )
    first.close()
    assert (
        metrics.registry.get_sample_value("chanstore_cache_entries", {"container": "shared"}) == 1
    )


# -- threads -------------------------------------------------------------------

THREADS = 8
ROUNDS = 40


def test_many_threads_leave_cache_and_backend_agreeing(backend_factory, metrics):
    box = CachedDict(backend_factory(DOMAIN), strict_mode=True, name="threads", metrics=metrics)
    start = threading.Barrier(THREADS, timeout=30)
    failures: list[BaseException] = []

    def work(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            start.wait()
            for i in range(ROUNDS):
                key = f"k{rnd.randrange(6)}"
                op = rnd.randrange(7)
                if op == 0:
                    box[key] = {"by": seed, "i": i}
                elif op == 1:
                    box.pop(key, None)
                elif op == 2:
                    box.setdefault(key, [seed])
                elif op == 3:
                    box.get(key)
                    _ = key in box
                elif op == 4:
                    box.update({key: (seed, i), f"own{seed}": i})
                elif op == 5:
                    len(box)
                    list(box)
                else:
                    with box.editing(f"own{seed}", default=-1):
                        pass
                with box.editing("counter", default={"n": 0}) as counter:
                    counter["n"] += 1
        except BaseException as exc:
            failures.append(exc)
            raise

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert box["counter"] == {"n": THREADS * ROUNDS}
    assert_agrees(box, backend_factory)
    assert metrics.registry.get_sample_value(
        "chanstore_cache_entries", {"container": "threads"}
    ) == len(box)


# -- copies -----------------------------------------------------------------------------


def test_copy_is_a_plain_dict_of_every_item(seeded, metrics):
    box = cached(seeded, metrics)
    box["d"] = 4
    copied = box.copy()
    assert type(copied) is dict
    assert copied == {"a": 1, "b": [2], "c": None, "d": 4}
    assert box.loaded
    copied["e"] = 5
    assert "e" not in box
    # Shallow like dict.copy: the values are the cached objects (save() stores a change).
    assert copied["b"] is box["b"]


def test_the_copy_module_and_or_give_plain_dicts_too(seeded, metrics):
    """copy.copy used to alias the same memory and lock; deepcopy could not pickle the lock."""
    box = cached(seeded, metrics)
    shallow = copy.copy(box)
    assert type(shallow) is dict and shallow == {"a": 1, "b": [2], "c": None}
    deep = copy.deepcopy(box)
    assert deep == shallow and deep["b"] is not box["b"]
    deep["b"].append(3)
    assert box["b"] == [2]
    merged = {"a": "theirs", "x": 1} | box
    assert type(merged) is dict and merged == {"a": 1, "b": [2], "c": None, "x": 1}
    assert stored(seeded) == {"a": 1, "b": [2], "c": None}
