"""Writes of Python values, their JSON shape proven in C against the shape copied, in one process.

Before a value is encoded, ``codec.to_json_shape`` copies it with every part
JSON cannot hold replaced by its type mark. A value of JSON types only is its
own shape; ``chanstore.json_shape.plain`` proves that in C, and the value is
encoded as it is. The baseline, measured in the same rounds, is the same call
with the proof switched off, so that every value is walked and copied in
Python, as before.

Measured: ``codec.encode_bytes`` compact (what is stored in Redis and hashed
for the ETag) and indented (the json backend's file form), and what a library
user sees: ``d[key] = value`` of a ``CachedDict`` on a json container with
fsync off (a temporary folder), the same key written over and over (from 100
KB: below that, the file write's noise hides the encode). Values are
chat messages (text) and game state (numbers) from
``bench/json_libraries.py``, parsed into Python values. Figures are medians of
5 rounds; each round times many calls of each form in turn, the switch held
for the whole of the walked form's calls.

    python3 bench/json_shape.py
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator

from chanstore import MoobiusStorage, codec, json_shape
from harness import markdown_table
from json_libraries import shapes
from stored_form import ROUNDS, per_call

SIZES = (("100 B", 100), ("100 KB", 100_000), ("900 KB", 900_000))
#: The CachedDict's set is measured from this size: at 100 B the encode is 1 µs of a file
#: write of about 200 µs, whose noise on a shared disk is larger than that.
LIBRARY_SIZE = 100_000


@contextlib.contextmanager
def walked() -> Iterator[None]:
    """Every value walked and copied into its shape in Python, as before the proof."""
    plain = json_shape.plain
    json_shape.plain = lambda *_args: False
    try:
        yield
    finally:
        json_shape.plain = plain


def paired(call: Callable[[], object], size: int) -> tuple[float, float]:
    """µs per call with the proof and with every value walked: the medians of ROUNDS
    rounds, each timing both in turn (the proof first in even rounds, last in odd ones)."""
    proven: list[float] = []
    walking: list[float] = []
    for index in range(ROUNDS):
        for form in ("proven", "walked") if index % 2 == 0 else ("walked", "proven"):
            if form == "proven":
                proven.append(per_call(call, size))
            else:
                with walked():
                    walking.append(per_call(call, size))
    return statistics.median(proven), statistics.median(walking)


def row(what: str, label: str, shape: str, times: tuple[float, float]) -> list[str]:
    proven, walked_ = times
    return [what, label, shape, f"{proven:,.1f} µs", f"{walked_:,.1f} µs",
            f"**{proven / walked_:.2f}x**"]  # fmt: skip


def main() -> int:
    if not json_shape.COMPILED:
        print("the extension chanstore._json_shape is not in use: nothing to compare")
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as root:
        config = [{"implementation": "json", "name": "state", "load": True, "clear": False,
                   "settings": {"root_dir": root, "fsync": False}}]  # fmt: skip
        storage = MoobiusStorage("bench", "shape", config)
        for label, size in SIZES:
            for shape, text in shapes(size).items():
                value = json.loads(text)

                def stored(value: object = value) -> None:
                    storage.state["key"] = value

                def compact(value: object = value) -> bytes:
                    return codec.encode_bytes(value)

                def indented(value: object = value) -> bytes:
                    return codec.encode_bytes(value, indent=2)

                rows.append(row("encode_bytes, compact", label, shape, paired(compact, size)))
                rows.append(row("encode_bytes, indented", label, shape, paired(indented, size)))
                if size >= LIBRARY_SIZE:
                    rows.append(row("CachedDict set, json", label, shape, paired(stored, size)))
    headers = ["call", "size", "shape", "proven plain", "walked, as before", "ratio"]
    print(markdown_table(headers, rows, {3, 4, 5}))
    print(f"\n{sys.version.split()[0]}; medians of {ROUNDS} rounds, each timing both forms in turn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
