"""The redis backend in cluster mode, against a real 3-primary, 3-replica Redis Cluster.

The shared cluster (one per module) serves the tests that kill nothing; each
failover test builds a cluster of its own, kills a primary with SIGKILL under
a write loop, and prints what it measured (run with ``-s`` to see it;
bench/failover.py prints the same figures).
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
from redis.crc import key_slot

from chanstore.backends.redis_marker import MARKER_SUFFIX
from chanstore.backends.redis_writes import TRANSACTION_BYTES
from chanstore.backends.redisdb import RedisDatabase
from chanstore.errors import BackendUnavailable, PreconditionFailed
from chanstore.history import ORIGIN
from chanstore.versions import Change, etag_of
from redis_topologies import (
    ClusterSetup,
    Heard,
    other_link,
    require_redis,
    until,
    until_async,
    write_loop,
)
from support import close_connections, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of its own, for a test that kills a primary."""
    require_redis()
    setup = ClusterSetup(tmp_path / "cluster")
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


def backends_over_every_primary(cluster, prefix, n=30, **more):
    backends = [RedisDatabase(domain=f"service_s.channel_{k}.{prefix}", **cluster.settings(**more))
                for k in range(n)]  # fmt: skip
    primaries = {cluster.primary_of_slot(key_slot(b.hash_name)) for b in backends}
    assert len(primaries) == 3, "the domains should spread over every primary"
    return backends


def close_all(backends):
    for backend in backends:
        backend.close()


def commandstats(cluster, port) -> dict[str, int]:
    client = cluster.node_on(port).client()
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items()}


def test_reads_and_writes_of_many_domains(cluster):
    backends = backends_over_every_primary(cluster, "rw")
    try:
        for n, backend in enumerate(backends):
            assert backend.set_value("hp", {"now": n}) == (True, "hp")
            backend.set_many({"a": n, "b": [n]})
        for n, backend in enumerate(backends):
            assert backend.get_value("hp") == (True, {"now": n})
            assert backend.load_all() == {"hp": {"now": n}, "a": n, "b": [n]}
            assert sorted(backend.all_keys()) == ["a", "b", "hp"]
            assert backend.get_many(["a", "zz"]) == {"a": n}
            assert backend.delete_key("b") == (True, "b")
            assert backend.delete_many(["a", "zz"]) == ["a"]
        assert backends[0].get_value("b")[0] is False
    finally:
        close_all(backends)


def test_a_domain_lives_in_one_slot_under_its_hash_tag(cluster):
    backend = RedisDatabase(domain="service_s.channel_c.bars", **cluster.settings())
    try:
        backend.set_value("k", 1)
        port = cluster.primary_of_slot(key_slot(b"service_s.channel_c.bars"))
        client = cluster.node_on(port).client()
        assert client.hget("chanstore:{service_s.channel_c.bars}", "k") == b"1"
        assert client.xlen("chanstore:-events:{service_s.channel_c.bars}") == 1
        client.close()
    finally:
        backend.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_batch_across_primaries(cluster, flavour):
    backends = backends_over_every_primary(cluster, f"batch{flavour}")
    parts = [(backend, {"v": n}) for n, backend in enumerate(backends)]
    parts[4] = (backends[4], {"v": object()})  # unstorable: that part alone fails
    try:
        if flavour == "sync":
            errors = RedisDatabase.set_many_together(parts)
        else:
            errors = asyncio.run(RedisDatabase.set_many_together_async(parts))
        assert [n for n, error in enumerate(errors) if error is not None] == [4]
        assert "object" in str(errors[4])
        for n, backend in enumerate(backends):
            assert backend.load_all() == ({} if n == 4 else {"v": n})
    finally:
        close_all(backends)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_write_after_the_primaries_closed_the_pooled_connections_is_made_once(cluster, flavour):
    """Every primary closed the connections the writes went on (a restart, a
    ``CLIENT KILL``, an idle ``timeout``): the next batch goes on new ones and each
    write is made once (writes are never sent again, see test_redis_backend.py)."""
    backends = backends_over_every_primary(cluster, f"closed-{flavour}")
    loop = asyncio.new_event_loop()

    def store(n):
        parts = [(backend, {"v": n}) for backend in backends]
        if flavour == "sync":
            return RedisDatabase.set_many_together(parts)
        return loop.run_until_complete(RedisDatabase.set_many_together_async(parts))

    try:
        assert store(1) == [None] * len(backends)
        for port in cluster.primary_ports():
            close_connections(cluster.node_on(port).client())
        loop.run_until_complete(asyncio.sleep(0.2))  # the event loop reads the closes
        assert store(2) == [None] * len(backends)
        for backend in backends:
            assert backend.load_all() == {"v": 2}
            client = cluster.node_on(cluster.primary_of_slot(key_slot(backend.hash_name))).client()
            assert client.xlen(backend.stream_name) == 2  # two writes, each made once
            client.close()
    finally:
        loop.close()
        close_all(backends)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_conditional_writes_across_primaries(cluster, flavour):
    backends = backends_over_every_primary(cluster, f"cond{flavour}")
    try:
        for backend in backends:
            backend.set_value("n", 1)
        ok = Change(sets={"n": 2}, expect={"n": etag_of(1)})
        stale = Change(sets={"n": 3}, expect={"n": None})
        parts = [(backend, ok if n % 2 else stale) for n, backend in enumerate(backends)]
        if flavour == "sync":
            answers = RedisDatabase.apply_if_together(parts)
        else:
            answers = asyncio.run(RedisDatabase.apply_if_together_async(parts))
        for n, (backend, answer) in enumerate(zip(backends, answers, strict=True)):
            if n % 2:
                assert answer == []
                assert backend.get_value("n") == (True, 2)
            else:
                assert isinstance(answer, PreconditionFailed)
                assert backend.get_value("n") == (True, 1)
        with pytest.raises(PreconditionFailed):
            backends[1].apply_if(Change(deletes=("n",), expect={"n": etag_of(1)}))
        assert backends[1].apply_if(Change(deletes=("n",), expect={"n": "*"})) == ["n"]
    finally:
        close_all(backends)


def test_the_history_and_its_follower_across_slots(cluster):
    backends = backends_over_every_primary(cluster, "feed", n=12)

    async def main():
        histories = [backend.change_history() for backend in backends]
        starts = [history.position() for history in histories]
        assert starts == [ORIGIN] * len(backends)
        follower = histories[0].follower()
        assert all(history.follower() is follower for history in histories)
        seen: dict[int, list] = {n: [] for n in range(len(backends))}
        for n, history in enumerate(histories):
            follower.follow(history.name, starts[n], seen[n].append)
        for round_ in range(3):
            errors = await RedisDatabase.set_many_together_async(
                [(backend, {f"k{round_}": round_}) for backend in backends]
            )
            assert errors == [None] * len(backends)
        for _ in range(500):
            if all(len(events) == 3 for events in seen.values()):
                break
            await asyncio.sleep(0.01)
        for events in seen.values():
            assert [(e.op, e.key) for e in events] == [("set", "k0"), ("set", "k1"), ("set", "k2")]
        await follower.close()
        assert all(events[-1] is None for events in seen.values())  # closing ends them

    try:
        asyncio.run(main())
        since = backends[3].change_history().since(ORIGIN)
        assert [e.key for e in since] == ["k0", "k1", "k2"]
        assert [e.key for e in backends[3].change_history().since(since[0].position)] == [
            "k1", "k2"]  # fmt: skip
    finally:
        close_all(backends)


def test_readiness_pings_every_primary_and_keeps_a_marker_on_each(cluster):
    backend = RedisDatabase(domain="service_probe", **cluster.settings(), key_prefix="probe:")
    try:
        backend.check_available()
        assert backend.integrity_problems() == []
        for port in cluster.primary_ports():
            client = cluster.node_on(port).client()
            markers = list(client.scan_iter(match=f"probe:{MARKER_SUFFIX}*"))
            assert len(markers) == 1  # one per primary, in a slot it holds
            client.delete(markers[0])
            client.close()
            problems = backend.integrity_problems()
            assert [p.kind for p in problems] == ["data_lost"]
            assert f"127.0.0.1:{port}" in problems[0].message
        assert backend.integrity_problems() == []
    finally:
        backend.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_min_replicas_waits_on_the_primary_that_holds_the_slot(cluster, flavour):
    backends = backends_over_every_primary(cluster, f"wait{flavour}", min_replicas=1)
    lonely = backends[0]
    port = cluster.primary_of_slot(key_slot(lonely.hash_name))
    before = {p: commandstats(cluster, p).get("wait", 0) for p in cluster.primary_ports()}

    def store(parts):
        if flavour == "sync":
            return RedisDatabase.set_many_together(parts)
        return asyncio.run(RedisDatabase.set_many_together_async(parts))

    try:
        assert store([(lonely, {"k": 1})]) == [None]
        after = {p: commandstats(cluster, p).get("wait", 0) for p in cluster.primary_ports()}
        # One WAIT, on the primary that holds the slot, none elsewhere.
        assert {p: after[p] - before[p] for p in after} == {
            p: int(p == port) for p in after}  # fmt: skip
        # A batch over every primary: one WAIT on each, every part acknowledged.
        assert store([(backend, {"k": 2}) for backend in backends]) == [None] * len(backends)
        again = {p: commandstats(cluster, p).get("wait", 0) for p in cluster.primary_ports()}
        assert all(again[p] - after[p] == 1 for p in again)
        # Its replica holds it the moment the write is acknowledged.
        view = cluster.view()
        primary_id = view[port]["id"]
        [replica] = [p for p, node in view.items() if node["primary"] == primary_id]
        replica_client = cluster.node_on(replica).client()
        replica_client.execute_command("READONLY")
        assert replica_client.hget(lonely.hash_name, "k") == b"2"
        replica_client.close()
    finally:
        close_all(backends)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_repeated_keys_after_a_script_flush_are_never_made_out_of_order(cluster, flavour):
    """A round may hold several writes of one domain (a write lane's batch where a key
    repeats). After a SCRIPT FLUSH a small set is refused (NOSCRIPT) and sent again,
    in order; but not once a large set of its key, a transaction, ran after it."""
    backends = backends_over_every_primary(cluster, f"order{flavour}")
    large = {"text": "o" * TRANSACTION_BYTES}
    for backend in backends:
        backend.set_value("warm", 1)
    for port in cluster.primary_ports():
        client = cluster.node_on(port).client()
        client.script_flush()
        client.close()
    # Another domain's parts between them, as in a lane's batch whose runs span channels:
    # consecutive parts of one domain would be one write (one transaction here).
    spacer = RedisDatabase(domain=f"order{flavour}.spacer", **cluster.settings())
    parts = [part for backend in backends
             for part in ((backend, {"hp": 1, "mp": 1}), (spacer, {"s": 1}),
                          (backend, {"hp": large}), (spacer, {"s": 2}),
                          (backend, {"mp": 2}))]  # fmt: skip
    try:
        if flavour == "sync":
            errors = RedisDatabase.set_many_together(parts)
        else:
            errors = asyncio.run(RedisDatabase.set_many_together_async(parts))
        overtaken = 0
        by_domain = [errors[at : at + 5] for at in range(0, len(errors), 5)]
        for backend, (small, spaced, made, spaced_again, after) in zip(backends, by_domain,
                                                                         strict=True):  # fmt: skip
            assert (made, after, spaced, spaced_again) == (None, None, None, None)
            assert backend.load_all() == {"warm": 1, "hp": large, "mp": 2}
            history = [("warm", 1), ("hp", large), ("mp", 2)]
            if small is None:  # its node had the script again by then (sync: one after another)
                history[1:1] = [("hp", 1), ("mp", 1)]
            else:
                assert isinstance(small, BackendUnavailable) and "later write" in str(small)
                overtaken += 1
            client = cluster.node_on(cluster.primary_of_slot(key_slot(backend.hash_name))).client()
            sets = [(f[b"key"].decode(), json.loads(f[b"value"]))
                    for _id, f in client.xrange(backend.stream_name)]  # fmt: skip
            client.close()
            assert sets == history
        assert overtaken > 0
        assert spacer.load_all() == {"s": 2}
    finally:
        close_all([*backends, spacer])


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_large_values_go_as_transactions_on_each_primary(cluster, flavour):
    """Unconditional sets of large values are MULTI/EXEC on the primary of their slot, with
    a history entry each, and the WAIT of min_replicas after them."""
    backends = backends_over_every_primary(cluster, f"large{flavour}", min_replicas=1)
    large = {"text": "z" * TRANSACTION_BYTES}
    before = {p: commandstats(cluster, p).get("exec", 0) for p in cluster.primary_ports()}
    parts = [(backend, {"k": large, "n": n}) for n, backend in enumerate(backends)]
    try:
        if flavour == "sync":
            errors = RedisDatabase.set_many_together(parts)
        else:
            errors = asyncio.run(RedisDatabase.set_many_together_async(parts))
        assert errors == [None] * len(backends)
        after = {p: commandstats(cluster, p).get("exec", 0) for p in cluster.primary_ports()}
        assert all(after[p] > before[p] for p in after)  # every primary holds some domain
        for n, backend in enumerate(backends):
            assert backend.load_all() == {"k": large, "n": n}
            client = cluster.node_on(cluster.primary_of_slot(key_slot(backend.hash_name))).client()
            assert client.xlen(backend.stream_name) == 2
            client.close()
    finally:
        close_all(backends)


def test_too_few_replicas_is_not_acknowledged_naming_the_node(cluster):
    backends = backends_over_every_primary(cluster, "wait2", n=12, min_replicas=2,
                                           replica_timeout=0.1)  # fmt: skip
    try:
        errors = RedisDatabase.set_many_together([(backend, {"k": 1}) for backend in backends])
        for backend, error in zip(backends, errors, strict=True):
            assert isinstance(error, BackendUnavailable)
            assert "the write is not acknowledged" in str(error)
            assert "only 1 of the 2 replicas required" in str(error)
            port = cluster.primary_of_slot(key_slot(backend.hash_name))
            assert f"(node 127.0.0.1:{port})" in str(error)
            # It was made on the primary all the same, as the message says.
            assert backend.get_many(["k"]) == {"k": 1}
        ok, failure = backends[0].set_value("j", 1)
        assert not ok and "not acknowledged" in failure
    finally:
        close_all(backends)


def test_a_manual_failover_is_followed_within_the_write(cluster):
    """CLUSTER FAILOVER moves a slot's primary: the next write meets MOVED, reads the slot
    table again and is made on the new primary, in the same call, with no error."""
    backend = RedisDatabase(domain="service_s.channel_c.moved", **cluster.settings())
    try:
        backend.set_value("k", 1)
        slot = key_slot(backend.hash_name)
        old = cluster.primary_of_slot(slot)
        view = cluster.view()
        [replica] = [p for p, node in view.items() if node["primary"] == view[old]["id"]]
        cluster.node_on(replica).client().execute_command("CLUSTER", "FAILOVER")

        def moved():
            try:
                return cluster.primary_of_slot(slot) == replica and cluster.wait_settled(10)
            except (redis.RedisError, LookupError):
                return False

        wait_until(moved, 30, "the replica to take over")
        assert backend.set_value("k", 2) == (True, "k")
        assert asyncio.run(RedisDatabase.set_many_together_async([(backend, {"j": 3})])) == [
            None]  # fmt: skip
        assert backend.load_all() == {"k": 2, "j": 3}
        backend.check_available()
    finally:
        backend.close()


def failover_loop(own_cluster, *, min_replicas: int, flavour: str):
    domains = [f"service_s.channel_{k}.loop" for k in range(24)]
    settings = own_cluster.settings(min_replicas=min_replicas, replica_timeout=0.5)
    backends = [RedisDatabase(domain=domain, **settings) for domain in domains]
    victim = backends[0]
    killed = []
    loop = asyncio.new_event_loop()

    def write(key, value):
        backend = backends[value % len(backends)]
        if flavour == "sync":
            [error] = RedisDatabase.set_many_together([(backend, {key: value})])
        else:
            [error] = loop.run_until_complete(
                RedisDatabase.set_many_together_async([(backend, {key: value})]))  # fmt: skip
        if error is not None:
            raise error

    def kill():
        killed.append(own_cluster.kill_primary_of(key_slot(victim.hash_name)))

    def restart_once_failed_over(measure):
        if min_replicas and killed and not killed[0].running:
            view = own_cluster.view() or {}
            node = view.get(killed[0].port)
            if node is not None and (not node["slots"] or "fail" in node["flags"]):
                taken = [p for p, n in view.items() if n["slots"] and n["role"] == "primary"
                         and "fail" not in n["flags"]]  # fmt: skip
                if len(taken) == 3:
                    own_cluster.restart(killed[0])

    try:
        measure = write_loop(write, kill, step=restart_once_failed_over, deadline=90)
        assert set(measure.errors) == {"BackendUnavailable"}
        held = {}
        for n, backend in enumerate(backends):
            keys = [key for key in measure.acknowledged if int(key[1:]) % len(backends) == n]
            held.update(backend.get_many(keys))
        lost = measure.lost(held)
        return measure, lost
    finally:
        close_all(backends)
        loop.close()


def test_a_killed_primary_is_followed_without_new_backends(own_cluster):
    measure, lost = failover_loop(own_cluster, min_replicas=0, flavour="sync")
    print("\n" + measure.report("cluster, min_replicas 0, sync", lost))
    assert measure.failures > 0


def test_with_min_replicas_no_acknowledged_write_is_lost(own_cluster):
    measure, lost = failover_loop(own_cluster, min_replicas=1, flavour="async")
    print("\n" + measure.report("cluster, min_replicas 1, asyncio", lost))
    assert measure.not_acknowledged > 0  # the promoted replica's shard had no replica
    assert lost == []


def test_the_follower_and_the_invalidation_link_follow_a_failover(own_cluster):
    domain = "service_s.channel_c.feed"
    backend = RedisDatabase(domain=domain, **own_cluster.settings())
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
        await until(lambda: (domain, ["a"]) in heard.heard, 5, "heard a")
        await until(lambda: len(heard.events) == 1, 5, "followed a")
        # a on the replica too, so that the new primary's history holds it to follow from.
        await asyncio.to_thread(own_cluster.wait_replicated, key_slot(backend.hash_name))
        killed = own_cluster.kill_primary_of(key_slot(backend.hash_name))
        await until(lambda: None in heard.events, 15, "the follow ended")
        await asyncio.to_thread(own_cluster.wait_failover, killed.port)
        await write("b", 2)
        follower.follow(history.name, heard.events[0].position, heard.deliver)
        await until(lambda: heard.events[-1] is not None and heard.events[-1].key == "b", 10,
                    "followed b from the new primary")  # fmt: skip
        # The link is on any node: if it was the killed one, it went down and came back.
        await until(lambda: heard.heard[-1] != "down", 15, "the link up")
        await write("c", 3)
        await until(lambda: (domain, ["c"]) in heard.heard, 5, "heard c")
        await link.close()
        await follower.close()

    try:
        asyncio.run(main())
    finally:
        backend.close()
