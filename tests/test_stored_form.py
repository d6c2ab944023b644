"""The stored form proven and indented in C (chanstore.stored_form), against the stdlib.

The stored form is what ``json.dumps(value, separators=(",", ":"))`` writes, so
the standard library is the oracle: whatever :func:`proves` accepts must be
exactly that text of what it parses to, and what the stdlib writes must be
accepted wherever the check does not decline on purpose (lone surrogates,
integers of more than 18 digits).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import select
import struct
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chanstore import codec, stored_form
from chanstore.http.bodies import MAX_JSON_DEPTH, parse_value
from chanstore.http.errors import HttpError
from json_documents import documents, stored

# Not on the whole module: the tests of the build itself must run where it is missing.
needs_extension = pytest.mark.skipif(
    not stored_form.COMPILED, reason="the extension is not in use: proves() proves nothing"
)

ROOT = Path(__file__).resolve().parents[1]


def is_stored_form(data: bytes) -> bool:
    """The oracle: ``data`` is the stdlib's compact text of what it parses to, finite."""
    try:
        value = json.loads(data, parse_constant=lambda name: math.nan)
        return stored(value) == data and _finite(value)
    except (ValueError, RecursionError):
        return False


def _finite(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    if isinstance(value, list):
        return all(map(_finite, value))
    return True


@needs_extension
@settings(max_examples=400, deadline=None)
@given(documents)
def test_what_the_stdlib_writes_is_proven_and_indented_as_the_stdlib_indents_it(value):
    data = stored(value)
    assert stored_form.proves(data, MAX_JSON_DEPTH), data
    assert stored_form.indented(data) == json.dumps(value, indent=2).encode("ascii")


# Ways a body can differ from the stored form of its document while staying JSON.
MUTATIONS = [
    (b",", b", "), (b":", b": "), (b"[", b"[ "), (b"}", b" }"), (b"/", b"\\/"),
    (b"\\u00e9", b"\\u00E9"), (b"\\u00e9", b"\xc3\xa9"), (b"\\n", b"\\u000a"),
    (b"0", b"00"), (b".5", b".50"), (b"e-05", b"e-5"), (b"e+16", b"E+16"),
    (b"1", b"-0"), (b"true", b"True"), (b'"', b"'"), (b"\\ud83d", b"\\ud83D"),
]  # fmt: skip


@needs_extension
@settings(max_examples=400, deadline=None)
@given(documents, st.sampled_from(MUTATIONS), st.integers(min_value=0, max_value=1000))
def test_nothing_is_proven_that_is_not_the_stored_form(value, mutation, where):
    data = stored(value)
    old, new = mutation
    at = data.find(old, where % (len(data) + 1))
    body = data[:at] + new + data[at + len(old) :] if at >= 0 else data + new
    if stored_form.proves(body, MAX_JSON_DEPTH):
        assert is_stored_form(body), body


@needs_extension
@pytest.mark.parametrize(
    "body, why",
    [
        (b" 1", "leading space"),
        (b"[1] ", "trailing space"),
        (b'{"a":1,"a":2}', "a repeated key: the document keeps the last"),
        (b'{"user":1,"uber":2,"user":3}', "a repeated key beside one of its first and last"),
        (b'{"":1,"":2}', "the empty key repeated"),
        (
            b"{" + b",".join(b'"k%d":1' % i for i in range(40)) + b',"k7":2}',
            "a repeated key among many",
        ),
        (b'"\\ud800"', "a lone surrogate (declined on purpose)"),
        (b'"\\ud800\\u0041"', "a high surrogate without its low one"),
        (b"1234567890123456789", "19 digits (declined on purpose)"),
        (b"-0", "the stdlib writes 0"),
        (b"1e400", "an infinity"),
        (b"NaN", "not JSON"),
        (b'"\\x"', "not an escape"),
        (b'"abc', "an unclosed string"),
        (b"[1,]", "a trailing comma"),
        (b"", "nothing"),
    ],
)
def test_bodies_that_are_not_proven(body, why):
    assert not stored_form.proves(body, MAX_JSON_DEPTH), why


@needs_extension
@pytest.mark.parametrize(
    "body",
    [b'{"user":1,"uber":2}', b'{"ab":1,"a":2,"b":3,"ba":4}', b'{"":1,"x":2}'],
    ids=["same-ends", "same-letters", "empty-key"],
)
def test_keys_alike_at_their_ends_are_different_keys(body):
    assert is_stored_form(body)
    assert stored_form.proves(body, MAX_JSON_DEPTH)


@needs_extension
def test_nesting_is_proven_up_to_the_limit_and_no_further():
    limit = MAX_JSON_DEPTH
    assert stored_form.proves(b"[" * limit + b"]" * limit, limit)
    assert not stored_form.proves(b"[" * (limit + 1) + b"]" * (limit + 1), limit)
    deep = b'{"a":' * MAX_JSON_DEPTH + b"1" + b"}" * MAX_JSON_DEPTH
    assert stored_form.proves(deep, MAX_JSON_DEPTH)
    assert stored_form.indented(deep) == json.dumps(json.loads(deep), indent=2).encode()


def _messages(count: int) -> list[dict[str, object]]:
    return [{"id": n, "text": f"message {n} " * 4, "ts": 1733212345.123456 + n}
            for n in range(count)]  # fmt: skip


@needs_extension
@pytest.mark.parametrize(
    ("value", "growth"),
    [
        (_messages(20_000), "within the first guess"),
        ([[n, [n, {"a": [n]}]] for n in range(30_000)], "past it"),
        ([[n] for n in range(4)], "within the first guess"),
        ([[[[[[n]]]]] for n in range(4)], "past it"),
    ],
    ids=["large-messages", "large-nested", "small-flat", "small-nested"],
)
def test_indented_is_the_stdlib_indent_however_much_the_document_grows(value, growth):
    """The indent writes into the answer sized at 1.25 times the stored form, and goes on
    in a buffer of its own when a document grows more: both ways, large (without the GIL)
    and small, byte for byte what the stdlib writes."""
    data = json.dumps(value, separators=(",", ":")).encode()
    expected = json.dumps(value, indent=2).encode()
    assert (len(expected) > 1.25 * len(data) + 64) == (growth == "past it")
    assert stored_form.indented(data) == expected


def float_tokens(x: float) -> list[str]:
    """repr of x, other layouts of it, and its last digit moved, added and dropped."""
    r = repr(x)
    tokens = [r, f"{x:.17g}", f"{x:.16g}", f"{x:.15g}", f"{x:.17e}"]
    mantissa, sep, exponent = r.partition("e")
    if "." in mantissa and mantissa[-1] not in "0.":
        tokens += [mantissa[:-1] + digit + sep + exponent for digit in "0123456789"]
        tokens.append(mantissa + "1" + sep + exponent)
    return [token for token in tokens if any(c in token for c in ".eEn")]


def edge_floats() -> list[float]:
    """Powers of two and of ten over the whole range, and their neighbours: where the
    interval of decimals that read back as a double is lopsided or holds a tie."""
    values = []
    for power in [2.0**j for j in range(-1074, 1024)] + [float(f"1e{k}") for k in range(-323, 309)]:
        values += [power, math.nextafter(power, 0), math.nextafter(power, math.inf)]
    return [x for value in values for x in (value, -value) if math.isfinite(x)]


def random_floats(count: int) -> list[float]:
    rnd = random.Random(20261202)
    values = []
    while len(values) < count:
        values += [
            struct.unpack("d", struct.pack("Q", rnd.getrandbits(64)))[0],
            rnd.uniform(-1e10, 1e10),
            1.7e9 + rnd.random() * 1e6,  # a timestamp: 17 digits
            round(1.7e9 + rnd.random() * 1e6, 6),  # one of microseconds: 16, decided in doubles
            round(rnd.uniform(-1e4, 1e4), rnd.randint(8, 13)),  # 16 or 17, and their neighbours
            rnd.getrandbits(rnd.randint(1, 60)) / 2 ** rnd.randint(0, 60),  # ties
        ]
    return [x for x in values if math.isfinite(x)]


@needs_extension
@pytest.mark.parametrize(
    "floats", [edge_floats, lambda: random_floats(40_000)], ids=["edges", "random"]
)
def test_a_float_is_proven_exactly_when_it_is_written_as_repr_writes_it(floats):
    wrong = []
    for x in floats():
        for token in float_tokens(x):
            truth = is_stored_form(token.encode())
            if stored_form.proves(token.encode(), MAX_JSON_DEPTH) != truth:
                wrong.append((token, truth))
    assert not wrong, f"{len(wrong)} tokens judged wrongly, e.g. {wrong[:5]}"


def test_the_source_distribution_holds_what_the_extensions_include(tmp_path):
    # Without a header an sdist still installs, silently without its extension.
    pytest.importorskip("setuptools", reason="building an sdist needs setuptools")
    # A fresh egg-info: setuptools also puts in whatever an old one's SOURCES.txt lists.
    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path),
         "sdist", "-d", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    [archive] = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        held = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    included = {
        f"daemon/chanstore/{name}"
        for source in (ROOT / "daemon" / "chanstore").glob("_*.c")
        for name in re.findall(r'#include "([^"]+)"', source.read_text())
    }
    assert included, "no header found to check"
    assert included <= held, f"missing from the sdist: {sorted(included - held)}"


def test_without_the_extension_nothing_is_proven_and_indenting_still_works():
    code = (
        "import json; from chanstore import stored_form as s; "
        "print(s.COMPILED, s.proves(b'[1]', 64), s.compacted(b'[1, 2]'), "
        "s.stored_text(b'[1, 2]', 64), s.indented(b'{\"a\":[1,{}]}').decode())"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "CHANSTORE_PURE_PYTHON": "1"},
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert run.stdout.split(maxsplit=4)[:4] == ["False", "False", "None", "None"]
    assert run.stdout.split(maxsplit=4)[4].strip() == json.dumps({"a": [1, {}]}, indent=2)


# -- where a PUT body meets the proof ---------------------------------------------------


@needs_extension
def test_a_proven_body_is_a_document_held_as_the_bytes_it_came_as():
    body = stored([{"user": "ann", "text": "héllo 🎉", "ts": 1700000000.1234567, "n": 3}])
    document = parse_value(body)
    assert document.stored is body
    assert codec.encode_bytes(document) is body
    assert codec.encode_bytes(document, indent=2) == json.dumps(json.loads(body), indent=2).encode()
    assert document.doc == json.loads(body)  # parsed when asked for, and only then


@pytest.mark.parametrize(
    "body",
    [b'{"a":1.50}', b'{"a":1,"a":2}', b'{"big":123456789012345678901234567890}', b'"\\ud800"'],
    ids=["float-not-repr", "repeated-key", "big-integer", "lone-surrogate"],
)
def test_a_body_not_proven_is_parsed_and_stored_as_the_stdlib_writes_it(body):
    assert codec.proven_document(body, MAX_JSON_DEPTH) is None
    document = parse_value(body)
    value = json.loads(body)
    assert codec.encode_bytes(document) == stored(value)
    assert document.doc == value


def test_a_body_too_deep_to_prove_is_refused_with_the_depth_in_the_answer():
    body = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)
    with pytest.raises(HttpError, match=f"nested more than {MAX_JSON_DEPTH} levels deep"):
        parse_value(body)


# -- Beside: the proof and the hash on threads that never take the GIL -----------------


#: One of Beside.take()'s answers: token, the stored form proven, its SHA-1, indented form.
Answer = tuple[int, bytes | None, str | None, bytes | None]


def answers_of(beside, tokens: int, timeout: float = 10.0) -> list[Answer]:
    """The answers of ``tokens`` submissions, waiting on the eventfd as the loop does."""
    found: list[Answer] = []
    deadline = time.monotonic() + timeout
    while len(found) < tokens:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(found)} of {tokens} answers came within {timeout}s"
        select.select([beside.fd], [], [], left)
        found.extend(beside.take())
    return found


def answer_alone(
    body: bytes, indent: bool = False
) -> tuple[bytes | None, str | None, bytes | None]:
    """What a Beside of its own answers for ``body``: the stored form proven (``body``, or
    it re-spelt; None), its SHA-1, its indented form."""
    beside = stored_form.Beside(1)
    try:
        beside.submit(body, MAX_JSON_DEPTH, indent)
        [(_, proven, sha1, indented)] = answers_of(beside, 1)
    finally:
        beside.close()
    return proven, sha1, indented


needs_beside = pytest.mark.skipif(
    stored_form.Beside is None, reason="no Beside: the extension is not in use, or not Linux"
)


@needs_beside
@settings(max_examples=150, deadline=None)
@given(st.lists(documents, min_size=1, max_size=6), st.sampled_from(MUTATIONS))
def test_beside_answers_as_proves_and_hashlib_do(values, mutation):
    bodies = [stored(value) for value in values]
    bodies.append(bodies[0].replace(*mutation))
    beside = stored_form.Beside(2)
    indents = [index % 2 == 0 for index in range(len(bodies))]
    try:
        tokens = [beside.submit(body, MAX_JSON_DEPTH, indent)
                  for body, indent in zip(bodies, indents, strict=True)]  # fmt: skip
        answers = sorted(answers_of(beside, len(tokens)))
    finally:
        beside.close()
    assert [token for token, _, _, _ in answers] == tokens
    for body, indent, (_, proven, sha1, indented) in zip(bodies, indents, answers, strict=True):
        # It may decline what stored_text() asks CPython about (see the test below), no more:
        # the body itself when proven, else the body re-spelt.
        if proven is not None:
            assert proven == stored_form.stored_text(body, MAX_JSON_DEPTH), body
            assert (proven is body) == stored_form.proves(body, MAX_JSON_DEPTH)
        # Hashed and, when asked, indented: what was proven, the file form of its value.
        hashed = proven is not None and beside.hashes
        assert sha1 == (hashlib.sha1(proven).hexdigest() if hashed else None)
        assert indented == (stored_form.indented(proven) if indent and proven else None)


@needs_beside
def test_beside_proves_chat_messages_as_proves_does():
    body = stored(
        [{"id": 10**11 + n, "text": "héllo 😀 " * 9, "ts": 1.7e9 + n / 7} for n in range(2_000)]
    )
    proven, sha1, _ = answer_alone(body)
    assert proven is body and stored_form.proves(body, MAX_JSON_DEPTH)
    assert sha1 == (hashlib.sha1(body).hexdigest() if stored_form.Beside(1).hashes else None)


@needs_beside
@pytest.mark.parametrize(
    "value",
    [
        [{"id": n, "text": "héllo " * 9, "ts": 1.7e9 + n / 7} for n in range(2_000)],
        [[1] * 50_000, {"a": [[[]], {}, [{"b": None}]]}],  # needs more room than it is given
    ],
    ids=["chat messages", "more room"],
)
def test_beside_indents_a_body_it_proves_as_the_original_writes_its_file(value):
    body = stored(value)
    proven, _, indented = answer_alone(body, indent=True)
    assert proven is body
    assert indented == json.dumps(value, indent=2).encode("ascii") == stored_form.indented(body)


@needs_beside
def test_beside_answers_a_body_spelt_otherwise_with_its_stored_form_hashed_and_indented():
    value = [{"id": n, "text": "héllo 😀 " * 9, "ts": 1.7e9 + n / 7} for n in range(2_000)]
    body = json.dumps(value, ensure_ascii=False, indent=1).encode()  # 0.65 times its stored form
    proven, sha1, indented = answer_alone(body, indent=True)
    assert proven == stored(value)
    assert sha1 == (hashlib.sha1(proven).hexdigest() if stored_form.Beside(1).hashes else None)
    assert indented == json.dumps(value, indent=2).encode("ascii")


@needs_beside
def test_beside_hashes_where_hashlib_hashes_with_openssl():
    # Else every large PUT would hash on the event loop again, and nothing would say so.
    hashlib_uses_openssl = type(hashlib.sha1()).__module__ == "_hashlib"
    assert stored_form.Beside(1).hashes == hashlib_uses_openssl


@needs_beside
def test_beside_declines_the_floats_only_cpython_decides():
    body = stored([1.5e-300, 1.7976931348623157e308])  # where the check asks CPython's dtoa
    assert stored_form.proves(body, MAX_JSON_DEPTH)
    proven, _, indented = answer_alone(body, indent=True)
    assert proven is None  # never "proven" wrongly: the thread may not run Python to decide
    assert indented is None  # nor indented: the writer makes the file form of what it parsed


@needs_beside
def test_beside_refuses_what_it_cannot_take_and_says_what_it_expected():
    with pytest.raises(ValueError, match="threads must be from 1 to 8, not 0"):
        stored_form.Beside(0)
    beside = stored_form.Beside(1)
    with pytest.raises(TypeError, match="submit\\(\\) takes bytes, not bytearray"):
        beside.submit(bytearray(b"[]"), 1)
    with pytest.raises(ValueError, match="max_depth must be from 0 to 1000"):
        beside.submit(b"[]", 1001)
    with pytest.raises(TypeError, match="submit\\(\\) takes data, max_depth and indent"):
        beside.submit(b"[]", 1, True, 2)
    beside.close()
    beside.close()  # again: nothing to do
    assert beside.fd == -1
    assert beside.take() == []
    with pytest.raises(ValueError, match="closed"):
        beside.submit(b"[]", 1)


@needs_beside
def test_beside_holds_a_body_until_its_answer_is_taken():
    body = stored(["x" * 1000] * 1000)
    held = sys.getrefcount(body)
    beside = stored_form.Beside(1)
    try:
        beside.submit(body, MAX_JSON_DEPTH)
        assert sys.getrefcount(body) == held + 1
        answers_of(beside, 1)
        assert sys.getrefcount(body) == held
        beside.submit(body, MAX_JSON_DEPTH)
    finally:
        beside.close()  # an answer not taken: dropped, and the body with it
    assert sys.getrefcount(body) == held


@needs_beside
def test_beside_frees_the_room_it_made_to_indent_into_taken_or_not():
    body = stored(["x" * 1000] * 100)  # 100 KB: its room is 125 KB
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(40):  # 9 MB of rooms and re-spelt bodies, if they were kept
            beside = stored_form.Beside(1)
            beside.submit(body, MAX_JSON_DEPTH, True)  # dropped untaken at close
            beside.submit(body.replace(b",", b", "), MAX_JSON_DEPTH, True)  # re-spelt too
            beside.submit(b"[1, 2", MAX_JSON_DEPTH, True)  # not proven: not indented
            answers_of(beside, 1)
            beside.submit(body, MAX_JSON_DEPTH, True)
            beside.close()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 1_000_000, f"{grown:,} bytes still held after 160 rooms"


@needs_beside
def test_a_forked_child_is_told_its_beside_has_no_threads_and_can_close_it():
    code = """
import os, sys
from chanstore import stored_form
beside = stored_form.Beside(2)
pid = os.fork()
if pid == 0:
    try:
        beside.submit(b"[]", 1)
    except RuntimeError as exc:
        print("child:", exc, flush=True)
    beside.close()  # joins nothing, takes no lock of the parent's
    os._exit(0)
_, status = os.waitpid(pid, 0)
beside.submit(b"[1]", 1)  # the parent's threads go on
beside.close()
sys.exit(os.waitstatus_to_exitcode(status))
"""
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, run.stderr
    assert "child: a Beside has no threads in a forked process" in run.stdout
