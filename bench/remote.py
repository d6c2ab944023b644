"""Benchmark of the ``chanstore`` backend: an in-process MoobiusStorage stored in a daemon.

What is measured, each side in the same run:

1. A cached get (``storage.stats[key]``, the key in the CachedDict's memory)
   on the ``chanstore`` backend against the same get on a local json backend:
   the cache is the library's either way, so the goal is parity (1.0x).
2. A set (``storage.stats[key] = value``, strict) on the ``chanstore``
   backend against a direct HTTP PUT of the same value to the same daemon
   with a keep-alive ``httpx.Client`` (what a service would write by hand):
   the ratio is the backend's overhead over the bare request (encoding, the
   contract's checks, the cache, the change feed's echo of its own write).
3. Staleness: another client's PUT, from its start to the moment the
   in-process cache holds the new value (the change feed's delivery).

How: the daemon (``chanstore serve``, a json container with ``fsync: false``,
so that the disk does not hide the overhead measured) runs as its own
process. Sides alternate in rounds sized by calibration, garbage collection
paused while timed; reported are medians over rounds of µs/op and of the
per-round ratios. Run: ``python3 bench/remote.py`` (about a minute) or
``--quick``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from chanstore import MoobiusStorage
from chanstore.client import Client
from harness import (
    chanstore_command,
    free_port,
    markdown_table,
    on_time_limit,
    progress,
    source_state,
    stop,
    text_table,
    wait_until,
)

SERVICE = "bench"
VALUE = {"hp": 100, "name": "alice", "tags": ["a", "b"]}


def per_op(run: Callable[[int], None], seconds: float) -> float:
    """µs per call of ``run(n)``'s n calls, sized to last about ``seconds``."""
    n = 1
    while True:
        started = time.perf_counter()
        run(n)
        took = time.perf_counter() - started
        if took > seconds / 4 or n > 10_000_000:
            break
        n *= 4
    n = max(1, int(n * seconds / max(took, 1e-9)))
    gc.disable()
    try:
        started = time.perf_counter()
        run(n)
        return (time.perf_counter() - started) / n * 1e6
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args()
    rounds, seconds = (3, 0.3) if args.quick else (7, 1.0)
    signal.signal(signal.SIGALRM, on_time_limit)
    signal.alarm(600)
    with tempfile.TemporaryDirectory(prefix="chanstore-bench-remote-") as folder:
        work = Path(folder)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        entry = {"name": "stats", "load": True, "clear": False}
        (work / "daemon.json").write_text(json.dumps([{**entry, "implementation": "json",
            "settings": {"root_dir": str(work / "daemon-data"), "fsync": False}}]))  # fmt: skip
        local = [{**entry, "implementation": "json",
                  "settings": {"root_dir": str(work / "local-data"), "fsync": False}}]  # fmt: skip
        remote = [{**entry, "implementation": "chanstore", "settings": {"url": url}}]
        log = work / "daemon.log"
        with log.open("wb") as out:
            daemon = subprocess.Popen([chanstore_command(), "serve", "--db-config",
                                       str(work / "daemon.json"), "--service-id", SERVICE,
                                       "--listen", f"127.0.0.1:{port}", "--log-level", "warning"],
                                      stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_until(lambda: _ready(url), daemon, "the daemon", log, 20)
            rows = measure(url, local, remote, rounds, seconds)
        finally:
            stop(daemon)
    report(rows, args)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def measure(url: str, local: list, remote: list, rounds: int, seconds: float) -> list[list[str]]:
    over_local = MoobiusStorage(SERVICE, "c1", local, strict_mode=True)
    over_daemon = MoobiusStorage(SERVICE, "c1", remote, strict_mode=True)
    over_local.stats["k"] = VALUE
    over_daemon.stats["k"] = VALUE
    http = httpx.Client(base_url=url)
    hits: list[tuple[float, float]] = []
    sets: list[tuple[float, float]] = []

    def hit(stats):
        def run(n: int) -> None:
            for _ in range(n):
                stats["k"]

        return run

    def store(n: int) -> None:
        stats = over_daemon.stats
        for i in range(n):
            stats[f"s{i % 100}"] = VALUE

    body = json.dumps(VALUE).encode()

    def put(n: int) -> None:
        for i in range(n):
            http.put(f"/v1/channels/c1/stats/p{i % 100}", content=body).raise_for_status()

    for round_ in range(rounds):
        progress(f"round {round_ + 1}/{rounds}")
        pair = [per_op(hit(over_local.stats), seconds), per_op(hit(over_daemon.stats), seconds)]
        hits.append((pair[0], pair[1]))
        sides = [per_op(store, seconds), per_op(put, seconds)]
        sets.append((sides[0], sides[1]))
    staleness = _staleness(url, over_daemon, 50 if rounds < 5 else 200)
    http.close()
    over_local.close()
    over_daemon.close()

    def median(pairs: list[tuple[float, float]], side: int) -> float:
        return statistics.median(pair[side] for pair in pairs)

    def ratio(pairs: list[tuple[float, float]]) -> float:
        return statistics.median(b / a for a, b in pairs)

    return [
        ["cached get: chanstore backend / local json", f"{median(hits, 1):.3f} µs",
         f"{median(hits, 0):.3f} µs", f"{ratio(hits):.2f}x", "1.0x (parity)"],
        ["set: chanstore backend / direct HTTP PUT", f"{median(sets, 0):.0f} µs",
         f"{median(sets, 1):.0f} µs", f"{statistics.median(a / b for a, b in sets):.2f}x",
         "(reported)"],
        ["another client's PUT seen in the cache (p50, p99)",
         f"{staleness[0]:.2f}, {staleness[1]:.2f} ms", "-", "", "< 1 s"],
    ]  # fmt: skip


def _staleness(url: str, storage: MoobiusStorage, samples: int) -> tuple[float, float]:
    """Milliseconds from the start of another client's PUT to the cache holding it."""
    took = []
    with Client(url) as other:
        for i in range(samples):
            started = time.perf_counter()
            other.set("c1", "stats", "seen", i)
            deadline = started + 5
            while storage.stats.memory.peek("seen") != i:
                if time.perf_counter() > deadline:
                    raise RuntimeError("a write was not seen within 5 s")
                time.sleep(0.0002)
            took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[min(len(took) - 1, int(len(took) * 0.99))]


def report(rows: list[list[str]], args: argparse.Namespace) -> None:
    headers = ["measure", "chanstore backend", "baseline", "ratio", "goal"]
    machine = (f"Python {platform.python_version()}, {platform.machine()}, "
               f"{len(__import__('os').sched_getaffinity(0))} CPUs")  # fmt: skip
    print(f"python3 bench/remote.py{' --quick' if args.quick else ''}  ({machine}; "
          f"{source_state()})")  # fmt: skip
    print(text_table(headers, rows, right={1, 2, 3}))
    print()
    print(markdown_table(headers, rows, right={1, 2, 3}))


if __name__ == "__main__":
    sys.exit(main())
