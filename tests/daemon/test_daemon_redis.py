"""Redis-backed containers against a real redis-server that the test starts and stops."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import IN_CI, DaemonProcess, RedisServer, json_entry, key_path, wait_until

from chanstore.client import BackendUnavailableError

#: Seconds /readyz may take to notice that Redis went away or came back.
NOTICED_WITHIN = 15.0


def _config(redis: RedisServer) -> list[dict[str, Any]]:
    settings = {**redis.settings, "socket_timeout": 1.0, "socket_connect_timeout": 0.5}
    return [
        json_entry("stats"),
        {"implementation": "redis", "name": "mana", "load": True, "settings": settings},
    ]


def test_crud_and_bulk_on_a_redis_container(start_daemon, redis: RedisServer,
                                             channel: str) -> None:  # fmt: skip
    daemon: DaemonProcess = start_daemon(_config(redis))

    with daemon.client() as client:
        mana = client.channel(channel).mana
        mana["MP"] = 30
        mana["odd/key ü"] = {"nested": [1, None]}
        assert mana["MP"] == 30
        assert mana["odd/key ü"] == {"nested": [1, None]}
        mana.update({"a": 1, "b": 2})
        assert sorted(mana) == sorted(["MP", "odd/key ü", "a", "b"])
        assert mana.get_many(["a", "b", "zzz"]) == {"a": 1, "b": 2}
        assert client.delete_many(channel, "mana", ["a", "zzz"]) == ["a"]
        del mana["MP"]
        assert "MP" not in mana
        assert sorted(mana) == sorted(["odd/key ü", "b"])

        odd = {name: index for index, name in enumerate(["..", "a.b", "%2F", "e\u0301", "é"])}
        client.set_many(channel + "/..", "mana", odd)

    # The data is in Redis itself, not only in the daemon's memory.
    assert redis.client().dbsize() >= 2
    daemon.restart()
    with daemon.client() as client:
        assert client.get(channel, "mana", "b") == 2
        assert sorted(client.keys(channel, "mana")) == sorted(["odd/key ü", "b"])
        assert client.get_many(channel + "/..", "mana", list(odd)) == odd
        assert sorted(client.keys(channel + "/..", "mana")) == sorted(odd)


def test_readyz_and_writes_follow_redis_going_away_and_coming_back(
    start_daemon, tmp_path: Path, channel: str
) -> None:
    # A Redis that keeps its data over a restart: coming back is not a loss (see
    # tests/reliability/test_redis_data_loss.py for one that comes back empty).
    if shutil.which("redis-server") is None:
        (pytest.fail if IN_CI else pytest.skip)("redis-server is not installed")
    redis = RedisServer(tmp_path / "durable", "--appendonly", "yes", "--appendfsync", "always")
    redis.start()
    try:
        _outage_and_return(start_daemon(_config(redis)), redis, channel)
    finally:
        redis.stop()


def _outage_and_return(daemon: DaemonProcess, redis: RedisServer, channel: str) -> None:
    assert daemon.http.get("/readyz").status_code == 200
    assert daemon.put(channel, "mana", "MP", 1).status_code == 200

    redis.stop()

    def not_ready() -> dict[str, Any] | None:
        response = daemon.http.get("/readyz")
        return response.json() if response.status_code == 503 else None

    answer = wait_until(not_ready, NOTICED_WITHIN, "/readyz to say 503")
    # Readiness names the container and the kind of failure; where is for the logs.
    assert answer["problems"] == {"mana": "unavailable"}
    logged = daemon.events("container_not_ready")
    assert any(f"Redis at 127.0.0.1:{redis.port}" in event["error"] for event in logged)

    # Writes to the dead backend are refused, never acknowledged.
    for number in range(3):
        refused = daemon.put(channel, "mana", f"k{number}", number)
        assert refused.status_code == 503
        assert refused.json()["code"] == "backend_unavailable"
        assert refused.json()["error"]
    with daemon.client() as client:
        try:
            client.set(channel, "mana", "via-client", 1)
        except BackendUnavailableError as exc:
            assert exc.status == 503
        else:
            raise AssertionError("a write to a dead Redis was acknowledged")
    bulk = daemon.http.post(key_path(channel, "mana") + "/-/set", json={"values": {"x": 1}})
    assert bulk.status_code == 503
    # A value in the cache is not answered from it while the invalidation link is down
    # with Redis (another daemon could write the moment Redis is back): a clean 503.
    cached = daemon.get(channel, "mana", "MP")
    assert (cached.status_code, cached.json()["code"]) == (503, "backend_unavailable")
    # The json containers do not care.
    assert daemon.put(channel, "stats", "HP", 5).status_code == 200
    assert daemon.get(channel, "stats", "HP").json() == 5
    assert daemon.http.get("/healthz").status_code == 200
    errors = daemon.metric("chanstore_backend_operation_errors_total", backend="redis",
                           container="mana", operation="set_many", error="unavailable")  # fmt: skip
    assert errors is not None
    assert errors >= 1

    redis.start()  # the same port, with its append-only file

    wait_until(lambda: daemon.http.get("/readyz").status_code == 200, NOTICED_WITHIN,
               "/readyz to say 200 again")  # fmt: skip
    assert daemon.events("integrity_problem") == []  # its data came back with it
    assert daemon.get(channel, "mana", "MP").json() == 1
    wait_until(lambda: daemon.put(channel, "mana", "k0", 0).status_code == 200, NOTICED_WITHIN,
               "writes to Redis to succeed again")  # fmt: skip
    assert daemon.get(channel, "mana", "k0").json() == 0
    # None of the refused writes landed.
    assert daemon.get(channel, "mana", "k1").status_code == 404
    assert daemon.get(channel, "mana", "via-client").status_code == 404


def test_a_dead_redis_at_start_fails_only_its_container(start_daemon, redis: RedisServer,
                                                        channel: str) -> None:  # fmt: skip
    config = _config(redis)
    redis.stop()
    daemon: DaemonProcess = start_daemon(config)

    assert daemon.http.get("/readyz").status_code == 503
    refused = daemon.get(channel, "mana", "MP")
    assert refused.status_code == 503
    assert refused.json()["code"] == "backend_unavailable"
    assert daemon.put(channel, "stats", "HP", 1).status_code == 200

    redis.start()
    wait_until(lambda: daemon.put(channel, "mana", "MP", 2).status_code == 200, NOTICED_WITHIN,
               "the redis container to serve once Redis is up")  # fmt: skip
    assert daemon.get(channel, "mana", "MP").json() == 2
