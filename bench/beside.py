"""What a large body costs the event loop: made ready on it, or beside it.

Before a value is stored, its body is proven its stored form and hashed for
its ETag. ``parse_value`` plus the hash does both on the event loop;
``chanstore.http.beside.parse_value_beside`` hands them to the extension's
threads. This measures, for bodies of chat messages of each size, the CPU
time the event loop gives each body (the other work it could not do
meanwhile: the loop is kept busy, as under load), 8 bodies in flight as 8
connections would have them, the two ways in alternating rounds. A ratio
over 1 is the loop spending less with the body made ready beside it; where
it crosses 1 is where ``BESIDE_LOOP_BYTES`` belongs.

Run: ``python3 bench/beside.py`` (about a minute; ``--rounds 5``, about two).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from chanstore import stored_form
from chanstore.http.beside import BESIDE_LOOP_BYTES, parse_value_beside
from chanstore.http.bodies import parse_value
from chanstore.versions import stored_with_etag

sys.path.insert(0, str(Path(__file__).parent))
from json_libraries import shapes

SIZES = [4_000, 8_000, 16_000, 32_000, 100_000, 900_000]
IN_FLIGHT = 8

#: A way to make a body ready: on the loop, or beside it.
MakeReady = Callable[[bytes], Awaitable[None]]


def body_of(size: int) -> bytes:
    value = json.loads(shapes(size)["text"])  # chat messages: text, ids, times
    return json.dumps(value, separators=(",", ":")).encode("ascii")


async def on_the_loop(body: bytes) -> None:
    stored_with_etag(parse_value(body))


async def beside_the_loop(body: bytes) -> None:
    stored_with_etag(await parse_value_beside(body))


def chunk_of_work() -> int:
    """About 20 µs of Python: what other connections would have the loop do."""
    return sum(range(600))


async def other_work(stop: asyncio.Event) -> int:
    """Chunks of other work done until ``stop``, yielding to the loop after each."""
    done = 0
    while not stop.is_set():
        chunk_of_work()
        done += 1
        await asyncio.sleep(0)
    return done


async def bodies(make: MakeReady, body: bytes, stop: asyncio.Event) -> int:
    """Bodies made ready until ``stop``, ``IN_FLIGHT`` at a time."""
    done = 0
    while not stop.is_set():
        await asyncio.gather(*(make(body) for _ in range(IN_FLIGHT)))
        done += IN_FLIGHT
    return done


def stop_after(seconds: float) -> asyncio.Event:
    """An event set ``seconds`` from now."""
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return stop


async def loop_time(make: MakeReady, body: bytes, seconds: float) -> float:
    """Microseconds of the loop per body: the other work it could not do meanwhile.

    The loop is kept busy, as a daemon's is under load, so that waking it from idle (tens
    of microseconds on a virtual machine) is not counted against the way that waits."""
    alone = await other_work(stop_after(seconds))
    stop = stop_after(seconds)
    beside_bodies, made = await asyncio.gather(other_work(stop), bodies(make, body, stop))
    chunk = seconds / alone
    return max(0.0, seconds - beside_bodies * chunk) / made * 1e6


async def measure(rounds: int, seconds: float) -> list[tuple[int, float, float]]:
    found = []
    for size in SIZES:
        body = body_of(size)
        await loop_time(beside_the_loop, body, 0.2)  # the loop's provers made, caches warm
        ons, besides = [], []
        for _ in range(rounds):
            ons.append(await loop_time(on_the_loop, body, seconds))
            besides.append(await loop_time(beside_the_loop, body, seconds))
        found.append((len(body), statistics.median(ons), statistics.median(besides)))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per size")
    parser.add_argument("--seconds", type=float, default=0.8, help="length of each round")
    args = parser.parse_args()
    if stored_form.Beside is None:
        raise SystemExit("the extension's Beside is not in use: nothing to compare")
    found = asyncio.run(measure(args.rounds, args.seconds))
    print(f"BESIDE_LOOP_BYTES = {BESIDE_LOOP_BYTES:,}; the loop's time per body, "
          f"{IN_FLIGHT} in flight")  # fmt: skip
    print("| body | on the loop (µs) | beside it (µs) | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for size, on, beside in found:
        ratio = f"{on / beside:.2f}x" if beside > 0 else "(beside: within the noise of 0)"
        print(f"| {size:,} | {on:.1f} | {beside:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
