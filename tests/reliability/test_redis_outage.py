"""Redis stops for a few seconds under load; the daemon rides it out and recovers by itself.

While Redis is down: the daemon keeps serving (same process), json containers
answer 200, reads and writes of the redis container answer 503 and never a
wrong value (its invalidation link is down with Redis, so memory does not
answer for it), /readyz is 503 and names the redis
container, and chanstore_backend_operation_errors_total counts the failures
by kind. When Redis is started again on the same port, readiness and writes
come back with no restart, and every acknowledged write reads back (after a
restart of the daemon too, so from Redis itself rather than from its cache).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
from load_helpers import (
    Ledger,
    Writer,
    daemon_running,
    durable_redis,
    json_entry,
    key_path,
    redis_entry,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from chanstore.backends.redisdb import RedisDatabase
from chanstore.storage import container_domain

OUTAGE_SECONDS = 3.0
CHANNEL = "outage"
CACHED = {f"cached-{index}": {"n": index} for index in range(10)}


class Reader(threading.Thread):
    """GETs keys that were stored before the outage, over and over; records every status."""

    def __init__(self, url: str, container: str) -> None:
        super().__init__(daemon=True, name=f"reader {container}")
        self.url = url
        self.container = container
        self.stopping = threading.Event()
        self.answers: list[tuple[int | None, object]] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=15) as http:
            while not self.stopping.is_set():
                for key, value in CACHED.items():
                    try:
                        response = http.get(key_path(CHANNEL, self.container, key))
                        self.answers.append((response.status_code, response.json() == value))
                    except httpx.TransportError as exc:
                        self.answers.append((None, str(exc)))
                time.sleep(0.005)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        assert not self.is_alive()


def _errors_by_kind(text: str, container: str) -> dict[str, float]:
    kinds: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "chanstore_backend_operation_errors_total"
                    and sample.labels.get("container") == container):  # fmt: skip
                kind = sample.labels["error"]
                kinds[kind] = kinds.get(kind, 0) + sample.value
    return kinds


def test_redis_outage_under_load(tmp_path: Path) -> None:
    redis = durable_redis(tmp_path / "redis")
    config = [json_entry("jout"), redis_entry("rout", redis)]
    try:
        with daemon_running(tmp_path / "daemon", config) as daemon:
            pid = daemon.http.get("/healthz").json()["pid"]
            for container in ("jout", "rout"):
                stored = daemon.http.post(key_path(CHANNEL, container) + "/-/set",
                                          json={"values": {**CACHED, "doomed": 0}})  # fmt: skip
                assert stored.status_code == 200, stored.text
            ledger = Ledger()
            writers = [Writer(daemon.url, ledger, container, CHANNEL, f"w{index}", pause=0.01)
                       for container in ("jout", "rout") for index in range(2)]  # fmt: skip
            readers = [Reader(daemon.url, container) for container in ("jout", "rout")]
            for thread in [*writers, *readers]:
                thread.start()
            time.sleep(0.5)

            redis.stop()
            down_since = time.monotonic()
            ready = wait_until(lambda: (r := daemon.http.get("/readyz")).status_code == 503 and r,
                               15, "/readyz to notice Redis is down")  # fmt: skip
            problems = ready.json()["problems"]
            assert "rout" in problems and "jout" not in problems, problems
            # What the cache cannot answer fails cleanly too: a channel not yet in memory,
            # a delete, a bulk set.
            fresh = daemon.http.get(key_path("fresh", "rout", "k"))
            assert fresh.status_code == 503 and "unavailable" in fresh.text, fresh.text
            # (A failed write makes the daemon ask Redis next time, so not a key the readers read.)
            deleted = daemon.http.delete(key_path(CHANNEL, "rout", "doomed"))
            assert deleted.status_code == 503, deleted.text
            bulk = daemon.http.post(key_path(CHANNEL, "rout") + "/-/set",
                                    json={"values": {"b1": 1, "b2": 2}})  # fmt: skip
            assert bulk.status_code == 503, bulk.text
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_since)))
            assert daemon.http.get("/healthz").json()["pid"] == pid
            down_until = time.monotonic()
            errors = _errors_by_kind(daemon.metrics_text(), "rout")

            redis.start()  # same port, same append-only file
            wait_until(lambda: daemon.http.get("/readyz").status_code == 200, 20,
                       "/readyz to notice Redis is back")  # fmt: skip
            wait_until(lambda: any(status == 200 and sent > down_until
                                   for w in writers if w.container == "rout"
                                   for status, sent, _ in list(w.answers)),
                       20, "writes to the redis container to succeed again")  # fmt: skip
            assert daemon.http.get(key_path("fresh", "rout", "k")).status_code == 404
            assert daemon.get(CHANNEL, "rout", "doomed").json() == 0  # the delete failed
            time.sleep(0.3)
            for thread in [*writers, *readers]:
                thread.stop()

            # Sent and answered while Redis was surely down: a 503 every time, never a 200.
            during = [status for w in writers if w.container == "rout"
                      for status, sent, answered in w.answers
                      if sent > down_since and answered < down_until]  # fmt: skip
            assert during and set(during) == {503}, sorted(set(map(str, during)))
            # json writes and reads never failed. Reads of the redis container are never
            # wrong: while its invalidation link is down (Redis is), memory does not answer
            # for it (another daemon may write the moment Redis is back), so they go to
            # Redis and answer 503 while it is down, the right value otherwise.
            json_statuses = {s for w in writers if w.container == "jout" for s, _, _ in w.answers}
            assert json_statuses == {200}, json_statuses
            answers = {reader.container: set(reader.answers) for reader in readers}
            assert answers["jout"] == {(200, True)}, answers["jout"]
            redis_reads = answers["rout"]
            assert (200, True) in redis_reads, redis_reads
            assert redis_reads <= {(200, True), (503, False)}, redis_reads
            # The failures are counted by kind.
            assert errors.get("unavailable", 0) + errors.get("timeout", 0) > 0, errors
            assert daemon.http.get("/healthz").json()["pid"] == pid  # no restart

            assert ledger.lost(daemon) == []
            daemon.restart()  # now the values come from Redis itself, not the cache
            assert ledger.lost(daemon) == []
            print(
                f"{ledger.acknowledged} writes acknowledged, {len(during)} answered 503 while "
                f"Redis was down, errors by kind {errors}, statuses {ledger.statuses}, lost 0"
            )
    finally:
        redis.stop()


def test_redis_hanging_under_load_leaves_cache_and_redis_agreeing(tmp_path: Path) -> None:
    """Redis frozen (SIGSTOP): writes time out with an unknown outcome, and may land later.

    Whatever a write that failed did in the end, once Redis answers again the
    daemon serves what Redis holds, not what it cached before the failure.
    """
    redis = durable_redis(tmp_path / "redis")
    config = [redis_entry("rhang", redis)]
    try:
        with daemon_running(tmp_path / "daemon", config) as daemon:
            ledger = Ledger()
            writers = [Writer(daemon.url, ledger, "rhang", CHANNEL, f"w{index}", keys=3,
                              pause=0.01) for index in range(3)]  # fmt: skip
            for writer in writers:
                writer.start()
            wait_until(lambda: ledger.acknowledged >= 20, 30, "writes to be acknowledged")
            assert redis.process is not None
            redis.process.send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: ledger.statuses.get(503, 0) >= 3, 30, "writes to fail")
            finally:
                redis.process.send_signal(signal.SIGCONT)
            wait_until(lambda: daemon.http.get("/readyz").status_code == 200, 30,
                       "/readyz to notice Redis answers again")  # fmt: skip
            for writer in writers:
                writer.stop()
            assert ledger.lost(daemon) == []
            backend = RedisDatabase(container_domain("e2e", CHANNEL, "rhang"), **redis.settings)
            try:
                differ = {}
                for _container, channel, key in ledger.sent:
                    served = daemon.get(channel, "rhang", key).json()
                    ok, stored = backend.get_value(key)
                    if (ok and stored) != served:
                        differ[key] = (served, stored)
            finally:
                backend.close()
            assert differ == {}, f"daemon serves (first) what Redis does not hold: {differ}"
            print(
                f"{ledger.acknowledged} writes acknowledged, statuses {ledger.statuses}; "
                f"the daemon serves what Redis holds for all {len(ledger.sent)} keys"
            )
    finally:
        if redis.process is not None:
            redis.process.send_signal(signal.SIGCONT)
        redis.stop()
