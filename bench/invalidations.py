"""What hearing its own writes costs a daemon's event loop: the invalidation link's reads.

Every write chanstore makes to Redis publishes one invalidation
(``chanstore.backends.redis_invalidations``), and every daemon's link hears
all of them, its own included, which it skips. On a busy daemon most of what
its link reads is its own writes, on the thread that also serves HTTP. This
publishes a burst of own-origin invalidations (from another thread, pipelined)
and takes the event loop thread's CPU time until the link has read them all
(a last message, from another origin, is the first it passes on), against the
least redis-py can cost: a loop of ``read_response(timeout=math.inf)`` on a
subscribed connection of its own, reading a burst of the same messages, in
alternating rounds (each reader is subscribed during its own rounds only). A
ratio near 1 is the link costing little more than the reads themselves.

Starts a redis-server of its own on a free port. Run: ``python3
bench/invalidations.py`` (about 20 seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
import redis.asyncio.connection
import uvloop

from chanstore.backends.redis_invalidations import (
    RedisInvalidations,
    channel_of,
    link_connection,
    payload,
)
from harness import redis_server

#: Own-origin messages per round, and what they invalidate.
MESSAGES = 20_000
PREFIX = "chanstore:"
OWN = payload("mine", f"{PREFIX}bench-0".encode(), ["hp"])
LAST = payload("another", f"{PREFIX}bench-0".encode(), ["last"])
#: The most one round may take.
ROUND_LIMIT = 60.0


class Listener:
    """Hears the link's state and the one message it passes on (the last of a round)."""

    def __init__(self) -> None:
        self.up = asyncio.Event()
        self.heard = asyncio.Event()

    def invalidated(self, domain: str, keys: list[str]) -> None:
        self.heard.set()

    def link_changed(self, up: bool) -> None:
        if up:
            self.up.set()


def publish_burst(port: int, channel: bytes) -> None:
    client = redis.Redis(port=port)
    try:
        pipe = client.pipeline(transaction=False)
        for _ in range(MESSAGES):
            pipe.publish(channel, OWN)
        pipe.publish(channel, LAST)
        pipe.execute()
    finally:
        client.close()


async def loop_us_per_message(port: int, channel: bytes,
                              heard_all: Callable[[], Awaitable[None]]) -> float:  # fmt: skip
    """The event loop thread's CPU µs per message while a burst is published and read."""
    started = time.thread_time()
    publisher = threading.Thread(target=publish_burst, args=(port, channel))
    publisher.start()
    try:
        await asyncio.wait_for(heard_all(), ROUND_LIMIT)
    finally:
        await asyncio.to_thread(publisher.join, ROUND_LIMIT)
    return (time.thread_time() - started) / (MESSAGES + 1) * 1e6


async def bare_round(port: int, channel: bytes) -> float:
    """Loop µs per message of a connection of its own, subscribed for this round only."""
    connection = redis.asyncio.connection.Connection(port=port, protocol=2)
    await connection.connect()
    try:
        await connection.send_command("SUBSCRIBE", channel)
        await connection.read_response(timeout=5)

        async def heard_all() -> None:
            while (await connection.read_response(timeout=math.inf))[2] != LAST:
                pass

        return await loop_us_per_message(port, channel, heard_all)
    finally:
        await connection.disconnect()


async def link_round(port: int) -> float:
    """Loop µs per message of a link, listened to (so running) for this round only."""
    link = RedisInvalidations(lambda: link_connection({"host": "127.0.0.1", "port": port}),
                              key_prefix=PREFIX, name="bench", origin="mine")  # fmt: skip
    listener = Listener()
    link.subscribe(listener)
    try:
        await asyncio.wait_for(listener.up.wait(), 10)
        return await loop_us_per_message(port, link.channel, listener.heard.wait)
    finally:
        await link.close()


async def measure(port: int, rounds: int) -> tuple[list[float], list[float]]:
    channel = channel_of(PREFIX)
    bare_us, link_us = [], []
    for _ in range(rounds):
        bare_us.append(await bare_round(port, channel))
        link_us.append(await link_round(port))
    return bare_us, link_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, redis_server(Path(workdir)) as port:
        bare_us, link_us = uvloop.run(measure(port, args.rounds))
    ratios = [link / bare for bare, link in zip(bare_us, link_us, strict=True)]
    print(f"{MESSAGES:,} own invalidations a round, {args.rounds} rounds; event loop CPU µs "
          f"per message (medians)")  # fmt: skip
    print("| bare reads | the link | ratio (rounds) |")
    print("| ---: | ---: | --- |")
    print(
        f"| {statistics.median(bare_us):.2f} | {statistics.median(link_us):.2f} | "
        f"**{statistics.median(ratios):.2f}x** ({' '.join(f'{r:.2f}' for r in ratios)}) |"
    )


if __name__ == "__main__":
    main()
