"""Benchmarks of ``chanstore migrate`` and ``export``, each beside a plain-code baseline.

The data, made once per run with the library: 1,000 channels of one container
(``stats``) of 100 keys each, 100,000 keys of small dicts such as
``{"hp": 7, "name": "player 7 of c0001"}``, written by ``JSONDatabase.set_many``
(fsync off) into a json root, as ``MoobiusStorage`` lays them out
(``service_bench/channel_c0001/stats/k007.json``). ``--quick``: 200 channels,
20,000 keys. What is measured:

1. Migrate json -> Redis: keys/s of :func:`chanstore.transfer.migrate` in this
   process (the source a json db_config, the target a redis one), onto a key
   prefix of its own in each round so that every key is copied (each write
   runs chanstore's write script, history entry included, and the count of
   the target's keys is checked after each channel, as the command does).
   Baseline: the plain loop doing the same job, which walks the same folders
   (``os.walk``), reads and ``json.loads`` each file, and writes it again
   (``json.dumps``) with redis-py, a pipeline of one ``HSET`` per key into a
   hash per domain, ``execute()`` every 1,000 keys. Goal (the migrate issue):
   at least 0.5x the baseline's rate. Also measured: the rerun, ``migrate``
   into a target that holds every key already (compare only: each batch read
   from both sides, nothing written), against the same baseline.
2. Export: keys/s of :func:`chanstore.transfer.export` writing its lines to a
   file, from the json root and from Redis (the copy that part 1's rerun
   target holds). Baselines: for json, the walk, read and ``json.loads`` of
   each file and one ``json.dumps`` of the line
   (``{"channel", "container", "key", "value"}``) written to a file; for Redis,
   ``SCAN ... MATCH TYPE hash`` for the hashes, ``HSCAN ... COUNT 1000`` of
   each, ``json.loads`` and the same line written.
3. Peak memory of an export: ``python -m chanstore.cli export --db-config F -o
   OUT`` (``CHANSTORE_SERVICE_ID`` set) as a process of its own, from json and
   from Redis, of services holding 0, 10,000, 100,000 and 300,000 keys (100
   keys a channel: the data grows in channels; ``--quick``: 0, 2,000 and
   20,000). The peak resident set is the export process's own ``ru_maxrss``,
   which ``os.wait4`` answers for that one child, in a small launcher process
   that forks and execs it: a child of this benchmark itself would report this
   process's peak instead (the kernel carries the peak of the image a process
   was forked from across ``exec``). The export of nothing shows what the
   interpreter and its imports take; an export that streams stays at about
   that however much data there is.

How: the sides of parts 1 and 2 run in the same rounds, in an order rotated
each round; figures are medians over rounds of each side's keys/s and of the
rounds' ratios, because this machine is shared and noisy. Each timed side
starts after a ``gc.collect()`` and runs with the garbage collector on, as the
command does. The json files were written just before, so they are read from
the page cache on both sides (a cold read from disk is not measured). The
benchmark starts its own ``redis-server`` on a free port (no persistence),
which shares the machine's cores with this process; the rounds' copies go to
database 0, flushed after each round (untimed), the copy that reruns and
exports read to database 1. Everything is made in a temporary folder, removed
at the end; a run past its time limit is aborted.

Run: ``python3 bench/transfer.py`` (about 4.5 minutes on 2 cores) or ``python3
bench/transfer.py --quick`` (under a minute).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

from chanstore import JSONDatabase
from chanstore.backends.redisdb import RedisDatabase
from chanstore.config import parse_db_config
from chanstore.storage import container_domain
from chanstore.transfer import export, migrate
from harness import (
    markdown_table,
    on_time_limit,
    progress,
    redis_server,
    source_state,
    stop,
    text_table,
)

SERVICE = "bench"
CONTAINER = "stats"
KEYS_PER_CHANNEL = 100
#: The baselines' pipeline: ``execute()`` every this many keys (migrate's batch size too).
BATCH = 1000
#: The copy that reruns and exports read, and the memory part's Redis data.
COPY_DB, COPY_PREFIX = 1, "copy:"
#: The migrate issue: at least this fraction of the plain loop's rate.
GOAL_MIGRATE = 0.5

MIGRATE, MIGRATE_BASELINE, RERUN = "migrate", "baseline", "rerun"
JSON_EXPORT, JSON_BASELINE = "json export", "json baseline"
REDIS_EXPORT, REDIS_BASELINE = "redis export", "redis baseline"


@dataclass(frozen=True)
class Settings:
    """How large and how long the run is."""

    channels: int  # of the data parts 1 and 2 read (KEYS_PER_CHANNEL keys each)
    rounds: int  # of parts 1 and 2; medians are over these
    memory_keys: tuple[int, ...]  # the exports whose peak memory part 3 reads
    time_limit: float  # seconds; past it the run is aborted (and redis-server stopped)

    @property
    def keys(self) -> int:
        return self.channels * KEYS_PER_CHANNEL


FULL = Settings(channels=1000, rounds=5, memory_keys=(0, 10_000, 100_000, 300_000),
                time_limit=540.0)  # fmt: skip
QUICK = Settings(channels=200, rounds=3, memory_keys=(0, 2_000, 20_000), time_limit=150.0)


# -- the data ------------------------------------------------------------------------------


def channel_name(index: int) -> str:
    return f"c{index:04d}"


def channel_values(channel: str) -> dict[str, Any]:
    return {f"k{i:03d}": {"hp": i, "name": f"player {i} of {channel}"}
            for i in range(KEYS_PER_CHANNEL)}  # fmt: skip


def service_of(keys: int, settings: Settings) -> str:
    """The service whose data is ``keys`` keys: parts 1 and 2's when it is that size."""
    return SERVICE if keys == settings.keys else f"mem{keys}"


def fill_json(root: Path, service: str, channels: int) -> None:
    """``channels`` channels of KEYS_PER_CHANNEL keys under ``service``, as the library lays
    them out (fsync off: this is preparation)."""
    for index in range(channels):
        channel = channel_name(index)
        database = JSONDatabase(container_domain(service, channel, CONTAINER),
                                root_dir=str(root), fsync=False)  # fmt: skip
        try:
            database.set_many(channel_values(channel))
        finally:
            database.close()


def fill_redis(port: int, service: str, channels: int) -> None:
    """The same data as :func:`fill_json`, in the copy's database, with the library."""
    for index in range(channels):
        channel = channel_name(index)
        database = RedisDatabase(container_domain(service, channel, CONTAINER),
                                 host="127.0.0.1", port=port, db=COPY_DB,
                                 key_prefix=COPY_PREFIX)  # fmt: skip
        try:
            database.set_many(channel_values(channel))
        finally:
            database.close()


def json_config(root: Path) -> list[dict[str, Any]]:
    return [{"implementation": "json", "name": CONTAINER, "load": False, "clear": False,
             "settings": {"root_dir": str(root)}}]  # fmt: skip


def redis_config(port: int, db: int, prefix: str) -> list[dict[str, Any]]:
    settings = {"host": "127.0.0.1", "port": port, "db": db, "key_prefix": prefix}
    return [{"implementation": "redis", "name": CONTAINER, "load": False, "clear": False,
             "settings": settings}]  # fmt: skip


# -- the plain-code baselines ------------------------------------------------------------


def raw_migrate(root: Path, service: str, client: redis.Redis, prefix: str) -> int:
    """Walk the service's json files, read and parse each, and HSET it into its domain's
    hash through a pipeline executed every BATCH keys; the number of keys copied."""
    pipe = client.pipeline(transaction=False)
    copied = 0
    for folder, _folders, names in os.walk(root / f"service_{service}"):
        files = [name for name in names if name.endswith(".json")]
        if not files:
            continue
        hash_name = prefix + os.path.relpath(folder, root).replace(os.sep, ".")
        for name in files:
            with open(os.path.join(folder, name), "rb") as file:
                value = json.loads(file.read())
            pipe.hset(hash_name, name[:-5], json.dumps(value, separators=(",", ":")))
            copied += 1
            if copied % BATCH == 0:
                pipe.execute()
    pipe.execute()
    return copied


def export_line(domain_parts: Sequence[str], key: str, value: Any) -> str:
    """The export's line of one key: ``domain_parts`` are service, channel, container."""
    channel = domain_parts[1].removeprefix("channel_")
    record = {"channel": channel, "container": domain_parts[2], "key": key, "value": value}
    return json.dumps(record) + "\n"


def raw_export_json(root: Path, service: str, out: IO[str]) -> int:
    """Walk the service's json files, read and parse each, write its line; how many."""
    written = 0
    for folder, _folders, names in os.walk(root / f"service_{service}"):
        parts = os.path.relpath(folder, root).split(os.sep)
        for name in names:
            if not name.endswith(".json"):
                continue
            with open(os.path.join(folder, name), "rb") as file:
                value = json.loads(file.read())
            out.write(export_line(parts, name[:-5], value))
            written += 1
    return written


def raw_export_redis(client: redis.Redis, prefix: str, service: str, out: IO[str]) -> int:
    """SCAN for the service's hashes, HSCAN each, parse each value, write its line."""
    start = len(prefix)
    match = f"{prefix}service_{service}.channel_*".encode()
    written = 0
    cursor = 0
    while True:
        cursor, names = client.scan(cursor, match=match, count=BATCH, _type="hash")
        for name in names:
            parts = name[start:].decode().split(".")
            field_cursor = 0
            while True:
                field_cursor, fields = client.hscan(name, field_cursor, count=BATCH)
                for key, data in fields.items():
                    out.write(export_line(parts, key.decode(), json.loads(data)))
                written += len(fields)
                if not field_cursor:
                    break
        if not cursor:
            return written


# -- timing ----------------------------------------------------------------------------------


@dataclass
class Rounds:
    """Seconds per round of each side, every side moving the same ``keys`` keys."""

    keys: int
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, side: str) -> float:
        """Median keys/s of ``side``."""
        return statistics.median(self.keys / s for s in self.seconds[side])

    def ratio(self, side: str, baseline: str) -> float:
        """Median over rounds of ``side``'s rate / ``baseline``'s rate in the same round."""
        pairs = zip(self.seconds[side], self.seconds[baseline], strict=True)
        return statistics.median(base / mine for mine, base in pairs)


def timed_rounds(label: str, sides: dict[str, Callable[[int], int]], keys: int, rounds: int,
                 after_round: Callable[[], None] = lambda: None) -> Rounds:  # fmt: skip
    """Run every side once per round, in an order rotated each round; each must answer
    that it moved ``keys`` keys."""
    found = Rounds(keys, {name: [] for name in sides})
    names = list(sides)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            started = time.perf_counter()
            moved = sides[name](index)
            elapsed = time.perf_counter() - started
            if moved != keys:
                raise RuntimeError(f"{label} {name}: moved {moved:,} keys, not {keys:,}")
            found.seconds[name].append(elapsed)
        after_round()
        progress(f"{label}: round {index + 1} of {rounds}: " + ", ".join(
            f"{name} {keys / found.seconds[name][-1]:,.0f} keys/s" for name in names))  # fmt: skip
    return found


# -- part 1: migrate json -> Redis ------------------------------------------------------------


def measure_migrate(root: Path, port: int, settings: Settings) -> Rounds:
    source = parse_db_config(json_config(root))
    copy = parse_db_config(redis_config(port, COPY_DB, COPY_PREFIX))
    client = redis.Redis(host="127.0.0.1", port=port, db=0, socket_timeout=30)
    keys = settings.keys

    def copied(tallies: Sequence[Any], *, expected_copies: int) -> int:
        [tally] = tallies
        if not tally.ok or tally.copied != expected_copies or tally.target_keys != keys:
            raise RuntimeError(f"migrate: unexpected tally {tally}")
        return int(tally.keys)

    def run_migrate(index: int) -> int:
        target = parse_db_config(redis_config(port, 0, f"round{index}:"))
        return copied(migrate(source, target, SERVICE), expected_copies=keys)

    def run_rerun(_index: int) -> int:
        return copied(migrate(source, copy, SERVICE), expected_copies=0)

    def run_baseline(index: int) -> int:
        return raw_migrate(root, SERVICE, client, f"raw{index}:")

    try:
        progress(f"migrate: the copy that reruns and exports read ({keys:,} keys, untimed)")
        copied(migrate(source, copy, SERVICE), expected_copies=keys)
        sides = {MIGRATE: run_migrate, MIGRATE_BASELINE: run_baseline, RERUN: run_rerun}
        return timed_rounds("migrate", sides, keys, settings.rounds, after_round=client.flushdb)
    finally:
        client.close()


# -- part 2: export ------------------------------------------------------------------------------


def measure_export(root: Path, port: int, workdir: Path, settings: Settings) -> Rounds:
    sources = {
        JSON_EXPORT: parse_db_config(json_config(root)),
        REDIS_EXPORT: parse_db_config(redis_config(port, COPY_DB, COPY_PREFIX)),
    }
    client = redis.Redis(host="127.0.0.1", port=port, db=COPY_DB, socket_timeout=30)
    sink = workdir / "export.jsonl"

    def exporting(name: str) -> Callable[[int], int]:
        def run(_index: int) -> int:
            with sink.open("w", encoding="ascii") as out:
                [tally] = export(sources[name], SERVICE, out)
            if not tally.ok or tally.copied != tally.keys:
                raise RuntimeError(f"{name}: unexpected tally {tally}")
            return int(tally.copied)

        return run

    def json_baseline(_index: int) -> int:
        with sink.open("w", encoding="ascii") as out:
            return raw_export_json(root, SERVICE, out)

    def redis_baseline(_index: int) -> int:
        with sink.open("w", encoding="ascii") as out:
            return raw_export_redis(client, COPY_PREFIX, SERVICE, out)

    sides = {JSON_EXPORT: exporting(JSON_EXPORT), JSON_BASELINE: json_baseline,
             REDIS_EXPORT: exporting(REDIS_EXPORT), REDIS_BASELINE: redis_baseline}  # fmt: skip
    try:
        return timed_rounds("export", sides, settings.keys, settings.rounds)
    finally:
        client.close()
        sink.unlink(missing_ok=True)


# -- part 3: peak memory of an export process ------------------------------------------


@dataclass(frozen=True)
class Peak:
    """One export process: its peak resident set and how long it ran."""

    source: str
    keys: int
    peak_kib: int
    seconds: float


#: Runs the command its arguments name as a child and writes that child's peak RSS (KiB) and
#: wall time to the file its first argument names; exits with the child's status. Why a
#: process between: a child's ru_maxrss counts the memory of the process it was forked
#: from (the kernel keeps the old image's peak across exec), so a child of this
#: benchmark, which holds far more than an export needs, would report this process's peak.
LAUNCHER = """
import os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_pid, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as result:
    result.write(f"{usage.ru_maxrss} {time.perf_counter() - started}")
os._exit(os.waitstatus_to_exitcode(status))
"""


def export_process(config: Path, service: str, out: Path, log: Path) -> tuple[int, float]:
    """Run ``chanstore export`` as a process; its peak RSS in KiB and its wall time."""
    command = [sys.executable, "-m", "chanstore.cli", "export", "--db-config", str(config),
               "-o", str(out)]  # fmt: skip
    env = {**os.environ, "CHANSTORE_SERVICE_ID": service}
    result = log.with_suffix(".peak")
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(result), *command],
                                   env=env, cwd=config.parent, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            process.wait()
        finally:
            if process.poll() is None:  # the time limit: the export goes too
                os.killpg(process.pid, signal.SIGTERM)
            stop(process)
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{shlex.join(command)} exited with {process.returncode}:\n{tail}")
    peak, seconds = result.read_text().split()
    return int(peak), float(seconds)


def measure_memory(root: Path, port: int, workdir: Path, settings: Settings) -> list[Peak]:
    configs = {"json": workdir / "json-db.json", "redis": workdir / "redis-db.json"}
    configs["json"].write_text(json.dumps(json_config(root)))
    configs["redis"].write_text(json.dumps(redis_config(port, COPY_DB, COPY_PREFIX)))
    out = workdir / "memory-export.jsonl"
    peaks = []
    try:
        for keys in settings.memory_keys:
            for source, config in configs.items():
                service = service_of(keys, settings)
                peak_kib, seconds = export_process(config, service, out, workdir / "export.log")
                with out.open("rb") as lines:
                    written = sum(1 for _ in lines)
                if written != keys:
                    raise RuntimeError(f"export of {service} from {source}: {written:,} lines, "
                                       f"not {keys:,}")  # fmt: skip
                peaks.append(Peak(source, keys, peak_kib, seconds))
                progress(f"memory: {source}, {keys:,} keys: peak {peak_kib:,} KiB, "
                         f"{seconds:.1f} s")  # fmt: skip
    finally:
        out.unlink(missing_ok=True)
    return peaks


# -- reporting ---------------------------------------------------------------------------------


def environment(port: int) -> str:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
    try:
        server = client.info("server")
    finally:
        client.close()
    hiredis = "on" if redis.utils.HIREDIS_AVAILABLE else "off"
    return (
        f"Python {platform.python_version()}, redis-server {server['redis_version']}, "
        f"redis-py {redis.__version__} (hiredis {hiredis}), {os.cpu_count()} CPUs, "
        f"{platform.system()} {platform.machine()}"
    )


def rate(value: float) -> str:
    return f"{value:,.0f}"


def goal_verdict(ratio: float) -> str:
    return f">= {GOAL_MIGRATE:g}x: {'met' if ratio >= GOAL_MIGRATE else 'NOT met'}"


Section = tuple[str, Sequence[str], list[list[str]], set[int], list[str]]


def migrate_section(found: Rounds, settings: Settings) -> Section:
    baseline = ("os.walk + read + json.loads + redis-py pipeline HSET "
                f"(execute every {BATCH:,})")  # fmt: skip
    migrate_ratio = found.ratio(MIGRATE, MIGRATE_BASELINE)
    rows = [
        ["migrate (every key copied)", rate(found.rate(MIGRATE)), baseline,
         rate(found.rate(MIGRATE_BASELINE)), f"{migrate_ratio:.2f}x", goal_verdict(migrate_ratio)],
        ["migrate again (compare only)", rate(found.rate(RERUN)), baseline,
         rate(found.rate(MIGRATE_BASELINE)), f"{found.ratio(RERUN, MIGRATE_BASELINE):.2f}x", ""],
    ]  # fmt: skip
    headers = ("measure", "keys/s", "baseline", "baseline keys/s", "ratio", "goal")
    notes = [
        f"{settings.keys:,} keys: {settings.channels:,} channels x 1 container x "
        f"{KEYS_PER_CHANNEL} keys, chanstore.transfer.migrate in this process, json root "
        "(page cache) to a fresh key prefix each round",
        "migrate includes listing the channels, the write script's history entry per key "
        "and the count of the target's keys per channel; the baseline does none of these",
    ]
    return (f"1. Migrate {settings.keys:,} keys json -> Redis (median of {settings.rounds} rounds)",
            headers, rows, {1, 3, 4}, notes)  # fmt: skip


def export_section(found: Rounds, settings: Settings) -> Section:
    rows = [
        ["json", rate(found.rate(JSON_EXPORT)), "os.walk + read + json.loads + json.dumps line",
         rate(found.rate(JSON_BASELINE)), f"{found.ratio(JSON_EXPORT, JSON_BASELINE):.2f}x"],
        ["redis", rate(found.rate(REDIS_EXPORT)),
         f"SCAN + HSCAN (COUNT {BATCH:,}) + json.loads + json.dumps line",
         rate(found.rate(REDIS_BASELINE)), f"{found.ratio(REDIS_EXPORT, REDIS_BASELINE):.2f}x"],
    ]  # fmt: skip
    headers = ("source", "export keys/s", "baseline", "baseline keys/s", "ratio")
    notes = [f"{settings.keys:,} keys written as lines to a file by chanstore.transfer.export "
             "in this process; the baselines write the same lines to the same file"]  # fmt: skip
    return (f"2. Export throughput, {settings.keys:,} keys (median of {settings.rounds} rounds)",
            headers, rows, {1, 3, 4}, notes)  # fmt: skip


def growth(peaks: list[Peak], source: str) -> tuple[Peak, Peak]:
    """The smallest and the largest export of ``source`` that hold data."""
    held = [peak for peak in peaks if peak.source == source and peak.keys]
    return min(held, key=lambda p: p.keys), max(held, key=lambda p: p.keys)


def memory_section(peaks: list[Peak], settings: Settings) -> Section:
    sizes = list(settings.memory_keys)
    headers = ("source", *(f"peak MiB, {keys:,} keys" for keys in sizes),
               "growth, largest / smallest with data")  # fmt: skip
    rows = []
    for source in ("json", "redis"):
        by_keys = {peak.keys: peak for peak in peaks if peak.source == source}
        small, large = growth(peaks, source)
        rows.append([source, *(f"{by_keys[keys].peak_kib / 1024:.1f}" for keys in sizes),
                     f"{large.peak_kib / small.peak_kib:.2f}x for "
                     f"{large.keys // small.keys}x the data"])  # fmt: skip
    largest = max(sizes)
    seconds = ", ".join(f"{peak.source} {peak.keys / peak.seconds:,.0f} keys/s"
                        for peak in peaks if peak.keys == largest)  # fmt: skip
    notes = [
        "peak resident set (its own ru_maxrss, os.wait4 in a launcher process) of `python -m "
        "chanstore.cli export --db-config F -o OUT`; 0 keys is an export of a service with "
        "no data: the interpreter and its imports",
        f"{KEYS_PER_CHANNEL} keys a channel (the data grows in channels); the process's "
        f"rate at {largest:,} keys, start-up included: {seconds}",
    ]
    return ("3. Peak memory of an export process", headers, rows,
            set(range(1, len(headers))), notes)  # fmt: skip


@dataclass
class Results:
    settings: Settings
    migrate: Rounds
    export: Rounds
    memory: list[Peak]
    env: str
    source: str
    elapsed: float = 0.0


def summary(results: Results) -> list[str]:
    found = results.migrate
    ratio = found.ratio(MIGRATE, MIGRATE_BASELINE)
    lines = [
        f"migrate json -> Redis: {rate(found.rate(MIGRATE))} keys/s, {ratio:.2f}x the plain "
        f"loop's {rate(found.rate(MIGRATE_BASELINE))} keys/s (goal: at least "
        f"{GOAL_MIGRATE:g}x, {'met' if ratio >= GOAL_MIGRATE else 'NOT met'}); a rerun that "
        f"copies nothing: {rate(found.rate(RERUN))} keys/s",
    ]
    for source in ("json", "redis"):
        small, large = growth(results.memory, source)
        lines.append(
            f"export from {source}: peak {small.peak_kib / 1024:.1f} MiB at {small.keys:,} keys, "
            f"{large.peak_kib / 1024:.1f} MiB at {large.keys:,} keys "
            f"({large.peak_kib / small.peak_kib:.2f}x for {large.keys // small.keys}x the data)"
        )
    return lines


def report(results: Results) -> None:
    command = shlex.join(["python3", "bench/transfer.py", *sys.argv[1:]])
    settings = results.settings
    sections = [migrate_section(results.migrate, settings),
                export_section(results.export, settings),
                memory_section(results.memory, settings)]  # fmt: skip
    print(f"\ncommand: {command}")
    print(f"chanstore transfer benchmarks ({results.env})")
    print(f"{results.source}; medians of rounds in rotated order; ratio = chanstore's rate / "
          "a plain-code baseline's rate in the same round (the median of the rounds' ratios, "
          "not always the quotient of the two medians beside it)")  # fmt: skip
    for title, headers, rows, right, notes in sections:
        print(f"\n{title}\n")
        print(text_table(headers, rows, right))
        for note in notes:
            print(f"  - {note}")
    print()
    for line in summary(results):
        print(line)
    print(f"\nwhole run: {results.elapsed:.0f} s")
    print("\n--- markdown for the README ---\n")
    print(f"Measured with `{command}` ({results.env}). Medians of rounds in rotated order; "
          "ratio = chanstore's rate / a plain-code baseline's rate in the same round (the "
          "median of the rounds' ratios).")  # fmt: skip
    for title, headers, rows, right, notes in sections:
        print(f"\n**{title}**\n")
        print(markdown_table(headers, rows, right))
        print()
        for note in notes:
            print(f"- {note}.")
    print()
    for line in summary(results):
        print(f"- {line}.")


# -- main --------------------------------------------------------------------------------------


def run(settings: Settings, workdir: Path) -> Results:
    source = source_state()
    root = workdir / "json"
    sizes = sorted({settings.keys, *(keys for keys in settings.memory_keys if keys)})
    for keys in sizes:
        progress(f"writing {keys:,} keys into the json root")
        fill_json(root, service_of(keys, settings), keys // KEYS_PER_CHANNEL)
    progress("starting redis-server")
    with redis_server(workdir) as port:
        env = environment(port)
        migrated = measure_migrate(root, port, settings)
        exported = measure_export(root, port, workdir, settings)
        for keys in sizes:
            if service_of(keys, settings) != SERVICE:  # part 1 copied that one already
                progress(f"writing {keys:,} keys into Redis")
                fill_redis(port, service_of(keys, settings), keys // KEYS_PER_CHANNEL)
        memory = measure_memory(root, port, workdir, settings)
    return Results(settings, migrated, exported, memory, env, source)


def on_terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops redis-server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    settings = QUICK if args.quick else FULL
    signal.signal(signal.SIGALRM, on_time_limit)
    signal.signal(signal.SIGTERM, on_terminate)
    signal.alarm(int(settings.time_limit))
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="chanstore-bench-transfer-"))
    try:
        results = run(settings, workdir)
    finally:
        signal.alarm(0)
        progress("removing the temporary folder")
        shutil.rmtree(workdir, ignore_errors=True)
    results.elapsed = time.perf_counter() - started  # the folder's removal included
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
