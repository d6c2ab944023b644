"""Benchmarks of coherence across daemons on one Redis, each beside a same-run baseline.

Two daemons, A and B, serve one redis-server (DESIGN.md section 7): each has
the redis container ``kv`` (shared: every write publishes an invalidation that
the other daemon's link hears) and a json container ``files`` of its own (fsync
on, as shipped). A also has ``kv2``, a redis container under another key prefix
that B does not serve, so B's link never hears its writes. What is measured, by
the names ``--only`` takes:

1. ``staleness``: the time from a PUT's acknowledgement on A to the first GET on
   B that answers the new value. A poller process of its own reads the key on
   B in a tight loop over one keep-alive connection and notes the time each new
   value first came back; this process PUTs 1, 2, 3... on A, notes the time each
   acknowledgement came back, and writes the next value once the poller saw the
   last (so B always holds the current value in memory when the next write
   comes, and each sample is one invalidation and one read of Redis on B).
   Both clocks are CLOCK_MONOTONIC (``time.monotonic_ns()``), system-wide. The
   figure includes up to one of the poller's GETs (B's answer to a GET that was
   in flight when the invalidation came is the old value), so the poller's own
   round trip is reported beside. A value B answered before this process had
   read A's acknowledgement gives a negative figure, kept as it is.
2. ``get``: cached GET throughput on B (wrk ``-t2 -c32``, every GET a cache hit,
   checked on /metrics) of the redis container, with B's invalidation link up
   and A beside it, against the same GETs of B's json container. This build
   cannot switch coherence off and the previous release is not here to run, so
   the baseline is the same daemon's GETs of a container without a shared
   backend. Both run the same code on the hot path (the coherence checks, the
   link being up and the copy's maximum age, are made for every container), so
   the ratio shows what a live link beside the GETs costs (its PINGs, its
   connection) and that a shared container's cached GET is as fast as any;
   what the checks themselves cost against the previous release shows in
   bench/daemon.py's GET figures beside the README's earlier ones. Nobody
   writes meanwhile.
3. ``get-heard``: the same cached GETs of ``kv`` on B while a paced writer (wrk
   ``-t1 -c1`` with a 1 ms delay between requests) PUTs other keys of the same
   channels on A: each PUT is an invalidation that B hears and applies to a copy
   it holds (the GETs' keys stay cached). Baseline: the same GETs while the same
   writer PUTs the same keys to ``kv2`` on A, whose invalidations B never hears.
   Both sides put the same load on the machine, so the ratio is the cost of
   hearing other daemons' writes.
4. ``put``: PUT throughput on A's redis container (wrk ``-t2 -c32``), each PUT
   running the write script with its invalidation ``PUBLISH`` (heard by B),
   beside the same PUTs on A's json container (fsync on). That ratio is context
   only: the two backends differ in everything; PUT throughput against the
   previous release is measured elsewhere.

How: the benchmark starts everything itself on free loopback ports and stops it
at the end: a redis-server of its own (no persistence) and the two daemons as
real processes (``chanstore serve``) in a temporary working directory. Sides of
a comparison alternate round by round; figures are medians over rounds, ratios
the median of the rounds' ratios. wrk, the poller, both daemons and
redis-server share this machine's cores, which the report says; only ratios
from one run mean anything.

Run: ``python3 bench/coherence.py`` (about 3 minutes) or ``python3
bench/coherence.py --quick`` (under a minute); ``--only staleness,get`` runs
just those.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from harness import (
    chanstore_command,
    free_port,
    markdown_table,
    on_time_limit,
    progress,
    redis_server,
    source_state,
    stop,
    text_table,
    wait_until,
)

CONNECTIONS = 32
WRK_THREADS = 2
CHANNELS = 8
WARM_UP_SECONDS = 1
JSON_CONTAINER = "files"
REDIS_CONTAINER = "kv"
#: A redis container of A only, under a key prefix of its own: B never hears its writes.
UNHEARD_CONTAINER = "kv2"
UNHEARD_PREFIX = "bench-unheard:"
#: The paced writer of ``get-heard``: milliseconds wrk waits before each request.
WRITER_DELAY_MS = 1
WRITER_KEYS = 512
#: Seconds the paced writer runs before the GETs beside it start.
WRITER_LEAD = 0.3
#: Where the staleness is measured.
STALE_CHANNEL = "bench-stale"
STALE_KEY = "v"
#: Seconds the poller may take to see a value before the run is failed.
SEEN_TIMEOUT = 5.0
MEASURES = ("staleness", "get", "get-heard", "put")
VALUE: dict[str, Any] = {"hp": 100, "mana": 35, "name": "player", "flags": [1, 2, 3]}

#: DESIGN.md: "well under 100 ms on one host".
GOAL_STALENESS_P99_MS = 100.0
#: Issue 12: cached GET with coherence on at least 0.9x of a daemon without it.
GOAL_GET = 0.9


@dataclass(frozen=True)
class Settings:
    rounds: int  # rounds of each side; figures are medians over them
    seconds: int  # one wrk run
    get_keys: int  # keys preloaded for the cached GETs
    put_keys: int  # keys the PUTs cycle through
    stale_samples: int  # writes whose staleness is measured
    time_limit: float  # past it the run is aborted (and everything stopped)


FULL = Settings(rounds=4, seconds=6, get_keys=2000, put_keys=10_000, stale_samples=2000,
                time_limit=600.0)  # fmt: skip
QUICK = Settings(rounds=2, seconds=2, get_keys=1000, put_keys=5000, stale_samples=300,
                 time_limit=120.0)  # fmt: skip


# -- figures -------------------------------------------------------------------------


@dataclass
class Sample:
    """One wrk run: throughput and latency percentiles (and, for a writer beside, its rate)."""

    rps: float
    p50_ms: float
    p99_ms: float


@dataclass
class Measure:
    label: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return statistics.median(s.rps for s in self.samples)

    @property
    def p50_ms(self) -> float:
        return statistics.median(s.p50_ms for s in self.samples)

    @property
    def p99_ms(self) -> float:
        return statistics.median(s.p99_ms for s in self.samples)


@dataclass
class Comparison:
    name: str
    ours: Measure
    baseline: Measure
    goal: float | None
    note: str = ""

    @property
    def ratio(self) -> float:
        """ours / baseline: the median of the rounds' ratios (each round ran both sides)."""
        pairs = zip(self.ours.samples, self.baseline.samples, strict=True)
        return statistics.median(o.rps / b.rps for o, b in pairs)

    def target(self) -> str:
        return "context only" if self.goal is None else f">= {self.goal:g}x"

    def verdict(self) -> str:
        if self.goal is None:
            return "-"
        return "met" if self.ratio >= self.goal else "MISSED"


@dataclass
class Staleness:
    """Seconds from acknowledgement on A to the new value on B, one per write."""

    seconds: list[float]
    poll_rtt: list[float]  # the poller's GET round trips on B: p50, p99

    @property
    def negative(self) -> int:
        return sum(1 for s in self.seconds if s < 0)


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


# -- processes -----------------------------------------------------------------------


def http(port: int, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
    """One request to a daemon; the decoded JSON answer (text for /metrics)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        text = answer.read().decode()
    return text if path == "/metrics" else json.loads(text)


def healthy(port: int) -> bool:
    try:
        return http(port, "GET", "/healthz", timeout=1).get("status") == "serving"
    except (OSError, ValueError):
        return False


def ready(port: int) -> bool:
    try:
        http(port, "GET", "/readyz", timeout=1)
        return True
    except (OSError, ValueError):
        return False


def serve_command(port: int | str) -> list[str]:
    return ["serve", "--db-config", "db.json", "--listen", f"127.0.0.1:{port}",
            "--log-level", "warning"]  # fmt: skip


@dataclass
class Daemon:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def db_config(workdir: Path, redis_port: int, unheard: bool) -> list[dict[str, Any]]:
    redis = {"host": "127.0.0.1", "port": redis_port}
    entries = [
        {"implementation": "json", "name": JSON_CONTAINER, "load": True, "clear": False,
         "settings": {"root_dir": str(workdir / "data"), "fsync": True}},
        {"implementation": "redis", "name": REDIS_CONTAINER, "load": True, "clear": False,
         "settings": redis},
    ]  # fmt: skip
    if unheard:
        entries.append({"implementation": "redis", "name": UNHEARD_CONTAINER, "load": True,
                        "clear": False,
                        "settings": {**redis, "key_prefix": UNHEARD_PREFIX}})  # fmt: skip
    return entries


@contextlib.contextmanager
def daemon_process(name: str, workdir: Path, redis_port: int, unheard: bool) -> Iterator[Daemon]:
    """``chanstore serve`` on a free port in a folder of its own, stopped (SIGTERM) at the end."""
    folder = workdir / name
    folder.mkdir()
    (folder / "db.json").write_text(json.dumps(db_config(folder, redis_port, unheard), indent=2))
    port = free_port()
    log = folder / "daemon.log"
    with log.open("ab") as out:
        process = subprocess.Popen([chanstore_command(), *serve_command(port)], cwd=folder,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_until(lambda: healthy(port), process, f"chanstore serve ({name})", log, 20)
            yield Daemon(name, port, process)
        finally:
            status = stop(process)
            if status != 0:
                progress(f"chanstore serve ({name}) exited with status {status}; its log:\n"
                         f"{log.read_text(errors='replace')[-2000:]}")  # fmt: skip


def link_up(daemon: Daemon) -> bool:
    """Whether every chanstore_invalidation_link_up of the daemon is 1 (and there is one)."""
    text = http(daemon.port, "GET", "/metrics")
    values = re.findall(r"^chanstore_invalidation_link_up\{[^}]*\} (\S+)$", text, re.MULTILINE)
    return bool(values) and all(float(value) == 1 for value in values)


def cache_misses(daemon: Daemon) -> float:
    text = http(daemon.port, "GET", "/metrics")
    pattern = r'^chanstore_cache_requests_total\{[^}]*result="miss"[^}]*\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


def invalidations(daemon: Daemon) -> float:
    text = http(daemon.port, "GET", "/metrics")
    pattern = r"^chanstore_cache_invalidations_total\{[^}]*\} (\S+)$"
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


@contextlib.contextmanager
def all_cache_hits(daemon: Daemon, what: str) -> Iterator[None]:
    """Fail if a cache miss is counted on ``daemon`` while the body runs."""
    before = cache_misses(daemon)
    yield
    misses = cache_misses(daemon) - before
    if misses:
        raise RuntimeError(f"{misses:.0f} cache misses on {daemon.name} during {what}")


# -- a keep-alive HTTP/1.1 connection, for the staleness loop ----------------------------


class Connection:
    """One keep-alive connection to a daemon: a request, then its whole answer, in turn."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SEEN_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
                "Content-Type: application/json\r\n\r\n")  # fmt: skip
        self.sock.sendall(head.encode() + body)
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            self._receive()
        head_bytes, rest = self.buffer[:end], self.buffer[end + 4 :]
        match = re.search(rb"(?im)^content-length:\s*(\d+)", head_bytes)
        if match is None:
            raise RuntimeError(f"an answer without Content-Length: {head_bytes!r}")
        length = int(match.group(1))
        self.buffer = rest
        while len(self.buffer) < length:
            self._receive()
        answer, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(head_bytes.split(b" ", 2)[1]), answer

    def _receive(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise RuntimeError("the daemon closed the connection")
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


def poller_main(spec: dict[str, Any]) -> int:
    """The poller process: GET the key on B back to back; print ``value time_ns`` for each
    new value the moment its answer was read, until the value ``stop``; then the round
    trips' percentiles as ``RTT p50_ns p99_ns count``."""
    connection = Connection(spec["port"])
    last: bytes | None = None
    rtts: list[int] = []
    out = sys.stdout
    while True:
        sent = time.monotonic_ns()
        status, body = connection.request("GET", spec["path"])
        received = time.monotonic_ns()
        rtts.append(received - sent)
        if status != 200:
            raise RuntimeError(f"GET answered {status}: {body!r}")
        if body != last:
            last = body
            out.write(f"{body.decode()} {received}\n")
            out.flush()
            if body == str(spec["stop"]).encode():
                break
    rtts.sort()
    out.write(f"RTT {rtts[len(rtts) // 2]} {percentile(rtts, 0.99)} {len(rtts)}\n")
    out.flush()
    connection.close()
    return 0


def read_line(pipe: Any, buffer: bytearray, timeout: float) -> str:
    """The next line the poller printed (from ``buffer``, else read with a deadline)."""
    deadline = time.monotonic() + timeout
    fd = pipe.fileno()
    while (newline := buffer.find(b"\n")) < 0:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"the poller printed nothing for {timeout:g} s")
        data = os.read(fd, 65536)
        if not data:
            raise RuntimeError("the poller ended")
        buffer += data
    line = bytes(buffer[:newline]).decode()
    del buffer[: newline + 1]
    return line


# -- wrk -------------------------------------------------------------------------------

# Each thread builds its requests once, cycling through the keys from its own offset;
# DELAY_MS, when set, paces each connection (wrk's delay() hook).
WRK_SCRIPT = """
local threads = {}
local counter = 0

function setup(thread)
  thread:set("offset", #threads * 7919)
  table.insert(threads, thread)
end

function init(args)
  requests = {}
  for k = 0, KEYS - 1 do
    local path = string.format("/v1/channels/bench-%d/%s/%s-%d", k % CHANNELS, CONTAINER, PREFIX, k)
    requests[k + 1] = wrk.format(METHOD, path, {["Content-Type"] = "application/json"}, BODY)
  end
  counter = offset
end

function request()
  counter = counter + 1
  return requests[(counter % KEYS) + 1]
end

if DELAY_MS then
  function delay()
    return DELAY_MS
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"status": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.status, errors.connect, errors.read, errors.write, errors.timeout))
end
"""


def lua_string(text: str | None) -> str:
    return "nil" if text is None else json.dumps(text)


@dataclass(frozen=True)
class Load:
    """What one wrk script sends: METHOD /v1/channels/bench-N/CONTAINER/PREFIX-K."""

    name: str
    method: str
    container: str
    prefix: str
    keys: int
    body: str | None = None
    delay_ms: int | None = None

    def script(self, workdir: Path) -> Path:
        delay = "nil" if self.delay_ms is None else str(self.delay_ms)
        header = (
            f"METHOD = {lua_string(self.method)}\nCONTAINER = {lua_string(self.container)}\n"
            f"PREFIX = {lua_string(self.prefix)}\nKEYS = {self.keys}\nCHANNELS = {CHANNELS}\n"
            f"BODY = {lua_string(self.body)}\nDELAY_MS = {delay}\n"
        )
        path = workdir / f"{self.name}.lua"
        path.write_text(header + WRK_SCRIPT)
        return path


def wrk_command(seconds: float | str, script: str, url: str, connections: int = CONNECTIONS,
                threads: int = WRK_THREADS) -> list[str]:  # fmt: skip
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
            "--timeout", "10s", "-s", script, url]  # fmt: skip


def wrk_sample(name: str, returncode: int, stdout: str, stderr: str) -> Sample:
    """The figures of a finished wrk run; an error if any request failed."""
    match = re.search(r"^WRK_RESULT (\{.*\})$", stdout, re.MULTILINE)
    if returncode != 0 or match is None:
        raise RuntimeError(f"wrk ({name}) failed ({returncode}):\n{stdout}{stderr}")
    result = json.loads(match.group(1))
    failures = {k: result[k] for k in ("status", "connect", "read", "write", "timeout")
                if result[k]}  # fmt: skip
    if failures:
        raise RuntimeError(f"{name}: wrk saw failed requests {failures}:\n{stdout}")
    return Sample(result["requests"] / (result["duration_us"] / 1e6), result["p50_us"] / 1000,
                  result["p99_us"] / 1000)  # fmt: skip


def run_wrk(load: Load, daemon: Daemon, workdir: Path, seconds: float) -> Sample:
    command = wrk_command(seconds, str(load.script(workdir)), daemon.url)
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    return wrk_sample(load.name, finished.returncode, finished.stdout, finished.stderr)


@contextlib.contextmanager
def writer_running(load: Load, daemon: Daemon, workdir: Path,
                   seconds: float) -> Iterator[list[Sample]]:  # fmt: skip
    """The paced writer (wrk -t1 -c1) for ``seconds`` + 1 s (wrk takes whole seconds),
    started WRITER_LEAD before the body; yields a list that gets its figures at the end."""
    total = int(seconds) + 1
    command = wrk_command(total, str(load.script(workdir)), daemon.url, 1, 1)
    figures: list[Sample] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as writer:  # fmt: skip
        try:
            time.sleep(WRITER_LEAD)  # pacing: let the writer get going before the GETs
            yield figures
        except BaseException:
            writer.kill()
            raise
        finally:
            stdout, stderr = writer.communicate(timeout=total + 30)
        figures.append(wrk_sample(load.name, writer.returncode, stdout, stderr))


def alternate(rounds: int, first: Callable[[int], None], second: Callable[[int], None]) -> None:
    """Both sides of every round: ``first`` then ``second`` in even rounds, the other way
    round in odd ones, so that neither side always runs on a warmer machine."""
    for index in range(rounds):
        for side in (first, second) if index % 2 == 0 else (second, first):
            side(index)


def describe(sample: Sample) -> str:
    return f"{sample.rps:,.0f}/s p50 {sample.p50_ms:.2f} ms p99 {sample.p99_ms:.2f} ms"


# -- the run -----------------------------------------------------------------------------


@dataclass
class Results:
    env: str = ""
    staleness: Staleness | None = None
    comparisons: dict[str, Comparison] = field(default_factory=dict)


class Run:
    def __init__(self, settings: Settings, workdir: Path, only: Sequence[str]) -> None:
        self.settings = settings
        self.workdir = workdir
        self.only = only
        body = json.dumps(VALUE, separators=(",", ":"))
        self.get_redis = Load("get-kv", "GET", REDIS_CONTAINER, "get", settings.get_keys)
        self.get_json = Load("get-files", "GET", JSON_CONTAINER, "get", settings.get_keys)
        self.put_redis = Load("put-kv", "PUT", REDIS_CONTAINER, "put", settings.put_keys, body)
        self.put_json = Load("put-files", "PUT", JSON_CONTAINER, "put", settings.put_keys, body)
        self.heard = Load("writer-kv", "PUT", REDIS_CONTAINER, "w", WRITER_KEYS, body,
                          WRITER_DELAY_MS)  # fmt: skip
        self.unheard = Load("writer-kv2", "PUT", UNHEARD_CONTAINER, "w", WRITER_KEYS, body,
                            WRITER_DELAY_MS)  # fmt: skip

    def wrk(self, load: Load, daemon: Daemon, label: str) -> Sample:
        sample = run_wrk(load, daemon, self.workdir, self.settings.seconds)
        progress(f"{label}: {describe(sample)}")
        return sample

    def warm_up(self, load: Load, daemon: Daemon) -> None:
        sample = run_wrk(load, daemon, self.workdir, WARM_UP_SECONDS)
        progress(f"{load.name} on {daemon.name}, warm-up: {describe(sample)}")

    def preload(self, a: Daemon, b: Daemon) -> None:
        """The keys the GETs read, stored through A, then read once on B (so B holds every
        channel in memory) until B's link is up."""
        for container in (REDIS_CONTAINER, JSON_CONTAINER):
            daemon = a if container == REDIS_CONTAINER else b  # json: B's own root
            for channel in range(CHANNELS):
                values = {f"get-{k}": VALUE for k in range(channel, self.settings.get_keys,
                                                         CHANNELS)}  # fmt: skip
                http(daemon.port, "POST", f"/v1/channels/bench-{channel}/{container}/-/set",
                     {"values": values})  # fmt: skip
        # Both daemons use every container once (so every link is up), and the links say so.
        for daemon in (a, b):
            names = [REDIS_CONTAINER, JSON_CONTAINER] + ([UNHEARD_CONTAINER] if daemon is a
                                                         else [])  # fmt: skip
            for name in names:
                http(daemon.port, "POST", f"/v1/channels/bench-0/{name}/-/get", {"keys": ["x"]})
        deadline = time.monotonic() + 15
        while not (link_up(a) and link_up(b) and ready(a.port) and ready(b.port)):
            if time.monotonic() > deadline:
                raise RuntimeError("the daemons' invalidation links did not come up in 15 s")
            time.sleep(0.05)

    # -- 1. staleness ----------------------------------------------------------------

    def measure_staleness(self, a: Daemon, b: Daemon) -> Staleness:
        samples = self.settings.stale_samples
        path = f"/v1/channels/{STALE_CHANNEL}/{REDIS_CONTAINER}/{STALE_KEY}"
        writer = Connection(a.port)
        status, answer = writer.request("PUT", path, b"0")
        if status != 200:
            raise RuntimeError(f"PUT on A answered {status}: {answer!r}")
        spec = json.dumps({"port": b.port, "path": path, "stop": samples})
        poller = subprocess.Popen([sys.executable, __file__, "--poller", spec],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        buffer = bytearray()
        seconds: list[float] = []
        try:
            first = read_line(poller.stdout, buffer, SEEN_TIMEOUT)
            if first.split()[0] != "0":
                raise RuntimeError(f"the poller first saw {first!r}, not 0")
            for value in range(1, samples + 1):
                status, answer = writer.request("PUT", path, str(value).encode())
                acknowledged = time.monotonic_ns()
                if status != 200:
                    raise RuntimeError(f"PUT on A answered {status}: {answer!r}")
                seen_value, seen_at = read_line(poller.stdout, buffer, SEEN_TIMEOUT).split()
                if int(seen_value) != value:
                    raise RuntimeError(f"B answered {seen_value} after {value - 1}, not {value}")
                seconds.append((int(seen_at) - acknowledged) / 1e9)
            _, p50, p99, count = read_line(poller.stdout, buffer, SEEN_TIMEOUT).split()
            if poller.wait(timeout=10) != 0:
                raise RuntimeError(f"the poller failed: {poller.stderr.read().decode()}")
        finally:
            writer.close()
            if poller.poll() is None:
                poller.kill()
                poller.wait(timeout=10)
            poller.stdout.close()
            poller.stderr.close()
        result = Staleness(seconds, [int(p50) / 1e9, int(p99) / 1e9])
        progress(f"staleness over {samples} writes: p50 {percentile(seconds, 0.5) * 1000:.2f}"
                 f" ms, p99 {percentile(seconds, 0.99) * 1000:.2f} ms; the poller's GET "
                 f"p50 {int(p50) / 1e6:.3f} ms over {int(count):,} GETs")  # fmt: skip
        return result

    # -- 2. and 3. cached GETs ---------------------------------------------------------

    def measure_get(self, b: Daemon) -> Comparison:
        ours = Measure("GET cached, redis container of one of two daemons (link up)")
        theirs = Measure("GET cached, json container of the same daemon")
        self.warm_up(self.get_redis, b)
        self.warm_up(self.get_json, b)

        def redis_round(index: int) -> None:
            ours.samples.append(self.wrk(self.get_redis, b, f"get kv, round {index + 1}"))

        def json_round(index: int) -> None:
            theirs.samples.append(self.wrk(self.get_json, b, f"get files, round {index + 1}"))

        with all_cache_hits(b, "the cached GETs"):
            alternate(self.settings.rounds, redis_round, json_round)
        note = ("nobody writes meanwhile; B's invalidation link is up and A shares the Redis; "
                "this build cannot switch coherence off, so the baseline is B's json container, "
                "whose cached GETs run the same code (the coherence checks are made for every "
                "container): the ratio is what a live link beside the GETs costs, not what the "
                "checks cost against the previous release")  # fmt: skip
        return Comparison("GET cached (coherence on)", ours, theirs, GOAL_GET, note)

    def measure_get_heard(self, a: Daemon, b: Daemon) -> Comparison:
        ours = Measure("GET cached on B, B hearing A's writes")
        theirs = Measure("GET cached on B, A's writes unheard by B")
        writes: dict[str, list[Sample]] = {"heard": [], "unheard": []}
        heard_before = invalidations(b)
        self.warm_up(self.get_redis, b)

        def side(writer: Load, measure: Measure, kind: str) -> Callable[[int], None]:
            def run(index: int) -> None:
                with writer_running(writer, a, self.workdir, self.settings.seconds) as figures:
                    label = f"get kv, writes {kind}, round {index + 1}"
                    measure.samples.append(self.wrk(self.get_redis, b, label))
                writes[kind].extend(figures)
                progress(f"writer ({kind}) round {index + 1}: {describe(figures[0])}")

            return run

        with all_cache_hits(b, "the cached GETs beside the writer"):
            alternate(self.settings.rounds, side(self.heard, ours, "heard"),
                      side(self.unheard, theirs, "unheard"))  # fmt: skip
        heard = invalidations(b) - heard_before
        rate = {kind: statistics.median(s.rps for s in found) for kind, found in writes.items()}
        note = (f"the paced writer (wrk -t1 -c1, {WRITER_DELAY_MS} ms delay) PUT "
                f"{rate['heard']:,.0f}/s to kv on A (B heard {heard:,.0f} invalidations in all, "
                f"applied to the channels it holds) vs {rate['unheard']:,.0f}/s to kv2 on A "
                f"(key prefix {UNHEARD_PREFIX!r}, which B does not serve: nothing reaches B); "
                "every GET stayed a cache hit")  # fmt: skip
        return Comparison("GET cached, another daemon writing", ours, theirs, GOAL_GET, note)

    # -- 4. PUTs --------------------------------------------------------------------------

    def measure_put(self, a: Daemon, b: Daemon) -> Comparison:
        ours = Measure("PUT redis (script + invalidation PUBLISH)")
        theirs = Measure("PUT json (fsync on)")
        heard_before = invalidations(b)
        self.warm_up(self.put_redis, a)
        self.warm_up(self.put_json, a)

        def redis_round(index: int) -> None:
            ours.samples.append(self.wrk(self.put_redis, a, f"put kv, round {index + 1}"))

        def json_round(index: int) -> None:
            theirs.samples.append(self.wrk(self.put_json, a, f"put files, round {index + 1}"))

        alternate(self.settings.rounds, redis_round, json_round)
        heard = invalidations(b) - heard_before
        note = (f"PUTs on A, B subscribed beside it (B applied {heard:,.0f} invalidations to "
                "channels it held); the ratio is context only: a redis PUT against a json PUT "
                "with fsync, not against the previous release")  # fmt: skip
        return Comparison("PUT (with invalidation)", ours, theirs, None, note)

    def execute(self) -> Results:
        results = Results(env=environment())
        with redis_server(self.workdir) as redis_port, \
                daemon_process("A", self.workdir, redis_port, unheard=True) as a, \
                daemon_process("B", self.workdir, redis_port, unheard=False) as b:  # fmt: skip
            progress(f"daemon A pid {a.process.pid} on port {a.port}, B pid {b.process.pid} on "
                     f"port {b.port}, redis-server on port {redis_port}")  # fmt: skip
            self.preload(a, b)
            if "staleness" in self.only:
                results.staleness = self.measure_staleness(a, b)
            if "get" in self.only:
                results.comparisons["get"] = self.measure_get(b)
            if "get-heard" in self.only:
                results.comparisons["get-heard"] = self.measure_get_heard(a, b)
            if "put" in self.only:
                results.comparisons["put"] = self.measure_put(a, b)
        return results


# -- reporting ---------------------------------------------------------------------------


def environment() -> str:
    redis_version = first_line(["redis-server", "--version"]).split()[2].removeprefix("v=")
    wrk_version = first_line(["wrk", "-v"]).split()[1]
    packages = ", ".join(f"{name} {package_version(name)}"
                         for name in ("uvloop", "httptools", "redis"))  # fmt: skip
    return (
        f"Python {platform.python_version()}, {packages}, redis-server {redis_version}, "
        f"wrk {wrk_version}, {os.cpu_count()} CPUs, {platform.system()} {platform.machine()}"
    )


def first_line(command: list[str]) -> str:
    finished = subprocess.run(command, capture_output=True, text=True, check=False, timeout=10)
    return (finished.stdout or finished.stderr).splitlines()[0]


Section = tuple[str, list[str], Sequence[str], list[list[str]], set[int]]


def staleness_section(found: Staleness, settings: Settings) -> Section:
    values = found.seconds
    ms = [s * 1000 for s in values]
    p99 = percentile(ms, 0.99)
    headers = ("writes", "p50 ms", "p90 ms", "p99 ms", "max ms", "negative",
               "poller GET p50 ms", "target", "verdict")  # fmt: skip
    body = [[f"{len(values):,}", f"{percentile(ms, 0.5):.2f}", f"{percentile(ms, 0.9):.2f}",
             f"{p99:.2f}", f"{max(ms):.2f}", f"{found.negative:,}",
             f"{found.poll_rtt[0] * 1000:.3f}", f"p99 < {GOAL_STALENESS_P99_MS:g} ms",
             "met" if p99 < GOAL_STALENESS_P99_MS else "MISSED"]]  # fmt: skip
    notes = [
        "staleness = from the moment this process read A's acknowledgement of a PUT to the "
        "moment the poller read B's first answer holding the new value (CLOCK_MONOTONIC in "
        "both processes); each write waits for the last to be seen, so B holds the current "
        "value in memory when the next write comes",
        "a figure includes up to one of the poller's GETs on B (a GET in flight when the "
        f"invalidation came answers the old value): the poller's GET p50 is "
        f"{found.poll_rtt[0] * 1000:.3f} ms, p99 {found.poll_rtt[1] * 1000:.3f} ms",
        f"negative figures ({found.negative} of {len(values)}): B answered the new value "
        "before this process had read A's acknowledgement (the invalidation is published in "
        "the write's own step, before A answers); kept as they are in the percentiles",
    ]
    return ("Staleness across daemons (PUT acknowledged on A -> new value on B)", notes,
            headers, body, {0, 1, 2, 3, 4, 5, 6})  # fmt: skip


COMPARISON_HEADERS = ("measure", "req/s", "p50 ms", "p99 ms", "baseline", "baseline req/s",
                      "p50 ms", "p99 ms", "ratio", "target", "verdict")  # fmt: skip


def comparison_section(results: Results, settings: Settings) -> Section:
    found = [results.comparisons[name] for name in MEASURES if name in results.comparisons]
    body = [[c.name, f"{c.ours.rps:,.0f}", f"{c.ours.p50_ms:.2f}", f"{c.ours.p99_ms:.2f}",
             c.baseline.label, f"{c.baseline.rps:,.0f}", f"{c.baseline.p50_ms:.2f}",
             f"{c.baseline.p99_ms:.2f}", f"{c.ratio:.2f}x", c.target(), c.verdict()]
            for c in found]  # fmt: skip
    notes = [f"{c.name}: {c.ours.label}; {c.note}" for c in found]
    notes.append(
        f"medians of {settings.rounds} rounds of {settings.seconds} s, sides alternating; "
        "ratio = the median of the rounds' ratios; wrk -t2 -c32 over "
        f"{CHANNELS} channels ({settings.get_keys:,} keys for GET, {settings.put_keys:,} for PUT)"
    )
    notes.append(
        f"A, B, redis-server, wrk (and the paced writer) share this machine's {os.cpu_count()} "
        "cores; on separate hosts each daemon would have more CPU"
    )
    return ("Throughput beside a same-run baseline", notes, COMPARISON_HEADERS, body,
            {1, 2, 3, 5, 6, 7, 8})  # fmt: skip


def report(settings: Settings, results: Results, elapsed: float, source: str) -> None:
    command = shlex.join(["python3", *sys.argv])
    serve = shlex.join(["chanstore", *serve_command("PORT")])
    parts: list[Section] = []
    if results.staleness is not None:
        parts.append(staleness_section(results.staleness, settings))
    if results.comparisons:
        parts.append(comparison_section(results, settings))
    print(f"command: {command}")
    print(f"chanstore coherence benchmarks ({results.env})")
    print(f"{source}; two daemons A and B, each `{serve}`, on one redis-server: a redis "
          "container kv (shared) and a json container files (fsync on, each its own); "
          "only same-run ratios mean anything on this shared machine")  # fmt: skip
    for title, notes, headers, body, right in parts:
        print(f"\n{title}\n")
        print(text_table(headers, body, right))
        for note in notes:
            print(f"  - {note}")
    print(f"\nwhole run: {elapsed:.0f} s")
    print("\n--- markdown for the README ---\n")
    print(f"Measured with `{command}` ({results.env}); two daemons, each `{serve}`, on one "
          "redis-server.")  # fmt: skip
    for title, notes, headers, body, right in parts:
        print(f"\n**{title}**\n")
        print(markdown_table(headers, body, right))
        print()
        for note in notes:
            print(f"- {note}.")


# -- main --------------------------------------------------------------------------------


def measure_names(text: str) -> tuple[str, ...]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(MEASURES))
    if unknown or not names:
        what = f"unknown: {', '.join(unknown)}" if unknown else f"no measure named in {text!r}"
        raise argparse.ArgumentTypeError(f"{what}; the measures are {', '.join(MEASURES)}")
    return tuple(name for name in MEASURES if name in names)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run of under a minute")
    parser.add_argument("--only", type=measure_names, default=MEASURES, metavar="NAME[,NAME]",
                        help=f"run just these measures, of {', '.join(MEASURES)} "
                             "(default: all)")  # fmt: skip
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to make the temporary working directory")  # fmt: skip
    parser.add_argument("--poller", metavar="SPEC", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.poller is not None:
        return poller_main(json.loads(args.poller))
    settings = QUICK if args.quick else FULL
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install wrk redis-server)")
    signal.signal(signal.SIGALRM, on_time_limit)
    signal.alarm(int(settings.time_limit))
    started = time.perf_counter()
    source = source_state()
    workdir = Path(tempfile.mkdtemp(prefix="chanstore-bench-coherence-", dir=args.dir))
    try:
        results = Run(settings, workdir, args.only).execute()
    finally:
        signal.alarm(0)
        shutil.rmtree(workdir, ignore_errors=True)
    report(settings, results, time.perf_counter() - started, source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
