"""The codec on orjson writes and reads exactly what it wrote on the stdlib's json.

ETags are the SHA-1 of the compact stored form and the json backend's files
are the indented form the original SDK reads: both must stay byte for byte
what ``json.dumps`` made, for every value, including those orjson alone would
write differently (non-ASCII, floats below 1e-4, integers beyond 64 bits).
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chanstore import codec, stored_form
from chanstore.errors import UnstorableValue
from chanstore.versions import etag_of, etag_of_stored
from support import VALUES, assert_same


def stdlib_forms(value):
    """The compact and indented forms as the codec wrote them before orjson."""
    shaped = codec.to_json_shape(value)
    return (json.dumps(shaped, separators=(",", ":"), allow_nan=False),
            json.dumps(shaped, indent=2, allow_nan=False))  # fmt: skip


@pytest.mark.parametrize("kind", list(VALUES))
def test_every_value_is_written_as_the_stdlib_wrote_it_and_reads_back(kind):
    """Each VALUES entry: both forms byte for byte, and read back from either (bytes or text)."""
    value = VALUES[kind]
    compact, indented = stdlib_forms(value)
    assert codec.encode(value) == compact
    assert codec.encode_bytes(value) == compact.encode("ascii")
    assert codec.encode(value, indent=2) == indented
    for text in (compact, compact.encode(), indented, indented.encode()):
        assert_same(codec.decode(text), value)


ODD_FLOATS = [1e-5, 1.5e-5, 9.999e-5, 1e-4, 1e-7, -3e-9, 1e-10, 2.5e-300, 5e-324, 1e16, 1e22,
              1.7976931348623157e308, -0.0, 0.1, 100.0, 123456789.125, 1e15,
              9007199254740993.0]  # fmt: skip
BIG_INTS = [2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**80, -(2**63), -(2**63) - 1, -(2**80),
            10**18, 10**19, 10**30]  # fmt: skip
UNICODE = ["é", "世界", "🎉", "\x7f", "\x00\x1f", "\u2028\u2029", "a\\b\"c", "\ud800", "x\udfffy",
           "\ufeff", "\U0010ffff"]  # fmt: skip


@pytest.mark.parametrize("item", ODD_FLOATS + BIG_INTS + UNICODE, ids=repr)
def test_odd_numbers_and_text_are_exact_in_every_place(item):
    """As a value, inside a list and as a dict key (text), in both forms, and read back."""
    values = [item, [item, {"k": item}], {"x": [item]}]
    if isinstance(item, str):
        values.append({item: 1})
    for value in values:
        compact, indented = stdlib_forms(value)
        assert codec.encode(value) == compact
        assert codec.encode(value, indent=2) == indented
        assert_same(codec.decode(compact), value)
        assert_same(codec.decode(compact.encode("ascii")), value)
        assert_same(codec.decode(indented), value)
        assert_same(codec.decode(codec.encode(value), revive=False).doc, value)


@pytest.mark.parametrize("extension", [True, False], ids=["escaped in C", "in Python"])
def test_text_beyond_ascii_is_escaped_as_the_stdlib_escapes_it(extension, monkeypatch):
    """orjson writes such text (and DEL) as it is: escaped again in C where the extension
    is built (stored_form.compacted; the indented form re-spaced after), else by a codec
    error handler. Both must give the stdlib's bytes."""
    if extension and not stored_form.COMPILED:
        pytest.skip("the extension is not in use")
    monkeypatch.setattr(stored_form, "COMPILED", extension)
    chat = [{"user": "zoë", "text": "héllo 世界 🎉\x7f" * 40, "ts": 1.7e9 + n / 7, "n": n}
            for n in range(50)]  # fmt: skip
    for value in [chat, {"é": ["\x7f", "\U0010ffff", {"k": "\u2028"}]}, "\x7f", ["a\x7fé"]]:
        compact, indented = stdlib_forms(value)
        assert codec.encode_bytes(value) == compact.encode("ascii")
        assert codec.encode_bytes(value, indent=2) == indented.encode("ascii")


def test_a_text_that_merely_looks_like_a_number_is_not_mistaken():
    """Patterns the guards look for, inside strings: still exact (at worst, slower)."""
    for text in [
        "0.00001",
        "1e-7",
        "e-5",
        "12345678901234567890",
        " 0.0000",
        "-1234567890123456789",
    ]:
        value = {"s": text, text: [text]}
        compact, indented = stdlib_forms(value)
        assert codec.encode(value) == compact
        assert codec.encode(value, indent=2) == indented
        assert codec.decode(compact) == value


def test_an_escaped_mark_name_is_still_a_mark():
    """Another program may escape any character: the mark is revived as the stdlib's hook would."""
    text = '{"\\u005fmoobius_type": "builtins.set", "_moobius_val": [1, 2]}'
    assert codec.decode(text) == {1, 2}
    assert codec.decode(text.encode()) == {1, 2}


@pytest.mark.parametrize("kind", list(VALUES))
def test_etags_do_not_change(kind):
    """A value's ETag is the SHA-1 of the stdlib's compact form, as it always was."""
    compact, _ = stdlib_forms(VALUES[kind])
    assert etag_of(VALUES[kind]) == etag_of_stored(compact.encode("ascii"))


def test_known_etags_of_plain_values_are_pinned():
    """Figures from before the change (README's worked example): ASCII values keep theirs."""
    assert etag_of(codec.Document({"hp": 100, "max": 100})) == \
        "9e57f74a2de1059091ae897b6d141714b69cb66a"  # fmt: skip
    assert etag_of({"hp": 80}) == "46b3205c1886eeb840b29a148424b11226a8a551"


@pytest.mark.parametrize("doc", [float("nan"), [1, float("inf")], {"a": -math.inf}])
def test_nan_in_a_document_is_refused_even_though_orjson_writes_null(doc):
    with pytest.raises(UnstorableValue):
        codec.encode(codec.Document(doc))
    with pytest.raises(UnstorableValue):
        codec.encode(codec.Document(doc), indent=2)


def test_a_parsed_document_needs_no_float_check_and_a_plain_null_is_null():
    assert codec.encode(codec.Document([None, 1.5])) == "[null,1.5]"
    assert codec.encode(codec.Document([None, 1.5], parsed=True)) == "[null,1.5]"


def test_a_documents_stored_form_is_used_as_it_is():
    document = codec.Document({"a": 1}, parsed=True)
    document.stored = b'{"a":1}'
    assert codec.encode_bytes(document) is document.stored
    document.stored = '{"a":1}'  # text, as older callers set it
    assert codec.encode_bytes(document) == b'{"a":1}'


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", "-Infinity", "1e999", "[1,]", "", " ",
                                  '"\\ud800"', "1 2", "\ufeff1"])  # fmt: skip
def test_parse_is_strict_and_says_what_the_stdlib_says(text):
    strict = json.JSONDecoder(parse_constant=_refuse, parse_float=_finite)
    try:
        expected = ("ok", strict.decode(text))
    except ValueError as exc:
        expected = (type(exc), str(exc))
    try:
        actual = ("ok", codec.parse(text.encode("utf-8", "surrogatepass")))
    except ValueError as exc:
        actual = (type(exc), str(exc))
    assert repr(actual) == repr(expected)


def test_parse_keeps_big_integers_exact():
    assert codec.parse(b"[18446744073709551616, -9223372036854775809]") == [2**64, -(2**63) - 1]
    assert type(codec.parse(b"12345678901234567890123")) is int


def _refuse(name):
    raise ValueError(f"{name} is not JSON")


def _finite(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_any_json_value_is_written_and_read_as_by_the_stdlib(doc):
    compact = json.dumps(doc, separators=(",", ":"))
    assert codec.encode(codec.Document(doc)) == compact
    assert codec.encode(codec.Document(doc, parsed=True), indent=2) == json.dumps(doc, indent=2)
    assert codec.decode(compact, revive=False) == codec.Document(doc)
    assert codec.parse(compact.encode("utf-8", "surrogatepass")) == json.loads(compact)


@settings(max_examples=400, deadline=None)
@given(JSON, st.sampled_from(["compact", "indented", "spaced", "utf-8"]))
def test_a_parsed_document_holds_its_stored_form_whatever_form_it_came_in(doc, form):
    """parse_document makes the stored form once; a body that is it already is kept."""
    compact = json.dumps(doc, separators=(",", ":"))
    body = {
        "compact": compact,
        "indented": json.dumps(doc, indent=2),
        "spaced": json.dumps(doc),
        "utf-8": json.dumps(doc, ensure_ascii=False),
    }[form].encode("utf-8", "surrogatepass")
    try:
        expected = codec.parse(body)
    except ValueError as exc:  # lone surrogates in UTF-8: refused alike
        with pytest.raises(type(exc)) as raised:
            codec.parse_document(body)
        assert str(raised.value) == str(exc)
        return
    document = codec.parse_document(body)
    assert repr(document.doc) == repr(expected)
    assert codec.encode_bytes(document) == compact.encode("ascii")
    if body == compact.encode("ascii"):
        assert document.stored is body  # kept as it came, not made again


@pytest.mark.parametrize(
    "body",
    [b"[18446744073709551616,-9223372036854775809]", b"12345678901234567890123",
     b'{"big":123456789012345678901234567}'],
)  # fmt: skip
def test_a_compact_body_with_integers_beyond_64_bits_keeps_them_exact(body):
    document = codec.parse_document(body)
    assert repr(document.doc) == repr(json.loads(body))
    assert codec.encode_bytes(document) == body
