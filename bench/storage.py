"""Benchmarks of chanstore's storage layer, each printed beside a baseline from the same run.

What is measured:

1. Per-operation cost of a :class:`~chanstore.CachedDict` over json (fsync on),
   json (fsync off) and redis: a cached get (hit), an uncached get (miss: one
   backend read), set, delete, and ``load()`` of a container of N keys. The
   baselines are the plain code doing the same job: a ``dict`` get for hits; a
   one-at-a-time "write temp file / fsync / rename" loop for json writes (and
   the same loop without fsync, and with the folder fsync chanstore also does);
   ``unlink``, ``open/read/json.loads`` and ``listdir`` + reads for json
   deletes, reads and loads; raw redis-py HSET / HGET / HDEL / HGETALL for
   redis. Baselines serialize with ``json.dumps``, as any store must.
2. Instrumentation overhead per backend operation: ``get_value`` (null, json
   with fsync off, redis) and ``set_value`` (null, redis; a json write's
   file-system cost varies by far more than the wrapper's, and the wrapper's
   write path is the same for every backend) called through the instrumented
   method, against the bare function it wraps
   (``type(db).get_value.__wrapped__``) and against the bare function plus
   one ``observe()`` on a pre-bound Prometheus histogram child (the cost the
   wrapper is meant to stay close to); and that ``observe()`` alone, in a
   tight loop.
4. The in-process hot path against the original SDK (moobius 1.8.0, installed in
   a venv of the benchmark's own, made once with ``python3 -m venv`` and ``pip
   install moobius==1.8.0`` and kept under ``~/.cache/chanstore-bench``, or
   ``$CHANSTORE_BENCH_CACHE``): a cache hit (``d[key]``), ``d.get(key)``,
   ``key in d`` for held and for absent keys of a loaded container, and
   ``items()`` per item, each on chanstore's CachedDict here and on the
   original's in a subprocess of that venv, running the same loops
   (``bench/original_sdk.py``) timed the same way, in interleaved rounds; a
   plain dict is timed on both sides too, so that the two processes can be
   told apart from the two caches.
5. Memory: a channel in memory (a MoobiusStorage with one json container and
   one small key, here and in the original SDK; and what one more channel
   costs the daemon's engine, in-process), and a cached key against a plain
   dict of the same values (``tracemalloc``, after a collection).
3. Loading a 100,000-key container from Redis (``CachedDict.load`` and
   ``RedisDatabase.load_all``: one HGETALL) against fetching the same keys one
   HGET at a time, and one GET at a time from one Redis key per value (the
   original SDK's layout), each with ``json.loads``. The per-key baselines are
   handed the key list: they are not charged for listing the keys.

How: the sides of every comparison run in the same rounds, in an order
rotated each round, each round sized by calibration to a fixed duration, with
garbage collection paused while timed. Reported are medians over rounds: of
µs/op on each side, and of the per-round ratios or differences, because these
machines are shared and noisy. Part 2 takes its differences in the calling
thread's CPU time (``time.thread_time``), which the wrapper adds to and a
Redis round trip's waiting does not blur; wall clock is shown beside it. Part
3 fetches a different slice of the keys one at a time in each round and scales
the time to all of them (one round trip per key: the cost is linear). The
benchmark starts its own ``redis-server`` on a free port (no persistence),
waits for PING, and stops it at the end; json files go to a temporary folder
that is removed afterwards. A run past its time limit is aborted.

Run: ``python bench/storage.py`` (two to three minutes on 2 cores) or
``python bench/storage.py --quick`` (about 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Protocol

import redis
from prometheus_client import CollectorRegistry, Histogram

import original_sdk  # bench/original_sdk.py: the loops both sides of part 4 run
from chanstore import CachedDict, JSONDatabase, Metrics, MoobiusStorage, NullDatabase, cache_hits
from chanstore.backends.base import DatabaseInterface
from chanstore.backends.redisdb import RedisDatabase
from chanstore.codec import Document
from chanstore.config import load_db_config
from chanstore.engine import Engine, EngineSettings
from chanstore.instrumentation import attach
from chanstore.metrics import BACKEND_BUCKETS

VALUE: dict[str, Any] = {"hp": 100, "mana": 35, "name": "player", "flags": [1, 2, 3]}
GOAL_OVERHEAD_US = 2.0
#: A row judges the wrapper only if the observe() added to its own bare call costs within
#: this of a tight loop's observe(): beyond it, the row's noise (two Redis round trips
#: differ by microseconds here) is as large as the goal.
RESOLUTION_US = 0.5
GOAL_LOAD_SPEEDUP = 10.0
GOAL_HOT_RATIO = 2.0  # chanstore / the original SDK, for a hit and for `in`


@dataclass(frozen=True)
class Settings:
    """How long and how large each part of the run is."""

    rounds: int  # paired rounds per comparison; medians are over these
    round_seconds: float  # target duration of one timed side of one round
    pool_keys: int  # distinct keys that gets and sets cycle through
    container_keys: int  # N, the size of the container that load() reads
    miss_keys: int  # stored keys available to uncached gets in one round
    overhead_rounds: int
    big_keys: int  # the Redis container of part 3
    big_rounds: int
    big_sample: int  # keys fetched one at a time per round (scaled to big_keys)
    time_limit: float  # seconds; the run is aborted (and Redis stopped) past it
    hot_rounds: int  # part 4
    memory_channels: int  # part 5: channels made to measure one
    memory_keys: int  # part 5: keys loaded to measure one


FULL = Settings(
    rounds=7, round_seconds=0.08, pool_keys=500, container_keys=1000, miss_keys=2000,
    overhead_rounds=51, big_keys=100_000, big_rounds=5, big_sample=20_000, time_limit=340.0,
    hot_rounds=15, memory_channels=2000, memory_keys=10_000,
)  # fmt: skip
QUICK = Settings(
    rounds=3, round_seconds=0.03, pool_keys=200, container_keys=1000, miss_keys=500,
    overhead_rounds=21, big_keys=100_000, big_rounds=3, big_sample=3_000, time_limit=160.0,
    hot_rounds=7, memory_channels=1000, memory_keys=5000,
)  # fmt: skip


# -- timing ------------------------------------------------------------------------


@dataclass
class Case:
    """One measured loop: ``run`` does one operation per item that ``prepare(n)`` returns.

    ``prepare`` is untimed and runs before every round.
    """

    label: str
    run: Callable[[list[str]], object]
    prepare: Callable[[int], list[str]]
    max_ops: int = 200_000
    min_ops: int = 1
    # Times a round of n operations elsewhere (the original SDK's subprocess) instead.
    timer: Callable[[int], Timing] | None = None


@dataclass(frozen=True)
class Timing:
    """Seconds per operation over one round: wall clock, and CPU time of this thread."""

    wall: float
    cpu: float


def median_us(values: Iterable[float]) -> float:
    return statistics.median(values) * 1e6


@dataclass
class Comparison:
    """A chanstore operation and its plain-code baseline, one timing per round each."""

    operation: str
    backend: str
    subject: Case
    baseline: Case
    subject_times: list[Timing]
    baseline_times: list[Timing]

    @property
    def subject_us(self) -> float:
        return median_us(t.wall for t in self.subject_times)

    @property
    def baseline_us(self) -> float:
        return median_us(t.wall for t in self.baseline_times)

    @property
    def ratio(self) -> float:
        """Median over rounds of subject time / baseline time of the same round."""
        pairs = zip(self.subject_times, self.baseline_times, strict=True)
        return statistics.median(s.wall / b.wall for s, b in pairs)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def time_round(case: Case, n: int) -> Timing:
    """Time one round of ``n`` operations."""
    if case.timer is not None:
        return case.timer(n)
    items = case.prepare(n)
    wall, cpu = original_sdk.timed(lambda: case.run(items), len(items))
    return Timing(wall, cpu)


def calibrate(case: Case, seconds: float) -> int:
    """The number of operations that makes one round last about ``seconds`` (warms up too)."""
    n = 1
    while True:
        per_op = time_round(case, n).wall
        if per_op * n >= seconds / 5 or n >= case.max_ops:
            break
        n = min(case.max_ops, n * 10)
    return max(case.min_ops, min(case.max_ops, round(seconds / per_op)))


def interleaved(cases: Sequence[Case], rounds: int, seconds: float) -> list[list[Timing]]:
    """Time every case once per round, in an order rotated each round; timings by case."""
    sizes = [calibrate(case, seconds) for case in cases]
    timings: list[list[Timing]] = [[] for _ in cases]
    indexes = list(range(len(cases)))
    for index in range(rounds):
        shift = index % len(cases)
        for i in indexes[shift:] + indexes[:shift]:
            timings[i].append(time_round(cases[i], sizes[i]))
    return timings


def compare(
    operation: str, backend: str, subject: Case, baseline: Case, rounds: int, seconds: float
) -> Comparison:
    """Time ``subject`` and ``baseline`` in alternating order for ``rounds`` rounds."""
    subject_times, baseline_times = interleaved([subject, baseline], rounds, seconds)
    return Comparison(operation, backend, subject, baseline, subject_times, baseline_times)


def cycled(pool: Sequence[str], n: int) -> list[str]:
    """``n`` keys taken from ``pool`` in turn."""
    return list(itertools.islice(itertools.cycle(pool), n))


def keys_named(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{index:06d}" for index in range(count)]


# -- the plain-code baselines ----------------------------------------------------------


class RawStore(Protocol):
    """What a baseline store does, written the plain way, without chanstore."""

    def label(self, operation: str) -> str: ...
    def get(self, key: str) -> Any: ...
    def set(self, key: str, value: Any) -> None: ...
    def delete(self, key: str) -> None: ...
    def load(self) -> dict[str, Any]: ...
    def fill(self, keys: Sequence[str], value: Any) -> None: ...


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RawJsonStore:
    """One JSON file per key: write a temp file, (fsync,) rename over the key's file."""

    def __init__(self, folder: Path, *, fsync: bool, sync_folder: bool = False) -> None:
        self.folder = folder
        self.fsync = fsync
        self.sync_folder = sync_folder
        folder.mkdir(parents=True, exist_ok=True)

    def label(self, operation: str) -> str:
        folder = " + folder fsync" if self.sync_folder else ""
        return {
            "set": ("write temp/fsync/rename" if self.fsync else "write temp/rename") + folder,
            "delete": "unlink + folder fsync" if self.fsync else "unlink",
            "get (miss)": "read file + json.loads",
            "load": "listdir + read + json.loads",
        }[operation]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str) -> Any:
        return json.loads(self.path(key).read_bytes())

    def set(self, key: str, value: Any) -> None:
        self.write(key, json.dumps(value, indent=2).encode(), fsync=self.fsync)
        if self.sync_folder:
            fsync_folder(self.folder)

    def write(self, key: str, data: bytes, *, fsync: bool) -> None:
        temp = self.folder / f".tmp-{key}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path(key))

    def delete(self, key: str) -> None:
        os.unlink(self.path(key))
        if self.fsync:  # nothing else makes an unlink durable
            fsync_folder(self.folder)

    def load(self) -> dict[str, Any]:
        return {
            name[:-5]: json.loads((self.folder / name).read_bytes())
            for name in os.listdir(self.folder)
            if name.endswith(".json")
        }

    def fill(self, keys: Sequence[str], value: Any) -> None:
        data = json.dumps(value, indent=2).encode()
        for key in keys:
            self.write(key, data, fsync=False)


class RawRedisStore:
    """One Redis hash, driven with plain redis-py commands."""

    def __init__(self, client: redis.Redis, hash_name: str) -> None:
        self.client = client
        self.hash_name = hash_name

    def label(self, operation: str) -> str:
        return {
            "set": "redis-py HSET",
            "delete": "redis-py HDEL",
            "get (miss)": "redis-py HGET + json.loads",
            "load": "redis-py HGETALL + json.loads",
        }[operation]

    def get(self, key: str) -> Any:
        return json.loads(self.client.hget(self.hash_name, key))

    def set(self, key: str, value: Any) -> None:
        self.client.hset(self.hash_name, key, json.dumps(value))

    def delete(self, key: str) -> None:
        self.client.hdel(self.hash_name, key)

    def load(self) -> dict[str, Any]:
        items = self.client.hgetall(self.hash_name)
        return {field.decode(): json.loads(data) for field, data in items.items()}

    def fill(self, keys: Sequence[str], value: Any) -> None:
        data = json.dumps(value)
        self.client.hset(self.hash_name, mapping=dict.fromkeys(keys, data))


# -- the backends under test -------------------------------------------------------------


@dataclass
class Store:
    """A backend configuration and the baseline that does its job in plain code.

    ``open_db(domain)`` is the backend under test; ``open_filler(domain)`` the
    same data with fast writes, for untimed preparation; ``open_raw(name)`` a
    baseline store of its own.
    """

    label: str
    open_db: Callable[[str], DatabaseInterface]
    open_filler: Callable[[str], DatabaseInterface]
    open_raw: Callable[[str], RawStore]
    metrics: Metrics
    set_baselines: Callable[[], list[RawStore]]  # each gets a row of its own

    def cached(self, container: str) -> CachedDict:
        database = self.open_db(f"bench.{container}")
        return CachedDict(database, strict_mode=True, name=container, metrics=self.metrics)

    def fill(self, container: str, keys: Sequence[str]) -> None:
        filler = self.open_filler(f"bench.{container}")
        attach(filler, container="fill", metrics=self.metrics)
        filler.set_many(dict.fromkeys(keys, VALUE))


def json_store(root: Path, metrics: Metrics, *, fsync: bool) -> Store:
    tag = "on" if fsync else "off"
    folder = root / tag

    def open_raw(name: str) -> RawStore:
        return RawJsonStore(root / f"raw-{tag}" / name, fsync=fsync)

    def set_baselines() -> list[RawStore]:
        if not fsync:
            return [open_raw("set")]
        # chanstore also flushes the folder after the rename; so does the second baseline.
        synced = RawJsonStore(root / "raw-on" / "set-synced", fsync=True, sync_folder=True)
        return [open_raw("set"), synced]

    return Store(
        label=f"json fsync={tag}",
        open_db=lambda domain: JSONDatabase(domain, root_dir=str(folder), fsync=fsync),
        open_filler=lambda domain: JSONDatabase(domain, root_dir=str(folder), fsync=False),
        open_raw=open_raw,
        metrics=metrics,
        set_baselines=set_baselines,
    )


def redis_store(port: int, client: redis.Redis, metrics: Metrics) -> Store:
    def open_db(domain: str) -> DatabaseInterface:
        return RedisDatabase(domain, host="127.0.0.1", port=port)

    def open_raw(name: str) -> RawStore:
        return RawRedisStore(client, f"raw:{name}")

    return Store(
        label="redis",
        open_db=open_db,
        open_filler=open_db,
        open_raw=open_raw,
        metrics=metrics,
        set_baselines=lambda: [open_raw("set")],
    )


# -- part 1: per-operation cost --------------------------------------------------------------


def hit_cases(store: Store, pool: list[str]) -> tuple[Case, Case]:
    store.fill("hit", pool)
    cached = store.cached("hit")
    cached.load()
    plain = dict.fromkeys(pool, VALUE)

    def through_cache(keys: list[str]) -> object:
        value = None
        for key in keys:
            value = cached[key]
        return value

    def through_dict(keys: list[str]) -> object:
        value = None
        for key in keys:
            value = plain[key]
        return value

    def prepare(n: int) -> list[str]:
        return cycled(pool, n)

    return (
        Case("CachedDict[key]", through_cache, prepare, max_ops=1_000_000),
        Case("dict[key]", through_dict, prepare, max_ops=1_000_000),
    )


def miss_cases(store: Store, count: int) -> tuple[Case, Case]:
    keys = keys_named("miss", count)
    store.fill("miss", keys)
    cached = store.cached("miss")
    raw = store.open_raw("miss")
    raw.fill(keys, VALUE)

    def through_cache(batch: list[str]) -> object:
        value = None
        for key in batch:
            value = cached[key]
        return value

    def raw_get(batch: list[str]) -> object:
        value = None
        for key in batch:
            value = raw.get(key)
        return value

    def prepare_cached(n: int) -> list[str]:
        cached.forget()
        return keys[:n]

    def prepare_raw(n: int) -> list[str]:
        return keys[:n]

    return (
        Case("CachedDict[key], uncached", through_cache, prepare_cached, max_ops=count),
        Case(raw.label("get (miss)"), raw_get, prepare_raw, max_ops=count),
    )


def set_cases(store: Store, pool: list[str], raw: RawStore) -> tuple[Case, Case]:
    cached = store.cached("set")

    def through_cache(keys: list[str]) -> None:
        for key in keys:
            cached[key] = VALUE

    def raw_set(keys: list[str]) -> None:
        for key in keys:
            raw.set(key, VALUE)

    def prepare(n: int) -> list[str]:
        return cycled(pool, n)

    return (
        Case("CachedDict[key] = value", through_cache, prepare, max_ops=100_000),
        Case(raw.label("set"), raw_set, prepare, max_ops=100_000),
    )


def delete_cases(store: Store) -> tuple[Case, Case]:
    cached = store.cached("delete")
    raw = store.open_raw("delete")
    rounds = itertools.count()

    def fresh_keys(n: int) -> list[str]:
        return keys_named(f"del{next(rounds)}", n)

    def prepare_cached(n: int) -> list[str]:
        keys = fresh_keys(n)
        store.fill("delete", keys)
        return keys

    def prepare_raw(n: int) -> list[str]:
        keys = fresh_keys(n)
        raw.fill(keys, VALUE)
        return keys

    def through_cache(keys: list[str]) -> None:
        for key in keys:
            del cached[key]

    def raw_delete(keys: list[str]) -> None:
        for key in keys:
            raw.delete(key)

    return (
        Case("del CachedDict[key]", through_cache, prepare_cached, max_ops=500),
        Case(raw.label("delete"), raw_delete, prepare_raw, max_ops=500),
    )


def load_cases(store: Store, count: int) -> tuple[Case, Case]:
    keys = keys_named("load", count)
    store.fill("load", keys)
    cached = store.cached("load")
    raw = store.open_raw("load")
    raw.fill(keys, VALUE)

    def through_cache(loads: list[str]) -> None:
        for _ in loads:
            cached.load()

    def raw_load(loads: list[str]) -> None:
        for _ in loads:
            raw.load()

    def prepare(n: int) -> list[str]:
        return [""] * n

    return (
        Case("CachedDict.load()", through_cache, prepare, max_ops=1000),
        Case(raw.label("load"), raw_load, prepare, max_ops=1000),
    )


def measure_operations(stores: list[Store], settings: Settings) -> list[Comparison]:
    """Part 1: every operation of every store beside its baselines."""
    pool = keys_named("key", settings.pool_keys)
    run = {"rounds": settings.rounds, "seconds": settings.round_seconds}
    load = f"load() of {settings.container_keys:,} keys"
    results: list[Comparison] = []
    for store in stores:
        progress(f"part 1: {store.label}")
        results.append(compare("get (hit)", store.label, *hit_cases(store, pool), **run))
        misses = miss_cases(store, settings.miss_keys)
        results.append(compare("get (miss)", store.label, *misses, **run))
        for raw in store.set_baselines():
            results.append(compare("set", store.label, *set_cases(store, pool, raw), **run))
        results.append(compare("delete", store.label, *delete_cases(store), **run))
        loads = load_cases(store, settings.container_keys)
        results.append(compare(load, store.label, *loads, **run))
    return results


# -- part 2: instrumentation overhead ----------------------------------------------------------


@dataclass
class Overhead:
    """One backend operation called bare, bare plus one observe(), and instrumented.

    All three run in the same rounds; the figures are medians over rounds of
    the per-round differences from the bare call.
    """

    backend: str
    operation: str
    bare: list[Timing]
    observed: list[Timing]
    instrumented: list[Timing]

    def _difference_us(self, series: list[Timing], clock: str) -> float:
        pairs = zip(series, self.bare, strict=True)
        return median_us(getattr(s, clock) - getattr(b, clock) for s, b in pairs)

    @property
    def bare_us(self) -> float:
        return median_us(t.wall for t in self.bare)

    @property
    def instrumented_us(self) -> float:
        return median_us(t.wall for t in self.instrumented)

    @property
    def wall_us(self) -> float:
        """What the wrapper adds, wall clock."""
        return self._difference_us(self.instrumented, "wall")

    @property
    def cpu_us(self) -> float:
        """What the wrapper adds, CPU time of the calling thread."""
        return self._difference_us(self.instrumented, "cpu")

    @property
    def observe_cpu_us(self) -> float:
        """What one observe() adds to the same call, CPU time."""
        return self._difference_us(self.observed, "cpu")

    def resolves(self, observe_us: float) -> bool:
        """Whether this row measures finely enough to judge the wrapper: the observe() added
        to its bare call costs what ``observe_us``, one in a tight loop, costs."""
        return abs(self.observe_cpu_us - observe_us) <= RESOLUTION_US

    def verdict(self, observe_us: float) -> str:
        if not self.resolves(observe_us):
            return f"noise (observe() off by {us(self.observe_cpu_us - observe_us)} µs)"
        return "yes" if self.cpu_us < GOAL_OVERHEAD_US else "NO"


def reference_histogram() -> Any:
    """A pre-bound child of a histogram shaped like chanstore's, on a registry of its own."""
    histogram = Histogram(
        "bench_reference_seconds",
        "Reference observations.",
        ["backend", "container", "operation"],
        buckets=BACKEND_BUCKETS,
        registry=CollectorRegistry(),
    )
    return histogram.labels("bench", "bench", "get")


def overhead_cases(
    database: DatabaseInterface, operation: str, pool: list[str], child: Any
) -> list[Case]:
    """The bare call, the bare call plus one observe(), and the instrumented call."""
    instrumented = getattr(database, operation)
    bare = getattr(type(database), operation).__wrapped__
    args: tuple[Any, ...] = () if operation == "get_value" else (VALUE,)

    def through_bare(keys: list[str]) -> None:
        for key in keys:
            bare(database, key, *args)

    def bare_and_observe(keys: list[str]) -> None:
        for key in keys:
            started = time.perf_counter()
            bare(database, key, *args)
            child.observe(time.perf_counter() - started)

    def through_wrapper(keys: list[str]) -> None:
        for key in keys:
            instrumented(key, *args)

    def prepare(n: int) -> list[str]:
        return cycled(pool, n)

    # At least 100 calls a round, so that a slow call's variation averages out.
    return [
        Case(f"{operation} (bare)", through_bare, prepare, min_ops=100),
        Case(f"{operation} (bare + observe)", bare_and_observe, prepare, min_ops=100),
        Case(f"{operation} (instrumented)", through_wrapper, prepare, min_ops=100),
    ]


def observe_case(child: Any, seconds: float) -> Case:
    """observe() on a pre-bound histogram child in a tight loop."""

    def observe(items: list[str]) -> None:
        for _ in items:
            child.observe(seconds)

    return Case("histogram child .observe()", observe, lambda n: [""] * n)


def measure_overhead(
    backends: list[tuple[str, DatabaseInterface, tuple[str, ...]]],
    metrics: Metrics,
    settings: Settings,
) -> tuple[list[Overhead], list[float]]:
    """Part 2: the wrapper's cost per backend and operation, and the tight-loop reference.

    The reference runs in the same rounds as every comparison, so that it is
    measured under the same conditions.
    """
    pool = keys_named("key", settings.pool_keys)
    seconds = settings.round_seconds / 8
    child = reference_histogram()
    reference = observe_case(child, 20e-6)
    results: list[Overhead] = []
    observations: list[float] = []
    for label, database, operations in backends:
        progress(f"part 2: {label}")
        attach(database, container="overhead", metrics=metrics)
        database.set_many(dict.fromkeys(pool, VALUE))
        for operation in operations:
            cases = [*overhead_cases(database, operation, pool, child), reference]
            bare, observed, instrumented, tight = interleaved(
                cases, settings.overhead_rounds, seconds
            )
            results.append(Overhead(label, operation, bare, observed, instrumented))
            observations.extend(timing.cpu for timing in tight)
    return results, observations


# -- part 3: a 100,000-key container from Redis ----------------------------------------------


@dataclass
class BigLoad:
    """Seconds to load all ``keys``, one figure per round, by method.

    The one-at-a-time methods fetch ``sample`` keys a round (a different slice
    each round) and their time is scaled to all ``keys``: per-key fetches are
    independent round trips, so the cost is linear in the number of keys.
    """

    keys: int
    sample: int
    rounds: int
    times: dict[str, list[float]]

    def median_ms(self, method: str) -> float:
        return statistics.median(self.times[method]) * 1e3

    def speedup(self, slow: str, fast: str) -> float:
        pairs = zip(self.times[slow], self.times[fast], strict=True)
        return statistics.median(s / f for s, f in pairs)

    def measured_on(self, method: str) -> str:
        if method in WHOLE_LOADS or self.sample >= self.keys:
            return f"all {self.keys:,} keys"
        fetched = self.sample * self.rounds
        if fetched >= self.keys:
            return f"{self.rounds} x {self.sample:,} keys (every key once), scaled"
        return f"{fetched:,} of the keys, scaled x{self.keys / fetched:.3g}"


BIG_CACHED = "CachedDict.load() (one HGETALL)"
BIG_LOAD_ALL = "RedisDatabase.load_all() (one HGETALL)"
BIG_HGET = "redis-py HGET per key + json.loads"
BIG_GET = "redis-py GET per key + json.loads (original layout)"
WHOLE_LOADS = (BIG_CACHED, BIG_LOAD_ALL)


def populate_big(
    database: RedisDatabase, client: redis.Redis, keys: list[str], chunks: list[list[str]]
) -> str:
    """Store ``keys`` in chanstore's hash, and the keys of ``chunks`` as one Redis key each.

    Returns the prefix of those Redis keys (the original SDK's layout).
    """
    database.set_many(dict.fromkeys(keys, VALUE))
    prefix = "orig:bench.big:"
    data = json.dumps(VALUE)
    for chunk in chunks:
        for start in range(0, len(chunk), 5000):
            pipe = client.pipeline(transaction=False)
            for key in chunk[start : start + 5000]:
                pipe.set(prefix + key, data)
            pipe.execute()
    return prefix


def measure_big_load(
    port: int, client: redis.Redis, metrics: Metrics, settings: Settings
) -> BigLoad:
    """Part 3: the methods in rotating order each round."""
    progress(f"part 3: storing {settings.big_keys:,} keys")
    keys = keys_named("key", settings.big_keys)
    database = RedisDatabase("bench.big", host="127.0.0.1", port=port)
    cached = CachedDict(database, strict_mode=True, name="big", metrics=metrics)
    sample = min(settings.big_sample, settings.big_keys)
    starts = [index * sample % settings.big_keys for index in range(settings.big_rounds)]
    chunks = [keys[start : start + sample] for start in starts]
    prefix = populate_big(database, client, keys, chunks)
    hash_name = database.hash_name

    def load_cached(_chunk: list[str]) -> Mapping[str, Any]:
        cached.load()
        return cached  # complete now: len() and [] are answered from memory

    def load_all(_chunk: list[str]) -> Mapping[str, Any]:
        return database.load_all()

    def per_key_hget(chunk: list[str]) -> dict[str, Any]:
        return {key: json.loads(client.hget(hash_name, key)) for key in chunk}

    def per_key_get(chunk: list[str]) -> dict[str, Any]:
        return {key: json.loads(client.get(prefix + key)) for key in chunk}

    methods: dict[str, Callable[[list[str]], Mapping[str, Any]]] = {
        BIG_CACHED: load_cached,
        BIG_LOAD_ALL: load_all,
        BIG_HGET: per_key_hget,
        BIG_GET: per_key_get,
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    for index, chunk in enumerate(chunks):
        progress(f"part 3: round {index + 1} of {settings.big_rounds}")
        shift = index % len(methods)
        for name in [*methods][shift:] + [*methods][:shift]:
            cached.forget()
            wanted = keys if name in WHOLE_LOADS else chunk
            elapsed = time_load(methods[name], wanted)
            times[name].append(elapsed * len(keys) / len(wanted))
    cached.close()
    return BigLoad(settings.big_keys, sample, settings.big_rounds, times)


def time_load(method: Callable[[list[str]], Mapping[str, Any]], keys: list[str]) -> float:
    """Seconds ``method`` takes to return the values of ``keys``; checks that it did."""
    gc.collect()
    with gc_paused():
        started = time.perf_counter()
        loaded = method(keys)
        elapsed = time.perf_counter() - started
    if len(loaded) != len(keys) or loaded[keys[-1]] != VALUE:
        raise RuntimeError(f"a load returned {len(loaded)} values, not {len(keys)}")
    return elapsed


# -- part 4: the hot path against the original SDK --------------------------------------------


HOT_LOOPS = ("hit", "get", "in", "in (absent)", "items")
HOT_LABELS = {
    "hit": "d[key] (hit)",
    "get": "d.get(key) (hit)",
    "in": "key in d (held)",
    "in (absent)": "key in d (absent, loaded)",
    "items": "d.items(), per item",
}


def sdk_cache_folder() -> Path:
    default = Path.home() / ".cache" / "chanstore-bench"
    return Path(os.environ.get("CHANSTORE_BENCH_CACHE", default))


def original_sdk_python() -> Path:
    """The python of a venv holding the original SDK, made once and kept."""
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    venv = sdk_cache_folder() / f"{original_sdk.ORIGINAL.replace('==', '-')}-{version}"
    python = venv / "bin" / "python"
    done = venv / ".installed"
    if not done.exists():
        progress(f"part 4: making a venv with {original_sdk.ORIGINAL} in {venv} (once)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", original_sdk.ORIGINAL],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        done.write_text(original_sdk.ORIGINAL + "\n")
    return python


class OriginalSdk:
    """The original SDK's side: a subprocess of its venv that times rounds on request."""

    def __init__(self, python: Path, pool: int) -> None:
        script = Path(original_sdk.__file__)
        self.process = subprocess.Popen(
            [str(python), str(script), "--serve", str(pool)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.python_version = self._answer()["ready"]

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the original SDK's process ended ({self.process.wait()})")
        return json.loads(line)

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def timer(self, loop: str, target: str) -> Callable[[int], Timing]:
        def time_there(n: int) -> Timing:
            answer = self.ask(loop=loop, target=target, n=n)
            return Timing(answer["wall"], answer["cpu"])

        return time_there

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        stop(self.process)


@dataclass
class HotPath:
    """One loop of part 4: chanstore, the original SDK, and a dict in each process."""

    loop: str
    chanstore: list[Timing]
    original: list[Timing]
    dict_here: list[Timing]
    dict_there: list[Timing]

    @property
    def ratio(self) -> float:
        """Median over rounds of chanstore / the original, same round."""
        pairs = zip(self.chanstore, self.original, strict=True)
        return statistics.median(c.wall / o.wall for c, o in pairs)

    @staticmethod
    def us(timings: list[Timing]) -> float:
        return median_us(t.wall for t in timings)


def hot_cases(cached: CachedDict, plain: dict[str, Any], pool: list[str], loop: str) -> list[Case]:
    run = original_sdk.LOOPS[loop]

    def prepare(n: int) -> list[str]:
        return original_sdk.round_keys(loop, pool, n)

    return [
        Case(f"chanstore {loop}", lambda keys: run(cached, keys), prepare, max_ops=2_000_000),
        Case(f"dict {loop}", lambda keys: run(plain, keys), prepare, max_ops=2_000_000),
    ]


def measure_hot_path(
    store: Store, sdk: OriginalSdk, pool: list[str], settings: Settings
) -> list[HotPath]:
    """Part 4: every loop on both sides, in rotated order each round."""
    store.fill("hot", pool)
    cached = store.cached("hot")
    cached.load()
    plain = dict.fromkeys(pool, VALUE)
    results = []
    for loop in HOT_LOOPS:
        progress(f"part 4: {loop}")
        here = hot_cases(cached, plain, pool, loop)
        there = [
            Case(f"original {loop}", here[0].run, here[0].prepare, max_ops=2_000_000,
                 timer=sdk.timer(loop, "cached")),
            Case(f"dict there {loop}", here[1].run, here[1].prepare, max_ops=2_000_000,
                 timer=sdk.timer(loop, "dict")),
        ]  # fmt: skip
        ours, dict_here, original, dict_there = interleaved(
            [here[0], here[1], there[0], there[1]], settings.hot_rounds, settings.round_seconds
        )
        results.append(HotPath(loop, ours, original, dict_here, dict_there))
    return results


# -- part 5: memory ----------------------------------------------------------------------


@dataclass
class Memory:
    """Bytes (tracemalloc) per channel and per cached key."""

    channel: float  # a MoobiusStorage with one json container and one small key
    original_channel: float | None  # the same in the original SDK
    daemon_channel: float | None  # one more channel in the daemon's engine, one key written
    cached_key: float  # a loaded key of a CachedDict
    dict_key: float  # the same value in a plain dict
    keys: int


def traced_growth(build: Callable[[], object]) -> tuple[float, object]:
    """Bytes that what ``build()`` returns holds, after a collection."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    built = build()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return grown, built


def channel_bytes(root: Path, metrics: Metrics, count: int) -> float:
    config = [{"implementation": "json", "name": "box", "load": True,
               "settings": {"root_dir": str(root), "fsync": False}}]  # fmt: skip

    def channels(prefix: str, how_many: int) -> list[MoobiusStorage]:
        made = []
        for index in range(how_many):
            storage = MoobiusStorage("svc", f"{prefix}-{index:06d}", config, metrics=metrics)
            storage.box["k"] = 1
            made.append(storage)
        return made

    channels("warm", 10)
    grown, _made = traced_growth(lambda: channels("channel", count))
    return grown / count


def daemon_channel_bytes(root: Path, count: int) -> float:
    """What one more channel (one key written to one json container) costs the engine."""
    config = load_db_config([{"implementation": "json", "name": "box", "load": True,
                              "settings": {"root_dir": str(root), "fsync": False}}])  # fmt: skip

    async def measure() -> float:
        engine = Engine(EngineSettings(), config, Metrics(CollectorRegistry()))
        try:
            for index in range(10):  # warm: first-use objects are not per channel
                await engine.store.write(f"warm-{index}", "box", "k", Document({"v": 1}))
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            for index in range(count):
                await engine.store.write(f"channel-{index:06d}", "box", "k", Document({"v": 1}))
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            return grown / count
        finally:
            await engine.close()

    return asyncio.run(measure())


def key_bytes(store: Store, count: int) -> tuple[float, float]:
    """Bytes per key of a loaded CachedDict, and of a plain dict of equal values."""
    keys = keys_named("mem", count)
    store.fill("memory", keys)
    cached = store.cached("memory")
    data = json.dumps(VALUE)

    def load() -> CachedDict:
        cached.load()
        return cached

    held, _ = traced_growth(load)
    plain, _ = traced_growth(lambda: {key: json.loads(data) for key in keys})
    return held / count, plain / count


def measure_memory(root: Path, store: Store, sdk: OriginalSdk | None, settings: Settings) -> Memory:
    """Part 5."""
    progress("part 5: memory")
    count = settings.memory_channels
    channel = channel_bytes(root / "channels", Metrics(CollectorRegistry()), count)
    original = sdk.ask(memory=count)["bytes"] if sdk is not None else None
    try:
        daemon = daemon_channel_bytes(root / "engine", count)
    except Exception as exc:  # noqa: BLE001 - the engine is others' work in progress
        progress(f"part 5: the daemon's channels not measured: {exc!r}")
        daemon = None
    cached_key, dict_key = key_bytes(store, settings.memory_keys)
    return Memory(channel, original, daemon, cached_key, dict_key, settings.memory_keys)


# -- redis-server, started and stopped here ---------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_ping(process: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5,
                         socket_timeout=0.5)  # fmt: skip
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with status {process.returncode}")
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if client.ping():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not answer PING in {timeout}s")
            time.sleep(0.05)
    finally:
        client.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextlib.contextmanager
def redis_server(workdir: Path, timeout: float = 10.0) -> Iterator[int]:
    """A redis-server of our own on a free port, without persistence; yields the port."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    for attempt in itertools.count(1):
        port = free_port()
        log = (workdir / "redis.log").open("wb")
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_for_ping(process, port, timeout)
            break
        except BaseException as exc:
            stop(process)
            log.close()
            if not isinstance(exc, RuntimeError) or attempt == 3:
                sys.stderr.write((workdir / "redis.log").read_text(errors="replace"))
                raise
            # Most likely the port was taken between choosing it and binding it: retry.
    try:
        yield port
    finally:
        stop(process)
        log.close()


# -- reporting ---------------------------------------------------------------------------


_STARTED = time.perf_counter()


def progress(message: str) -> None:
    print(f"  {time.perf_counter() - _STARTED:5.1f}s {message}", file=sys.stderr, flush=True)


def us(value: float) -> str:
    if abs(value) < 10:
        return f"{value:.2f}"
    if abs(value) < 1000:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, align, *rows])


@dataclass
class Table:
    """A table that renders as aligned text or as markdown."""

    headers: Sequence[str]
    rows: list[list[str]]
    right: set[int]  # columns aligned right

    def text(self) -> str:
        return text_table(self.headers, self.rows, self.right)

    def markdown(self) -> str:
        return markdown_table(self.headers, self.rows, self.right)


def operations_table(results: list[Comparison]) -> Table:
    headers = ("operation", "backend", "chanstore µs/op", "baseline", "baseline µs/op", "ratio")
    rows = [
        [r.operation, r.backend, us(r.subject_us), r.baseline.label, us(r.baseline_us),
         f"{r.ratio:.2f}x"]
        for r in results
    ]  # fmt: skip
    return Table(headers, rows, {2, 4, 5})


def overhead_table(results: list[Overhead], observe_us: float) -> Table:
    headers = ("backend", "operation", "bare µs", "instrumented µs", "wrapper µs (wall)",
               "wrapper µs (CPU)", "observe() µs (CPU)", f"< {GOAL_OVERHEAD_US:g} µs")  # fmt: skip
    rows = [
        [r.backend, r.operation, us(r.bare_us), us(r.instrumented_us), us(r.wall_us),
         us(r.cpu_us), us(r.observe_cpu_us), r.verdict(observe_us)]
        for r in results
    ]  # fmt: skip
    return Table(headers, rows, {2, 3, 4, 5, 6})


def big_table(big: BigLoad) -> Table:
    headers = ("method", f"ms to load {big.keys:,} keys", "measured on", "one HGETALL is faster")
    rows = []
    for method in (BIG_CACHED, BIG_LOAD_ALL, BIG_HGET, BIG_GET):
        faster = "" if method in WHOLE_LOADS else f"{big.speedup(method, BIG_CACHED):.1f}x"
        rows.append([method, f"{big.median_ms(method):,.1f}", big.measured_on(method), faster])
    return Table(headers, rows, {1, 3})


def hot_table(hot: list[HotPath]) -> Table:
    headers = ("operation", "chanstore µs/op", f"{original_sdk.ORIGINAL} µs/op", "ratio",
               "dict µs/op (here)", "dict µs/op (there)")  # fmt: skip
    rows = [
        [HOT_LABELS[r.loop], us(r.us(r.chanstore)), us(r.us(r.original)), f"{r.ratio:.2f}x",
         us(r.us(r.dict_here)), us(r.us(r.dict_there))]
        for r in hot
    ]  # fmt: skip
    return Table(headers, rows, {1, 2, 3, 4, 5})


def memory_table(memory: Memory) -> Table:
    def size(value: float | None) -> str:
        return "not measured" if value is None else f"{value:,.0f}"

    rows = [
        ["a channel: MoobiusStorage, one json container, one small key", size(memory.channel)],
        [f"the same in {original_sdk.ORIGINAL}", size(memory.original_channel)],
        ["a channel in the daemon's engine (one key written)", size(memory.daemon_channel)],
        [f"a cached key (CachedDict.load() of {memory.keys:,})", size(memory.cached_key)],
        ["the same value in a plain dict", size(memory.dict_key)],
    ]
    return Table(("what", "bytes"), rows, {1})


def environment(client: redis.Redis) -> str:
    server = client.info("server")
    hiredis = "on" if redis.utils.HIREDIS_AVAILABLE else "off"
    return (
        f"Python {platform.python_version()}, redis-server {server['redis_version']}, "
        f"redis-py {redis.__version__} (hiredis {hiredis}), "
        f"prometheus-client {package_version('prometheus-client')}, "
        f"hit path {'in C' if cache_hits.COMPILED else 'in Python'}, {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.machine()}"
    )


@dataclass
class Results:
    """Everything one run measured."""

    settings: Settings
    operations: list[Comparison]
    overhead: list[Overhead]
    observations: list[float]  # CPU seconds per tight-loop observe(), one per round
    big: BigLoad
    env: str
    hot: list[HotPath]
    memory: Memory
    elapsed: float = 0.0

    def hot_summary(self) -> str:
        if not self.hot:
            return "The original SDK was not measured (its venv could not be made)."
        ratio = {r.loop: r.ratio for r in self.hot}
        hot = max(r.cpu_us for r in self.overhead if r.backend == "null")
        met = {True: "met", False: "NOT met"}
        verdict = (f"hit {met[ratio['hit'] <= GOAL_HOT_RATIO]}, `in` "
                   f"{met[ratio['in'] <= GOAL_HOT_RATIO]}, wrapper "
                   f"{met[self.worst_overhead_us < GOAL_OVERHEAD_US]}")  # fmt: skip
        goals = f"Goals (hit and `in` at most {GOAL_HOT_RATIO:g}x, wrapper under "
        goals += f"{GOAL_OVERHEAD_US:g} µs)"
        return (
            f"Against {original_sdk.ORIGINAL}'s CachedDict in the same run: a cache hit costs "
            f"{ratio['hit']:.2f}x the original's, `in` {ratio['in']:.2f}x, `get` "
            f"{ratio['get']:.2f}x, `in` of an absent key of a loaded container "
            f"{ratio['in (absent)']:.2f}x, and items() {ratio['items']:.2f}x per item; the "
            f"instrumentation wrapper costs {us(hot)} µs over the null backend and at most "
            f"{us(self.worst_overhead_us)} µs (CPU) in the rows that resolve it, "
            f"{self.worst_overhead_us / self.observe_us:.2f}x one observe() of "
            f"prometheus_client ({us(self.observe_us)} µs). {goals}: {verdict}."
        )

    def memory_summary(self) -> str:
        memory = self.memory
        original = memory.original_channel
        versus = "" if original is None else f" ({memory.channel / original:.2f}x the original's)"
        daemon = memory.daemon_channel
        engine = (
            "" if daemon is None else f"; one more in the daemon's engine, {daemon / 1024:.1f} KB"
        )
        return (
            f"A channel in memory costs {memory.channel / 1024:.2f} KB{versus}{engine}; "
            f"a cached key costs {memory.cached_key / memory.dict_key:.2f}x a plain "
            f"dict of the same values ({memory.cached_key:,.0f} against "
            f"{memory.dict_key:,.0f} bytes)."
        )

    @property
    def observe_us(self) -> float:
        return statistics.median(self.observations) * 1e6

    @property
    def worst_overhead_us(self) -> float:
        """The wrapper's cost in the worst row that resolves it (the null backend's always
        has so far); NaN, which meets no goal, if none does."""
        resolved = [r.cpu_us for r in self.overhead if r.resolves(self.observe_us)]
        return max(resolved, default=math.nan)

    def overhead_summary(self) -> str:
        hot = max((r for r in self.overhead if r.backend == "null"), key=lambda r: r.cpu_us)
        real = [r for r in self.overhead if r.backend != "null"]
        return (
            f"Over the null backend, where everything stays hot, the wrapper costs "
            f"{us(hot.cpu_us)} µs, {hot.cpu_us / hot.observe_cpu_us:.1f} times one observe() "
            f"added to the same call ({us(hot.observe_cpu_us)} µs); a pre-bound histogram "
            f"child's observe() alone, in a tight loop in the same rounds, costs "
            f"{us(self.observe_us)} µs. Over json and redis the wrapper costs up to "
            f"{us(max(r.cpu_us for r in real))} µs, where one observe() added to the same bare "
            f"call costs up to {us(max(r.observe_cpu_us for r in real))} µs."
        )

    def load_speedups(self) -> tuple[float, float]:
        """How much faster one HGETALL is than one HGET, and one GET, per key."""
        return self.big.speedup(BIG_HGET, BIG_CACHED), self.big.speedup(BIG_GET, BIG_CACHED)


def print_report(results: Results) -> None:
    settings, big = results.settings, results.big
    speedup_hget, speedup_get = results.load_speedups()
    overhead_ok = results.worst_overhead_us < GOAL_OVERHEAD_US
    load_ok = min(speedup_hget, speedup_get) >= GOAL_LOAD_SPEEDUP
    print(f"\nchanstore storage benchmarks ({results.env})")
    print("medians of interleaved rounds; ratio = chanstore / baseline of the same run\n")
    print(f"1. Per-operation cost (median of {settings.rounds} rounds)")
    print(operations_table(results.operations).text())
    rounds = settings.overhead_rounds
    print(f"\n2. Instrumentation overhead per backend operation "
          f"(median of {rounds} rounds of: bare, bare + observe(), instrumented)")  # fmt: skip
    print(overhead_table(results.overhead, results.observe_us).text())
    print(textwrap.fill(results.overhead_summary(), 100))
    print(f"goal < {GOAL_OVERHEAD_US:g} µs (CPU): {'met' if overhead_ok else 'NOT met'} "
          f"(worst of the rows that resolve it: {us(results.worst_overhead_us)} µs)")  # fmt: skip
    print(f"\n3. Loading {big.keys:,} keys from Redis (median of {settings.big_rounds} rounds)")
    print(big_table(big).text())
    print(f"goal >= {GOAL_LOAD_SPEEDUP:g}x faster than one at a time: "
          f"{'met' if load_ok else 'NOT met'}")  # fmt: skip
    print(
        f"\n4. The in-process hot path against {original_sdk.ORIGINAL} "
        f"(median of {settings.hot_rounds} rounds; ratio = chanstore / original, same round)"
    )
    if results.hot:
        print(hot_table(results.hot).text())
    print(textwrap.fill(results.hot_summary(), 100))
    print("\n5. Memory (tracemalloc, after a collection)")
    print(memory_table(results.memory).text())
    print(textwrap.fill(results.memory_summary(), 100))
    print(f"\nwhole run: {results.elapsed:.0f} s")
    print("\n--- markdown for the README ---\n")
    print(markdown_report(results))


def markdown_report(results: Results) -> str:
    speedup_hget, speedup_get = results.load_speedups()
    command = shlex.join(["python", "bench/storage.py", *sys.argv[1:]])
    big = results.big
    return "\n".join([
        f"Measured with `{command}` ({results.env}). Medians of interleaved rounds; "
        "ratio = chanstore / a plain-code baseline measured in the same run.",
        "",
        operations_table(results.operations).markdown(),
        "",
        "Instrumentation overhead: the instrumented method minus the bare function it wraps "
        "(`__wrapped__`), as the median of per-round differences in the calling thread's CPU "
        "time, which a Redis round trip's waiting does not blur (wall clock beside it). "
        "`observe()` is what one observation on a pre-bound histogram child adds to the same "
        "bare call, in the same rounds.",
        "",
        overhead_table(results.overhead, results.observe_us).markdown(),
        "",
        f"{results.overhead_summary()} Goal: under {GOAL_OVERHEAD_US:g} µs.",
        "",
        big_table(big).markdown(),
        "",
        f"Loading {big.keys:,} keys from Redis with one HGETALL is {speedup_hget:.0f}x faster "
        f"than one HGET per key and {speedup_get:.0f}x faster than one GET per key "
        f"(goal: at least {GOAL_LOAD_SPEEDUP:g}x).",
        "",
        f"The in-process hot path against {original_sdk.ORIGINAL}, installed in the "
        "benchmark's own venv and run in a subprocess of it, the same loops "
        "(`bench/original_sdk.py`) timed the same way in interleaved rounds; ratio = "
        "chanstore / the original, median of the same rounds' ratios. A plain dict on each "
        "side shows how far the two processes differ.",
        "",
        *([hot_table(results.hot).markdown(), ""] if results.hot else []),
        results.hot_summary(),
        "",
        memory_table(results.memory).markdown(),
        "",
        results.memory_summary(),
    ])  # fmt: skip


# -- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of about 30 s")
    args = parser.parse_args(argv)
    return QUICK if args.quick else FULL


def on_time_limit(signum: int, frame: object) -> None:
    raise TimeoutError("the benchmark ran past its time limit")


def on_terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops redis-server


def start_original_sdk(settings: Settings) -> OriginalSdk | None:
    """The original SDK's side of part 4, or None (said why) if its venv cannot be made."""
    try:
        return OriginalSdk(original_sdk_python(), settings.pool_keys)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        progress(f"part 4: the original SDK is not measured: {exc}")
        return None


def run(settings: Settings, workdir: Path) -> None:
    started = time.perf_counter()
    metrics = Metrics(CollectorRegistry())
    progress("starting redis-server")
    with redis_server(workdir) as port:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
        try:
            env = environment(client)
            root = workdir / "json"
            stores = [
                json_store(root, metrics, fsync=True),
                json_store(root, metrics, fsync=False),
                redis_store(port, client, metrics),
            ]
            operations = measure_operations(stores, settings)
            both = ("get_value", "set_value")
            # A json write's file-system cost varies by far more than the wrapper's from
            # call to call, so only its reads resolve the wrapper (whose write path is
            # the same for every backend).
            backends: list[tuple[str, DatabaseInterface, tuple[str, ...]]] = [
                ("null", NullDatabase("bench.overhead"), both),
                ("json fsync=off", JSONDatabase("bench.overhead", root_dir=str(root / "overhead"),
                                                fsync=False), ("get_value",)),
                ("redis", RedisDatabase("bench.overhead", host="127.0.0.1", port=port), both),
            ]  # fmt: skip
            try:
                overhead, observations = measure_overhead(backends, metrics, settings)
            finally:
                for _label, database, _operations in backends:
                    database.close()
            big = measure_big_load(port, client, metrics, settings)
        finally:
            client.close()
    sdk = start_original_sdk(settings)
    try:
        pool = keys_named("key", settings.pool_keys)
        hot = measure_hot_path(stores[1], sdk, pool, settings) if sdk is not None else []
        memory = measure_memory(workdir / "memory", stores[1], sdk, settings)
    finally:
        if sdk is not None:
            sdk.close()
    results = Results(settings, operations, overhead, observations, big, env, hot, memory)
    results.elapsed = time.perf_counter() - started
    print_report(results)


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGALRM, on_time_limit)
    signal.signal(signal.SIGTERM, on_terminate)
    signal.alarm(int(settings.time_limit))
    workdir = Path(tempfile.mkdtemp(prefix="chanstore-bench-"))
    try:
        run(settings, workdir)
    finally:
        signal.alarm(0)
        progress("removing the temporary folder")
        shutil.rmtree(workdir, ignore_errors=True)
        progress("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
