"""The redis backend, against real redis-servers that these tests start."""

from __future__ import annotations

import asyncio
import json

import pytest

from chanstore import CachedDict, MoobiusStorage
from chanstore.backends.redisdb import RedisDatabase
from chanstore.errors import BackendUnavailable, CorruptValue, WriteRefused
from support import Point, RedisServer, free_port

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
    assert client.keys("*") == [b"chanstore:svc.chan.box"]
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
    reset_commands(redis_server)
    db.set_many(dict.fromkeys(keys, 1))
    assert commands(redis_server) == {"hset": 1}
    reset_commands(redis_server)
    assert len(db.get_many(keys)) == size
    assert commands(redis_server) == {"hmget": 1}
    reset_commands(redis_server)
    assert len(db.delete_many(keys)) == size
    assert commands(redis_server) == {"multi": 1, "hmget": 1, "hdel": 1, "exec": 1}


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
    assert commands(redis_server) == {"hset": 2}  # one pipeline, nothing of the failed part
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
    assert commands(redis_server) == {"hset": 2, "hget": 1, "hgetall": 1}
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
