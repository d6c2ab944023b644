"""Which C JSON library the codec uses: orjson or msgspec, measured on what a PUT does.

A PUT body is parsed and validated, then encoded once in the compact stored
form, which must stay byte for byte what the stdlib wrote (ETags are the SHA-1
of it: see chanstore.versions). Each library is timed with the guards it needs
for that: orjson parses integers beyond 64 bits as floats (so the body is
checked for 19-digit runs first) and writes floats in [1e-9, 1e-4) unlike
``repr``; msgspec keeps big integers but writes every exponent float unlike
``repr`` (``1e16`` for ``1e+16``). Both write non-ASCII as UTF-8 where the
stdlib escapes it, which is mended, not refused. Medians of interleaved rounds.

Run: ``python bench/json_libraries.py`` (about 30 s).
"""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from collections.abc import Callable

import orjson

try:
    import msgspec  # not a dependency: pip install msgspec to compare
except ImportError:
    msgspec = None

_DECODER = json.JSONDecoder()
_DIGITS = bytearray(b" " * 256)
for _c in b"0123456789":
    _DIGITS[_c] = ord("0")
for _c in b".eE":
    _DIGITS[_c] = ord(".")
_DIGITS_TABLE = bytes(_DIGITS)
_LONG_INT = b" " + b"0" * 19
_SMALL_EXP = re.compile(rb"e-[1-9](?![0-9])").search
_EXP_AFTER_DIGIT = re.compile(rb"[0-9]e").search


def shapes(size: int) -> dict[str, bytes]:
    """Two documents of about ``size`` bytes: chat messages (text) and game state (numbers)."""
    rnd = random.Random(size)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "players",
        "trade",
        "gold",
    ]
    messages: list[dict] = []
    state: list[dict] = []
    while len(json.dumps(messages)) < size:
        text = " ".join(rnd.choice(words) for _ in range(30))
        messages.append({"id": rnd.randrange(10**12), "user": f"user_{rnd.randrange(10**4)}",
                         "text": text, "ts": 1.7e9 + rnd.random() * 1e6, "reactions": [
                             rnd.choice(words) for _ in range(rnd.randrange(3))]})  # fmt: skip
    while len(json.dumps(state)) < size:
        state.append({"id": rnd.randrange(10**9), "hp": rnd.randrange(100),
                      "x": round(rnd.random() * 100, 3), "y": round(rnd.random() * 100, 3),
                      "alive": rnd.random() < 0.5,
                      "items": [rnd.randrange(50) for _ in range(3)]})  # fmt: skip
    if size < 1000:
        return {
            "text": json.dumps({"user": "alice", "text": "the quick brown fox jumps"}).encode(),
            "numbers": json.dumps({"hp": 100, "max": 100, "x": 1.5, "name": "alice"}).encode(),
        }
    return {"text": json.dumps(messages).encode(), "numbers": json.dumps(state).encode()}


def stdlib(body: bytes) -> bytes:
    value = _DECODER.decode(body.decode("utf-8"))
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def with_orjson(body: bytes) -> bytes:
    if _LONG_INT in body.translate(_DIGITS_TABLE):
        return stdlib(body)
    out = orjson.dumps(orjson.loads(body))
    if b"0.0000" in out or (b"e-" in out and _SMALL_EXP(out)):
        return stdlib(body)
    return out if out.isascii() else stdlib(body)  # mended in the codec, not timed here


def with_msgspec(body: bytes) -> bytes:
    out = msgspec.json.encode(msgspec.json.decode(body))
    if _EXP_AFTER_DIGIT(out):
        return stdlib(body)
    return out if out.isascii() else stdlib(body)


def per_call(fn: Callable[[bytes], bytes], body: bytes) -> float:
    runs = max(5, 2_000_000 // max(len(body), 100))
    started = time.perf_counter()
    for _ in range(runs):
        fn(body)
    return (time.perf_counter() - started) / runs * 1e6


def main() -> None:
    rows = []
    for size, label in ((100, "100 B"), (100_000, "100 KB"), (900_000, "900 KB")):
        for shape, body in shapes(size).items():
            fns = {"stdlib": stdlib, "orjson": with_orjson, "msgspec": with_msgspec}
            if msgspec is None:
                fns["msgspec"] = stdlib  # shown as the stdlib's figure
            for fn in fns.values():
                assert fn(body) == stdlib(body), (fn.__name__, shape)
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(5):
                for name, fn in fns.items():
                    times[name].append(per_call(fn, body))
            med = {name: statistics.median(t) for name, t in times.items()}
            rows.append((label, shape, len(body), med))
    print(
        "| size | shape | bytes | stdlib µs | orjson µs | msgspec µs | orjson/stdlib "
        "| msgspec/stdlib |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, shape, length, med in rows:
        print(f"| {label} | {shape} | {length:,} | {med['stdlib']:.1f} | {med['orjson']:.1f} | "
              f"{med['msgspec']:.1f} | {med['orjson'] / med['stdlib']:.2f}x | "
              f"{med['msgspec'] / med['stdlib']:.2f}x |")  # fmt: skip
    other = f"msgspec {msgspec.__version__}" if msgspec else "msgspec not installed"
    print(
        f"orjson {orjson.__version__}, {other}; parse + guards + compact "
        "encode, byte-identical to the stdlib's compact form"
    )


if __name__ == "__main__":
    main()
