"""The redis backend, against real redis-servers that these tests start."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading

import pytest
import redis
import redis.asyncio

from chanstore import CachedDict, MoobiusStorage, codec
from chanstore.backends.redis_rounds import round_trip_async
from chanstore.backends.redis_writes import TRANSACTION_BYTES
from chanstore.backends.redisdb import WRITE_SCRIPT, RedisDatabase
from chanstore.errors import BackendUnavailable, CorruptValue, PreconditionFailed, WriteRefused
from chanstore.versions import ANY, UNREADABLE, Change, etag_of, etag_of_stored
from support import Point, RedisServer, ReplyLosingProxy, close_connections, free_port

# Commands a client sends to set up a connection, and those these tests send to look.
HOUSEKEEPING = {"info", "config", "hello", "client", "auth", "select", "ping", "flushall"}


def commands(server: RedisServer) -> dict[str, int]:
    """Calls per command since the last reset, housekeeping left out."""
    client = server.client()
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    calls = {name.removeprefix("cmdstat_"): entry["calls"] for name, entry in stats.items()}
    return {name: n for name, n in calls.items() if name.split("|")[0] not in HOUSEKEEPING}


def bytes_received(server: RedisServer) -> int:
    """Bytes the server read from its clients since the last reset."""
    client = server.client()
    try:
        return client.info("stats")["total_net_input_bytes"]
    finally:
        client.close()


def reset_commands(server: RedisServer) -> None:
    client = server.client()
    client.config_resetstat()
    client.close()


@pytest.fixture
def db(redis_settings):
    backend = RedisDatabase(domain="svc.chan.box", **redis_settings)
    yield backend
    backend.close()


# -- layout --------------------------------------------------------------------


def test_one_hash_per_domain_with_compact_json(db, redis_server):
    db.set_value("HP", {"alice": 100})
    db.set_value("p", Point(1, 2))
    client = redis_server.client()
    # The hash holds the data; the stream beside it, the domain's recent changes.
    assert sorted(client.keys("*")) == [b"chanstore:-events:svc.chan.box",
                                        b"chanstore:svc.chan.box"]  # fmt: skip
    assert client.type("chanstore:svc.chan.box") == b"hash"
    assert client.type("chanstore:-events:svc.chan.box") == b"stream"
    stored = client.hgetall("chanstore:svc.chan.box")
    assert stored[b"HP"] == b'{"alice":100}'
    assert json.loads(stored[b"p"]) == {
        "_moobius_type": "support.Point",
        "_moobius_val": {"x": 1, "y": 2},
    }
    client.close()


def test_key_prefix_and_db(redis_settings, redis_server):
    backend = RedisDatabase(domain="d", key_prefix="app1/", db=3, **redis_settings)
    backend.set_value("k", 1)
    assert redis_server.client(db=3).hget("app1/d", "k") == b"1"
    assert redis_server.client(db=0).keys("*") == []
    backend.close()


@pytest.mark.parametrize(
    "domains",
    [
        ["a", "a.b", "a:b", "a b", "a\nb", "a*", "[a]", "ü", "chanstore:a", "a.b.c"],
        ["x", "x\x00y", "x%00y"],
    ],
)
def test_domains_with_odd_characters_do_not_collide(redis_settings, domains):
    backends = [RedisDatabase(domain=domain, **redis_settings) for domain in domains]
    for index, backend in enumerate(backends):
        backend.set_value("same", index)
        backend.set_value(f"own-{index}", index)
    for index, backend in enumerate(backends):
        assert backend.load_all() == {"same": index, f"own-{index}": index}
        backend.close()


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("size", [3, 500])
def test_loading_a_container_is_one_round_trip(db, redis_server, metrics, size):
    db.set_many({f"k{n}": {"n": n} for n in range(size)})
    box = CachedDict(db, name="big", metrics=metrics)
    assert box.get("warm-up connection") is None
    reset_commands(redis_server)
    box.load()
    assert commands(redis_server) == {"hgetall": 1}
    assert len(box) == size


@pytest.mark.parametrize("size", [3, 500])
def test_bulk_operations_take_a_constant_number_of_commands(db, redis_server, size):
    keys = [f"k{n}" for n in range(size)]
    db.check_available()
    redis_server.client().script_load(WRITE_SCRIPT)  # as an earlier write would have
    reset_commands(redis_server)
    db.set_many(dict.fromkeys(keys, 1))
    # One script call (one round trip); what it runs inside is counted too: a
    # history entry per change, and one invalidation for the whole call.
    assert commands(redis_server) == {"evalsha": 1, "hset": size, "xadd": size, "publish": 1}
    reset_commands(redis_server)
    assert len(db.get_many(keys)) == size
    assert commands(redis_server) == {"hmget": 1}
    reset_commands(redis_server)
    assert len(db.delete_many(keys)) == size
    assert commands(redis_server) == {"evalsha": 1, "hdel": size, "xadd": size, "publish": 1}


def test_storage_with_a_redis_container_loads_in_one_round_trip(redis_settings, redis_server):
    RedisDatabase(domain="service_s.channel_c.bars", **redis_settings).set_many(
        {f"player{n}": n for n in range(200)}
    )
    reset_commands(redis_server)
    storage = MoobiusStorage("s", "c", [
        {"implementation": "redis", "name": "bars", "load": True, "settings": redis_settings},
    ])  # fmt: skip
    assert commands(redis_server) == {"hgetall": 1}
    assert storage.bars["player7"] == 7
    assert len(storage.bars) == 200
    assert commands(redis_server) == {"hgetall": 1}
    storage.close()


def test_keys_is_never_used(redis_settings, redis_server, metrics):
    reset_commands(redis_server)
    backend = RedisDatabase(domain="no.keys", **redis_settings)
    box = CachedDict(backend, name="nokeys", metrics=metrics)
    box.update({"a": 1, "b": 2})
    assert sorted(box) == ["a", "b"]
    assert len(box) == 2
    assert "a" in box
    box.popitem()
    box.load()
    box.clear()
    assert list(backend.all_keys()) == []
    assert "keys" not in commands(redis_server)
    assert "scan" not in commands(redis_server)
    backend.close()


# -- values it cannot read -------------------------------------------------------


def test_a_field_that_is_not_json_is_corrupt_for_its_key_only(db, redis_server, metrics):
    db.set_many({"good": 1, "other": [2]})
    redis_server.client().hset("chanstore:svc.chan.box", "bad", b"\x80not json")
    ok, failure = db.get_value("bad")
    assert ok is False
    assert failure.kind == "corrupt"
    assert "chanstore:svc.chan.box" in failure
    assert "'bad'" in failure
    loaded = db.load_all()
    assert isinstance(loaded.pop("bad"), CorruptValue)
    assert loaded == {"good": 1, "other": [2]}
    box = CachedDict(db, name="corrupt", metrics=metrics)
    box.load()
    # Loaded, the bad field is listed and reads as an error, never as absent.
    assert sorted(box) == ["bad", "good", "other"]
    assert box["good"] == 1
    with pytest.raises(CorruptValue):
        box["bad"]
    assert (
        metrics.registry.get_sample_value(
            "chanstore_backend_operation_errors_total",
            {
                "backend": "redis",
                "container": "corrupt",
                "operation": "load_all",
                "error": "corrupt",
            },
        )
        == 1
    )


# -- connections ------------------------------------------------------------------


def test_backends_with_the_same_settings_share_a_pool(redis_settings):
    first = RedisDatabase(domain="one", **redis_settings)
    second = RedisDatabase(domain="two", **redis_settings)
    assert first.client is second.client
    first.set_value("k", 1)
    first.close()
    first.close()  # closing twice is harmless
    assert second.set_value("k", 2) == (True, "k")
    assert second.get_value("k") == (True, 2)
    second.close()
    third = RedisDatabase(domain="one", **redis_settings)
    assert third.get_value("k") == (True, 1)
    third.close()


def test_unreachable_redis_is_a_clear_error_naming_where(metrics):
    port = free_port()  # nothing listens there
    backend = RedisDatabase(
        domain="down", host="127.0.0.1", port=port, socket_connect_timeout=1.0, socket_timeout=1.0
    )
    where = f"127.0.0.1:{port}"
    box = CachedDict(backend, strict_mode=True, name="down", metrics=metrics)
    for answer in (backend.get_value("k"), backend.set_value("k", 1), backend.delete_key("k")):
        ok, failure = answer
        assert ok is False
        assert failure.kind == "unavailable"
        assert where in failure
        assert "unreachable" in failure
    for call in (backend.all_keys, backend.load_all, backend.check_available, box.load):
        with pytest.raises(BackendUnavailable, match=f"Redis at {where}.* is unreachable"):
            call()
    labels = {"backend": "redis", "container": "down", "operation": "set", "error": "unavailable"}
    counted = metrics.registry.get_sample_value("chanstore_backend_operation_errors_total", labels)
    with pytest.raises(WriteRefused, match=where) as raised:
        box["k"] = 1
    assert raised.value.kind == "unavailable"
    with pytest.raises(BackendUnavailable):
        box.get("k")
    assert (
        metrics.registry.get_sample_value("chanstore_backend_operation_errors_total", labels)
        == counted + 1
    )
    backend.close()


def test_a_storage_whose_redis_is_down_fails_to_build(tmp_path):
    with pytest.raises(BackendUnavailable, match="unreachable"):
        MoobiusStorage("s", "c", [
            {"implementation": "json", "name": "files", "settings": {"root_dir": str(tmp_path)}},
            {"implementation": "redis", "name": "bars",
             "settings": {"host": "127.0.0.1", "port": free_port()}},
        ])  # fmt: skip


@pytest.fixture(scope="module")
def password_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-pw"), "--requirepass", "s3cret").start()
    yield server
    server.stop()


def test_password(password_server):
    settings = dict(password_server.settings)
    assert settings["password"] == "s3cret"
    backend = RedisDatabase(domain="auth", **settings)
    assert backend.set_value("k", 1) == (True, "k")
    assert backend.get_value("k") == (True, 1)
    backend.close()
    password_server.flush()


@pytest.mark.parametrize("password", [None, "", "wrong"])
def test_missing_or_wrong_password(password_server, password):
    settings = {**password_server.settings, "password": password}
    backend = RedisDatabase(domain="auth", **settings)
    ok, failure = backend.set_value("k", 1)
    assert ok is False
    assert failure.kind == "permission"
    assert f"127.0.0.1:{password_server.port}" in failure
    with pytest.raises(BackendUnavailable) as raised:
        backend.check_available()
    assert raised.value.kind == "permission"
    assert "refused the credentials" in str(raised.value)
    backend.close()


def test_url_with_password_and_db(password_server):
    url = f"redis://:s3cret@127.0.0.1:{password_server.port}/2"
    backend = RedisDatabase(domain="by.url", url=url)
    assert backend.set_value("k", [1]) == (True, "k")
    assert password_server.client(db=2).hget("chanstore:by.url", "k") == b"[1]"
    assert "s3cret" not in repr(backend)
    assert "s3cret" not in backend.where
    backend.close()
    password_server.flush()


def test_an_unreachable_url_does_not_show_its_password():
    port = free_port()
    backend = RedisDatabase(domain="x", url=f"redis://user:hunter2@127.0.0.1:{port}/0")
    ok, failure = backend.get_value("k")
    assert ok is False
    assert f"127.0.0.1:{port}" in failure
    assert "hunter2" not in failure
    backend.close()


# -- several domains in one round trip (the daemon's write lanes) -----------------------


def store_together(parts, flavour):
    """RedisDatabase.set_many_together, or its asyncio twin run on a fresh event loop."""

    async def run():
        try:
            return await RedisDatabase.set_many_together_async(parts)
        finally:
            close(parts)  # on the loop: the last one closes the asyncio client too

    if flavour == "async":
        return asyncio.run(run())
    try:
        return RedisDatabase.set_many_together(parts)
    finally:
        close(parts)


def close(parts):
    for backend, _items in parts:
        backend.close()


def stored(redis_settings, domain):
    backend = RedisDatabase(domain=domain, **redis_settings)
    try:
        return backend.load_all()
    finally:
        backend.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_domains_stored_together_take_one_round_trip(redis_settings, redis_server, metrics,
                                                     flavour):  # fmt: skip
    backends = [RedisDatabase(domain=f"together.{n}", **redis_settings) for n in range(3)]
    for n, backend in enumerate(backends):
        CachedDict(backend, name=f"box{n}", metrics=metrics)  # attaches the metrics
    parts = [(backends[0], {"a": 1, "b": [2]}), (backends[1], {"c": object()}),
             (backends[2], {"d": {"e": None}})]  # fmt: skip
    reset_commands(redis_server)
    errors = store_together(parts, flavour)
    assert errors[0] is None and errors[2] is None
    assert errors[1] is not None and "object" in str(errors[1])  # unstorable: that part only
    # One pipeline of one script call per domain, nothing of the failed part.
    assert commands(redis_server) == {"evalsha": 2, "hset": 3, "xadd": 3, "publish": 2}
    assert stored(redis_settings, "together.0") == {"a": 1, "b": [2]}
    assert stored(redis_settings, "together.1") == {}
    assert stored(redis_settings, "together.2") == {"d": {"e": None}}
    labels = {"backend": "redis", "container": "box2", "operation": "set_many"}
    count = metrics.registry.get_sample_value(
        "chanstore_backend_operation_duration_seconds_count", labels
    )
    assert count == 1


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_domains_stored_together_fail_clearly_when_redis_is_down(flavour):
    port = free_port()  # nothing listens there
    backends = [RedisDatabase(domain=f"down.{n}", host="127.0.0.1", port=port,
                              socket_connect_timeout=1.0) for n in range(2)]  # fmt: skip
    errors = store_together([(backend, {"k": 1}) for backend in backends], flavour)
    for error in errors:
        assert isinstance(error, BackendUnavailable)
        assert error.kind == "unavailable"
        assert f"127.0.0.1:{port}" in str(error)


# -- a Redis that lost chanstore's data ---------------------------------------------------


def probe(settings, **options):
    """A backend as the daemon's readiness probe holds one: asked for integrity problems."""
    return RedisDatabase(domain="service_probe", **settings, **options)


def kinds(backend):
    return [problem.kind for problem in backend.integrity_problems()]


def test_a_redis_that_was_empty_from_the_start_lost_nothing(redis_settings, redis_server):
    backend = probe(redis_settings)
    assert redis_server.client().dbsize() == 0
    assert kinds(backend) == []
    assert kinds(backend) == []
    # The first look left a marker for the next ones to compare with.
    marker = json.loads(redis_server.client().get("chanstore:-marker"))
    assert len(marker["id"]) == 32
    assert "if this key is gone" in marker["chanstore"]
    # A Redis already holding data (an earlier release, the library in-process) lost nothing.
    RedisDatabase(domain="old.data", **redis_settings).set_value("k", 1)
    redis_server.client().delete("chanstore:-marker")
    fresh = probe(redis_settings)
    assert kinds(fresh) == []
    backend.close()
    fresh.close()


def test_flushall_is_data_lost_told_once_to_each_watcher(redis_settings, redis_server):
    first, second = probe(redis_settings), probe(redis_settings)
    assert kinds(first) == kinds(second) == []
    redis_server.flush()

    (problem,) = first.integrity_problems()
    assert problem.kind == "data_lost"
    assert f"Redis at 127.0.0.1:{redis_server.port}/0" in problem.message
    assert "FLUSHALL" in problem.message
    assert "run_id unchanged" in problem.message
    assert kinds(first) == []  # told once: the new marker is what it compares with now
    # The first one wrote a new marker; the second still notices (another daemon's view).
    (problem,) = second.integrity_problems()
    assert problem.kind == "data_lost"
    assert "another daemon found the data lost first" in problem.message
    assert kinds(second) == []
    first.close()
    second.close()


def test_no_marker_traffic_on_reads_and_writes(redis_settings, redis_server):
    backend = probe(redis_settings)
    assert kinds(backend) == []
    reset_commands(redis_server)
    backend.set_value("k", 1)
    assert backend.get_value("k") == (True, 1)
    backend.set_many({"a": 1})
    assert backend.load_all() == {"k": 1, "a": 1}
    assert commands(redis_server) == {"evalsha": 2, "hset": 2, "xadd": 2, "publish": 2,
                                      "hget": 1, "hgetall": 1}  # fmt: skip
    reset_commands(redis_server)
    assert kinds(backend) == []
    assert commands(redis_server) == {"set": 1, "get": 1}  # and INFO: one round trip
    backend.close()


def test_markers_are_per_database_and_key_prefix(redis_settings, redis_server):
    db0, db1 = probe(redis_settings), probe(redis_settings, db=1)
    other_prefix = probe(redis_settings, key_prefix="app2:")
    for backend in (db0, db1, other_prefix):
        assert kinds(backend) == []
    redis_server.client(db=1).flushdb()
    assert kinds(db1) == ["data_lost"]
    assert kinds(db0) == []
    redis_server.client().delete("app2:-marker")  # as if only that prefix's data had gone
    assert kinds(other_prefix) == ["data_lost"]
    assert kinds(db0) == []
    for backend in (db0, db1, other_prefix):
        backend.close()


def test_a_restart_without_persistence_is_data_lost_and_with_it_is_not(tmp_path):
    volatile = RedisServer(tmp_path / "volatile").start()
    durable = RedisServer(tmp_path / "durable", "--appendonly", "yes",
                          "--appendfsync", "always").start()  # fmt: skip
    try:
        lost, kept = probe(volatile.settings), probe(durable.settings)
        for backend in (lost, kept):
            backend.set_value("k", 1)
            assert kinds(backend) == []
        for server in (volatile, durable):
            server.stop()
            server.start()  # the same port, the same folder
        (problem,) = lost.integrity_problems()
        assert problem.kind == "data_lost"
        assert "restarted (run_id" in problem.message
        assert lost.get_value("k")[0] is False
        assert kinds(kept) == []
        assert kept.get_value("k") == (True, 1)
        lost.close()
        kept.close()
    finally:
        volatile.stop()
        durable.stop()


def test_an_unreachable_redis_is_unavailable_not_data_lost():
    backend = probe({"host": "127.0.0.1", "port": free_port(), "socket_connect_timeout": 1.0})
    with pytest.raises(BackendUnavailable, match="unreachable"):
        backend.integrity_problems()
    backend.close()


# -- versions and conditional writes ---------------------------------------------------

WRITE_SHA = hashlib.sha1(WRITE_SCRIPT.encode()).hexdigest()
HASH = "chanstore:svc.chan.box"
STREAM = "chanstore:-events:svc.chan.box"


def snapshot(server):
    """The domain's hash and the length of its history: what a failed write must not change."""
    client = server.client()
    try:
        return client.hgetall(HASH), client.xlen(STREAM)
    finally:
        client.close()


@pytest.mark.parametrize("value", [1, "text", {"a": [1, 2.5, None]}, {1, 2}, (3, "x"),
                                   Point(1, 2), {"ü": "ß\u2603"}, [], None])  # fmt: skip
def test_the_etag_of_a_stored_value_is_versions_etag_of(db, redis_server, value):
    db.set_value("k", value)
    stored = redis_server.client().hget(HASH, "k")
    assert etag_of_stored(stored) == etag_of(value)
    ((_id, entry),) = redis_server.client().xrange(STREAM)
    assert entry[b"etag"].decode() == etag_of(value)
    assert entry[b"value"] == stored


def test_apply_if_stores_when_every_expectation_holds(db, redis_server):
    db.set_many({"a": 1, "b": [2]})
    change = Change(sets={"a": 10, "new": "n"}, deletes=["b", "never"],
                    expect={"a": etag_of(1), "b": ANY, "new": None})  # fmt: skip
    assert db.apply_if(change) == ["b"]  # the deleted keys that existed
    assert db.load_all() == {"a": 10, "new": "n"}


@pytest.mark.parametrize(
    ("expect", "conflicts"),
    [
        ({"a": etag_of(2)}, {"a": etag_of(1)}),  # another version
        ({"absent": etag_of(1)}, {"absent": None}),  # a version of a key that is absent
        ({"absent": ANY}, {"absent": None}),  # If-Match: * on an absent key
        ({"a": None}, {"a": etag_of(1)}),  # create-only on a key that exists
        ({"a": UNREADABLE}, {"a": etag_of(1)}),  # never holds
        ({"a": ""}, {"a": etag_of(1)}),  # not an ETag: never holds either
    ],
)
def test_a_failed_expectation_changes_nothing(db, redis_server, expect, conflicts):
    db.set_many({"a": 1, "b": 2})
    before = snapshot(redis_server)
    change = Change(sets={"a": 5, "c": 3}, deletes=["b"], expect=expect)
    with pytest.raises(PreconditionFailed) as failed:
        db.apply_if(change)
    assert failed.value.conflicts == conflicts
    assert snapshot(redis_server) == before  # neither the hash nor its history changed


def test_all_or_nothing_over_many_keys(db, redis_server):
    db.set_many({"x": 1, "y": 1, "z": 1})
    before = snapshot(redis_server)
    stale = {"x": etag_of(1), "y": etag_of(0), "z": etag_of(1)}  # y is not at that version
    with pytest.raises(PreconditionFailed) as failed:
        db.apply_if(Change(sets={"x": 2, "y": 2, "z": 2}, expect=stale))
    assert failed.value.conflicts == {"y": etag_of(1)}
    assert snapshot(redis_server) == before
    current = {key: etag_of(1) for key in "xyz"}
    assert db.apply_if(Change(sets={"x": 2, "y": 2, "z": 2}, expect=current)) == []
    assert db.load_all() == {"x": 2, "y": 2, "z": 2}


def test_a_conditional_delete(db, redis_server):
    db.set_value("k", {"v": 1})
    with pytest.raises(PreconditionFailed):
        db.apply_if(Change(deletes=["k"], expect={"k": etag_of({"v": 2})}))
    assert db.get_value("k") == (True, {"v": 1})
    assert db.apply_if(Change(deletes=["k"], expect={"k": etag_of({"v": 1})})) == ["k"]
    assert db.get_value("k")[0] is False
    with pytest.raises(PreconditionFailed) as failed:
        db.apply_if(Change(deletes=["k"], expect={"k": ANY}))
    assert failed.value.conflicts == {"k": None}


def test_a_conditional_write_is_one_round_trip(db, redis_server):
    db.set_value("k", 1)
    reset_commands(redis_server)
    db.apply_if(Change(sets={"k": 2}, expect={"k": etag_of(1)}))
    with pytest.raises(PreconditionFailed):
        db.apply_if(Change(sets={"k": 3}, expect={"k": etag_of(1)}))
    # The failed one changed nothing: no history entry, no invalidation.
    assert commands(redis_server) == {"evalsha": 2, "hget": 2, "hset": 1, "xadd": 1,
                                      "publish": 1}  # fmt: skip


def test_an_expectation_alone_checks_without_changing(db, redis_server):
    db.set_value("k", 1)
    assert db.apply_if(Change(expect={"k": etag_of(1)})) == []
    with pytest.raises(PreconditionFailed):
        db.apply_if(Change(expect={"k": None}))
    reset_commands(redis_server)
    assert db.apply_if(Change()) == []  # nothing to check or change: no round trip
    assert commands(redis_server) == {}


def test_concurrent_increments_through_apply_if_lose_no_update(redis_settings):
    threads, increments = 8, 40
    attempts = []

    def increment(backend):
        tries = 0
        for _ in range(increments):
            while True:
                tries += 1
                ok, value = backend.get_value("n")
                assert ok
                try:
                    backend.apply_if(Change(sets={"n": value + 1}, expect={"n": etag_of(value)}))
                    break
                except PreconditionFailed:
                    continue
        attempts.append(tries)

    # One backend object per thread on its own pool, as separate daemons would be.
    backends = [RedisDatabase(domain="svc.counter",
                              **{**redis_settings, "socket_timeout": 2.0 + n / 100})
                for n in range(threads)]  # fmt: skip
    assert len({backend.client for backend in backends}) == threads
    backends[0].set_value("n", 0)
    workers = [threading.Thread(target=increment, args=(b,)) for b in backends]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert not worker.is_alive()
    assert backends[0].get_value("n") == (True, threads * increments)
    assert sum(attempts) >= threads * increments
    for backend in backends:
        backend.close()


def test_a_foreign_pretty_printed_document_is_replaced_with_its_canonical_etag(db, redis_server):
    document = {"hp": 100, "tags": ["a", "b"], "name": "ü"}
    pretty = json.dumps(document, indent=2, ensure_ascii=False).encode()
    redis_server.client().hset(HASH, "k", pretty)
    canonical = etag_of(document)
    assert etag_of_stored(pretty) != canonical  # what a naive check would compare
    # A conflict reports the canonical ETag, the one a reader computes from the value.
    with pytest.raises(PreconditionFailed) as failed:
        db.apply_if(Change(sets={"k": 1}, expect={"k": etag_of({"other": 1})}))
    assert failed.value.conflicts == {"k": canonical}
    with pytest.raises(PreconditionFailed) as failed:
        db.apply_if(Change(sets={"k": 1}, expect={"k": None}))
    assert failed.value.conflicts == {"k": canonical}
    assert redis_server.client().hget(HASH, "k") == pretty
    # The document the caller read (and its ETag) is what is stored: the write goes through.
    reset_commands(redis_server)
    assert db.apply_if(Change(sets={"k": {**document, "hp": 90}}, expect={"k": canonical})) == []
    assert commands(redis_server)["evalsha"] == 2  # the retry expects the foreign bytes
    assert db.get_value("k") == (True, {**document, "hp": 90})
    # Once chanstore stored it, the stored bytes are the compact form: one round trip.
    reset_commands(redis_server)
    db.apply_if(Change(deletes=["k"], expect={"k": etag_of({**document, "hp": 90})}))
    assert commands(redis_server)["evalsha"] == 1


def test_foreign_bytes_that_are_not_json_are_unreadable_and_never_match(db, redis_server):
    redis_server.client().hset(HASH, "bad", b"\x80 not json")
    for expected in (UNREADABLE, etag_of({"some": "document"}), None):
        with pytest.raises(PreconditionFailed) as failed:
            db.apply_if(Change(sets={"bad": 1}, expect={"bad": expected}))
        assert failed.value.conflicts == {"bad": UNREADABLE}
    assert db.apply_if(Change(sets={"bad": 1}, expect={"bad": ANY})) == []
    assert db.get_value("bad") == (True, 1)


def test_a_foreign_document_changed_again_between_the_tries_is_a_conflict(db, redis_server):
    """The retry expects the exact bytes seen: a change in between is a conflict, not lost."""
    document = {"n": 1}
    redis_server.client().hset(HASH, "k", json.dumps(document, indent=4))
    # Simulate the change racing in between by expecting the canonical ETag of a document
    # whose foreign bytes are then replaced (as a second foreign writer would).
    redis_server.client().hset(HASH, "k", json.dumps({"n": 2}, indent=4))
    with pytest.raises(PreconditionFailed) as failed:
        db.apply_if(Change(sets={"k": 3}, expect={"k": etag_of(document)}))
    assert failed.value.conflicts == {"k": etag_of({"n": 2})}


def apply_together(parts, flavour):
    """RedisDatabase.apply_if_together, or its asyncio twin on a fresh event loop."""

    async def run():
        return await RedisDatabase.apply_if_together_async(parts)

    if flavour == "async":
        return asyncio.run(run())
    return RedisDatabase.apply_if_together(parts)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_conditional_changes_of_many_domains_take_one_round_trip(redis_settings, redis_server,
                                                                 flavour):  # fmt: skip
    backends = [RedisDatabase(domain=f"cond.{n}", **redis_settings) for n in range(4)]
    for backend in backends:
        backend.set_value("k", 1)
    parts = [
        (backends[0], Change(sets={"k": 2}, expect={"k": etag_of(1)})),
        (backends[1], Change(sets={"k": 2}, expect={"k": etag_of(5)})),  # fails: itself only
        (backends[2], Change(deletes=["k", "gone"], expect={"k": ANY})),
        (backends[3], Change(sets={"k": object()})),  # unstorable: nothing of it is sent
    ]
    reset_commands(redis_server)
    answers = apply_together(parts, flavour)
    assert commands(redis_server)["evalsha"] == 3
    assert answers[0] == []
    assert isinstance(answers[1], PreconditionFailed)
    assert answers[1].conflicts == {"k": etag_of(1)}
    assert answers[2] == ["k"]
    assert isinstance(answers[3], Exception) and "object" in str(answers[3])
    assert [b.load_all() for b in backends] == [{"k": 2}, {"k": 1}, {}, {"k": 1}]
    for backend in backends:
        backend.close()


def set_history(server):
    """``(key, value)`` of every set in the svc.chan.box domain's history, oldest first."""
    return [(fields[b"key"].decode(), json.loads(fields[b"value"]))
            for fields in history(server) if fields[b"op"] == b"set"]  # fmt: skip


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_parts_of_one_domain_are_made_in_the_order_given_by_one_script_call(
    db, redis_settings, redis_server, flavour
):
    """How a write lane sends a batch in which a key repeats (keeps_part_order): the
    consecutive parts of one domain are one call of the script, which makes each value
    in turn and records each; one invalidation is published for all of them."""
    assert RedisDatabase.keeps_part_order
    db.set_value("hp", 0)  # the script is in Redis's cache now
    reset_commands(redis_server)
    parts = [(db, {"hp": 1, "mp": 1}), (db, {"hp": 2}), (db, {"hp": 3, "mp": 2})]
    assert store_together(parts, flavour) == [None, None, None]
    assert commands(redis_server) == {"evalsha": 1, "hset": 5, "xadd": 5, "publish": 1}
    assert stored(redis_settings, "svc.chan.box") == {"hp": 3, "mp": 2}
    assert set_history(redis_server) == [
        ("hp", 0), ("hp", 1), ("mp", 1), ("hp", 2), ("hp", 3), ("mp", 2)]  # fmt: skip


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_large_values_of_one_key_in_a_row_are_one_transaction(
    db, redis_settings, redis_server, flavour
):
    first, second = ({"text": letter * TRANSACTION_BYTES} for letter in "ab")
    db.set_value("warm", 1)
    reset_commands(redis_server)
    assert store_together([(db, {"hp": first}), (db, {"hp": second})], flavour) == [None, None]
    assert commands(redis_server) == {"multi": 1, "hset": 1, "xadd": 2, "publish": 1, "exec": 1}
    # HSET carried the last value only: three values went to Redis (with the history's two).
    received = bytes_received(redis_server)
    assert 3 * TRANSACTION_BYTES < received < 4 * TRANSACTION_BYTES, received
    assert stored(redis_settings, "svc.chan.box") == {"warm": 1, "hp": second}
    assert set_history(redis_server) == [("warm", 1), ("hp", first), ("hp", second)]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_part_that_cannot_be_sent_fails_alone_among_parts_of_its_domain(
    db, redis_settings, redis_server, flavour
):
    """Joined, the parts would share one answer: one that cannot be sent (a value that is
    not JSON) is kept apart, so the others are made, in order, and it alone fails."""
    db.set_value("warm", 1)
    parts = [(db, {"hp": 1}), (db, {"hp": object()}), (db, {"hp": 3})]
    first, refused, last = store_together(parts, flavour)
    assert (first, last) == (None, None)
    assert refused is not None
    assert stored(redis_settings, "svc.chan.box") == {"warm": 1, "hp": 3}
    assert set_history(redis_server) == [("warm", 1), ("hp", 1), ("hp", 3)]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_after_a_script_flush_repeated_keys_are_sent_again_in_order(
    db, redis_settings, redis_server, flavour
):
    db.set_value("warm", 1)
    redis_server.client().script_flush()
    parts = [(db, {"hp": 1}), (db, {"hp": 2})]
    assert store_together(parts, flavour) == [None, None]  # both refused, both sent again
    assert stored(redis_settings, "svc.chan.box") == {"warm": 1, "hp": 2}
    assert set_history(redis_server) == [("warm", 1), ("hp", 1), ("hp", 2)]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_write_that_did_not_run_is_not_sent_after_a_later_write_of_its_key(
    db, redis_settings, redis_server, flavour
):
    """A small set goes through the script, which a flushed cache refuses (NOSCRIPT); a
    large one as a transaction, which runs. Sent again, the small one would overwrite the
    large one that came after it: it is answered as not made instead."""
    large = {"text": "x" * TRANSACTION_BYTES}
    db.set_value("warm", 1)
    redis_server.client().script_flush()
    # Another domain's parts between them, as in a lane's batch whose runs span channels:
    # consecutive parts of one domain would be one write (one transaction here).
    other = RedisDatabase(domain="svc.chan.other", **redis_settings)
    parts = [(db, {"hp": 1, "mp": 1}), (other, {"x": 1}), (db, {"hp": large}),
             (other, {"x": 2}), (db, {"mp": 2})]  # fmt: skip
    small, spaced, made, spaced_again, after = store_together(parts, flavour)
    assert isinstance(small, BackendUnavailable)
    assert "later write of the same key" in str(small)
    assert (made, after) == (None, None)  # mp 2: refused too, sent again, nothing after it
    assert (spaced, spaced_again) == (None, None)  # refused both, both sent again in order
    assert stored(redis_settings, "svc.chan.box") == {"warm": 1, "hp": large, "mp": 2}
    assert stored(redis_settings, "svc.chan.other") == {"x": 2}
    assert set_history(redis_server) == [("warm", 1), ("hp", large), ("mp", 2)]


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("size", [1, 3])
def test_a_flushed_script_cache_is_reloaded_by_the_write(redis_settings, redis_server, flavour,
                                                         size):  # fmt: skip
    backends = [RedisDatabase(domain=f"noscript.{n}", **redis_settings) for n in range(size)]
    backends[0].set_value("warm", 1)  # the script is in Redis's cache now
    redis_server.client().script_flush()
    reset_commands(redis_server)
    parts = [(backend, {"k": n}) for n, backend in enumerate(backends)]
    errors = store_together(parts, flavour)  # one pipeline (or one call) after the flush
    assert errors == [None] * size
    # NOSCRIPT for each call, then the text once per call, which loads the script again.
    assert commands(redis_server)["evalsha"] == size
    assert commands(redis_server)["eval"] == size
    assert [stored(redis_settings, f"noscript.{n}") for n in range(size)] == [
        {"k": n, **({"warm": 1} if n == 0 else {})} for n in range(size)
    ]
    assert redis_server.client().script_exists(WRITE_SHA) == [True]
    # Conditional writes through a single call recover the same way.
    again = RedisDatabase(domain="noscript.0", **redis_settings)
    redis_server.client().script_flush()
    assert again.apply_if(Change(sets={"k": 9}, expect={"k": etag_of(0)})) == []
    assert again.get_value("k") == (True, 9)
    again.close()


def test_a_value_written_by_an_earlier_release_loads_and_changes_conditionally(db, redis_server):
    # What the previous release stored: compact JSON in the hash, and no history at all.
    redis_server.client().hset(HASH, mapping={"hp": b"100", "p": codec.encode(Point(1, 2))})
    assert db.load_all() == {"hp": 100, "p": Point(1, 2)}
    db.apply_if(Change(sets={"hp": 90}, expect={"hp": etag_of(100)}))
    assert db.get_value("hp") == (True, 90)
    assert redis_server.client().xlen(STREAM) == 1


# -- large unconditional sets: a transaction instead of the script ---------------------


def history(server):
    """Every history entry's fields, oldest first."""
    client = server.client()
    try:
        return [fields for _id, fields in client.xrange(STREAM)]
    finally:
        client.close()


def invalidations_heard(server, write):
    """The invalidations published while ``write()`` runs."""
    client = server.client()
    listener = client.pubsub(ignore_subscribe_messages=True)
    try:
        listener.subscribe("chanstore:-invalidations")
        assert listener.get_message(timeout=1.0) is None  # subscribed: the confirmation
        write()
        heard = []
        while (message := listener.get_message(timeout=0.2)) is not None:
            heard.append(message["data"])
        return heard
    finally:
        listener.close()
        client.close()


def test_large_unconditional_sets_are_made_as_the_script_makes_small_ones(db, redis_server):
    """Values of TRANSACTION_BYTES and more are handed to HSET and XADD in MULTI/EXEC, not
    through Lua (which hashes every byte it is given): the same hash, history entries and
    invalidation as the script leaves."""
    large = {"text": "x" * TRANSACTION_BYTES}
    db.check_available()
    reset_commands(redis_server)
    heard = invalidations_heard(redis_server, lambda: db.set_many({"a": large, "b": 2}))
    made = {"multi": 1, "hset": 1, "xadd": 2, "publish": 1, "exec": 1, "subscribe": 1}
    assert commands(redis_server) == made  # and the listener's SUBSCRIBE
    reset_commands(redis_server)
    heard += invalidations_heard(redis_server, lambda: db.set_many({"c": 3, "d": 4}))
    assert commands(redis_server)["evalsha"] == 1  # small: the script
    assert db.get_many(["a", "b", "c", "d"]) == {"a": large, "b": 2, "c": 3, "d": 4}
    stored_a = codec.encode_bytes(large)
    assert history(redis_server) == [
        {
            b"op": b"set",
            b"key": key.encode(),
            b"value": stored,
            b"etag": etag_of_stored(stored).encode(),
        }
        for key, stored in [("a", stored_a), ("b", b"2"), ("c", b"3"), ("d", b"4")]
    ]
    assert [message.split(b"\0")[1:] for message in heard] == [
        [HASH.encode(), b"a", b"b"],
        [HASH.encode(), b"c", b"d"],
    ]
    assert heard[0].split(b"\0")[0] == heard[1].split(b"\0")[0]  # this process's origin


def test_a_large_conditional_set_still_goes_through_the_script(db, redis_server):
    large = "x" * TRANSACTION_BYTES
    db.set_value("k", 1)
    reset_commands(redis_server)
    assert db.apply_if(Change(sets={"k": large}, expect={"k": etag_of(1)})) == []
    assert "multi" not in commands(redis_server)
    assert commands(redis_server)["evalsha"] == 1
    assert db.get_value("k") == (True, large)


def test_a_large_set_on_a_hash_a_foreign_writer_replaced_fails_and_leaves_no_history(
    db, redis_server
):
    """Redis runs a transaction's XADD even when its HSET failed; the history entry it made
    is deleted before the error is answered, so no watcher hears of a change not made."""
    client = redis_server.client()
    client.set(HASH, "a string, not a hash")
    stored, error = db.set_value("k", "x" * TRANSACTION_BYTES)
    assert stored is False
    assert "WRONGTYPE" in str(error)
    assert client.get(HASH) == b"a string, not a hash"
    assert client.xlen(STREAM) == 0
    client.close()


def test_a_large_set_through_asyncio_is_a_transaction_too(db, redis_server):
    large = ["y" * TRANSACTION_BYTES]
    db.check_available()
    reset_commands(redis_server)
    assert asyncio.run(RedisDatabase.set_many_together_async([(db, {"k": large})])) == [None]
    assert commands(redis_server)["exec"] == 1
    assert db.get_value("k") == (True, large)
    assert [entry[b"key"] for entry in history(redis_server)] == [b"k"]


# -- a reply that is lost ------------------------------------------------------


@pytest.fixture
def lossy(redis_settings, redis_server):
    """A backend that reaches Redis through a proxy that can lose its replies."""
    proxy = ReplyLosingProxy(redis_server.port)
    settings = {**redis_settings, "port": proxy.port, "socket_timeout": 0.3}
    backend = RedisDatabase(domain="svc.chan.lossy", **settings)
    yield backend, proxy
    backend.close()
    proxy.close()


def apply_with_replies_lost(backend, proxy, flavour, change):
    """Store 1 under "k" (a connection made, the script loaded), lose the replies on that
    connection, then make ``change`` through it: its answer, or its error."""
    if flavour == "sync":
        backend.set_value("k", 1)
        proxy.lose_replies()
        try:
            return backend.apply_if(change)
        except Exception as exc:  # noqa: BLE001 - the answer under test
            return exc
    loop = asyncio.new_event_loop()
    try:
        stored = RedisDatabase.set_many_together_async([(backend, {"k": 1})])
        assert loop.run_until_complete(stored) == [None]
        proxy.lose_replies()
        applied = RedisDatabase.apply_if_together_async([(backend, change)])
        [answer] = loop.run_until_complete(applied)
        return answer
    finally:
        loop.close()


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "if-match"])
def test_a_write_whose_reply_is_lost_fails_and_is_never_sent_again(
    lossy, redis_server, flavour, size, conditional
):
    """Redis makes the write and its reply is lost: the write fails as a timeout (the
    daemon's 503), and it is not sent again behind the caller's back. Sent again, it
    would be made twice (two changes in the history for one write), and a conditional
    one would answer 412 to its own value."""
    backend, proxy = lossy
    value = ["v" * (TRANSACTION_BYTES if size == "large" else 10)]
    expect = {"k": etag_of(1)} if conditional else {}
    answer = apply_with_replies_lost(backend, proxy, flavour, Change(sets={"k": value},
                                                                     expect=expect))  # fmt: skip
    assert isinstance(answer, BackendUnavailable), answer
    assert answer.kind == "timeout"
    client = redis_server.client()
    try:
        changes = client.xrange("chanstore:-events:svc.chan.lossy")
        stored = client.hget("chanstore:svc.chan.lossy", "k")
    finally:
        client.close()
    assert json.loads(stored) == value  # Redis made it...
    assert len(changes) == 2, f"made {len(changes) - 1} times"  # ...once


# -- the replies of a round ----------------------------------------------------


def blocking_round(redis_server: RedisServer, socket_timeout: float, commands):
    """``round_trip_async`` of ``commands`` on a client with ``socket_timeout``; its
    replies or its error, and whether the same client's next round is answered."""

    async def run():
        client = redis.asyncio.Redis(port=redis_server.port, password=redis_server.password,
                                     socket_timeout=socket_timeout)  # fmt: skip
        try:
            try:
                answer = await round_trip_async(client, commands)
            except redis.RedisError as exc:
                answer = exc
            return answer, await round_trip_async(client, [("PING",)])
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_a_read_that_asks_for_no_timeout_outwaits_the_socket_timeout(redis_server):
    """round_trip_async reads each reply with ``timeout=math.inf`` (redis-py's documented
    "no timeout") inside one deadline of its own. If redis-py ever applies its socket
    timeout to such a read, a round's replies get a timer each again: this fails."""

    async def run():
        client = redis.asyncio.Redis(port=redis_server.port, password=redis_server.password,
                                     socket_timeout=0.1)  # fmt: skip
        connection = await client.connection_pool.get_connection()
        try:
            await connection.send_command("BLPOP", "nothing-here", "0.3")
            return await connection.read_response(timeout=math.inf)
        except redis.TimeoutError:
            pytest.fail("redis-py applied its socket timeout to a read that asked for none "
                        "(timeout=math.inf): round_trip_async relies on that meaning, see the "
                        "bound on redis in pyproject.toml")  # fmt: skip
        finally:
            await client.connection_pool.release(connection)
            await client.aclose()

    assert asyncio.run(run()) is None  # BLPOP's answer once its 0.3 s are up: nothing


def test_a_rounds_replies_come_within_one_socket_timeout(redis_server):
    """Each reply within the socket timeout is not enough: all of a round's replies come
    within one, or the round fails as a timeout, its connection closed, so that the next
    round on the client is answered and never reads this one's replies."""
    waits = [("BLPOP", "nothing-here", "0.3"), ("BLPOP", "nor-here", "0.3")]
    answer, after = blocking_round(redis_server, 0.45, waits)
    assert isinstance(answer, redis.TimeoutError), answer
    assert "did not come within 0.45s" in str(answer)
    assert after == [b"PONG"]
    answer, after = blocking_round(redis_server, 1.0, waits)
    assert answer == [None, None]
    assert after == [b"PONG"]


# -- a connection that Redis closed --------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_write_after_redis_closed_the_pooled_connection_is_made_once(db, redis_server, flavour):
    """The pool's connection was closed by Redis while it sat idle: the next write goes
    on a new connection, and is made once. Writes are never sent again, so one sent on
    the closed connection would fail on a Redis that is up; redis-py 8.1's asyncio pool
    hands such a connection out (redis/redis-py#4252)."""
    loop = asyncio.new_event_loop()

    def store(value):
        change = Change(sets={"k": value})
        if flavour == "sync":
            return db.apply_if(change)
        [answer] = loop.run_until_complete(RedisDatabase.apply_if_together_async([(db, change)]))
        return answer

    try:
        assert store(1) == []
        close_connections(redis_server.client())
        loop.run_until_complete(asyncio.sleep(0.2))  # the event loop reads the close
        assert store(2) == []
    finally:
        loop.close()
    assert db.get_value("k") == (True, 2)
    assert [entry[b"key"] for entry in history(redis_server)] == [b"k", b"k"]
