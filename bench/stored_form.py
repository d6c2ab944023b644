"""The stored form proven in C against parsing it, per call, in one process.

A PUT body that is already its stored form (compact, as chanstore's clients
send it) is proven so by ``chanstore.stored_form.proves`` and kept as it came.
The baseline, measured in the same rounds, is what such a body cost before:
``parse_value`` (what a PUT calls) with the proof switched off, so that the
body is parsed by orjson, encoded again to show it is the stored form, checked
for depth, and the parsed document freed. Beside them: the json backend's
file form, ``indented`` in C against orjson's indent of the parsed document
(``codec.encode_bytes`` of a parsed Document).

Bodies are chat messages (text, with one 17-digit timestamp float each) and
game state (numbers) from ``bench/json_libraries.py``, made compact. Figures
are medians of 5 rounds; each round times many calls of each function in turn.

    python3 bench/stored_form.py
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator

from chanstore import codec, stored_form
from chanstore.http.bodies import MAX_JSON_DEPTH, parse_value
from json_libraries import shapes

ROUNDS = 5


def per_call(fn: Callable[[], object], size: int) -> float:
    runs = max(5, 3_000_000 // max(size, 100))
    started = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - started) / runs * 1e6


@contextlib.contextmanager
def proof_off() -> Iterator[None]:
    """parse_value as it was before the proof: every body parsed and checked for depth."""
    proves = stored_form.proves
    stored_form.proves = lambda data, max_depth: False
    try:
        yield
    finally:
        stored_form.proves = proves


def parse_as_before(body: bytes) -> codec.Document:
    with proof_off():
        return parse_value(body)


def measure(body: bytes) -> dict[str, float]:
    document = codec.Document(json.loads(body), parsed=True)
    fns: dict[str, Callable[[], object]] = {
        "proven": lambda: parse_value(body),
        "parsed": lambda: parse_as_before(body),
        "indented": lambda: stored_form.indented(body),
        "orjson_indent": lambda: codec.encode_bytes(document, indent=2),
    }
    assert parse_value(body).stored is body and parse_as_before(body).stored is body
    assert stored_form.indented(body) == json.dumps(json.loads(body), indent=2).encode()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            times[name].append(per_call(fn, len(body)))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    if not stored_form.COMPILED:
        sys.exit("chanstore._stored_form is not built: `pip install -e .` builds it")
    print(
        "| size | shape | bytes | parse_value, proven µs | parsed as before µs | ratio "
        "| indented µs | orjson indent µs | ratio |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size, label in ((100, "100 B"), (100_000, "100 KB"), (900_000, "900 KB")):
        for shape, loose in shapes(size).items():
            body = json.dumps(json.loads(loose), separators=(",", ":")).encode()
            assert stored_form.proves(body, MAX_JSON_DEPTH), (label, shape)
            med = measure(body)
            print(f"| {label} | {shape} | {len(body):,} | {med['proven']:.1f} | "
                  f"{med['parsed']:.1f} | {med['proven'] / med['parsed']:.2f}x | "
                  f"{med['indented']:.1f} | {med['orjson_indent']:.1f} | "
                  f"{med['indented'] / med['orjson_indent']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
