"""A Redis that lost chanstore's data is noticed, said, counted, and its copies dropped.

Before: after a FLUSHALL or a restart without persistence, cached keys kept
answering 200 with values Redis no longer held (gone for good once the
channel left memory), and /readyz said ready. Now the readiness probe finds
the database's marker gone or changed (one round trip per probe, none per
request): the container's caches are dropped (every channel answers what
Redis holds), ``integrity_problem`` is logged at error with kind
``data_lost``, ``chanstore_integrity_problems_total`` counts it, /readyz
answers 503 ``{"mana": "data_lost"}`` for the hold period, and
``chanstore stats`` shows it. A Redis that was empty from the start, or
already held data without a marker, is no loss. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from load_helpers import (
    DaemonProcess,
    RedisServer,
    daemon_running,
    json_entry,
    need_redis,
    redis_entry,
    wait_until,
)
from prometheus_client import CollectorRegistry

from chanstore.backends.redisdb import RedisDatabase
from chanstore.codec import Document
from chanstore.config import load_db_config
from chanstore.engine import ABSENT, Engine, EngineSettings
from chanstore.metrics import Metrics
from chanstore.storage import container_domain

#: Seconds the daemon may take to notice (its probe runs every 5 s; /readyz checks at most
#: once a second).
NOTICED_WITHIN = 15.0
#: Seconds /readyz is watched to show that data_lost stays (readiness answers live 1 s).
WATCHED_FOR = 2.5
MARKER = "chanstore:-marker"
CHANNEL = "loss"


def _readyz(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    response = daemon.http.get("/readyz")
    return response.status_code, response.json()


def _problems(daemon: DaemonProcess) -> dict[str, str] | None:
    status, body = _readyz(daemon)
    return body["problems"] if status == 503 else None


def _lost_count(daemon: DaemonProcess) -> float | None:
    return daemon.metric("chanstore_integrity_problems_total", container="mana", kind="data_lost")


def _started(daemon: DaemonProcess, redis: RedisServer) -> None:
    """Store MP in the redis container (cached by the read) once the probe has seen the marker."""
    assert daemon.put(CHANNEL, "mana", "MP", 30).status_code == 200
    assert daemon.put(CHANNEL, "stats", "HP", 100).status_code == 200
    assert daemon.get(CHANNEL, "mana", "MP").json() == 30
    client = redis.client()
    wait_until(lambda: client.exists(MARKER), NOTICED_WITHIN, "the daemon's marker in Redis")
    client.close()
    assert _readyz(daemon) == (200, {"status": "ready"})


def _the_lie_is_gone(daemon: DaemonProcess) -> dict[str, str]:
    """The cached key no longer answers as if nothing happened, and /readyz is no longer ready."""
    wait_until(lambda: daemon.get(CHANNEL, "mana", "MP").status_code == 404, NOTICED_WITHIN,
               "the cached key to stop answering its lost value")  # fmt: skip

    # Reads may stop lying sooner than readiness says why (a daemon whose invalidation
    # link dropped with the Redis reads the backend at once): wait for the why.
    def lost() -> dict[str, str] | None:
        problems = _problems(daemon)
        return problems if problems.get("mana") == "data_lost" else None

    problems = wait_until(lost, NOTICED_WITHIN, "/readyz to say data_lost")
    assert daemon.keys(CHANNEL, "mana") == []
    return problems


def _the_truth_is_told(daemon: DaemonProcess, redis: RedisServer, cause: str) -> None:
    """Log event at error, metric, /readyz for a while, chanstore stats; the rest serves."""
    (event,) = [e for e in daemon.events("integrity_problem") if e.get("container") == "mana"]
    assert event["level"] == "error"
    assert event["kind"] == "data_lost"
    assert f"Redis at 127.0.0.1:{redis.port}/0 no longer holds the data" in event["error"]
    assert cause in event["error"]
    (dropped,) = daemon.events("container_caches_dropped")
    assert dropped["container"] == "mana"
    assert dropped["channels"] >= 1
    assert _lost_count(daemon) == 1
    assert daemon.metric("chanstore_backend_up", backend="redis", container="mana") == 0
    assert daemon.metric("chanstore_ready") == 0
    # It stays said over fresh checks, and is counted once.
    deadline = time.monotonic() + WATCHED_FOR
    while time.monotonic() < deadline:
        assert _readyz(daemon) == (503, {"status": "not ready",
                                         "problems": {"mana": "data_lost"}})  # fmt: skip
        time.sleep(0.2)
    assert _lost_count(daemon) == 1
    stats = _run_stats(daemon)
    assert "readiness       NOT READY: mana (data_lost)" in stats  # the kind, from /readyz
    assert "mana                 data_lost        1 since start" in stats
    # The json container never noticed; the redis one takes writes again at once.
    assert daemon.get(CHANNEL, "stats", "HP").json() == 100
    assert daemon.put(CHANNEL, "mana", "MP", 31).status_code == 200
    assert daemon.get(CHANNEL, "mana", "MP").json() == 31
    assert daemon.keys(CHANNEL, "mana") == ["MP"]


def _run_stats(daemon: DaemonProcess) -> str:
    from daemon_harness import run_cli  # noqa: PLC0415 - load_helpers put it on the path

    done = run_cli("stats", "--listen", daemon.listen, "--interval", "0.2", timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_flushall_under_running_daemons(tmp_path: Path) -> None:
    need_redis()
    redis = RedisServer(tmp_path / "redis").start()
    config = [json_entry("stats"), redis_entry("mana", redis)]
    try:
        with daemon_running(tmp_path / "one", config) as one, \
                daemon_running(tmp_path / "two", config) as two:  # fmt: skip
            _started(one, redis)
            assert two.get(CHANNEL, "mana", "MP").json() == 30  # cached there too
            flushed = redis.client()
            flushed.flushall()
            flushed.close()

            assert _the_lie_is_gone(one) == {"mana": "data_lost"}
            # The other daemon noticed too, though the first one wrote a new marker.
            assert _the_lie_is_gone(two) == {"mana": "data_lost"}
            _the_truth_is_told(one, redis, "FLUSHALL")
            assert _lost_count(two) == 1
    finally:
        redis.stop()


def test_a_redis_restarted_without_persistence(tmp_path: Path) -> None:
    need_redis()
    redis = RedisServer(tmp_path / "redis").start()
    config = [json_entry("stats"), redis_entry("mana", redis)]
    try:
        with daemon_running(tmp_path / "daemon", config) as daemon:
            _started(daemon, redis)
            redis.stop()
            wait_until(lambda: _problems(daemon) == {"mana": "unavailable"}, NOTICED_WITHIN,
                       "/readyz to say the Redis is unavailable")  # fmt: skip
            # A new, empty redis-server on the same port, in an empty folder.
            empty = RedisServer(tmp_path / "empty")
            empty.port = redis.port
            redis = empty.start()

            assert _the_lie_is_gone(daemon) == {"mana": "data_lost"}
            _the_truth_is_told(daemon, redis, "restarted (run_id")
    finally:
        redis.stop()


def test_a_redis_empty_from_the_start_or_without_a_marker_lost_nothing(tmp_path: Path) -> None:
    need_redis()
    redis = RedisServer(tmp_path / "redis").start()
    # Data an earlier release (or the library in-process) stored: no marker beside it.
    earlier = RedisDatabase(domain=container_domain("e2e", "old", "mana"), **redis.settings)
    earlier.set_value("MP", 7)
    earlier.close()
    config = [json_entry("stats"), redis_entry("mana", redis)]
    try:
        with daemon_running(tmp_path / "daemon", config) as daemon:
            _started(daemon, redis)
            assert daemon.get("old", "mana", "MP").json() == 7
            for _ in range(3):  # fresh checks, each one past the 1 s an answer is reused
                assert _readyz(daemon) == (200, {"status": "ready"})
                time.sleep(1.1)
            daemon.restart()
            wait_until(lambda: _readyz(daemon)[0] == 200, NOTICED_WITHIN, "/readyz after restart")
            assert daemon.get(CHANNEL, "mana", "MP").json() == 30
            assert daemon.events("integrity_problem") == []
            assert daemon.events("container_caches_dropped") == []
            assert _lost_count(daemon) == 0  # the counter exists from the start, at 0
            assert "no problems found since the daemon started" in _run_stats(daemon)
    finally:
        redis.stop()


# -- in-process: the engine drops the caches, and the hold ends ---------------------------


def test_the_engine_drops_caches_and_is_not_ready_for_the_hold(redis_settings, redis_server,
                                                              tmp_path: Path) -> None:  # fmt: skip
    metrics = Metrics(CollectorRegistry())
    config = load_db_config([
        {"implementation": "json", "name": "stats", "settings": {"root_dir": str(tmp_path)}},
        {"implementation": "redis", "name": "mana", "load": True, "settings": redis_settings},
    ])  # fmt: skip

    async def main() -> None:
        engine = Engine(EngineSettings(service_id="inproc"), config, metrics)
        store = engine.store
        engine.containers["mana"].data_lost_hold = 0.5
        assert await engine.readiness.check() == {}  # first sight: the marker is written
        for channel in ("c1", "c2"):
            assert await store.write(channel, "mana", "MP", Document(30))
            assert await store.keys_page(channel, "mana", None, 10) == (["MP"], None)
        assert await store.write("c1", "stats", "HP", Document(1))
        assert store.cached_body("c1", "mana", "MP")[0] == b"30"

        redis_server.flush()
        assert store.cached_body("c1", "mana", "MP")[0] == b"30"  # the lie, until the next probe
        in_flight = store.write("c2", "mana", "late", Document(1))  # lands after the flush
        assert await engine.readiness.check() == {"mana": "data_lost"}
        assert await in_flight

        assert store.cached_body("c1", "mana", "MP") is None  # memory no longer answers
        assert await store.read_body("c1", "mana", "MP") is ABSENT
        assert store.cached_body("c1", "mana", "MP") is ABSENT  # reloaded, complete: empty
        assert await store.keys_page("c1", "mana", None, 10) == ([], None)
        assert await store.keys_page("c2", "mana", None, 10) == (["late"], None)
        assert store.cached_body("c1", "stats", "HP")[0] == b"1"  # json kept its cache
        assert await engine.readiness.check() == {"mana": "data_lost"}  # held, counted once
        labels = {"container": "mana", "kind": "data_lost"}
        assert metrics.registry.get_sample_value("chanstore_integrity_problems_total",
                                                 labels) == 1  # fmt: skip

        deadline = time.monotonic() + 10
        while await engine.readiness.check():
            assert time.monotonic() < deadline, "data_lost outlived its hold"
            await asyncio.sleep(0.05)
        assert metrics.registry.get_sample_value("chanstore_ready") == 1
        await engine.close()

    asyncio.run(asyncio.wait_for(main(), 60))
