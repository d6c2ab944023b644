"""How fast a Python server can take large PUTs to Redis at all: a ceiling for put-large.

Issue 14 asks that 100 KB PUTs to a redis container reach 0.15x of
redis-benchmark's ``SET`` of the same size. This measures how much of that a
server written in Python can reach on this machine, whatever its design: a
bare server (:class:`BarePut`, run as a process of its own) that does only
what every such PUT must, with the same parts the daemon uses for it:

* read the request with uvloop and httptools;
* prove the body its stored form and take the SHA-1 of its ETag, on the C
  extension's threads (``chanstore.http.beside.parse_value_beside``);
* send the value's two copies, to the domain's hash and to its change
  history's stream, in one ``MULTI``/``HSET``/``XADD``/``PUBLISH``/``EXEC``
  on one connection: the daemon's own commands for such a write
  (``chanstore.backends.redis_writes.Write``), packed as the daemon packs
  them (``chanstore.backends.redis_rounds.packed``: the value is written
  uncopied), their replies read with hiredis and taken by the same ``Write``;
* answer ``200`` with the ETag, as the daemon does.

Nothing else: no routing, no checks of names or limits, no write lanes, no
cache, no coherence, no metrics or logs. Each of those is the daemon's and
none is free, so the bare server's rate bounds the daemon's from above. wrk
PUTs to it and to ``chanstore serve`` (a redis container on the same Redis)
with put-large's load (8 connections, 4 keys in 4 channels, the same body),
and redis-benchmark SETs the same size, in alternating rounds; each side's
ratio to SET, and its server's CPU per PUT (``/proc``).

Starts a redis-server of its own on a free port. Run: ``python3
bench/put_floor.py`` (about 90 seconds; ``--rounds``, ``--seconds``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import hiredis
import httptools
import uvloop

from chanstore.backends.base import DatabaseInterface
from chanstore.backends.redis_rounds import packed
from chanstore.backends.redis_writes import Write
from chanstore.http.beside import parse_value_beside
from chanstore.versions import Change
from daemon import (
    LARGE_CONNECTIONS,
    LARGE_KEYS,
    REDIS_CONTAINER,
    Daemon,
    Load,
    daemon_process,
    run_redis_benchmark,
    run_wrk,
)
from harness import (
    Domain,
    cpu_seconds,
    free_port,
    progress,
    redis_server,
    stop,
    text_table,
    wait_until,
)
from json_libraries import shapes

#: The value's size: put-large's smaller one, the size of the goal still unmet.
VALUE_BYTES = 100_000
#: The entries each history stream keeps, as the daemon's ``--event-history`` default.
HISTORY = DatabaseInterface.history_length
#: The bare server's key prefix: its hashes, streams and invalidation channel.
PREFIX = "floor:"
#: Seconds the bare server may take to start answering.
START_LIMIT = 20.0


# -- the bare server -----------------------------------------------------------------


class BareRedis(asyncio.Protocol):
    """One connection to Redis: commands written as they come, replies handed back in order."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        #: Each round waiting for its replies: its future, how many, those read so far.
        self.waiting: collections.deque[tuple[asyncio.Future[list[object]], int, list[object]]] = (
            collections.deque()
        )
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's, not asyncio's class

    def send(self, commands: list[tuple[object, ...]]) -> asyncio.Future[list[object]]:
        """Write ``commands`` in one packet; the future gets their replies."""
        assert self.transport is not None
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((future, len(commands), []))
        self.transport.writelines(packed(commands))
        return future

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future, count, replies = self.waiting[0]
            replies.append(reply)
            if len(replies) == count:
                self.waiting.popleft()
                future.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        for future, _count, _replies in self.waiting:
            future.set_exception(ConnectionError("Redis closed the connection"))


class BarePut(asyncio.Protocol):
    """One HTTP connection: each request's body is stored as the last path segment's value
    (a large value: smaller ones go by the daemon's script, which this does not load)."""

    def __init__(self, redis: BareRedis) -> None:
        self.redis = redis
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.putting: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's, not asyncio's class

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        # wrk sends one request at a time on a connection: answers stay in order.
        self.putting = asyncio.ensure_future(self.put(self.url, body))

    async def put(self, url: bytes, body: bytes) -> None:
        assert self.transport is not None
        _, channel, _, key = url.rsplit(b"/", 3)
        document = await parse_value_beside(body)
        hash_name = PREFIX.encode() + channel
        write = Write(Domain(hash_name, hash_name + b":history", HISTORY, PREFIX),
                      Change(sets={key.decode(): document}))  # fmt: skip
        # One round: a write whose HSET failed would need a second, to take back its history.
        taken = write.answer is None and write.take(await self.redis.send(write.commands(False)))
        if taken and not isinstance(write.answer, BaseException):
            status, answer = b"200 OK", b'{"ok":true,"etag":"%s"}' % document.etag.encode()
        else:
            status, answer = b"500 Internal Server Error", b'{"code":"redis"}'
        self.transport.write(
            b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b'etag: "%s"\r\n\r\n%s' % (status, len(answer), document.etag.encode(), answer)
        )


async def serve_bare(port: int, redis_port: int) -> None:
    """The bare server on ``port`` until it is stopped."""
    loop = asyncio.get_running_loop()
    _, redis = await loop.create_connection(BareRedis, "127.0.0.1", redis_port)
    server = await loop.create_server(lambda: BarePut(redis), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


@contextlib.contextmanager
def bare_process(workdir: Path, redis_port: int, body: str) -> Iterator[Daemon]:
    """The bare server as a process of its own, once it stored ``body``; stopped (SIGTERM)
    at the end."""
    port = free_port()
    command = [sys.executable, __file__, "--serve-bare", str(port), str(redis_port)]
    log = workdir / "bare.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: answers_put(port, body), process, "the bare server", log,
                       START_LIMIT)  # fmt: skip
            yield Daemon(port, process, command)
        finally:
            stop(process)


def answers_put(port: int, body: str) -> bool:
    """Whether the bare server on ``port`` stores ``body``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("PUT", "/v1/channels/c/x/k", body=body.encode())
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


# -- the rounds ----------------------------------------------------------------------


@dataclass
class Side:
    """One server's rounds: its rates, and its CPU seconds over the PUTs of those rounds."""

    name: str
    rates: list[float] = field(default_factory=list)
    cpu: float = 0.0
    puts: float = 0.0

    def cpu_per_put_us(self) -> float:
        return self.cpu / self.puts * 1e6


def measure(rounds: int, seconds: int) -> tuple[list[Side], list[float], int]:
    body = json.dumps(json.loads(shapes(VALUE_BYTES)["text"]), separators=(",", ":"))
    load = Load(f"put-redis-{VALUE_BYTES}", "PUT", REDIS_CONTAINER, f"large-{VALUE_BYTES}",
                LARGE_KEYS, body)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="chanstore-floor-") as folder:
        workdir = Path(folder)
        with (
            redis_server(workdir) as redis_port,
            bare_process(workdir, redis_port, body) as bare,
            daemon_process(workdir, redis_port, ()) as daemon,
        ):
            servers = {"bare server": bare, "chanstore serve": daemon}
            sides = [Side(name) for name in servers]
            for server in servers.values():  # warm up, and fill the history streams
                run_wrk(load, server, workdir, seconds, LARGE_CONNECTIONS)
            sets: list[float] = []
            requests = 20_000
            for index in range(rounds):
                for side, server in zip(sides, servers.values(), strict=True):
                    before = cpu_seconds(server.process.pid)
                    sample = run_wrk(load, server, workdir, seconds, LARGE_CONNECTIONS)
                    side.cpu += cpu_seconds(server.process.pid) - before
                    side.puts += sample.rps * seconds
                    side.rates.append(sample.rps)
                found = run_redis_benchmark(redis_port, requests, LARGE_CONNECTIONS,
                                            ("set",), len(body))["SET"]  # fmt: skip
                requests = max(2000, int(found.rps * seconds))
                sets.append(found.rps)
                progress(f"round {index + 1}: " + ", ".join(
                    f"{side.name} {side.rates[-1]:,.0f}/s" for side in sides
                ) + f", SET {found.rps:,.0f}/s")  # fmt: skip
    return sides, sets, len(body)


def report(sides: list[Side], sets: list[float], size: int) -> str:
    set_rate = statistics.median(sets)
    rows = [[side.name, f"{statistics.median(side.rates):,.0f}/s",
             f"{statistics.median(r / s for r, s in zip(side.rates, sets, strict=True)):.3f}x",
             f"{side.cpu_per_put_us():,.0f} µs"] for side in sides]  # fmt: skip
    rows.append([f"redis-benchmark SET -d {size}", f"{set_rate:,.0f}/s", "1.000x", ""])
    table = text_table(["PUT of 100 KB to Redis", "rate", "of SET", "server CPU per PUT"],
                       rows, {1, 2, 3})  # fmt: skip
    bare, daemon = (statistics.median(side.rates) for side in sides)
    return f"{table}\nchanstore serve / bare server: {daemon / bare:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each side (default 4)")
    parser.add_argument("--seconds", type=int, default=5, help="seconds of each wrk run")
    parser.add_argument("--serve-bare", nargs=2, type=int, metavar=("PORT", "REDIS_PORT"),
                        help=argparse.SUPPRESS)  # the bare server's own process  # fmt: skip
    arguments = parser.parse_args()
    if arguments.serve_bare:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_bare(*arguments.serve_bare))
        return
    print(report(*measure(arguments.rounds, arguments.seconds)))


if __name__ == "__main__":
    main()
