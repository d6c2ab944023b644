"""Writes and reads of Python values, with what the codec asks found in C, in one process.

**Writes.** Before a value is encoded, ``codec.to_json_shape`` copies it with
every part JSON cannot hold replaced by its type mark. A value of JSON types
only is its own shape; ``chanstore.json_shape.plain`` proves that in C, and
the value is encoded as it is. The baseline, measured in the same rounds, is
the same call with the proof switched off, so that every value is walked and
copied in Python, as before. Measured: ``codec.encode_bytes`` compact (what
is stored in Redis and hashed for the ETag) and indented (the json backend's
file form), and what a library user sees: ``d[key] = value`` of a
``CachedDict`` on a json container with fsync off (a temporary folder), the
same key written over and over (from 100 KB: below that, the file write's
noise hides the encode).

**Reads.** Before a text is parsed by orjson, the codec asks whether it may
hold an integer beyond 64 bits and whether it may name a type mark
(``json_shape.long_integer`` and ``json_shape.may_name``). The baseline is the
same call with the extension switched off, so that Python answers them
(``bytes.translate`` and ``in``), as before. Measured: ``codec.decode`` of
the stored form (the library's read), ``codec.decode(revive=False)`` (the
daemon's, which keeps the document), and what a cache miss costs: the json
backend's ``get_value`` of the file written above (from 100 KB).

Values are chat messages (text) and game state (numbers) from
``bench/json_libraries.py``, parsed into Python values. Figures are medians of
5 rounds; each round times many calls of each form in turn, the switch held
for the whole of the baseline's calls, with the garbage collector off.

    python3 bench/json_shape.py
"""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from unittest.mock import patch

from chanstore import MoobiusStorage, codec, json_shape
from harness import markdown_table, per_call
from json_libraries import shapes

SIZES = (("100 B", 100), ("100 KB", 100_000), ("900 KB", 900_000))
ROUNDS = 5
#: The CachedDict's set and the json backend's read are measured from this size: at 100 B
#: the codec's microsecond is part of a file operation of a few hundred, whose noise on a
#: shared disk is larger than that.
LIBRARY_SIZE = 100_000


def walked() -> contextlib.AbstractContextManager[object]:
    """Every value walked and copied into its shape in Python, as before the proof."""
    return patch.object(json_shape, "plain", lambda *_args: False)


def asked_in_python() -> contextlib.AbstractContextManager[object]:
    """The text's questions answered in Python, as before (the extension switched off)."""
    return patch.object(json_shape, "_compiled", None)


def paired(call: Callable[[], object], size: int,
           before: Callable[[], contextlib.AbstractContextManager[object]] = walked,
           ) -> tuple[float, float]:  # fmt: skip
    """µs per call as it is and as ``before`` makes it: the medians of ROUNDS rounds, each
    timing both in turn (as it is first in even rounds, last in odd ones)."""
    now: list[float] = []
    then: list[float] = []
    gc.collect()
    for index in range(ROUNDS):
        for form in ("now", "then") if index % 2 == 0 else ("then", "now"):
            if form == "now":
                now.append(per_call(call, size))
            else:
                with before():
                    then.append(per_call(call, size))
    return statistics.median(now), statistics.median(then)


def row(what: str, label: str, shape: str, times: tuple[float, float]) -> list[str]:
    now, then = times
    return [what, label, shape, f"{now:,.1f} µs", f"{then:,.1f} µs", f"**{now / then:.2f}x**"]


def main() -> int:
    if not json_shape.COMPILED:
        print("the extension chanstore._json_shape is not in use: nothing to compare")
        return 1
    writes, reads = [], []
    # A decode of 100 KB makes about 10,000 objects, freed as the next call begins: the
    # collector's passes then land in whichever form is timed (1.5x apart, either way).
    # None of them is garbage it would find, so it is off while timing.
    gc.disable()
    with tempfile.TemporaryDirectory() as root:
        config = [{"implementation": "json", "name": "state", "load": True, "clear": False,
                   "settings": {"root_dir": root, "fsync": False}}]  # fmt: skip
        storage = MoobiusStorage("bench", "shape", config)
        backend = storage.state.database
        for label, size in SIZES:
            for shape, text in shapes(size).items():
                value = json.loads(text)
                stored_form = codec.encode_bytes(value)

                def stored(value: object = value) -> None:
                    storage.state["key"] = value

                def compact(value: object = value) -> bytes:
                    return codec.encode_bytes(value)

                def indented(value: object = value) -> bytes:
                    return codec.encode_bytes(value, indent=2)

                def decoded(data: bytes = stored_form) -> object:
                    return codec.decode(data)

                def kept(data: bytes = stored_form) -> object:
                    return codec.decode(data, revive=False)

                writes.append(row("encode_bytes, compact", label, shape, paired(compact, size)))
                writes.append(row("encode_bytes, indented", label, shape, paired(indented, size)))
                if size >= LIBRARY_SIZE:
                    writes.append(row("CachedDict set, json", label, shape, paired(stored, size)))
                reads.append(row("decode", label, shape, paired(decoded, size, asked_in_python)))
                reads.append(row("decode, revive=False", label, shape,
                                 paired(kept, size, asked_in_python)))  # fmt: skip
                if size >= LIBRARY_SIZE:
                    storage.state["key"] = value

                    def missed() -> object:
                        return backend.get_value("key")

                    reads.append(row("json get_value", label, shape,
                                     paired(missed, size, asked_in_python)))  # fmt: skip
    print(markdown_table(["call", "size", "shape", "proven plain", "walked, as before", "ratio"],
                         writes, {3, 4, 5}))  # fmt: skip
    print()
    print(markdown_table(["call", "size", "shape", "asked in C", "in Python, as before", "ratio"],
                         reads, {3, 4, 5}))  # fmt: skip
    print(f"\n{sys.version.split()[0]}; medians of {ROUNDS} rounds, each timing both forms in turn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
