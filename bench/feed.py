"""Benchmarks of conditional writes and the change feed, each beside a same-run baseline.

What is measured, for a json container (fsync on, as shipped) and a redis
container alike, by the names ``--only`` takes:

1. ``conditional``: conditional PUT throughput against unconditional PUT, at
   the same concurrency with the same tool: wrk with one thread per
   connection (``-t16 -c16``), each connection writing 64 keys of its own
   over 8 channels, so that every condition holds. A conditional PUT sends
   ``If-Match`` with the ETag its connection's previous PUT of that key
   answered (read from the response in the Lua ``response()`` hook: with one
   connection per thread, a thread's response is that of its last request);
   the first PUT of each key in a round uses the ETag read just before the
   round by a bulk get (two reads that agree, so that the writes the last
   round left in flight have landed). The unconditional script does the same
   work but sends no ``If-Match``. Every value carries the run and a counter,
   so every PUT changes the ETag. A 412 is counted (the script then goes on
   from the ETag the 412 names) and reported; past 0.1% of the requests it
   fails the run, as any other failed request does. Ratio = conditional /
   unconditional, paired by round (the two sides alternate in order).
2. ``fanout``: 100 watchers (SSE streams of one channel, narrowed to the
   container) attached while wrk (``-t2 -c16``) writes to that channel at
   full speed, against the same writes with no stream open (a stream was
   opened once before the rounds, so that both sides keep the history).
   Latency is from acknowledgement to receipt: wrk's ``response()`` notes
   each 200's ETag and the time it arrived (CLOCK_MONOTONIC through
   LuaJIT's FFI); the readers note the time each recv() returned and the
   ETags of the ``set`` events in it (CLOCK_MONOTONIC, time.monotonic_ns(),
   the same system-wide clock). Every value holds a sequence number of its
   writer, so its ETag (the SHA-1 of its stored bytes) names that one write;
   latencies are joined on it for every (event, watcher) pair. An event read
   before wrk read its write's 200 has a negative latency (kept as it is in
   the percentiles); so each value also holds the time its PUT was sent,
   and the latency from the send to the receipt is reported beside. The
   streams are read by a few processes, each multiplexing its share with
   selectors (epoll) and finding ETags with one regular-expression pass over
   each recv(). Events still unread when wrk stops are drained (until the streams
   are quiet) before the counts are made; a watcher ended by the daemon
   (``slow_reader``) is reported.
3. ``memory``: memory per open stream: a fresh daemon's VmRSS (from
   /proc/<pid>/status) with no stream open, then with 1,000 idle streams of
   the json container, then with 1,000 more of the redis container; each
   growth divided by 1,000 (one stream of each was opened and closed before
   the first figure, so that what streams need once is already loaded).

Beside every figure, the CPU the daemon (and redis-server) used per request,
from /proc/<pid>/stat, shows where the time goes.

How: the benchmark starts everything itself on free loopback ports and stops
it at the end: a redis-server of its own (no persistence) and the daemon as a
real process (``chanstore serve --max-watchers 2000``) in a temporary working
directory, with a db_config holding a json container (fsync on) and a redis
container. wrk and the readers share the machine's cores with the daemon and
redis-server, which the report says; only ratios from one run mean anything.

Run: ``python3 bench/feed.py`` (about 4 minutes) or ``python3 bench/feed.py
--quick`` (under a minute); ``--only conditional,memory`` runs just those.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import os
import platform
import re
import resource
import selectors
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
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from harness import (
    chanstore_command,
    cpu_seconds,
    free_port,
    markdown_table,
    on_time_limit,
    progress,
    redis_pings,
    source_state,
    stop,
    text_table,
    wait_until,
)

#: Part 1: wrk threads = connections, so that a thread's response is its last request's.
CONNECTIONS = 16
CHANNELS = 8
KEYS_PER_CONNECTION = 64
#: Seconds between the two bulk reads whose ETags must agree before a conditional round.
ETAG_SETTLE = 0.3
#: 412s tolerated per conditional request (a key changed after its ETag was read).
MAX_REFUSED = 0.001
#: Part 2: the writer (wrk) beside the watchers.
WRITER_THREADS = 2
WRITER_CONNECTIONS = 16
WRITER_KEYS_PER_THREAD = 256
WATCHERS = 100
WATCHER_PROCESSES = 2
#: Part 3.
IDLE_STREAMS = 1000
OPEN_BATCH = 100
MAX_WATCHERS = 2000
#: Seconds without a byte on any stream after which a drain is over.
QUIET_SECONDS = 0.5
#: Seconds a drain may take at most (then what is missing is counted as missing).
DRAIN_TIMEOUT = 30.0

JSON_CONTAINER = "files"
REDIS_CONTAINER = "kv"
#: backend -> (container, label)
BACKENDS = {"json": (JSON_CONTAINER, "json (fsync on)"), "redis": (REDIS_CONTAINER, "redis")}
MEASURES = ("conditional", "fanout", "memory")

GOAL_CONDITIONAL = 0.8
GOAL_FANOUT = 0.8
GOAL_P99_MS = 10.0

#: Every value written: these fields and the writer's thread and sequence number.
VALUE_FIELDS = '"hp":100,"mana":35,"name":"player","flags":[1,2,3]'


@dataclass(frozen=True)
class Settings:
    rounds: int  # rounds of each side; figures are medians over them
    seconds: int  # one wrk run
    warm_up: int  # an untimed wrk run before the rounds
    time_limit: float  # past it the run is aborted (and everything stopped)


FULL = Settings(rounds=4, seconds=6, warm_up=2, time_limit=600.0)
QUICK = Settings(rounds=1, seconds=2, warm_up=1, time_limit=150.0)


# -- processes -----------------------------------------------------------------------


@dataclass
class Redis:
    port: int
    pid: int


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[Redis]:
    """A redis-server of our own on a free port, without persistence."""
    port = free_port()
    log = workdir / "redis.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"],
            cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until(lambda: redis_pings(port), process, "redis-server", log, 10)
            yield Redis(port, process.pid)
        finally:
            stop(process)


def http(port: int, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
    """One request to the daemon; the decoded JSON answer (text for /metrics)."""
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


SERVE_ARGS = ("--max-watchers", str(MAX_WATCHERS))


def serve_command(port: int | str) -> list[str]:
    return ["serve", "--db-config", "db.json", "--listen", f"127.0.0.1:{port}",
            "--log-level", "warning", *SERVE_ARGS]  # fmt: skip


@dataclass
class Daemon:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid


@contextlib.contextmanager
def daemon_process(workdir: Path, redis_port: int) -> Iterator[Daemon]:
    """``chanstore serve`` on a free port, stopped (SIGTERM) at the end."""
    entries = [
        {"implementation": "json", "name": JSON_CONTAINER, "load": True, "clear": False,
         "settings": {"root_dir": str(workdir / "data"), "fsync": True}},
        {"implementation": "redis", "name": REDIS_CONTAINER, "load": True, "clear": False,
         "settings": {"host": "127.0.0.1", "port": redis_port}},
    ]  # fmt: skip
    (workdir / "db.json").write_text(json.dumps(entries, indent=2))
    port = free_port()
    log = workdir / "daemon.log"
    with log.open("ab") as out:
        process = subprocess.Popen([chanstore_command(), *serve_command(port)], cwd=workdir,
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_until(lambda: healthy(port), process, "chanstore serve", log, 20)
            yield Daemon(port, process)
        finally:
            status = stop(process)
            if status != 0:
                progress(f"chanstore serve exited with status {status}; see its log:\n"
                         f"{log.read_text(errors='replace')[-2000:]}")  # fmt: skip


# -- /proc -----------------------------------------------------------------------------


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU ticks of the whole machine, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(values[:8])
    return total - values[3] - values[4], total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Usage:
    """CPU seconds used by the watched processes, and the machine's busy share, over a span."""

    cpu: dict[str, float]
    busy: float  # fraction of all cores


@contextlib.contextmanager
def usage_of(pids: dict[str, int]) -> Iterator[list[Usage]]:
    """Yields a list that gets the :class:`Usage` of ``pids`` while the body ran."""
    found: list[Usage] = []
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy0, total0 = machine_busy()
    yield found
    busy1, total1 = machine_busy()
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    found.append(Usage({name: after[name] - before[name] for name in pids},
                       (busy1 - busy0) / max(1, total1 - total0)))  # fmt: skip


# -- wrk -------------------------------------------------------------------------------

WRK_DONE = """
function done(summary, latency, requests)
  local errors = summary.errors
  local refused = 0
  for _, thread in ipairs(threads) do
    refused = refused + (thread:get("refused") or 0)
  end
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"status": %d, "connect": %d, "read": %d, "write": %d, "timeout": %d, "refused": %d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.status, errors.connect, errors.read, errors.write, errors.timeout, refused))
  for _, thread in ipairs(threads) do
    local failures = thread:get("failures")
    for i = 1, #(failures or {}) do
      io.write("WRK_FAILURE ", failures[i], "\\n")
    end
  end
  if ACK_FILE then
    local out = assert(io.open(ACK_FILE, "w"))
    for _, thread in ipairs(threads) do
      local etags, times = thread:get("ack_etags"), thread:get("ack_us")
      for i = 1, #etags do
        out:write(etags[i], " ", string.format("%.1f", times[i]), "\\n")
      end
    end
    out:close()
  end
end
"""

# Part 1. One connection per thread: request() and response() alternate, so
# `current` is the key whose answer response() gets. Each request's body
# differs (thread, counter), so each PUT changes the key's ETag; the next PUT
# of that key sends the ETag just answered (when CONDITIONAL).
CONDITIONAL_SCRIPT = """
threads = {}

function setup(thread)
  thread:set("index", #threads)
  table.insert(threads, thread)
end

function init(args)
  paths, etags = {}, {}
  for k = 0, KEYS - 1 do
    paths[k + 1] = string.format("/v1/channels/%s-%d/%s/c%d-k%d",
                                 CHANNEL_PREFIX, k % CHANNELS, CONTAINER, index, k)
    etags[k + 1] = ETAGS[index * KEYS + k + 1]
  end
  counter, current = 0, 1
  sent, failures, refused = nil, {}, 0
end

function request()
  counter = counter + 1
  current = (counter - 1) % KEYS + 1
  local headers = {["Content-Type"] = "application/json"}
  if CONDITIONAL then
    headers["If-Match"] = etags[current]
  end
  local body = string.format('{' .. FIELDS .. ',"run":%d,"t":%d,"n":%d}', RUN, index, counter)
  sent = headers["If-Match"]
  return wrk.format("PUT", paths[current], headers, body)
end

function response(status, headers, body)
  if status == 200 then
    etags[current] = headers["etag"] or headers["ETag"]
    return
  end
  if status == 412 then
    -- The key changed after its ETag was read: go on from the one the 412 names.
    refused = refused + 1
    etags[current] = headers["etag"] or headers["ETag"]
  end
  if #failures < 5 then
    failures[#failures + 1] = string.format("%d %s If-Match %s: %s", status, paths[current],
                                            tostring(sent), body)
  end
end
"""

# Part 2. Any number of connections per thread: an answer is matched to its
# write by the ETag it carries, which names the value (thread, sequence).
FANOUT_SCRIPT = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local now = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

threads = {}

function setup(thread)
  thread:set("index", #threads)
  table.insert(threads, thread)
end

function init(args)
  paths = {}
  for k = 0, KEYS - 1 do
    paths[k + 1] = string.format("/v1/channels/%s/%s/w%d-k%d", CHANNEL, CONTAINER, index, k)
  end
  headers = {["Content-Type"] = "application/json"}
  counter = 0
  ack_etags, ack_us = {}, {}
end

function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now)
  return tonumber(now.tv_sec) * 1e6 + tonumber(now.tv_nsec) / 1e3
end

function request()
  counter = counter + 1
  local body = string.format('{' .. FIELDS .. ',"t":%d,"seq":%d,"sent":%.1f}',
                             index, counter, now_us())
  return wrk.format("PUT", paths[(counter - 1) % KEYS + 1], headers, body)
end

function response(status, headers, body)
  if status == 200 then
    local n = #ack_etags + 1
    ack_etags[n] = headers["etag"] or headers["ETag"]
    ack_us[n] = now_us()
  end
end
"""


def lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Lua string


def wrk_command(seconds: int, script: str, url: str, threads: int,
                connections: int) -> list[str]:  # fmt: skip
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency",
            "--timeout", "10s", "-s", script, url]  # fmt: skip


@dataclass
class Sample:
    """One wrk run, and the CPU the processes used meanwhile."""

    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    usage: Usage | None = None
    refused: int = 0  # 412 answers

    @property
    def seconds(self) -> float:
        return self.requests / self.rps

    def cpu_us(self, name: str) -> float:
        """CPU microseconds process ``name`` used per request."""
        assert self.usage is not None
        return self.usage.cpu[name] * 1e6 / max(1, self.requests)


def run_wrk(name: str, script: Path, daemon: Daemon, seconds: int, threads: int,
            connections: int, watch: dict[str, int]) -> Sample:  # fmt: skip
    command = wrk_command(seconds, str(script), daemon.url, threads, connections)
    with usage_of(watch) as usage:
        finished = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=seconds + 60)  # fmt: skip
    match = re.search(r"^WRK_RESULT (\{.*\})$", finished.stdout, re.MULTILINE)
    if finished.returncode != 0 or match is None:
        raise RuntimeError(f"wrk ({name}) failed ({finished.returncode}):\n"
                           f"{finished.stdout}{finished.stderr}")  # fmt: skip
    result = json.loads(match.group(1))
    refused = result["refused"]  # 412s, counted in "status" too
    result["status"] -= refused
    failures = {k: result[k] for k in ("status", "connect", "read", "write", "timeout")
                if result[k]}  # fmt: skip
    if refused > result["requests"] * MAX_REFUSED:
        failures["412"] = refused
    if failures:
        raise RuntimeError(f"{name}: wrk saw failed requests {failures} (status: an answer "
                           f"above 399 other than 412):\n{finished.stdout}")  # fmt: skip
    return Sample(result["requests"], result["requests"] / (result["duration_us"] / 1e6),
                  result["p50_us"] / 1000, result["p99_us"] / 1000, usage[0],
                  refused)  # fmt: skip


def describe(sample: Sample) -> str:
    return f"{sample.rps:,.0f}/s p50 {sample.p50_ms:.2f} ms p99 {sample.p99_ms:.2f} ms"


def alternate(rounds: int, first: Callable[[int], None], second: Callable[[int], None]) -> None:
    """Both sides of every round: ``first`` first in even rounds, ``second`` in odd ones."""
    for index in range(rounds):
        for side in (first, second) if index % 2 == 0 else (second, first):
            side(index)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(ours: Sequence[Sample], theirs: Sequence[Sample]) -> float:
    """The median of the rounds' ratios (each round ran both sides back to back)."""
    return median([o.rps / t.rps for o, t in zip(ours, theirs, strict=True)])


# -- part 1: conditional PUT -------------------------------------------------------------


def cond_channel(container: str) -> str:
    return f"cond-{container}"


def cond_keys(container: str) -> dict[str, list[str]]:
    """The keys of part 1 by channel, as the Lua script names them."""
    by_channel: dict[str, list[str]] = {}
    for thread in range(CONNECTIONS):
        for k in range(KEYS_PER_CONNECTION):
            channel = f"{cond_channel(container)}-{k % CHANNELS}"
            by_channel.setdefault(channel, []).append(f"c{thread}-k{k}")
    return by_channel


def current_etags(daemon: Daemon, container: str, timeout: float = 20.0) -> list[str]:
    """The ETag header of every key of part 1, in the script's order (thread, key), once
    two readings ETAG_SETTLE seconds apart agree: the writes a finished wrk run left in
    flight are applied by then, so the first conditional PUT of each key holds."""
    deadline = time.monotonic() + timeout
    last = read_etags(daemon, container)
    while True:
        time.sleep(ETAG_SETTLE)
        etags = read_etags(daemon, container)
        if etags == last:
            return etags
        if time.monotonic() > deadline:
            raise RuntimeError(f"the ETags of {container} still changed after {timeout:g} s")
        last = etags


def read_etags(daemon: Daemon, container: str) -> list[str]:
    etags: dict[str, str] = {}
    for channel, keys in cond_keys(container).items():
        answer = http(daemon.port, "POST", f"/v1/channels/{channel}/{container}/-/get",
                      {"keys": keys})  # fmt: skip
        if answer.get("missing"):
            raise RuntimeError(f"{channel}/{container}: keys missing: {answer['missing'][:5]}")
        for key in keys:
            etags[f"{channel}/{key}"] = f'"{answer["etags"][key]}"'
    return [etags[f"{cond_channel(container)}-{k % CHANNELS}/c{t}-k{k}"]
            for t in range(CONNECTIONS) for k in range(KEYS_PER_CONNECTION)]  # fmt: skip


def preload_cond(daemon: Daemon, container: str) -> None:
    value = json.loads("{" + VALUE_FIELDS + "}")
    for channel, keys in cond_keys(container).items():
        http(daemon.port, "POST", f"/v1/channels/{channel}/{container}/-/set",
             {"values": dict.fromkeys(keys, value)})  # fmt: skip


def conditional_script(workdir: Path, container: str, conditional: bool,
                       etags: Sequence[str]) -> Path:  # fmt: skip
    table = ",\n".join(f"  {lua_string(etag)}" for etag in etags)
    header = (
        f"CHANNEL_PREFIX = {lua_string(cond_channel(container))}\n"
        f"CONTAINER = {lua_string(container)}\nCHANNELS = {CHANNELS}\n"
        f"KEYS = {KEYS_PER_CONNECTION}\nCONDITIONAL = {'true' if conditional else 'false'}\n"
        f"FIELDS = {lua_string(VALUE_FIELDS)}\nACK_FILE = nil\nRUN = {time.monotonic_ns()}\n"
        f"ETAGS = {{\n{table}\n}}\n"
    )
    path = workdir / f"{'conditional' if conditional else 'unconditional'}-{container}.lua"
    path.write_text(header + CONDITIONAL_SCRIPT + WRK_DONE)
    return path


@dataclass
class CondResult:
    backend: str
    plain: list[Sample] = field(default_factory=list)
    conditional: list[Sample] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return paired_ratio(self.conditional, self.plain)


def measure_conditional(run: Run, daemon: Daemon, backend: str) -> CondResult:
    container = BACKENDS[backend][0]
    preload_cond(daemon, container)
    found = CondResult(backend)
    watch = run.cpu_watch(daemon, backend)

    def once(conditional: bool, seconds: int) -> Sample:
        etags = current_etags(daemon, container)
        script = conditional_script(run.workdir, container, conditional, etags)
        name = f"{'conditional' if conditional else 'unconditional'} PUT {backend}"
        return run_wrk(name, script, daemon, seconds, CONNECTIONS, CONNECTIONS, watch)

    for conditional in (False, True):
        sample = once(conditional, run.settings.warm_up)
        progress(f"warm-up {'conditional' if conditional else 'unconditional'} PUT {backend}: "
                 f"{describe(sample)}")  # fmt: skip

    def plain(index: int) -> None:
        found.plain.append(once(False, run.settings.seconds))
        progress(f"round {index + 1} unconditional PUT {backend}: {describe(found.plain[-1])}")

    def conditional(index: int) -> None:
        found.conditional.append(once(True, run.settings.seconds))
        progress(f"round {index + 1} conditional PUT {backend}: "
                 f"{describe(found.conditional[-1])}")  # fmt: skip

    alternate(run.settings.rounds, plain, conditional)
    return found


# -- part 2: fan-out ---------------------------------------------------------------------

#: A set event's ETag and the time its write was sent (inside the value), in one pass.
SET_EVENT = re.compile(rb'"etag":"([0-9a-f]+)","value":\{[^\n]*?"sent":([0-9.]+)')
END_REASON = re.compile(rb'event: end\ndata: \{"reason":"([^"]*)"')


@dataclass
class Stream:
    """One SSE stream read by a reader process."""

    index: int
    sock: socket.socket
    tail: bytes = b""
    ready: bool = False
    events: int = 0
    ended: str | None = None
    closed: bool = False


def open_stream(port: int, path: str, timeout: float = 10.0) -> socket.socket:
    """A connection that asked for ``path`` as an event stream (HTTP/1.0: no chunking)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())  # fmt: skip
    sock.setblocking(False)
    return sock


def reader_main(spec: dict[str, Any]) -> int:
    """A reader process: opens ``count`` streams, reads them all with one selector.

    Talks to its parent through lines: it says ``ready`` once every stream
    sent its ``ready`` event; ``go`` marks the start of the measured span;
    ``drain ACKS OUT`` reads on until the streams are quiet, then joins what
    was received with the acknowledgements in ACKS (``"etag" microseconds``
    lines), writes the latencies (microseconds, doubles: every one from the
    acknowledgement, then every one from the send) to OUT and answers
    ``done {json}``.
    """
    selector = selectors.DefaultSelector()
    streams = []
    for index in range(spec["count"]):
        stream = Stream(index, open_stream(spec["port"], spec["path"]))
        selector.register(stream.sock, selectors.EVENT_READ, stream)
        streams.append(stream)
    os.set_blocking(0, False)
    selector.register(0, selectors.EVENT_READ, None)
    # (stream index, receipt ns, (ETag, sent) of each set event found in one recv)
    records: list[tuple[int, int, list[tuple[bytes, bytes]]]] = []
    ready = 0
    told_ready = False
    command = b""
    started_cpu = 0.0
    drain: list[str] | None = None
    drain_deadline = 0.0
    last_data = time.monotonic()
    deadline = time.monotonic() + spec["timeout"]
    while True:
        for key, _ in selector.select(timeout=0.05):
            stream = key.data
            if stream is None:
                chunk = os.read(0, 4096)
                if not chunk:
                    return 1  # the parent is gone
                command += chunk
                while b"\n" in command:
                    line, command = command.split(b"\n", 1)
                    words = line.decode().split()
                    if words == ["go"]:
                        started_cpu = sum(os.times()[:2])
                    elif words and words[0] == "drain":
                        drain = words[1:]
                        drain_deadline = time.monotonic() + DRAIN_TIMEOUT
                    elif words == ["stop"]:
                        return 0
                continue
            try:
                data = stream.sock.recv(1 << 18)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            received = time.monotonic_ns()
            if not data:
                stream.closed = True
                selector.unregister(stream.sock)
                stream.sock.close()
                continue
            last_data = time.monotonic()
            buffer = stream.tail + data if stream.tail else data
            end = buffer.rfind(b"\n\n")
            if end < 0:
                stream.tail = buffer
                continue
            complete, stream.tail = buffer[: end + 2], buffer[end + 2 :]
            if not stream.ready and b"event: ready" in complete:
                stream.ready = True
                ready += 1
            found = SET_EVENT.findall(complete)
            if found:
                records.append((stream.index, received, found))
                stream.events += len(found)
            if b"event: end" in complete:
                reason = END_REASON.search(complete)
                stream.ended = reason.group(1).decode() if reason else "?"
        now = time.monotonic()
        if not told_ready and ready == len(streams):
            told_ready = True
            print("ready", flush=True)
        if drain is not None and (now - last_data > QUIET_SECONDS or now > drain_deadline):
            break
        if now > deadline:
            print(f"failed: no drain within {spec['timeout']:g} s", flush=True)
            return 1
    cpu = sum(os.times()[:2]) - started_cpu
    for stream in streams:
        if not stream.closed:
            selector.unregister(stream.sock)
            stream.sock.close()
    acks_path, out_path = drain
    acks: dict[bytes, float] = {}
    with open(acks_path, "rb") as lines:
        for line in lines:
            etag, micros = line.split()
            acks[etag.strip(b'"')] = float(micros)
    from_ack = array.array("d")
    from_send = array.array("d")
    matched = [0] * len(streams)
    unacked = 0
    for index, received, events in records:
        received_us = received / 1000
        for etag, sent in events:
            acked = acks.get(etag)
            if acked is None:
                unacked += 1  # written while wrk stopped: its answer was never read
            else:
                from_ack.append(received_us - acked)
                from_send.append(received_us - float(sent))
                matched[index] += 1
    with open(out_path, "wb") as out:
        from_ack.tofile(out)
        from_send.tofile(out)
    summary = {
        "streams": len(streams),
        "events": sum(s.events for s in streams),
        "acks": len(acks),
        "missing": sum(len(acks) - m for m in matched),
        "unacked": unacked,
        "ended": dict(Counter(s.ended for s in streams if s.ended)),
        "closed_without_end": sum(1 for s in streams if s.closed and not s.ended),
        "cpu": cpu,
    }
    print("done " + json.dumps(summary), flush=True)
    return 0


def read_line(process: subprocess.Popen[str], timeout: float, what: str) -> str:
    """The next line ``process`` prints, within ``timeout`` seconds."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise RuntimeError(f"a reader said nothing within {timeout:g} s while {what}")
    line = process.stdout.readline()
    if not line:
        stderr = process.stderr.read() if process.stderr else ""
        raise RuntimeError(f"a reader ended while {what} (status {process.wait(5)}):\n{stderr}")
    return line.strip()


def tell(readers: Sequence[subprocess.Popen[str]], line: str) -> None:
    for reader in readers:
        assert reader.stdin is not None
        reader.stdin.write(line + "\n")
        reader.stdin.flush()


@contextlib.contextmanager
def readers_attached(port: int, path: str, watchers: int, processes: int,
                     timeout: float) -> Iterator[list[subprocess.Popen[str]]]:  # fmt: skip
    """``processes`` readers holding ``watchers`` streams of ``path`` between them, every
    stream open (its ``ready`` event read) when the body starts."""
    readers: list[subprocess.Popen[str]] = []
    try:
        for share in (len(r) for r in split(range(watchers), processes)):
            spec = {"port": port, "path": path, "count": share, "timeout": timeout}
            readers.append(subprocess.Popen(
                [sys.executable, __file__, "--reader", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            ))  # fmt: skip
        for reader in readers:
            line = read_line(reader, 30, "opening its streams")
            if line != "ready":
                raise RuntimeError(f"a reader said {line!r} instead of ready")
        yield readers
    finally:
        for reader in readers:
            if reader.poll() is None:
                with contextlib.suppress(OSError):
                    tell([reader], "stop")
            try:
                reader.wait(timeout=5)
            except subprocess.TimeoutExpired:
                reader.kill()
                reader.wait(timeout=5)
            for pipe in (reader.stdin, reader.stdout, reader.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()


def split(items: range, parts: int) -> list[range]:
    size, extra = divmod(len(items), parts)
    out, start = [], items.start
    for part in range(parts):
        end = start + size + (1 if part < extra else 0)
        out.append(range(start, end))
        start = end
    return out


def fanout_channel(container: str) -> str:
    return f"fan-{container}"


def fanout_script(workdir: Path, container: str, acks: Path) -> Path:
    header = (
        f"CHANNEL = {lua_string(fanout_channel(container))}\n"
        f"CONTAINER = {lua_string(container)}\nKEYS = {WRITER_KEYS_PER_THREAD}\n"
        f"FIELDS = {lua_string(VALUE_FIELDS)}\nACK_FILE = {lua_string(str(acks))}\n"
    )
    path = workdir / f"fanout-{container}.lua"
    path.write_text(header + FANOUT_SCRIPT + WRK_DONE)
    return path


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass
class Delivery:
    """What 100 watchers got during one round with them attached."""

    deliveries: int  # (event, watcher) pairs with a latency
    p50_ms: float  # from acknowledgement (wrk read the 200) to receipt
    p99_ms: float
    max_ms: float
    early: float  # share of deliveries received before wrk read their acknowledgement
    sent_p50_ms: float  # from the PUT being sent to receipt
    sent_p99_ms: float
    missing: int  # acknowledged events some watcher did not get
    ended: dict[str, int]
    closed_without_end: int
    reader_cpu: float  # seconds, all readers


@dataclass
class FanoutResult:
    backend: str
    alone: list[Sample] = field(default_factory=list)
    watched: list[Sample] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return paired_ratio(self.watched, self.alone)


def measure_fanout(run: Run, daemon: Daemon, backend: str) -> FanoutResult:
    container = BACKENDS[backend][0]
    channel = fanout_channel(container)
    path = f"/v1/channels/{channel}/-/events?containers={container}"
    acks = run.workdir / f"acks-{container}.txt"
    script = fanout_script(run.workdir, container, acks)
    watch = run.cpu_watch(daemon, backend)
    found = FanoutResult(backend)
    seconds = run.settings.seconds

    # One stream opened and closed first, so that the history exists on both sides.
    with readers_attached(daemon.port, path, 1, 1, 60):
        pass
    sample = run_wrk(f"fan-out {backend} warm-up", script, daemon, run.settings.warm_up,
                     WRITER_THREADS, WRITER_CONNECTIONS, watch)  # fmt: skip
    progress(f"warm-up writes {backend}: {describe(sample)}")

    def alone(index: int) -> None:
        found.alone.append(run_wrk(f"writes {backend}", script, daemon, seconds,
                                   WRITER_THREADS, WRITER_CONNECTIONS, watch))  # fmt: skip
        progress(f"round {index + 1} writes {backend}, no watcher: {describe(found.alone[-1])}")

    def watched(index: int) -> None:
        timeout = seconds + DRAIN_TIMEOUT + 120
        with readers_attached(daemon.port, path, WATCHERS, WATCHER_PROCESSES,
                              timeout) as readers:  # fmt: skip
            tell(readers, "go")
            sample = run_wrk(f"writes {backend} with watchers", script, daemon, seconds,
                             WRITER_THREADS, WRITER_CONNECTIONS, watch)  # fmt: skip
            outs = [run.workdir / f"latencies-{i}.bin" for i in range(len(readers))]
            for reader, out in zip(readers, outs, strict=True):
                tell([reader], f"drain {acks} {out}")
            summaries = []
            for reader in readers:
                line = read_line(reader, DRAIN_TIMEOUT + 120, "draining")
                if not line.startswith("done "):
                    raise RuntimeError(f"a reader said {line!r}")
                summaries.append(json.loads(line[5:]))
        from_ack, from_send = array.array("d"), array.array("d")
        for out in outs:
            both = array.array("d")
            with out.open("rb") as source:
                both.frombytes(source.read())
            out.unlink()
            half = len(both) // 2
            from_ack.extend(both[:half])
            from_send.extend(both[half:])
        ordered = sorted(from_ack)
        sent = sorted(from_send)
        ended: Counter[str] = Counter()
        for summary in summaries:
            ended.update(summary["ended"])
        delivery = Delivery(
            deliveries=len(ordered),
            p50_ms=percentile(ordered, 0.50) / 1000,
            p99_ms=percentile(ordered, 0.99) / 1000,
            max_ms=(ordered[-1] / 1000) if ordered else float("nan"),
            early=sum(1 for v in ordered if v < 0) / max(1, len(ordered)),
            sent_p50_ms=percentile(sent, 0.50) / 1000,
            sent_p99_ms=percentile(sent, 0.99) / 1000,
            missing=sum(s["missing"] for s in summaries),
            ended=dict(ended),
            closed_without_end=sum(s["closed_without_end"] for s in summaries),
            reader_cpu=sum(s["cpu"] for s in summaries),
        )
        found.watched.append(sample)
        found.deliveries.append(delivery)
        progress(f"round {index + 1} writes {backend}, {WATCHERS} watchers: {describe(sample)}; "
                 f"delivery p50 {delivery.p50_ms:.2f} ms p99 {delivery.p99_ms:.2f} ms "
                 f"max {delivery.max_ms:.1f} ms (from the send: p50 {delivery.sent_p50_ms:.2f} "
                 f"ms p99 {delivery.sent_p99_ms:.2f} ms), {delivery.deliveries:,} deliveries, "
                 f"{delivery.missing:,} missing, ended {delivery.ended or 'none'}")  # fmt: skip

    alternate(run.settings.rounds, alone, watched)
    return found


# -- part 3: memory per stream -----------------------------------------------------------


def open_ready_streams(port: int, path: str, count: int, timeout: float) -> list[socket.socket]:
    """``count`` streams of ``path``, OPEN_BATCH at a time, each past its ``ready`` event."""
    opened: list[socket.socket] = []
    try:
        with selectors.DefaultSelector() as selector:
            deadline = time.monotonic() + timeout
            while len(opened) < count:
                batch = [
                    open_stream(port, path) for _ in range(min(OPEN_BATCH, count - len(opened)))
                ]
                opened.extend(batch)
                pending = {sock: b"" for sock in batch}
                for sock in batch:
                    selector.register(sock, selectors.EVENT_READ)
                while pending:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{len(pending)} streams not ready within {timeout} s")
                    for key, _ in selector.select(timeout=0.5):
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        data = pending[sock] + sock.recv(65536)
                        if b"event: ready" in data:
                            del pending[sock]
                            selector.unregister(sock)
                        elif not data or b" 503 " in data[:20]:
                            raise RuntimeError(f"a stream was refused: {data[:200]!r}")
                        else:
                            pending[sock] = data
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(socks: Sequence[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


def settled_rss(pid: int) -> int:
    """The median of a few VmRSS readings a third of a second apart (KiB)."""
    readings = []
    for _ in range(5):
        time.sleep(0.3)
        readings.append(rss_kib(pid))
    return int(statistics.median(readings))


def watchers_open(daemon: Daemon) -> float:
    text = http(daemon.port, "GET", "/metrics")
    found = re.search(r"^chanstore_watchers(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else float("nan")


@dataclass
class MemoryResult:
    backend: str
    before_kib: int
    after_kib: int
    streams: int
    watchers_metric: float

    @property
    def per_stream_kib(self) -> float:
        return (self.after_kib - self.before_kib) / self.streams


def measure_memory(run: Run, redis: Redis) -> list[MemoryResult]:
    """VmRSS of a fresh daemon with no stream, then with IDLE_STREAMS more streams of
    each backend's container in turn (the earlier ones stay open)."""
    found: list[MemoryResult] = []
    opened: list[socket.socket] = []
    with daemon_process(run.workdir, redis.port) as daemon:
        try:
            paths = {}
            for backend, (container, _label) in BACKENDS.items():
                channel = f"mem-{container}"
                paths[backend] = f"/v1/channels/{channel}/-/events?containers={container}"
                http(daemon.port, "PUT", f"/v1/channels/{channel}/{container}/k", {"v": 1})
                close_all(open_ready_streams(daemon.port, paths[backend], 1, 10))
            time.sleep(0.5)
            before = settled_rss(daemon.pid)
            for backend, path in paths.items():
                opened.extend(open_ready_streams(daemon.port, path, IDLE_STREAMS, 60))
                after = settled_rss(daemon.pid)
                result = MemoryResult(backend, before, after, IDLE_STREAMS,
                                      watchers_open(daemon))  # fmt: skip
                found.append(result)
                progress(f"memory {backend}: VmRSS {before / 1024:.1f} MiB before, "
                         f"{after / 1024:.1f} MiB with {IDLE_STREAMS:,} more streams "
                         f"({result.per_stream_kib:.1f} KiB each; chanstore_watchers "
                         f"{result.watchers_metric:g})")  # fmt: skip
                before = after
        finally:
            close_all(opened)
    return found


# -- the run -----------------------------------------------------------------------------


class Run:
    def __init__(self, settings: Settings, workdir: Path, only: Sequence[str]) -> None:
        self.settings = settings
        self.workdir = workdir
        self.only = only
        self.redis_pid = 0

    def cpu_watch(self, daemon: Daemon, backend: str) -> dict[str, int]:
        watch = {"daemon": daemon.pid}
        if backend == "redis":
            watch["redis"] = self.redis_pid
        return watch

    def execute(self) -> Results:
        results = Results()
        with redis_server(self.workdir) as redis:
            self.redis_pid = redis.pid
            if {"conditional", "fanout"} & set(self.only):
                with daemon_process(self.workdir, redis.port) as daemon:
                    progress(f"daemon pid {daemon.pid} on port {daemon.port}, "
                             f"redis-server on port {redis.port}")  # fmt: skip
                    for backend in BACKENDS:
                        if "conditional" in self.only:
                            results.conditional.append(measure_conditional(self, daemon, backend))
                        if "fanout" in self.only:
                            results.fanout.append(measure_fanout(self, daemon, backend))
            if "memory" in self.only:
                results.memory.extend(measure_memory(self, redis))
            results.env = environment()
        return results


@dataclass
class Results:
    conditional: list[CondResult] = field(default_factory=list)
    fanout: list[FanoutResult] = field(default_factory=list)
    memory: list[MemoryResult] = field(default_factory=list)
    env: str = ""


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


def verdict(value: float, goal: float, higher_is_better: bool = True) -> str:
    met = value >= goal if higher_is_better else value < goal
    return "met" if met else "MISSED"


def cpu_text(samples: Sequence[Sample], name: str) -> str:
    return f"{median([s.cpu_us(name) for s in samples]):,.0f}"


COND_HEADERS = ("backend", "unconditional PUT/s", "p50 ms", "p99 ms", "conditional PUT/s",
                "p50 ms", "p99 ms", "ratio", "daemon CPU us/PUT uncond/cond",
                "redis-server us/PUT uncond/cond", "goal", "verdict")  # fmt: skip
COND_RIGHT = {1, 2, 3, 4, 5, 6, 7, 8, 9}


def cond_rows(results: Sequence[CondResult]) -> list[list[str]]:
    body = []
    for r in results:
        plain, cond = r.plain, r.conditional
        redis_cpu = (f"{cpu_text(plain, 'redis')} / {cpu_text(cond, 'redis')}"
                     if r.backend == "redis" else "-")  # fmt: skip
        body.append([
            BACKENDS[r.backend][1],
            f"{median([s.rps for s in plain]):,.0f}", f"{median([s.p50_ms for s in plain]):.2f}",
            f"{median([s.p99_ms for s in plain]):.2f}",
            f"{median([s.rps for s in cond]):,.0f}", f"{median([s.p50_ms for s in cond]):.2f}",
            f"{median([s.p99_ms for s in cond]):.2f}", f"{r.ratio:.2f}x",
            f"{cpu_text(plain, 'daemon')} / {cpu_text(cond, 'daemon')}", redis_cpu,
            f">= {GOAL_CONDITIONAL:g}x", verdict(r.ratio, GOAL_CONDITIONAL),
        ])  # fmt: skip
    return body


FAN_HEADERS = ("backend", "writes/s alone", f"writes/s, {WATCHERS} watchers", "ratio",
               f"goal >= {GOAL_FANOUT:g}x", "deliveries/s", "ack->receipt p50 ms", "p99 ms",
               "max ms", f"goal p99 < {GOAL_P99_MS:g} ms", "send->receipt p50 ms", "p99 ms",
               "daemon CPU us/write alone/watched")  # fmt: skip
FAN_RIGHT = {1, 2, 3, 5, 6, 7, 8, 10, 11, 12}


def fan_rows(results: Sequence[FanoutResult]) -> list[list[str]]:
    body = []
    for r in results:
        p99 = median([d.p99_ms for d in r.deliveries])
        delivered = median([d.deliveries / s.seconds
                            for d, s in zip(r.deliveries, r.watched, strict=True)])  # fmt: skip
        body.append([
            BACKENDS[r.backend][1], f"{median([s.rps for s in r.alone]):,.0f}",
            f"{median([s.rps for s in r.watched]):,.0f}", f"{r.ratio:.2f}x",
            verdict(r.ratio, GOAL_FANOUT), f"{delivered:,.0f}",
            f"{median([d.p50_ms for d in r.deliveries]):.2f}", f"{p99:.2f}",
            f"{median([d.max_ms for d in r.deliveries]):.1f}",
            latency_verdict(p99, median([d.early for d in r.deliveries])),
            f"{median([d.sent_p50_ms for d in r.deliveries]):.2f}",
            f"{median([d.sent_p99_ms for d in r.deliveries]):.2f}",
            f"{cpu_text(r.alone, 'daemon')} / {cpu_text(r.watched, 'daemon')}",
        ])  # fmt: skip
    return body


def latency_verdict(p99_ms: float, early: float) -> str:
    """The p99 goal's verdict, saying so when most events came before their write's 200."""
    found = verdict(p99_ms, GOAL_P99_MS, higher_is_better=False)
    return f"{found} ({early:.0%} before the 200)" if early > 0.5 else found


def fan_notes(results: Sequence[FanoutResult]) -> list[str]:
    notes = []
    for r in results:
        label = BACKENDS[r.backend][1]
        spans = [s.seconds for s in r.watched]
        reader_share = median([d.reader_cpu / t for d, t in zip(r.deliveries, spans,
                                                                strict=True)])  # fmt: skip
        daemon_share = median([s.usage.cpu["daemon"] / s.seconds for s in r.watched
                               if s.usage])  # fmt: skip
        daemon_alone = median([s.usage.cpu["daemon"] / s.seconds for s in r.alone if s.usage])
        busy = median([s.usage.busy for s in r.watched if s.usage])
        busy_alone = median([s.usage.busy for s in r.alone if s.usage])
        ended: Counter[str] = Counter()
        for d in r.deliveries:
            ended.update(d.ended)
        dropped = ", ".join(f"{n} {reason}" for reason, n in ended.items()) or "none"
        missing = sum(d.missing for d in r.deliveries)
        closed = sum(d.closed_without_end for d in r.deliveries)
        early = median([d.early for d in r.deliveries])
        per_delivery = median([
            (w.cpu_us("daemon") - a.cpu_us("daemon")) * w.requests / max(1, d.deliveries)
            for a, w, d in zip(r.alone, r.watched, r.deliveries, strict=True)
        ])  # fmt: skip
        notes.append(
            f"{label}: the daemon used {daemon_alone:.0%} of a core alone and "
            f"{daemon_share:.0%} with the watchers, {per_delivery:.0f} us more CPU per "
            f"delivery (one event to one watcher); the readers {reader_share:.0%} of a core "
            f"in all; the machine's {os.cpu_count()} cores were {busy_alone:.0%} busy alone, "
            f"{busy:.0%} with the watchers. Watchers ended by the daemon: {dropped}; streams "
            f"closed without an end event: {closed}; acknowledged events a watcher never "
            f"got: {missing:,}; deliveries read before wrk read the write's own answer: "
            f"{early:.1%} (negative latencies, kept in the percentiles)"
        )
    return notes


MEM_HEADERS = ("streams added", "VmRSS before (MiB)", "VmRSS after (MiB)",
               "per stream (KiB)")  # fmt: skip
MEM_RIGHT = {1, 2, 3}


def mem_rows(results: Sequence[MemoryResult]) -> list[list[str]]:
    return [[f"{r.streams:,} of the {BACKENDS[r.backend][1]} container",
             f"{r.before_kib / 1024:.1f}", f"{r.after_kib / 1024:.1f}",
             f"{r.per_stream_kib:.1f}"] for r in results]  # fmt: skip


def cond_notes(results: Sequence[CondResult]) -> list[str]:
    notes = []
    for r in results:
        busy = median([s.usage.busy for s in r.plain + r.conditional if s.usage])
        daemon = median([s.usage.cpu["daemon"] / s.seconds for s in r.plain + r.conditional
                         if s.usage])  # fmt: skip
        refused = sum(s.refused for s in r.conditional)
        notes.append(f"{BACKENDS[r.backend][1]}: the daemon used {daemon:.0%} of a core, the "
                     f"machine's {os.cpu_count()} cores were {busy:.0%} busy (wrk's "
                     f"{CONNECTIONS} threads included); 412 answers in the conditional rounds: "
                     f"{refused}")  # fmt: skip
    return notes


Section = tuple[str, list[str], tuple[str, ...], list[list[str]], set[int]]


def sections(results: Results, settings: Settings) -> list[Section]:
    """(title, notes, headers, rows, right-aligned columns) of every part that ran."""
    found = []
    rounds = (f"medians of {settings.rounds} round{'s' if settings.rounds > 1 else ''} of "
              f"{settings.seconds} s per side, the sides alternating; ratio = the median of "
              f"the rounds' ratios")  # fmt: skip
    if results.conditional:
        found.append((
            "1. Conditional PUT (If-Match) against unconditional PUT",
            [f"wrk -t{CONNECTIONS} -c{CONNECTIONS} (one keep-alive connection per thread), "
             f"{KEYS_PER_CONNECTION} keys of its own per connection over {CHANNELS} channels; "
             "each conditional PUT sends If-Match with the ETag its connection's previous PUT "
             "of that key answered, every value differs; a 412 is counted below (past "
             f"{MAX_REFUSED:.1%} of the requests it fails the run); "
             f"{rounds}",
             *cond_notes(results.conditional)],
            COND_HEADERS, cond_rows(results.conditional), COND_RIGHT,
        ))  # fmt: skip
    if results.fanout:
        per = WATCHERS // WATCHER_PROCESSES
        found.append((
            f"2. Fan-out: {WATCHERS} watchers on the written channel, writes at full speed",
            [f"writer: wrk -t{WRITER_THREADS} -c{WRITER_CONNECTIONS}, PUTs to one channel "
             f"({WRITER_KEYS_PER_THREAD} keys per thread); watchers: {WATCHERS} SSE streams "
             f"(?containers=<the container>) read by {WATCHER_PROCESSES} processes of "
             f"{per} streams each (selectors/epoll); ack->receipt = receipt (recv returned) "
             "- acknowledgement (wrk read the 200), negative where a watcher read the event "
             "before wrk read the write's 200; send->receipt = receipt - the time wrk made "
             "the PUT (written inside the value); CLOCK_MONOTONIC everywhere, over every "
             "(event, watcher) pair; deliveries/s = such pairs per second of writing; "
             f"{rounds}",
             f"on this {os.cpu_count()}-core machine the readers, wrk, redis-server and the "
             "daemon compete for CPU: the readers' share and the daemon's are below",
             *fan_notes(results.fanout)],
            FAN_HEADERS, fan_rows(results.fanout), FAN_RIGHT,
        ))  # fmt: skip
    if results.memory:
        found.append((
            "3. Memory per open stream",
            ["a fresh daemon (--max-watchers "
             f"{MAX_WATCHERS}); its VmRSS (/proc/<pid>/status, median of 5 readings) with no "
             f"stream open, then after {IDLE_STREAMS:,} idle streams of one container's "
             "channel (each past its ready event), then after as many more of the other "
             "container's, the first ones still open; per stream = the growth / "
             f"{IDLE_STREAMS:,}; one stream of each was opened and closed before the first "
             "figure; the kernel's socket buffers are not in VmRSS",
             "chanstore_watchers read "
             + ", then ".join(f"{r.watchers_metric:g}" for r in results.memory)
             + " with the streams open"],
            MEM_HEADERS, mem_rows(results.memory), MEM_RIGHT,
        ))  # fmt: skip
    return found


def report(settings: Settings, results: Results, elapsed: float, source: str) -> None:
    command = shlex.join(["python3", *sys.argv])
    serve = shlex.join(["chanstore", *serve_command("PORT")])
    parts = sections(results, settings)
    print(f"command: {command}")
    print(f"chanstore feed benchmarks ({results.env})")
    now = source_state()
    if now != source:
        source = f"{source} at the start, {now.removeprefix('chanstore source: ')} at the end"
    print(f"{source}; daemon: {serve}, a json container (fsync on) and a redis "
          f"container; only same-run ratios mean anything on this shared machine")  # fmt: skip
    for title, notes, headers, body, right in parts:
        print(f"\n{title}\n")
        print(text_table(headers, body, right))
        for note in notes:
            print(f"  - {note}")
    print(f"\nwhole run: {elapsed:.0f} s")
    print("\n--- markdown for the README ---\n")
    print(f"Measured with `{command}` ({results.env}); the daemon ran as `{serve}`.")
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
    parser.add_argument("--reader", metavar="SPEC", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def raise_file_limit(wanted: int) -> None:
    """At least ``wanted`` open files for this process and the daemon (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.reader is not None:
        return reader_main(json.loads(args.reader))
    settings = QUICK if args.quick else FULL
    for tool in ("wrk", "redis-server"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install wrk redis-server)")
    raise_file_limit(IDLE_STREAMS * 2 + 1024)
    signal.signal(signal.SIGALRM, on_time_limit)
    signal.alarm(int(settings.time_limit))
    started = time.perf_counter()
    source = source_state()
    workdir = Path(tempfile.mkdtemp(prefix="chanstore-bench-feed-", dir=args.dir))
    try:
        results = Run(settings, workdir, args.only).execute()
    finally:
        signal.alarm(0)
        shutil.rmtree(workdir, ignore_errors=True)
    report(settings, results, time.perf_counter() - started, source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
