"""The in-process loops that bench/storage.py times on both sides, and the side of the
original SDK: its CachedDict (moobius 1.8.0), in a venv of its own, in a subprocess.

Standard library only, so that the original's venv runs this file as it is:
``python original_sdk.py --serve POOL`` builds the original's CachedDict
holding POOL keys (and a plain dict of the same), then times one round per
line it reads on stdin (``{"loop": "hit", "target": "cached", "n": 1000}``)
and answers its seconds per operation on stdout. bench/storage.py imports the
same loops and :func:`timed`, so both sides run the same code, timed the same
way, in rounds interleaved with each other (the subprocess waits on its pipe
while the other side is timed). ``{"memory": COUNT}`` measures what COUNT of
the original's MoobiusStorage (one json container, one small key each) hold.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Mapping
from typing import Any

VALUE: dict[str, Any] = {"hp": 100, "mana": 35, "name": "player", "flags": [1, 2, 3]}
ORIGINAL = "moobius==1.8.0"


def hit(mapping: Mapping[str, Any], keys: list[str]) -> None:
    for key in keys:
        mapping[key]


def get(mapping: Mapping[str, Any], keys: list[str]) -> None:
    for key in keys:
        mapping.get(key)


def contains(mapping: Mapping[str, Any], keys: list[str]) -> None:
    for key in keys:
        key in mapping  # noqa: B015 - the lookup is what is timed


def items(mapping: Mapping[str, Any], keys: list[str]) -> None:
    """One operation per item: the whole mapping iterated len(keys) / len(mapping) times."""
    for _ in range(len(keys) // len(mapping)):
        for _item in mapping.items():
            pass


LOOPS: dict[str, Callable[[Mapping[str, Any], list[str]], None]] = {
    "hit": hit,
    "get": get,
    "in": contains,
    "in (absent)": contains,
    "items": items,
}


def pool_keys(count: int) -> list[str]:
    return [f"key-{index:06d}" for index in range(count)]


def absent_keys(count: int) -> list[str]:
    return [f"absent-{index:06d}" for index in range(count)]


def round_keys(loop: str, pool: list[str], n: int) -> list[str]:
    """The ``n`` keys (``n`` rounded up to whole passes over the pool) a round goes through."""
    passes = max(1, -(-n // len(pool)))
    source = absent_keys(len(pool)) if loop == "in (absent)" else pool
    return source * passes


def timed(run: Callable[[], object], operations: int) -> tuple[float, float]:
    """Seconds per operation of ``run()``, wall clock and this thread's CPU, GC paused."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        cpu_started = time.thread_time()
        started = time.perf_counter()
        run()
        elapsed = time.perf_counter() - started
        cpu = time.thread_time() - cpu_started
    finally:
        if enabled:
            gc.enable()
    return elapsed / operations, cpu / operations


class _Unstored:
    """The database behind the original's CachedDict: the timed reads never reach it."""

    def get_value(self, key: str) -> tuple[bool, Any]:
        return False, "absent"

    def set_value(self, key: str, value: Any) -> tuple[bool, Any]:
        return True, key

    def delete_key(self, key: str) -> tuple[bool, Any]:
        return True, key

    def all_keys(self) -> list[str]:
        return []


def original_memory(count: int) -> float:
    """Bytes per channel of the original's MoobiusStorage with one json container and key."""
    from moobius.database.storage import MoobiusStorage  # noqa: PLC0415 - only in its venv

    with tempfile.TemporaryDirectory() as root:
        config = [{"implementation": "json", "name": "box", "load": True, "clear": False,
                   "settings": {"root_dir": root}}]  # fmt: skip
        warm = [MoobiusStorage("svc", f"warm-{index}", config) for index in range(10)]
        for storage in warm:
            storage.box["k"] = 1
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        held = []
        for index in range(count):
            storage = MoobiusStorage("svc", f"channel-{index:06d}", config)
            storage.box["k"] = 1
            held.append(storage)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    return grown / count


def serve(pool_size: int) -> None:
    """Answer timing requests on stdin, one JSON line each, with the original's CachedDict."""
    from loguru import logger  # noqa: PLC0415 - only in the original's venv
    from moobius.database.storage import CachedDict  # noqa: PLC0415

    logger.remove()  # the original logs a warning per NullDatabase; nothing on our pipe
    pool = pool_keys(pool_size)
    cached = CachedDict(_Unstored())
    for key in pool:
        cached[key] = dict(VALUE)
    targets = {"cached": cached, "dict": dict.fromkeys(pool, VALUE)}
    print(json.dumps({"ready": sys.version.split()[0]}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "memory" in request:
            print(json.dumps({"bytes": original_memory(request["memory"])}), flush=True)
            continue
        loop, mapping = LOOPS[request["loop"]], targets[request["target"]]
        keys = round_keys(request["loop"], pool, request["n"])
        wall, cpu = timed(lambda: loop(mapping, keys), len(keys))  # noqa: B023
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--serve"]:
        raise SystemExit("usage: original_sdk.py --serve POOL (run by bench/storage.py)")
    serve(int(sys.argv[2]))
