"""What encoding a round of writes for Redis costs: chanstore's packer against redis-py's.

A write lane's batch reaches Redis as one round (``redis_rounds.round_trip_async``)
whose commands are encoded into RESP first. This times that encoding for the
rounds the daemon sends most: a batch of small values (one script call per
domain) and a batch of large ones (a ``MULTI``/``HSET``/``XADD``/``PUBLISH``/
``EXEC`` transaction each), built by the real :class:`Write`, encoded by
``chanstore.backends.redis_rounds.packed`` and by redis-py's asyncio
``Connection.pack_commands`` in alternating rounds (CPU time of this process,
no server needed). A ratio over 1 is chanstore's packer being faster.

Run: ``python3 bench/redis_rounds.py`` (about 20 seconds).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio.connection

from chanstore.backends.base import DatabaseInterface
from chanstore.backends.redis_rounds import packed
from chanstore.backends.redis_writes import Write
from chanstore.codec import Document
from chanstore.versions import Change
from harness import Domain

#: The Redis backend's default key prefix, which the benchmark's names begin with.
PREFIX = "chanstore:"
#: The entries each history stream keeps, as the daemon's ``--event-history`` default.
HISTORY = DatabaseInterface.history_length
#: (label, writes in the batch, value bytes): the small batch is what 32 clients
#: writing health bars make; the large one what 8 writing 100 KB values make.
ROUNDS = [("16 small values, a script call each", 16, 60),
          ("7 values of 100 KB, a transaction each", 7, 100_000)]  # fmt: skip


def batch_commands(writes: int, size: int) -> list[tuple[Any, ...]]:
    commands: list[tuple[Any, ...]] = []
    for number in range(writes):
        value = Document({"text": "x" * max(0, size - 12)}, parsed=True)
        hash_name = f"{PREFIX}kv:bench-{number % 8}".encode()
        domain = Domain(hash_name, hash_name + b":history", HISTORY, PREFIX)
        write = Write(domain, Change(sets={f"key-{number}": value}))
        commands.extend(write.commands(by_text=False))
    return commands


def per_round(pack: Callable[[Any], Any], commands: list[tuple[Any, ...]], seconds: float) -> float:
    """Microseconds of CPU per encoding of ``commands``, over about ``seconds``."""
    count, started = 0, time.process_time()
    while (elapsed := time.process_time() - started) < seconds:
        for _ in range(50):
            pack(commands)
        count += 50
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per measure and round")
    args = parser.parse_args()
    theirs = redis.asyncio.connection.Connection().pack_commands
    print("| round | redis-py µs | chanstore µs | ratio (rounds) |")
    print("| --- | ---: | ---: | --- |")
    for label, writes, size in ROUNDS:
        commands = batch_commands(writes, size)
        assert b"".join(packed(commands)) == b"".join(theirs(commands))
        ratios, ours_us, theirs_us = [], [], []
        for _ in range(args.rounds):
            theirs_us.append(per_round(theirs, commands, args.seconds))
            ours_us.append(per_round(packed, commands, args.seconds))
            ratios.append(theirs_us[-1] / ours_us[-1])
        spread = " ".join(f"{ratio:.2f}" for ratio in ratios)
        print(f"| {label} | {statistics.median(theirs_us):.1f} | "
              f"{statistics.median(ours_us):.1f} | **{statistics.median(ratios):.2f}x** "
              f"({spread}) |")  # fmt: skip


if __name__ == "__main__":
    main()
