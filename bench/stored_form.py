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

``--previous DIR`` compares the proof and the indent with another build of the
extension, in the same rounds: DIR holds its ``_stored_form*.so`` (a
worktree's ``daemon/chanstore`` after ``python3 setup.py build_ext
--inplace`` there), loaded beside this build's in one process.

    python3 bench/stored_form.py --previous /tmp/previous/daemon/chanstore

``--spelt`` measures bodies spelt as other clients spell them (Python's
``json.dumps``, JavaScript's ``JSON.stringify``) instead: ``parse_value``,
which re-spells them in C (``stored_form.compacted``) and proves that, against
the same call with the re-spelling switched off (parsed by orjson, as before),
in the same rounds. Then what a write of the library costs for the same
values, whose text is not all ASCII: ``codec.encode_bytes``, compact and
indented (the json file form), with orjson's output escaped in C against
the same call escaping by a codec error handler, as before.

    python3 bench/stored_form.py --spelt
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from unittest.mock import patch

from chanstore import codec, stored_form
from chanstore.http.bodies import MAX_JSON_DEPTH, parse_value
from harness import per_call
from json_libraries import shapes

ROUNDS = 5


def medians(fns: dict[str, Callable[[], object]], size: int) -> dict[str, float]:
    """µs per call of each of ``fns`` (on a body of ``size`` bytes): the median of
    ROUNDS rounds, each timing every function in turn."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            times[name].append(per_call(fn, size))
    return {name: statistics.median(values) for name, values in times.items()}


@contextlib.contextmanager
def proof_off() -> Iterator[None]:
    """parse_value as it was before the proof: every body parsed and checked for depth."""
    stored_text = stored_form.stored_text
    stored_form.stored_text = lambda data, max_depth: None
    try:
        yield
    finally:
        stored_form.stored_text = stored_text


@contextlib.contextmanager
def respelling_off() -> Iterator[None]:
    """parse_value as it was before bodies were re-spelt: a body spelt otherwise parsed."""
    compacted, stored_text = stored_form.compacted, stored_form.stored_text
    stored_form.compacted = lambda data: None  # the codec escapes by its handler too
    stored_form.stored_text = lambda data, max_depth: (
        data if stored_form.proves(data, max_depth) else None
    )
    try:
        yield
    finally:
        stored_form.compacted, stored_form.stored_text = compacted, stored_text


def parsed_as_spelt(body: bytes) -> codec.Document:
    with respelling_off():
        return parse_value(body)


def measure_spelt() -> None:
    """parse_value of each spelt body: re-spelt, and parsed as before, in turns. The text
    bodies hold words that are not ASCII, which JavaScript writes as they are."""
    print("| size | shape | spelling | bytes | parse_value, re-spelt µs | parsed as before µs "
          "| ratio |")  # fmt: skip
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for body, label, shape in bodies():
        value = json.loads(body.decode().replace("quick", "quíck 😀"))
        spellings = {"python": json.dumps(value).encode()}
        if shape == "text":
            spellings["javascript"] = json.dumps(value, separators=(",", ":"),
                                                 ensure_ascii=False).encode()  # fmt: skip
        for spelling, spelt in spellings.items():
            assert parse_value(spelt).stored == parsed_as_spelt(spelt).stored != spelt
            respelt, parsed = medians({"respelt": functools.partial(parse_value, spelt),
                                       "parsed": functools.partial(parsed_as_spelt, spelt)},
                                      len(spelt)).values()  # fmt: skip
            print(f"| {label} | {shape} | {spelling} | {len(spelt):,} | {respelt:.1f} | "
                  f"{parsed:.1f} | {respelt / parsed:.2f}x |")  # fmt: skip


def escapes_in_python() -> contextlib.AbstractContextManager[object]:
    """codec.encode_bytes as it was before its escapes were made in C."""
    return patch.object(stored_form, "COMPILED", False)


def encoded_as_before(value: object, indent: int | None) -> bytes:
    with escapes_in_python():
        return codec.encode_bytes(value, indent=indent)


def measure_escapes() -> None:
    """codec.encode_bytes of values whose text is not all ASCII: escaped in C, and by the
    codec error handler as before, in turns."""
    print("| size | indent | bytes | encode_bytes, escaped in C µs | as before µs | ratio |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for body, label, shape in bodies():
        if shape != "text":
            continue
        value = json.loads(body.decode().replace("quick", "quíck 😀"))
        for indent in (None, 2):
            made = codec.encode_bytes(value, indent=indent)
            assert (
                made
                == encoded_as_before(value, indent)
                == (
                    json.dumps(value, indent=indent, separators=None if indent else (",", ":"))
                ).encode()
            )
            escaped, before = medians(
                {"escaped": functools.partial(codec.encode_bytes, value, indent=indent),
                 "before": functools.partial(encoded_as_before, value, indent)},
                len(made),
            ).values()  # fmt: skip
            print(f"| {label} | {indent} | {len(made):,} | {escaped:.1f} | {before:.1f} | "
                  f"{escaped / before:.2f}x |")  # fmt: skip


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
    return medians(fns, len(body))


def previous_build(folder: Path) -> ModuleType:
    """The ``_stored_form`` extension built in ``folder``, loaded beside this one."""
    built = sorted(folder.glob("_stored_form*.so"))
    if not built:
        sys.exit(f"no _stored_form*.so in {folder}: run `python3 setup.py build_ext --inplace`")
    spec = importlib.util.spec_from_file_location("_stored_form", built[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_builds(previous: ModuleType) -> None:
    """The proof and the indent of each body by this build and by ``previous``, in turns."""
    print("| size | shape | bytes | what | this build µs | previous build µs | ratio |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    modules = {"this": stored_form, "previous": previous}
    for body, label, shape in bodies():
        assert stored_form.proves(body, MAX_JSON_DEPTH) and previous.proves(body, MAX_JSON_DEPTH)
        assert stored_form.indented(body) == previous.indented(body), (label, shape)
        for what in ("proof", "indent"):
            builds = {name: _call(module, what, body) for name, module in modules.items()}
            this, before = medians(builds, len(body)).values()
            print(f"| {label} | {shape} | {len(body):,} | {what} | {this:.1f} | {before:.1f} | "
                  f"{before / this:.2f}x |")  # fmt: skip


def _call(module: ModuleType, what: str, body: bytes) -> Callable[[], object]:
    if what == "proof":
        return functools.partial(module.proves, body, MAX_JSON_DEPTH)
    return functools.partial(module.indented, body)


def bodies() -> Iterator[tuple[bytes, str, str]]:
    """Each compact body, with its size's label and its shape."""
    for size, label in ((100, "100 B"), (100_000, "100 KB"), (900_000, "900 KB")):
        for shape, loose in shapes(size).items():
            yield json.dumps(json.loads(loose), separators=(",", ":")).encode(), label, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--previous", type=Path, metavar="DIR",
                        help="compare the proof and the indent with the build of _stored_form "
                             "in DIR")  # fmt: skip
    parser.add_argument("--spelt", action="store_true",
                        help="measure bodies spelt as other clients spell them")  # fmt: skip
    args = parser.parse_args()
    if not stored_form.COMPILED:
        sys.exit("chanstore._stored_form is not built: `pip install -e .` builds it")
    if args.spelt:
        measure_spelt()
        print()
        measure_escapes()
        return
    if args.previous is not None:
        compare_builds(previous_build(args.previous))
        return
    print(
        "| size | shape | bytes | parse_value, proven µs | parsed as before µs | ratio "
        "| indented µs | orjson indent µs | ratio |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for body, label, shape in bodies():
        assert stored_form.proves(body, MAX_JSON_DEPTH), (label, shape)
        med = measure(body)
        print(f"| {label} | {shape} | {len(body):,} | {med['proven']:.1f} | "
              f"{med['parsed']:.1f} | {med['proven'] / med['parsed']:.2f}x | "
              f"{med['indented']:.1f} | {med['orjson_indent']:.1f} | "
              f"{med['indented'] / med['orjson_indent']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
