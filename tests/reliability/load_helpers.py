"""What the load, kill, outage, reload and concurrency tests share (not fixtures).

They run the daemon as a real process through tests/daemon/daemon_harness.py
and a redis-server through tests/support.py; this module adds a durable
Redis (append-only file, fsync on every write), writer threads that record
what the daemon acknowledged, and the read-back that checks nothing
acknowledged was lost.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "daemon"))

from daemon_harness import (
    IN_CI,
    DaemonProcess,
    RedisServer,
    json_entry,
    key_path,
    metric,
    wait_until,
)

__all__ = [
    "DaemonProcess",
    "Ledger",
    "RedisServer",
    "Writer",
    "daemon_running",
    "durable_redis",
    "json_entry",
    "key_path",
    "metric",
    "need_redis",
    "redis_entry",
    "wait_until",
]

#: Options that make redis-server lose nothing it acknowledged, even to SIGKILL.
DURABLE_REDIS = ("--appendonly", "yes", "--appendfsync", "always")


def need_redis() -> None:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def durable_redis(folder: Path) -> RedisServer:
    """A started redis-server that writes every change to its AOF in ``folder`` before answering."""
    need_redis()
    return RedisServer(folder, *DURABLE_REDIS).start()


def redis_entry(name: str, redis: RedisServer, **fields: Any) -> dict[str, Any]:
    """A db_config entry for a redis container, with short timeouts so an outage fails fast."""
    settings = {**redis.settings, "socket_timeout": 1.0, "socket_connect_timeout": 0.5}
    return {"implementation": "redis", "name": name, "load": True, "clear": False,
            "settings": settings, **fields}  # fmt: skip


@contextlib.contextmanager
def daemon_running(workdir: Path, config: list[dict[str, Any]], **options: Any
                   ) -> Iterator[DaemonProcess]:  # fmt: skip
    """A started daemon, stopped afterwards; the test fails if its log shows a crash."""
    daemon = DaemonProcess(workdir, config, **options)
    try:
        daemon.start()
        yield daemon
    finally:
        problems = daemon.close()
        if problems:
            pytest.fail("the daemon crashed or hung:\n" + "\n".join(problems))


@dataclass
class Ledger:
    """What writers sent and what the daemon acknowledged, per (container, channel, key).

    Each key is written by one writer only, with increasing sequence numbers, so
    a read-back must show a sequence number between the last acknowledged one
    and the last one sent.
    """

    acked: dict[tuple[str, str, str], int] = field(default_factory=dict)
    sent: dict[tuple[str, str, str], int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record_sent(self, where: tuple[str, str, str], seq: int) -> None:
        with self.lock:
            self.sent[where] = seq

    def record(self, where: tuple[str, str, str], seq: int, status: int | None) -> None:
        with self.lock:
            if status is None:
                self.transport_errors += 1
                return
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200:
                self.acked[where] = max(seq, self.acked.get(where, 0))

    @property
    def acknowledged(self) -> int:
        return self.statuses.get(200, 0)

    def lost(self, daemon: DaemonProcess) -> list[str]:
        """Every acknowledged write that does not read back (empty when none is lost)."""
        problems = []
        with self.lock:
            expected = dict(self.acked)
            sent = dict(self.sent)
        by_container: dict[tuple[str, str], list[str]] = {}
        for container, channel, key in expected:
            by_container.setdefault((container, channel), []).append(key)
        for (container, channel), keys in by_container.items():
            response = daemon.http.post(key_path(channel, container) + "/-/get",
                                        json={"keys": keys})  # fmt: skip
            assert response.status_code == 200, response.text
            values = response.json()["values"]
            for key in keys:
                where = (container, channel, key)
                value = values.get(key)
                low, high = expected[where], sent[where]
                if not isinstance(value, dict) or value.get("key") != key:
                    problems.append(f"{where}: acknowledged seq {low}, read {value!r}")
                elif not low <= value["seq"] <= high:
                    problems.append(f"{where}: acknowledged seq {low} (last sent {high}), "
                                    f"read seq {value['seq']}")  # fmt: skip
        return problems


class Writer(threading.Thread):
    """PUTs increasing sequence numbers to its own keys until stopped; records the answers."""

    def __init__(self, url: str, ledger: Ledger, container: str, channel: str, name: str,
                 keys: int = 5, pause: float = 0.0, bulk: bool = False) -> None:  # fmt: skip
        super().__init__(daemon=True, name=f"writer {container} {name}")
        self.url = url
        self.ledger = ledger
        self.container = container
        self.channel = channel
        self.keys = [f"{name}-k{index}" for index in range(keys)]
        self.pause = pause
        #: Every other request is a bulk set of all this writer's keys.
        self.bulk = bulk
        self.stopping = threading.Event()
        self.seq = 0
        #: (status or None, monotonic time sent, monotonic time answered) of each request.
        self.answers: list[tuple[int | None, float, float]] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=15) as http:
            while not self.stopping.is_set():
                self.seq += 1
                keys = [self.keys[self.seq % len(self.keys)]]
                if self.bulk and self.seq % 2:
                    keys = self.keys
                places = [(self.container, self.channel, key) for key in keys]
                for where in places:
                    self.ledger.record_sent(where, self.seq)
                sent = time.monotonic()
                try:
                    if len(keys) == 1:
                        status: int | None = http.put(
                            key_path(self.channel, self.container, keys[0]),
                            json={"key": keys[0], "seq": self.seq},
                        ).status_code
                    else:
                        values = {key: {"key": key, "seq": self.seq} for key in keys}
                        status = http.post(key_path(self.channel, self.container) + "/-/set",
                                           json={"values": values}).status_code  # fmt: skip
                except httpx.TransportError:
                    status = None
                    time.sleep(0.02)
                for where in places:
                    self.ledger.record(where, self.seq, status)
                self.answers.append((status, sent, time.monotonic()))
                if self.pause:
                    time.sleep(self.pause)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        assert not self.is_alive(), f"{self.name} did not stop"


def json_files_parse(root: Path) -> int:
    """How many ``*.json`` files there are under ``root``; fails on one that does not parse."""
    count = 0
    for path in root.rglob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))
        count += 1
    return count
