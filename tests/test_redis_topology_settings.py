"""The redis backend's topology settings and key layout, without any server.

``mode``, ``sentinels``/``master_name``, ``nodes``, ``min_replicas`` and
``replica_timeout`` are checked in a db_config like every other setting (each
problem names the entry, the setting and what was expected), and building a
RedisDatabase with them checks the same. Standalone and sentinel keep the
names of earlier releases; cluster names carry the domain as hash tag.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.crc import key_slot

from chanstore.backends.redis_wait import ReplicaWait
from chanstore.backends.redisdb import RedisDatabase
from chanstore.config import load_db_config
from chanstore.errors import BackendUnavailable, ConfigError
from support import free_port

SENTINEL = {"mode": "sentinel", "sentinels": ["127.0.0.1:26379"], "master_name": "main"}
CLUSTER = {"mode": "cluster", "nodes": ["127.0.0.1:7000", "[::1]:7001"]}


def problems_of(settings: dict) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_db_config([{"implementation": "redis", "name": "bars", "settings": settings}])
    return raised.value.problems


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"mode": "replicated"}, ["'mode' must be 'standalone', 'sentinel' or 'cluster'",
                                  "'replicated'"]),
        ({"mode": 3}, ["'mode' must be str"]),
        ({"mode": "sentinel", "master_name": "main"},
         ["sentinel mode needs setting 'sentinels'", '["host:port", ...]']),
        ({"mode": "sentinel", "sentinels": ["h:1"]},
         ["sentinel mode needs setting 'master_name'", "the sentinels monitor"]),
        ({**SENTINEL, "master_name": ""}, ["'master_name' must name the primary"]),
        ({**SENTINEL, "sentinels": []}, ["'sentinels' must list at least one \"host:port\""]),
        ({**SENTINEL, "sentinels": ["h:1", "nohost"]},
         ["'sentinels': item 1", "'nohost' is not \"host:port\""]),
        ({**SENTINEL, "sentinels": ["h:70000"]}, ["a port from 1 to 65535"]),
        ({**SENTINEL, "sentinels": [26379]}, ["item 0", "26379 is not a \"host:port\" string"]),
        ({**SENTINEL, "sentinels": "h:1"}, ["'sentinels' must be list"]),
        ({**SENTINEL, "url": "redis://h:1/0"},
         ["setting 'url' names one server", "sentinels name the primary", "remove 'url'"]),
        ({**SENTINEL, "host": "h", "port": 1},
         ["setting 'host' names one server", "setting 'port' names one server"]),
        ({**SENTINEL, "nodes": ["h:1"]},
         ["'nodes' is a setting of cluster mode", "the mode is sentinel"]),
        ({"mode": "cluster"}, ["cluster mode needs setting 'nodes'", "the rest is discovered"]),
        ({**CLUSTER, "db": 2}, ["'db' must be 0 in cluster mode", "not 2"]),
        ({**CLUSTER, "key_prefix": "app{1}:"}, ["'key_prefix' cannot hold '{' or '}'"]),
        ({**CLUSTER, "url": "redis://h:1"}, ["'url' names one server", "are 'nodes'"]),
        ({**CLUSTER, "master_name": "main"},
         ["'master_name' is a setting of sentinel mode", "the mode is cluster"]),
        ({"nodes": ["h:1"]},
         ["'nodes' is a setting of cluster mode", "the mode is standalone",
          'add "mode": "cluster"']),
        ({"sentinels": ["h:1"], "master_name": "m"},
         ["'sentinels' is a setting of sentinel mode", "'master_name' is a setting of sentinel"]),
        ({"min_replicas": -1}, ["'min_replicas' must be 0 or more, not -1"]),
        ({"min_replicas": 1.5}, ["'min_replicas' must be int"]),
        ({"min_replicas": True}, ["'min_replicas' must be int"]),
        ({"replica_timeout": 0}, ["'replica_timeout' must be more than 0 seconds"]),
        ({"replica_timeout": "1s"}, ["'replica_timeout' must be int or float"]),
    ],
)  # fmt: skip
def test_inconsistent_topology_settings_say_what_was_expected(settings, expected):
    problems = problems_of(settings)
    text = "; ".join(problems)
    for part in expected:
        assert part in text
    assert all(problem.startswith("db_config: entry 0 ('bars')") for problem in problems)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"mode": "standalone", "host": "h", "port": 1, "min_replicas": 1},
        {"mode": "standalone", "url": "redis://h:1/3"},
        {**SENTINEL, "db": 3, "password": "p", "min_replicas": 2, "replica_timeout": 0.25},
        {**CLUSTER, "db": 0, "min_replicas": 1, "replica_timeout": 2},
    ],
)
def test_consistent_topology_settings_are_accepted(settings):
    config = load_db_config([{"implementation": "redis", "name": "bars", "settings": settings}])
    assert dict(config.containers[0].settings) == settings


def test_building_a_backend_checks_the_same():
    with pytest.raises(ConfigError, match="sentinel mode needs setting 'master_name'"):
        RedisDatabase(domain="a", mode="sentinel", sentinels=["h:1"])
    with pytest.raises(ConfigError, match="'db' must be 0 in cluster mode"):
        RedisDatabase(domain="a", db=1, **CLUSTER)
    with pytest.raises(ConfigError, match="'host' names one server"):
        RedisDatabase(domain="a", host="h", **SENTINEL)
    with pytest.raises(ValueError, match="in cluster mode a domain cannot be empty"):
        RedisDatabase(domain="", **CLUSTER)


def test_standalone_and_sentinel_keep_the_names_of_earlier_releases():
    # Data written by the current release must load unchanged: these are its names.
    for settings in ({"host": "127.0.0.1", "port": free_port()}, SENTINEL):
        backend = RedisDatabase(domain="service_s.channel_c.bars", **settings)
        try:
            assert backend.hash_name == b"chanstore:service_s.channel_c.bars"
            assert backend.stream_name == b"chanstore:-events:service_s.channel_c.bars"
        finally:
            backend.close()
    backend = RedisDatabase(domain="d", key_prefix="app:", host="127.0.0.1", port=free_port())
    assert (backend.hash_name, backend.stream_name) == (b"app:d", b"app:-events:d")
    backend.close()


@pytest.mark.parametrize("domain", ["service_s.channel_c.bars", "a}b", "{x}", "x{y", "é"])
def test_cluster_names_put_a_domain_in_one_slot(domain):
    backend = RedisDatabase(domain=domain, **CLUSTER)  # builds without reaching any node
    try:
        assert backend.hash_name == f"chanstore:{{{domain}}}".encode()
        assert backend.stream_name == f"chanstore:-events:{{{domain}}}".encode()
        assert key_slot(backend.hash_name) == key_slot(backend.stream_name)
    finally:
        backend.close()


def test_domains_spread_over_the_slots_of_a_cluster():
    slots = set()
    for n in range(200):
        backend = RedisDatabase(domain=f"service_s.channel_{n}.bars", **CLUSTER)
        slots.add(key_slot(backend.hash_name) * 3 // 16384)  # which third of the slots
        backend.close()
    assert slots == {0, 1, 2}


def test_an_unreachable_cluster_is_unavailable_naming_its_nodes():
    ports = [free_port(), free_port()]
    nodes = [f"127.0.0.1:{port}" for port in ports]
    backend = RedisDatabase(domain="a", mode="cluster", nodes=nodes, socket_connect_timeout=0.5)
    where = f"Redis at cluster {nodes[0]},{nodes[1]} is unreachable"
    try:
        for ok, failure in (backend.get_value("k"), backend.set_value("k", 1)):
            assert ok is False
            assert failure.kind == "unavailable"
            assert where in failure
        for call in (backend.load_all, backend.check_available, backend.integrity_problems):
            with pytest.raises(BackendUnavailable, match=where):
                call()
    finally:
        backend.close()


def test_replica_wait_never_waits_forever():
    assert ReplicaWait(1, 1.0).command() == ("WAIT", 1, 1000)
    assert ReplicaWait(2, 0.0001).command() == ("WAIT", 2, 1)  # WAIT n 0 would block forever
    assert ReplicaWait(1, 1).holds(1) and ReplicaWait(1, 1).holds(2)
    assert not ReplicaWait(2, 1).holds(1)


def test_together_keys_part_by_min_replicas():
    port = free_port()
    plain = RedisDatabase(domain="a", host="127.0.0.1", port=port)
    waiting = RedisDatabase(domain="b", host="127.0.0.1", port=port, min_replicas=1)
    try:
        assert plain.client is waiting.client  # one pool...
        assert plain.together_key != waiting.together_key  # ...but never one batch
    finally:
        plain.close()
        waiting.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_standalone_min_replicas_waits_in_the_writes_own_round_trip(redis_settings, redis_server,
                                                                   flavour):  # fmt: skip
    # The session's server has no replica: WAIT 1 answers 0 once its timeout passed.
    backend = RedisDatabase(domain="svc.wait", **redis_settings, min_replicas=1,
                            replica_timeout=0.05)  # fmt: skip
    client = redis_server.client()
    backend.set_value("loads-the-script", 0)  # so that the write below takes one round
    client.config_resetstat()
    try:
        if flavour == "sync":
            [error] = RedisDatabase.set_many_together([(backend, {"k": 1})])
        else:
            [error] = asyncio.run(RedisDatabase.set_many_together_async([(backend, {"k": 1})]))
        assert isinstance(error, BackendUnavailable)
        where = f"Redis at 127.0.0.1:{redis_server.port}/0"
        assert str(error).startswith(f"{where}: the write is not acknowledged: only 0 of the 1 "
                                     "replica required")  # fmt: skip
        stats = client.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 1 and stats["cmdstat_wait"]["calls"] == 1
        assert backend.get_value("k") == (True, 1)  # made on the primary, as it says
        with pytest.raises(BackendUnavailable, match="not acknowledged"):
            backend.delete_many(["k"])
    finally:
        client.close()
        backend.close()
