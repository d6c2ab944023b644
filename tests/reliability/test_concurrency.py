"""Many threads on one in-process MoobiusStorage, many clients on one daemon key: no divergence.

* Threads share one MoobiusStorage (a json and a redis container) and set,
  read, delete, bulk-update, pop and edit-in-place a few shared keys while
  another thread drops the caches; afterwards every cached value is what the
  backend holds, a storage reopened from the backends sees the same data,
  and no in-place increment was lost.
* Clients hammer one key of a running daemon (json and redis containers):
  the final value is the last acknowledged write of one of the clients,
  the backend (the json file, the Redis hash) holds the same value, and a
  restarted daemon reads it too.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path
from typing import Any

import httpx
from load_helpers import (
    RedisServer,
    daemon_running,
    json_entry,
    key_path,
    need_redis,
    redis_entry,
)

from chanstore import MoobiusStorage
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.backends.redisdb import RedisDatabase
from chanstore.storage import container_domain

THREADS = 8
OPERATIONS = 300
KEYS = [f"k{index}" for index in range(12)]


def _storage(root: Path, redis: RedisServer, load: bool) -> MoobiusStorage:
    return MoobiusStorage("svc", "chan", [
        {"implementation": "json", "name": "jc", "load": load,
         "settings": {"root_dir": str(root), "fsync": False}},
        {"implementation": "redis", "name": "rc", "load": load, "settings": redis.settings},
    ])  # fmt: skip


def _churn(cached: Any, seed: int, failures: list[str], edits: list[int]) -> None:
    rng = random.Random(seed)
    try:
        for step in range(OPERATIONS):
            key = rng.choice(KEYS)
            roll = rng.random()
            if roll < 0.3:
                cached[key] = {"seed": seed, "step": step}
            elif roll < 0.5:
                cached.get(key)
            elif roll < 0.6:
                cached.pop(key, None)
            elif roll < 0.7:
                cached.update({rng.choice(KEYS): [seed, step], rng.choice(KEYS): step})
            elif roll < 0.8:
                cached.setdefault(key, "default")
            elif roll < 0.9:
                with cached.editing("counter", {"n": 0}) as counter:
                    counter["n"] += 1
                edits.append(seed)
            else:
                key in cached  # noqa: B015 - a read that may fill the cache
    except Exception as exc:  # noqa: BLE001 - reported by the test
        failures.append(f"thread {seed}: {exc!r}")


def test_threads_on_one_storage_leave_cache_and_backend_agreeing(tmp_path: Path) -> None:
    need_redis()
    redis = RedisServer(tmp_path / "redis").start()
    try:
        storage = _storage(tmp_path / "data", redis, load=False)
        stop = threading.Event()

        def forgetter() -> None:  # drops the caches now and then, so reads miss and refill
            while not stop.wait(0.01):
                for cached in storage.containers.values():
                    cached.forget()

        failures: list[str] = []
        edits: dict[str, list[int]] = {name: [] for name in storage.containers}
        threads = [threading.Thread(target=forgetter, daemon=True)]
        for name, cached in storage.containers.items():
            for seed in range(THREADS):
                threads.append(
                    threading.Thread(
                        target=_churn, args=(cached, seed, failures, edits[name]), daemon=True
                    )
                )
        for thread in threads[1:]:
            thread.start()
        threads[0].start()
        for thread in threads[1:]:
            thread.join(timeout=60)
            assert not thread.is_alive()
        stop.set()
        threads[0].join(timeout=10)
        assert failures == []

        reopened = _storage(tmp_path / "data", redis, load=True)
        for name, cached in storage.containers.items():
            backend = cached.database
            held = cached.memory.keys()
            for key in held:  # every value the cache holds is the stored one
                assert backend.get_value(key) == (True, cached.memory.peek(key)), (name, key)
            memory = dict(cached.items())
            fresh = dict(reopened.containers[name].items())
            assert memory == fresh, name
            assert fresh["counter"] == {"n": len(edits[name])}, (name, fresh["counter"])
        print(
            f"{len(threads) - 1} threads x {OPERATIONS} operations; cache == backend; "
            f"in-place increments {[len(e) for e in edits.values()]}, none lost"
        )
        storage.close()
        reopened.close()
    finally:
        redis.stop()


CLIENTS = 8
PUTS_PER_CLIENT = 40
HOT_CHANNEL = "hot"
HOT_KEY = "the-key"


def _hammer(url: str, container: str, client: int, acked: list[dict[str, int]],
            failures: list[str]) -> None:  # fmt: skip
    """PUT this client's values to the hot key, one after the other; keeps the acknowledged ones."""
    path = key_path(HOT_CHANNEL, container, HOT_KEY)
    with httpx.Client(base_url=url, timeout=15) as http:
        for number in range(PUTS_PER_CLIENT):
            value = {"client": client, "n": number}
            response = http.put(path, json=value)
            if response.status_code == 200:
                acked.append(value)
            else:
                failures.append(f"{container} {value}: {response.status_code} {response.text}")
            if number % 5 == 0:
                read = http.get(path)
                if read.status_code != 200 or read.json().get("n") is None:
                    failures.append(f"GET {container}: {read.status_code} {read.text}")


def test_clients_on_one_daemon_key_agree_with_the_backend(tmp_path: Path) -> None:
    need_redis()
    redis = RedisServer(tmp_path / "redis").start()
    config = [json_entry("jhot"), redis_entry("rhot", redis)]
    try:
        with daemon_running(tmp_path / "daemon", config) as daemon:
            acked: dict[str, list[list[dict[str, int]]]] = {"jhot": [], "rhot": []}
            failures: list[str] = []
            threads = []
            for container, per_client in acked.items():
                for client in range(CLIENTS):
                    mine: list[dict[str, int]] = []
                    per_client.append(mine)
                    threads.append(threading.Thread(
                        target=_hammer, args=(daemon.url, container, client, mine, failures),
                        daemon=True))  # fmt: skip
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
                assert not thread.is_alive()
            assert failures == [], failures[:10]

            finals = {}
            for container, per_client in acked.items():
                final = daemon.get(HOT_CHANNEL, container, HOT_KEY).json()
                # Each client's writes are acknowledged one after the other, so the value
                # left standing must be some client's last acknowledged write.
                assert final in [mine[-1] for mine in per_client], (container, final)
                finals[container] = final
            domain = container_domain("e2e", HOT_CHANNEL, "jhot")
            files = list(daemon.data_dir.rglob(f"{HOT_KEY}.json"))
            assert len(files) == 1 and json.loads(files[0].read_text()) == finals["jhot"], files
            json_backend = JSONDatabase(domain, root_dir=str(daemon.data_dir))
            assert json_backend.get_value(HOT_KEY) == (True, finals["jhot"])
            redis_backend = RedisDatabase(container_domain("e2e", HOT_CHANNEL, "rhot"),
                                          **redis.settings)  # fmt: skip
            assert redis_backend.get_value(HOT_KEY) == (True, finals["rhot"])
            # Redis's history holds every acknowledged write once, each client's in the
            # order acknowledged, and the value left standing last: the write lane sends
            # the runs of a batch where the key repeats in one round trip, in order.
            client = redis.client()
            made = [json.loads(fields[b"value"])
                    for _id, fields in client.xrange(redis_backend.stream_name)]  # fmt: skip
            client.close()
            redis_backend.close()
            assert len(made) == sum(len(mine) for mine in acked["rhot"])
            for number, mine in enumerate(acked["rhot"]):
                assert [value for value in made if value["client"] == number] == mine
            assert made[-1] == finals["rhot"]
            daemon.restart()
            for container, final in finals.items():
                assert daemon.get(HOT_CHANNEL, container, HOT_KEY).json() == final
            total = sum(len(mine) for per_client in acked.values() for mine in per_client)
            print(
                f"{total} PUTs acknowledged on one key by {CLIENTS} clients per container; "
                f"final values {finals} agree with the backends and after a restart"
            )
    finally:
        redis.stop()
