"""Many reloads, valid and invalid, while clients read and write: nothing fails, nothing is lost.

Containers ``steady`` (json) and ``rsteady`` (redis) are in every config;
each valid reload adds or removes an unrelated container, each invalid one
(broken JSON, an unknown implementation, a duplicate name, a missing field)
must be rejected with 400 while the running config stays. Clients PUT and
GET the steady containers throughout: every request answers 200, every GET
sees the writer's own last value, and every acknowledged write reads back,
after a restart too. At most two channels stay in memory, so channels are
also dropped and read back from the backends throughout.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import httpx
from load_helpers import (
    Ledger,
    RedisServer,
    daemon_running,
    json_entry,
    key_path,
    need_redis,
    redis_entry,
)

RELOADS = 24
CLIENTS = 4


class ReadWriter(threading.Thread):
    """PUTs a key then GETs it back, over and over; anything but 200 and its own value fails."""

    def __init__(self, url: str, ledger: Ledger, container: str, name: str) -> None:
        super().__init__(daemon=True, name=f"client {container} {name}")
        self.url = url
        self.ledger = ledger
        self.container = container
        self.name_ = name
        self.stopping = threading.Event()
        self.failures: list[str] = []
        self.requests = 0

    def run(self) -> None:
        seq = 0
        with httpx.Client(base_url=self.url, timeout=15) as http:
            while not self.stopping.is_set():
                seq += 1
                key = f"{self.name_}-k{seq % 7}"
                channel = f"reload-{self.name_}"  # a channel each: they leave memory and come back
                where = (self.container, channel, key)
                path = key_path(channel, self.container, key)
                self.ledger.record_sent(where, seq)
                try:
                    put = http.put(path, json={"key": key, "seq": seq})
                    self.ledger.record(where, seq, put.status_code)
                    got = http.get(path)
                except httpx.TransportError as exc:
                    self.failures.append(f"{key}: {exc!r}")
                    continue
                self.requests += 2
                if put.status_code != 200:
                    self.failures.append(f"PUT {key}: {put.status_code} {put.text}")
                elif got.status_code != 200 or got.json() != {"key": key, "seq": seq}:
                    self.failures.append(f"GET {key}: {got.status_code} {got.text}")


def _write_atomically(path: Path, text: str) -> None:
    spare = path.with_name(path.name + ".new")
    spare.write_text(text, encoding="utf-8")
    os.replace(spare, path)


def test_reloads_under_load_fail_nothing(tmp_path: Path) -> None:
    need_redis()
    redis = RedisServer(tmp_path / "redis").start()
    steady = [json_entry("steady"), redis_entry("rsteady", redis)]
    invalid: list[Any] = [
        '[{"implementation": "json", "name": "half',  # caught half-written
        [*steady, {"implementation": "nosuchengine", "name": "x", "settings": {}}],
        [*steady, json_entry("steady")],  # a duplicate name
        [*steady, {"name": "nameless-implementation"}],
    ]
    try:
        # Few channels in memory and a short idle timeout: channels are dropped and
        # reloaded from the backends all the time as well.
        args = ["--max-channels", "2", "--idle-timeout", "0.2"]
        with daemon_running(tmp_path / "daemon", steady, args=args) as daemon:
            ledger = Ledger()
            clients = [
                ReadWriter(daemon.url, ledger, container, f"c{index}")
                for container in ("steady", "rsteady")
                for index in range(CLIENTS // 2)
            ]
            for client in clients:
                client.start()
            verdicts = {True: 0, False: 0}
            try:
                for number in range(RELOADS):
                    if number % 3 == 2:
                        entries = invalid[number % len(invalid)]
                        text = entries if isinstance(entries, str) else json.dumps(entries)
                        expect_ok = False
                    else:
                        extra = [json_entry(f"extra{number}")] if number % 2 == 0 else []
                        text, expect_ok = json.dumps([*steady, *extra]), True
                    _write_atomically(daemon.config_path, text)
                    answer = daemon.http.post("/-/reload")
                    assert answer.status_code == (200 if expect_ok else 400), answer.text
                    verdicts[expect_ok] += 1
                    served = daemon.containers()
                    assert {"steady", "rsteady"} <= set(served), served
            finally:
                for client in clients:
                    client.stopping.set()
                for client in clients:
                    client.join(timeout=30)
            failures = [failure for client in clients for failure in client.failures]
            requests = sum(client.requests for client in clients)
            assert failures == [], failures[:20]
            assert requests > 0 and ledger.acknowledged > 0
            assert ledger.lost(daemon) == []
            _write_atomically(daemon.config_path, json.dumps(steady))  # the last one was bad
            assert daemon.http.post("/-/reload").status_code == 200
            daemon.restart()
            assert ledger.lost(daemon) == []
            print(
                f"{verdicts[True]} valid and {verdicts[False]} invalid reloads; {requests} "
                f"requests, 0 failed; {ledger.acknowledged} writes acknowledged, lost 0"
            )
    finally:
        redis.stop()
