"""The redis backend in sentinel mode, against a real primary, replica and three sentinels.

The shared setup (one per module) serves the tests that kill nothing; each
failover test starts a setup of its own, kills its primary with SIGKILL
under a write loop, and prints what it measured (run with ``-s`` to see it;
bench/failover.py prints the same figures).
"""

from __future__ import annotations

import asyncio

import pytest

from chanstore.backends.redisdb import RedisDatabase
from chanstore.errors import BackendUnavailable, PreconditionFailed
from chanstore.versions import Change
from redis_topologies import (
    MASTER_NAME,
    STEADY_DOWN_AFTER_MS,
    Heard,
    SentinelSetup,
    other_link,
    require_redis,
    until,
    until_async,
    write_loop,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory):
    require_redis()
    setup = SentinelSetup(tmp_path_factory.mktemp("sentinel"), down_after_ms=STEADY_DOWN_AFTER_MS)
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def own_sentinel(tmp_path):
    """A setup of its own, for a test that kills its primary."""
    require_redis()
    setup = SentinelSetup(tmp_path / "sentinel")
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


def primary_client(setup: SentinelSetup):
    return setup.server_on(setup.primary_port()).client()  # type: ignore[arg-type]


def test_reads_and_writes_go_to_the_primary_the_sentinels_name(sentinel):
    backend = RedisDatabase(domain="service_s.channel_c.bars", **sentinel.settings())
    other = RedisDatabase(domain="service_s.channel_d.bars", **sentinel.settings())
    try:
        assert backend.client is other.client  # one pool for the settings
        assert backend.set_value("hp", {"now": 10}) == (True, "hp")
        backend.set_many({"a": 1, "b": [2]})
        assert backend.get_value("hp") == (True, {"now": 10})
        assert backend.load_all() == {"hp": {"now": 10}, "a": 1, "b": [2]}
        assert other.load_all() == {}
        assert backend.all_keys() == ["hp", "a", "b"]
        assert backend.delete_key("a") == (True, "a")
        assert backend.get_many(["a", "b"]) == {"b": [2]}
    finally:
        backend.close()
        other.close()


def test_the_names_are_those_of_a_single_server(sentinel):
    backend = RedisDatabase(domain="service_s.channel_c.names", **sentinel.settings())
    try:
        backend.set_value("k", 1)
        client = primary_client(sentinel)
        assert client.hget("chanstore:service_s.channel_c.names", "k") == b"1"
        assert client.xlen("chanstore:-events:service_s.channel_c.names") == 1
        # Data written under those names (an earlier release, a standalone server) loads.
        client.hset("chanstore:service_s.channel_c.names", "old", b'{"x":1}')
        assert backend.get_value("old") == (True, {"x": 1})
        client.close()
    finally:
        backend.close()


def test_conditional_writes_hold(sentinel):
    backend = RedisDatabase(domain="service_s.channel_c.cond", **sentinel.settings())
    try:
        backend.set_value("n", 1)
        with pytest.raises(PreconditionFailed):
            backend.apply_if(Change(sets={"n": 5}, expect={"n": None}))
        assert backend.apply_if(Change(deletes=("n",), expect={"n": "*"})) == ["n"]
        assert backend.load_all() == {}
    finally:
        backend.close()


def test_batches_history_and_follower_async(sentinel):
    backends = [RedisDatabase(domain=f"service_s.channel_{n}.feed", **sentinel.settings())
                for n in range(4)]  # fmt: skip

    async def main():
        errors = await RedisDatabase.set_many_together_async(
            [(backend, {"v": n}) for n, backend in enumerate(backends)]
        )
        assert errors == [None] * 4
        history = backends[0].change_history()
        start = history.position()
        events = []
        follower = history.follower()
        follower.follow(history.name, start, events.append)
        await RedisDatabase.set_many_together_async([(backends[0], {"w": 1})])
        for _ in range(500):
            if events:
                break
            await asyncio.sleep(0.01)
        assert [(e.op, e.key) for e in events] == [("set", "w")]
        await follower.close()

    try:
        assert RedisDatabase.set_many_together([(b, {"s": 1}) for b in backends]) == [None] * 4
        asyncio.run(main())
        assert [e.key for e in backends[0].change_history().since("0-0")] == ["s", "v", "w"]
        backends[0].check_available()
        assert backends[0].integrity_problems() == []
    finally:
        for backend in backends:
            backend.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_min_replicas_acknowledges_only_what_enough_replicas_hold(sentinel, flavour):
    one = RedisDatabase(domain="service_s.channel_c.wait1", **sentinel.settings(min_replicas=1))
    two = RedisDatabase(domain="service_s.channel_c.wait2",
                        **sentinel.settings(min_replicas=2, replica_timeout=0.2))  # fmt: skip

    def store(backend, items):
        if flavour == "sync":
            return RedisDatabase.set_many_together([(backend, items)])[0]
        return asyncio.run(RedisDatabase.set_many_together_async([(backend, items)]))[0]

    try:
        assert store(one, {"k": 1}) is None
        assert one.set_value("j", 2) == (True, "j")
        # The one replica holds it: it is on the replica now, not some time later.
        replica = sentinel.replicas[0].client()
        assert replica.hget(one.hash_name, "k") == b"1"
        error = store(two, {"k": 1})
        assert isinstance(error, BackendUnavailable)
        assert "the write is not acknowledged" in str(error)
        assert "only 1 of the 2 replicas required (min_replicas)" in str(error)
        assert "within 0.2 s" in str(error) and "may still be read" in str(error)
        ok, failure = two.set_value("j", 2)
        assert not ok and failure.kind == "unavailable"
        # Made on the primary all the same, as the message says.
        assert primary_client(sentinel).hget(two.hash_name, "k") == b"1"
        replica.close()
    finally:
        one.close()
        two.close()


def test_a_killed_primary_is_followed_without_a_new_backend(own_sentinel):
    """min_replicas 0: writes fail for a while, then resume by themselves."""
    backend = RedisDatabase(domain="service_s.channel_c.loop", **own_sentinel.settings())
    killed = []

    def kill():
        killed.append(own_sentinel.kill_primary())

    try:
        measure = write_loop(lambda key, value: backend.set_many({key: value}), kill)
        assert measure.failures > 0
        assert set(measure.errors) == {"BackendUnavailable"}
        new_port = own_sentinel.wait_failover(killed[0].port)
        assert backend.client.connection_pool.get_master_address()[1] == new_port
        lost = measure.lost(backend.get_many(list(measure.acknowledged)))
        print("\n" + measure.report("sentinel, min_replicas 0, sync", lost))
    finally:
        backend.close()


def test_with_min_replicas_no_acknowledged_write_is_lost(own_sentinel):
    """min_replicas 1 (asyncio, as the daemon writes): after the kill every acknowledged
    write is on the new primary; until a replica is back writes are not acknowledged,
    and once the old primary comes back as a replica they resume by themselves."""
    settings = own_sentinel.settings(min_replicas=1, replica_timeout=0.5)
    backend = RedisDatabase(domain="service_s.channel_c.safe", **settings)
    killed = []
    loop = asyncio.new_event_loop()

    def write(key, value):
        [error] = loop.run_until_complete(
            RedisDatabase.set_many_together_async([(backend, {key: value})])
        )
        if error is not None:
            raise error

    def kill():
        killed.append(own_sentinel.kill_primary())

    def restart_once_failed_over(measure):
        if killed and not killed[0].running:
            port = own_sentinel.primary_port()
            if port is not None and port != killed[0].port:
                own_sentinel.restart(killed[0])

    try:
        measure = write_loop(write, kill, step=restart_once_failed_over, deadline=90)
        assert set(measure.errors) == {"BackendUnavailable"}
        assert measure.not_acknowledged > 0  # while the new primary had no replica
        lost = measure.lost(backend.get_many(list(measure.acknowledged)))
        print("\n" + measure.report("sentinel, min_replicas 1, asyncio", lost))
        assert lost == []
        assert own_sentinel.primary_port() != killed[0].port
    finally:
        backend.close()
        loop.close()


def test_master_name_unknown_to_the_sentinels_is_unavailable(sentinel):
    backend = RedisDatabase(domain="x", **{**sentinel.settings(), "master_name": "nobody"})
    try:
        with pytest.raises(BackendUnavailable, match="No master found for 'nobody'"):
            backend.check_available()
        assert MASTER_NAME in sentinel.settings()["master_name"]
    finally:
        backend.close()


def test_the_follower_and_the_invalidation_link_follow_a_failover(own_sentinel):
    backend = RedisDatabase(domain="service_s.channel_c.feed", **own_sentinel.settings())
    heard = Heard()

    async def write(key, value, timeout=30):
        async def once():
            [error] = await RedisDatabase.set_many_together_async([(backend, {key: value})])
            return error is None

        await until_async(once, timeout, f"the write of {key}")

    async def main():
        link = other_link(backend)
        link.subscribe(heard)
        await until(lambda: "up" in heard.heard, 10, "the link up")
        history = backend.change_history()
        follower = history.follower()
        follower.follow(history.name, history.position(), heard.deliver)
        await write("a", 1)
        await until(lambda: ("service_s.channel_c.feed", ["a"]) in heard.heard, 5, "heard a")
        await until(lambda: len(heard.events) == 1, 5, "followed a")
        # a on the replicas too, so that the new primary's history holds it to follow from.
        await asyncio.to_thread(own_sentinel.wait_replicated)
        killed = own_sentinel.kill_primary()
        await until(lambda: None in heard.events, 15, "the follow ended")
        await until(lambda: "down" in heard.heard, 15, "the link down")
        await asyncio.to_thread(own_sentinel.wait_failover, killed.port)
        await write("b", 2)
        follower.follow(history.name, heard.events[0].position, heard.deliver)
        await until(lambda: heard.events[-1] is not None and heard.events[-1].key == "b", 10,
                    "followed b from the new primary")  # fmt: skip
        await until(lambda: link_up_again(heard.heard), 15, "the link up again")
        await write("c", 3)
        await until(lambda: ("service_s.channel_c.feed", ["c"]) in heard.heard, 5, "heard c")
        await link.close()
        await follower.close()

    try:
        asyncio.run(main())
    finally:
        backend.close()


def link_up_again(heard: list) -> bool:
    """Whether the link said up after it last said down (writes may be heard since)."""
    states = [event for event in heard if event in ("up", "down")]
    return "down" in states and states[-1] == "up"
