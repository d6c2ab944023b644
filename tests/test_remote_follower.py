"""The follower of the chanstore backend's change feed: changes put in their place among its
own writes (the end-to-end tests, against real daemons, are in
tests/daemon/test_daemon_as_backend.py; these replay orders a live daemon rarely shows)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from chanstore import codec
from chanstore.backends import remote_follower
from chanstore.backends.remote_follower import Follower
from chanstore.cache import ABSENT, UNKNOWN, CacheMemory
from chanstore.codec import Document


class Backend:
    """What a follower reads of its backend: whether values are revived."""

    revive_values = True


@pytest.fixture
def backend() -> Backend:
    return Backend()


@pytest.fixture
def memory(metrics) -> CacheMemory:
    held = CacheMemory(metrics.cache_counts("stats"), metrics.cache_entries.labels("stats"))
    held._reset(complete=True)  # a loaded, empty container
    return held


@pytest.fixture
def follower(memory, backend) -> Follower:
    return Follower(memory, "stats", backend)


def set_event(follower: Follower, key: str, document: object, etag: str) -> None:
    follower.change("set", key, document, etag)


def test_another_clients_changes_are_heard(follower, memory):
    set_event(follower, "hp", {"_moobius_type": "builtins.set", "_moobius_val": [1]}, "e1")
    assert memory.peek("hp") == {1}
    follower.change("delete", "hp", None, None)
    assert memory.peek("hp") is ABSENT


def test_the_echo_of_an_own_write_changes_nothing(follower, memory):
    """The object a caller changes in place is never swapped for a copy of itself."""
    mine = {"hp": 10}
    writes = follower.begin(["bar"], delete=False)
    writes.acked("bar", mine, "e-mine")
    memory.stored("bar", mine)  # the owner's own note comes after
    set_event(follower, "bar", {"hp": 10}, "e-mine")  # the echo
    assert memory.peek("bar") is mine


def test_changes_before_the_echo_are_older_and_those_after_it_are_kept(follower, memory):
    mine = {"hp": 10}
    writes = follower.begin(["bar"], delete=False)
    # Heard while the write is in flight: acknowledged before it (older), its echo, then
    # a newer change, all before the owner has even heard back from the daemon.
    set_event(follower, "bar", {"hp": 1}, "e-older")
    set_event(follower, "bar", {"hp": 10}, "e-mine")
    set_event(follower, "bar", {"hp": 99}, "e-newer")
    assert memory.peek("bar") is ABSENT  # nothing decided before the acknowledgement
    writes.acked("bar", mine, "e-mine")
    memory.stored("bar", mine)  # late: it must not undo the newer change
    assert memory.peek("bar") == {"hp": 99}


def test_a_change_after_the_acknowledgement_waits_for_the_echo(follower, memory):
    mine = [1]
    writes = follower.begin(["k"], delete=False)
    writes.acked("k", mine, "e-mine")
    memory.stored("k", mine)
    set_event(follower, "k", [0], "e-older")  # older: its event came before our echo
    assert memory.peek("k") is mine
    set_event(follower, "k", [1], "e-mine")
    set_event(follower, "k", [2], "e-newer")
    assert memory.peek("k") == [2]


def test_a_failed_write_lets_the_changes_held_meanwhile_through(follower, memory):
    writes = follower.begin(["k"], delete=False)
    set_event(follower, "k", "theirs", "e1")
    assert memory.peek("k") is ABSENT
    writes.withdrawn()
    assert memory.peek("k") == "theirs"
    set_event(follower, "k", "later", "e2")  # nothing waits any more
    assert memory.peek("k") == "later"


def test_deleting_an_absent_key_expects_no_echo(follower, memory):
    writes = follower.begin(["k"], delete=True)
    set_event(follower, "k", "created meanwhile", "e1")
    writes.acked("k", ABSENT, None, echo=False)
    memory.deleted("k")  # the owner's note: absorbed
    assert memory.peek("k") == "created meanwhile"


def test_a_delete_waits_for_its_own_delete_event(follower, memory):
    memory.stored("k", 1)
    writes = follower.begin(["k"], delete=True)
    writes.acked("k", ABSENT, None)
    memory.deleted("k")
    set_event(follower, "k", 0, "e-older")
    assert memory.peek("k") is ABSENT
    follower.change("delete", "k", None, None)
    set_event(follower, "k", 5, "e-newer")
    assert memory.peek("k") == 5


def test_a_drop_while_a_write_is_under_way_leaves_its_key_unknown(follower, memory):
    mine = {"x": 1}
    writes = follower.begin(["k"], delete=False)
    follower.drop("a new stream")
    writes.acked("k", mine, "e-mine")
    memory.stored("k", mine)
    assert memory.peek("k") is UNKNOWN  # what else changed meanwhile is not known
    set_event(follower, "k", {"x": 2}, "e2")  # memory is partial and does not hold k
    assert memory.peek("k") is UNKNOWN


def test_bulk_writes_with_a_key_twice_wait_for_one_echo(follower, memory):
    writes = follower.begin(["a", "b", "a"], delete=True)
    for key in ("a", "b"):
        writes.acked(key, ABSENT, None)
    follower.change("delete", "a", None, None)
    follower.change("delete", "b", None, None)
    set_event(follower, "a", "new", "e")
    assert memory.peek("a") == "new"


def test_a_change_that_cannot_be_revived_forgets_the_key(follower, memory):
    @dataclass
    class Exact:
        n: int

    codec.register_type(Exact, name="tests.Exact")
    try:
        memory.stored("k", 1)
        set_event(follower, "k", {"_moobius_type": "tests.Exact", "_moobius_val": {}}, "e")
    finally:
        codec.unregister_type(Exact)
    assert memory.peek("k") is UNKNOWN
    assert not memory.complete


def test_without_reviving_a_change_is_heard_as_its_document(follower, memory, backend):
    backend.revive_values = False
    document = {"_moobius_type": "builtins.tuple", "_moobius_val": [1, 2]}
    set_event(follower, "k", document, "e")
    held = memory.peek("k")
    assert held == Document(document)
    assert held.doc is not document  # each memory has its own copy


def test_an_echo_never_heard_is_given_up_and_its_key_forgotten(follower, memory, monkeypatch):
    """It should not happen (every acknowledged write has its event); if it did, the key's
    later changes would wait for ever."""
    monkeypatch.setattr(remote_follower, "ECHO_WAIT", 0.0)
    mine = [1]
    writes = follower.begin(["k"], delete=False)
    writes.acked("k", mine, "e-mine")
    memory.stored("k", mine)
    set_event(follower, "k", [2], "e-other")  # and no echo ever
    assert memory.peek("k") is UNKNOWN
    set_event(follower, "k", [3], "e-later")  # nothing waits any more
    assert memory.peek("k") is UNKNOWN  # partial now, and it does not hold "k"
