"""CachedDict: every mapping operation agrees with the backend, on every backend."""

from __future__ import annotations

import copy
import errno
import random
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from structlog.testing import capture_logs

from chanstore import CachedDict, codec
from chanstore.backends.null import NullDatabase
from chanstore.cache import ABSENT, UNKNOWN, CacheMemory, NullMemory, UnreadableValue
from chanstore.errors import (
    BackendError,
    CorruptValue,
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


# -- the in-memory seam: CacheMemory, fetch and fetch_many ------------------------------


class Hooked(DictDatabase):
    """A backend that runs ``during`` in the middle of a read: another writer's turn."""

    engine_name = "hooked"

    def __init__(self, domain="", store=None):
        super().__init__(domain, store)
        self.during = None
        self.reads: list[object] = []

    def _turn(self, what):
        self.reads.append(what)
        if self.during is not None:
            during, self.during = self.during, None
            during()

    def get_value(self, key):
        answer = super().get_value(key)
        self._turn(key)
        return answer

    def get_many(self, keys):
        keys = list(keys)
        found = {key: codec.decode(self.data[key]) for key in keys if key in self.data}
        self._turn(keys)
        return found

    def all_keys(self):
        keys = list(self.data)
        self._turn("all_keys")
        return keys


@pytest.fixture
def hooked(metrics):
    backend = Hooked("seam")
    backend.set_many({"a": 1, "b": [2]})
    return backend, CachedDict(backend, strict_mode=True, name="seam", metrics=metrics)


def cache_requests(metrics, container, result):
    return metrics.registry.get_sample_value(
        "chanstore_cache_requests_total", {"container": container, "result": result}
    )


def test_peek_answers_from_memory_alone(hooked, metrics):
    backend, box = hooked
    memory = box.memory
    assert isinstance(memory, CacheMemory)
    assert memory.peek("a") is UNKNOWN  # not read yet, and memory is not complete
    assert cache_requests(metrics, "seam", "hit") == 0  # UNKNOWN is not a hit
    backend.set_value("n", {"new": 1})  # the caller's own write...
    memory.stored("n", {"new": 1})  # ... which the backend now holds
    assert memory.peek("n") == {"new": 1}
    assert (memory.complete, len(memory), memory.keys()) == (False, 1, ["n"])
    assert backend.reads == []  # peek never asks the backend
    box.load()
    assert memory.complete
    assert memory.peek("missing") is ABSENT
    assert sorted(memory.keys()) == ["a", "b", "n"]
    assert cache_requests(metrics, "seam", "hit") == 2


def test_stored_deleted_and_unsure_are_what_the_caller_settled(hooked):
    _backend, box = hooked
    memory = box.memory
    box.load()
    writes = memory.writes
    memory.stored("x", 1)
    memory.deleted("a")
    assert (memory.peek("x"), memory.peek("a"), memory.complete) == (1, ABSENT, True)
    memory.unsure("b")
    assert memory.peek("b") is UNKNOWN
    assert not memory.complete  # what the backend holds for "b" is not known
    assert memory.writes == writes + 3
    assert box["b"] == [2]  # asked the backend again


def test_fetch_reads_through_and_counts_a_miss(hooked, metrics):
    backend, box = hooked
    assert box.fetch("a") == 1
    assert box.fetch("a") == 1
    assert box.fetch("missing") is ABSENT
    assert box.fetch("missing") is ABSENT  # an absent key is not cached while incomplete
    assert backend.reads == ["a", "missing", "missing"]
    assert (cache_requests(metrics, "seam", "hit"), cache_requests(metrics, "seam", "miss")) == (
        1,
        3,
    )
    with pytest.raises(InvalidKey):
        box.fetch("")


def test_fetch_does_not_cache_a_read_that_a_write_overtook(hooked):
    backend, box = hooked
    memory = box.memory
    # The read finds 1; meanwhile another writer stores 10 and says so.
    backend.during = lambda: (backend.set_value("a", 10), memory.stored("a", 10))
    assert box.fetch("a") == 1  # what the read found, for this caller
    assert memory.peek("a") == 10  # but memory keeps the newer write
    backend.during = lambda: (backend.delete_key("b"), memory.deleted("b"))
    assert box.fetch("b") == [2]
    assert memory.peek("b") is UNKNOWN
    assert box.fetch("b") is ABSENT


def test_fetch_raises_when_the_backend_fails(metrics):
    class Broken(DictDatabase):
        engine_name = "broken"

        def get_value(self, key):
            raise TimeoutError("slow")

        def get_many(self, keys):
            raise TimeoutError("slow")

    box = CachedDict(Broken("broken"), name="broken", metrics=metrics)
    with pytest.raises(BackendError) as raised:
        box.fetch("k")
    assert raised.value.kind == "timeout"
    with pytest.raises(BackendError):
        box.fetch_many(["k"])


def test_fetch_many_asks_once_for_what_memory_does_not_know(hooked, metrics):
    backend, box = hooked
    box.memory.stored("x", "held")
    assert box.fetch_many(["b", "x", "missing", "a", "b"]) == {"b": [2], "x": "held", "a": 1}
    assert backend.reads == [["b", "missing", "a"]]  # one get_many, each key once
    assert cache_requests(metrics, "seam", "miss") == 3
    assert box.fetch_many(["a", "b"]) == {"a": 1, "b": [2]}  # cached now
    assert len(backend.reads) == 1
    assert box.fetch_many([]) == {}
    with pytest.raises(InvalidKey):
        box.fetch_many(["ok", "bad\x00"])


def test_fetch_many_does_not_cache_what_a_write_overtook(hooked):
    backend, box = hooked
    memory = box.memory
    backend.during = lambda: (backend.set_value("a", 10), memory.stored("a", 10))
    assert box.fetch_many(["a", "b"]) == {"a": 1, "b": [2]}
    assert memory.peek("a") == 10
    assert memory.peek("b") is UNKNOWN


def damage(backend_factory, backend, key):
    """Store ``key``, then tear its stored value behind the backend's back."""
    backend.set_value(key, {"hp": 10})
    if backend_factory.kind == "dict":
        backend.data[key] = '{"hp": 1'
    elif backend_factory.kind == "redis":
        backend.client.hset(backend.hash_name, key, b'{"hp": 1')
    else:
        (backend.path / f"{key}.json").write_text('{"hp": 1')  # a torn write


def test_fetch_many_reports_a_value_that_cannot_be_read_per_key(backend_factory, metrics):
    backend = backend_factory("corrupt.many")
    backend.set_value("good", 1)
    damage(backend_factory, backend, "bad")
    box = CachedDict(backend, name="corrupt", metrics=metrics)
    if backend_factory.kind == "dict":
        # A third-party get_value that lets decoding raise: a failure of kind
        # "internal", which fails the read (never an absent key).
        with pytest.raises(BackendError) as raised:
            box.fetch_many(["good", "bad"])
        assert raised.value.kind == "internal"
        return
    found = box.fetch_many(["good", "bad", "missing"])
    assert found["good"] == 1
    assert isinstance(found["bad"], UnreadableValue)  # it used to fail the whole call
    assert found["bad"].key == "bad"
    assert set(found) == {"good", "bad"}
    assert box.fetch_many(["good"]) == {"good": 1}
    with pytest.raises(CorruptValue):
        box.fetch("bad")


def test_a_write_during_a_load_is_not_undone_by_it(hooked):
    backend, box = hooked
    memory = box.memory

    def meanwhile():
        backend.set_value("a", "new")
        memory.stored("a", "new")
        backend.set_value("c", 3)
        memory.stored("c", 3)
        backend.delete_key("b")
        memory.deleted("b")

    original = backend.load_all
    backend.load_all = lambda: (original(), meanwhile())[0]  # read first, then the writes
    box.load()
    assert memory.complete
    assert held(box) == {"a": "new", "c": 3}
    assert_agrees(box, lambda _domain: Hooked("seam", {"seam": backend.data}))


def test_an_unsure_write_during_a_load_leaves_memory_incomplete(hooked):
    backend, box = hooked
    original = backend.load_all
    backend.load_all = lambda: (original(), box.memory.unsure("a"))[0]
    box.load()
    assert not box.memory.complete
    assert box.memory.peek("a") is UNKNOWN
    assert box.memory.peek("b") == [2]


def test_a_write_during_a_clear_is_left_to_the_backend(hooked):
    backend, box = hooked
    box.load()
    memory = box.memory
    # Between listing the keys and deleting them, another writer stores "c".
    backend.during = lambda: (backend.set_value("c", 3), memory.stored("c", 3))
    box.clear()
    assert memory.peek("c") is UNKNOWN  # the clear may or may not have deleted it
    assert not memory.complete
    assert box.get("c") == backend.load_all().get("c")  # so reads ask the backend


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


# -- a stored value that cannot be decoded ---------------------------------------------


@pytest.fixture
def damaged(backend_factory, metrics):
    """A CachedDict over a backend holding ``good`` and a torn ``bad`` (json and redis:
    the backends that say a value is corrupt; a third party's may not know)."""
    if backend_factory.kind == "dict":
        pytest.skip("DictDatabase cannot tell a torn value from a failure")
    backend = backend_factory(DOMAIN)
    backend.set_value("good", 1)
    damage(backend_factory, backend, "bad")
    return backend_factory, CachedDict(backend, name="box", metrics=metrics)


def integrity_problems(metrics, container="box"):
    return metrics.registry.get_sample_value(
        "chanstore_integrity_problems_total", {"container": container, "kind": "corrupt_value"}
    )


def cache_entries(metrics, container):
    return metrics.registry.get_sample_value("chanstore_cache_entries", {"container": container})


@pytest.mark.parametrize("load", [False, True], ids=["partial", "loaded"])
def test_a_value_that_cannot_be_decoded_is_never_passed_off_as_absent(damaged, metrics, load):
    factory, box = damaged
    with capture_logs() as events:
        if load:
            box.load()  # it used to skip "bad" and still call the cache complete
            assert box.loaded
        for _ in range(3):
            with pytest.raises(CorruptValue) as raised:  # it used to be a KeyError
                box["bad"]
            with pytest.raises(CorruptValue):
                box.get("bad")  # not None
            assert "bad" in box
        assert sorted(box) == ["bad", "good"]
        assert sorted(box.keys()) == ["bad", "good"]
        assert len(box) == 2
        assert box["good"] == 1
    # The error names container and key, never where the value is stored.
    message = str(raised.value)
    assert "'bad'" in message and "'box'" in message
    assert "json" not in message and "chanstore:" not in message and "/" not in message
    assert isinstance(raised.value, UnreadableValue) and raised.value.kind == "corrupt"
    # Logged at error and counted once, when found, with the backend's detail.
    found = [e for e in events if e["event"] == "integrity_problem"]
    assert len(found) == 1, found
    assert (found[0]["log_level"], found[0]["kind"], found[0]["key"]) == (
        "error", "corrupt_value", "bad",
    )  # fmt: skip
    assert ("bad.json" if factory.kind.startswith("json") else "'bad'") in found[0]["error"]
    assert integrity_problems(metrics) == 1
    # Reading every value reads the damaged one too: an error, not a shorter dict.
    with pytest.raises(CorruptValue):
        dict(box.items())
    with pytest.raises(CorruptValue):
        list(box.values())
    with pytest.raises(CorruptValue):
        box.copy()
    with pytest.raises(CorruptValue):
        box.pop("bad")
    with pytest.raises(CorruptValue):
        box.setdefault("bad", "default")  # never overwrites damaged data on the quiet
    assert "bad" in stored(factory)
    assert integrity_problems(metrics) == 1


def test_a_damaged_key_can_be_deleted_or_overwritten(damaged, metrics):
    factory, box = damaged
    box.load()
    assert cache_entries(metrics, "box") == 2  # held, as its marker
    del box["bad"]  # it used to raise KeyError and leave the stored value
    assert "bad" not in box
    assert "bad" not in stored(factory)
    with pytest.raises(KeyError):
        box["bad"]
    damage(factory, box.database, "bad")
    box.forget()
    with pytest.raises(CorruptValue):
        box["bad"]
    box["bad"] = {"hp": 5}  # a new value over it works too
    assert box["bad"] == {"hp": 5}
    assert stored(factory) == {"good": 1, "bad": {"hp": 5}}
    assert dict(box.items()) == {"good": 1, "bad": {"hp": 5}}
    assert integrity_problems(metrics) == 2  # found again after the cache was dropped


def test_memory_holds_the_marker_and_never_raises_it_itself(damaged):
    _factory, box = damaged
    box.load()
    marker = box.memory.peek("bad")
    assert isinstance(marker, UnreadableValue)
    raised = []
    for _ in range(3):
        with pytest.raises(UnreadableValue) as error:
            box["bad"]
        raised.append(error.value)
    # Each read raises a fresh error: one kept in memory would gather tracebacks and
    # keep their frames alive for as long as the channel stays in memory.
    assert marker not in raised and len({id(e) for e in raised}) == 3
    assert marker.__traceback__ is None
    assert box.memory.peek("bad") is marker


def test_a_strict_write_that_timed_out_leaves_its_key_unknown(metrics):
    class Stalling(DictDatabase):
        engine_name = "stalling"
        stalling = False

        def set_value(self, key, value):
            if self.stalling:
                super().set_value(key, value)  # it lands, and the answer is lost
                raise TimeoutError("no answer")
            return super().set_value(key, value)

    backend = Stalling("stall")
    box = CachedDict(backend, strict_mode=True, name="stall", metrics=metrics)
    box["k"] = "old"
    box.load()
    backend.stalling = True
    with pytest.raises(WriteRefused) as raised:
        box["k"] = "new"
    assert raised.value.kind == "timeout"
    assert box.memory.peek("k") is UNKNOWN
    backend.stalling = False
    assert box["k"] == "new"


# -- hit and miss counts: plain numbers, folded at collection ---------------------------


def test_hits_are_plain_counts_shared_by_a_containers_dicts(metrics):
    first = CachedDict(DictDatabase("one"), name="shared", metrics=metrics)
    second = CachedDict(DictDatabase("two"), name="shared", metrics=metrics)
    assert first.memory._counts is second.memory._counts is metrics.cache_counts("shared")
    first["k"] = second["k"] = 1
    for box in (first, second, first):
        assert box["k"] == 1
    counts = metrics.cache_counts("shared")
    assert (counts.hits, counts.misses) == (3, 0)
    assert cache_requests(metrics, "shared", "hit") == 3  # collecting folds them in
    assert cache_requests(metrics, "shared", "hit") == 3  # once
    metrics.fold()
    assert cache_requests(metrics, "shared", "hit") == 3


def test_the_exposition_is_that_of_a_plain_counter(metrics):
    """Same name, help, type, labels and values as before the counts were folded."""
    box = CachedDict(DictDatabase("expo"), name="expo", metrics=metrics)
    box["k"] = 1
    assert box["k"] == 1
    assert box.get("missing") is None
    reference = CollectorRegistry()
    counter = Counter(
        "chanstore_cache_requests_total",
        "Key lookups in a CachedDict: hit when answered from memory, miss when "
        "the backend was asked.",
        ["container", "result"],
        registry=reference,
    )
    counter.labels("expo", "hit").inc()
    counter.labels("expo", "miss").inc()

    def family(registry):
        text = generate_latest(registry).decode()
        return [
            line
            for line in text.splitlines()
            if "chanstore_cache_requests" in line and "_created{" not in line
        ]

    assert family(metrics.registry) == family(reference)
    assert 'chanstore_cache_requests_total{container="expo",result="hit"} 1.0' in family(
        metrics.registry
    )
    names = [f.name for f in metrics.registry.collect()]
    assert names.count("chanstore_cache_requests") == 1
