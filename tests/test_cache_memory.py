"""CachedDict's memory: the CacheMemory seam, reads that race writes, damaged values, counts.

What :mod:`chanstore.cache_memory` holds and how CachedDict fills it: peek
answers from memory alone, fetch and fetch_many read through it, a read that
a write overtook is not cached, a stored value that cannot be decoded is held
as an UnreadableValue (never passed off as absent), and hits and misses are
plain counts folded into the metrics. The mapping operations themselves are
in test_cache.py.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from structlog.testing import capture_logs

from chanstore import CachedDict, codec
from chanstore.cache import ABSENT, UNKNOWN, CacheMemory, UnreadableValue
from chanstore.errors import BackendError, CorruptValue, InvalidKey, WriteRefused
from support import DictDatabase

DOMAIN = "cache.test"


def stored(factory):
    """What the backend holds, read by an instance that shares no memory with the cache."""
    return factory(DOMAIN).load_all()


def held(box):
    """What the cache holds in memory (read through its public seam)."""
    held_keys = box.memory.keys()  # a list: CacheMemory is not a mapping
    return {key: box.memory.peek(key) for key in held_keys}


def assert_agrees(box, factory):
    assert dict(box.items()) == stored(factory)


def cache_entries(metrics, container):
    return metrics.registry.get_sample_value("chanstore_cache_entries", {"container": container})


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


# -- what a follower of the backend tells memory: heard, drop, written --------------------


def test_heard_puts_a_change_memory_holds_the_key_of_and_pops_a_delete(hooked):
    backend, box = hooked
    memory = box.memory
    assert box["a"] == 1  # held now; "b" is not
    writes = memory.writes
    memory.heard("a", 10)
    memory.heard("b", [20])  # partial memory, "b" not held: it stays unknown
    assert (memory.peek("a"), memory.peek("b")) == (10, UNKNOWN)
    memory.heard("a", ABSENT)
    assert memory.peek("a") is UNKNOWN  # deleted: a partial memory just forgets it
    assert memory.writes == writes + 3
    assert backend.reads == ["a"]


def test_heard_on_a_complete_memory_keeps_it_complete(hooked):
    _backend, box = hooked
    memory = box.memory
    box.load()
    memory.heard("new", {"x": 1})
    memory.heard("a", ABSENT)
    memory.heard("b", "changed")
    assert memory.complete
    assert held(box) == {"new": {"x": 1}, "b": "changed"}
    assert memory.peek("a") is ABSENT


def test_heard_during_a_read_keeps_the_read_from_being_cached(hooked):
    backend, box = hooked
    memory = box.memory
    # The read finds 1; meanwhile another client stores 10, and a follower hears it.
    backend.during = lambda: (backend.set_value("a", 10), memory.heard("a", 10))
    assert box.fetch("a") == 1
    assert memory.peek("a") is UNKNOWN  # the old answer was not cached
    assert box["a"] == 10


def test_heard_during_a_load_leaves_the_key_unknown_and_memory_incomplete(hooked):
    backend, box = hooked
    memory = box.memory
    original = backend.load_all

    def load_then_hear():
        found = original()
        backend.set_value("a", "new")
        memory.heard("a", "new")  # newer than what the load read, or older: unknown
        return found

    backend.load_all = load_then_hear
    box.load()
    assert not memory.complete
    assert memory.peek("a") is UNKNOWN
    assert memory.peek("b") == [2]
    assert box["a"] == "new"


def test_drop_forgets_everything_and_completeness(hooked):
    backend, box = hooked
    memory = box.memory
    box.load()
    writes = memory.writes
    memory.drop()
    assert (memory.complete, len(memory), memory.writes) == (False, 0, writes + 1)
    backend.set_value("a", "elsewhere")  # a change the follower missed
    assert box["a"] == "elsewhere"


def test_drop_during_a_load_keeps_nothing_the_load_read(hooked):
    backend, box = hooked
    memory = box.memory
    original = backend.load_all
    backend.load_all = lambda: (original(), memory.drop())[0]
    box.load()
    assert (memory.complete, len(memory)) == (False, 0)
    backend.load_all = original
    box.load()  # the next load is trusted again
    assert memory.complete
    assert held(box) == {"a": 1, "b": [2]}


def test_written_holds_the_owners_write_and_its_own_note_changes_nothing_more(hooked):
    _backend, box = hooked
    memory = box.memory
    box.load()
    mine = {"hp": 9}
    memory.written("a", mine)  # the follower orders the acknowledged write first...
    memory.heard("a", {"hp": 8})  # ... then a newer change by another client...
    memory.stored("a", mine)  # ... and the owner's own note of its write comes late
    assert memory.peek("a") == {"hp": 8}
    memory.written("b", ABSENT)
    memory.heard("b", "back")
    memory.deleted("b")
    assert memory.peek("b") == "back"
    # Consumed once: the next note of the same object is a write like any other.
    memory.stored("a", mine)
    assert memory.peek("a") is mine


def test_written_not_certain_forgets_the_key_and_absorbs_the_owners_note(hooked):
    _backend, box = hooked
    memory = box.memory
    box.load()
    mine = [1]
    memory.written("a", mine, certain=False)
    memory.stored("a", mine)
    assert memory.peek("a") is UNKNOWN
    assert not memory.complete


def test_a_drop_forgets_what_a_follower_noted(hooked):
    _backend, box = hooked
    memory = box.memory
    mine = "mine"
    memory.written("a", mine)
    memory.drop()
    memory.stored("a", mine)  # a write noted after the drop is held as usual
    assert memory.peek("a") == "mine"


def test_a_null_memory_keeps_nothing_it_hears(metrics):
    box = CachedDict(name="scratch", metrics=metrics)  # the null backend
    memory = box.memory
    writes = memory.writes
    memory.heard("k", {"x": 1})
    memory.written("k", {"x": 1})
    memory.drop()
    assert (memory.complete, len(memory), memory.peek("k")) == (True, 0, None)
    assert memory.writes == writes + 3
    assert box["k"] is None


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
