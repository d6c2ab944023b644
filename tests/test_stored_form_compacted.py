"""Bodies spelt otherwise re-spelt as their stored form, in C (chanstore.stored_form.compacted).

Clients other than chanstore's send a value's JSON in other spellings: Python's
``json.dumps`` with a space after every ``,`` and ``:``, JavaScript's
``JSON.stringify`` with non-ASCII text as it is, PHP's ``json_encode`` with
``\\/``, pretty printers. :func:`~chanstore.stored_form.stored_text` proves
the re-spelt body in their place. The standard library is the oracle: what
``stored_text`` gives for any body must be exactly
``json.dumps(json.loads(body), separators=(",", ":"))``, and for a body the
stdlib refuses it must give nothing (the parser then words the 400).
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chanstore import codec, stored_form
from chanstore.http.bodies import MAX_JSON_DEPTH, parse_value
from chanstore.http.errors import HttpError
from json_documents import documents, stored

pytestmark = pytest.mark.skipif(
    not stored_form.COMPILED, reason="the extension is not in use: nothing is re-spelt"
)


def stdlib_stored(body: bytes) -> bytes | None:
    """The oracle: the stored form of what the stdlib reads in ``body`` (as UTF-8, as the
    daemon reads it); None where it refuses it, or its document cannot be stored."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=lambda name: math.nan)
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


#: How clients spell a document, each a function of the value.
SPELLINGS = {
    "python json.dumps": lambda value: json.dumps(value).encode(),
    "javascript JSON.stringify": lambda value: json.dumps(
        value, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8", "surrogatepass"),
    "pretty, indent 2": lambda value: json.dumps(value, indent=2).encode(),
    "pretty, tabs, unicode": lambda value: (
        json.dumps(value, indent="\t", ensure_ascii=False)
        .replace("\n", "\r\n")
        .encode("utf-8", "surrogatepass")
    ),
    "php json_encode": lambda value: stored(value).replace(b"/", b"\\/"),
    "upper-case escapes": lambda value: _upper_hex(stored(value)),
}


def _upper_hex(data: bytes) -> bytes:
    """``data`` (a stored form) with the hex digits of every \\u escape in upper case."""
    out = bytearray(data)
    at = 0
    while (at := data.find(b"\\", at)) >= 0:
        if data[at + 1 : at + 2] == b"u":
            out[at + 2 : at + 6] = data[at + 2 : at + 6].upper()
            at += 6
        else:
            at += 2
    return bytes(out)


@settings(max_examples=300, deadline=None)
@given(documents, st.sampled_from(sorted(SPELLINGS)))
def test_every_client_spelling_is_re_spelt_into_the_stored_form(value, spelling):
    body = SPELLINGS[spelling](value)
    assert stdlib_stored(body) == stored(value), "the spelling itself is wrong"
    assert stored_form.stored_text(body, MAX_JSON_DEPTH) == stored(value), body
    # Re-spelt only where that changes something: the stored form itself is proven as it is.
    assert (stored_form.compacted(body) is None) == (body == stored(value))


# Ways a body can be damaged or spelt oddly: whitespace anywhere (inside a token too),
# bytes that split tokens, join them, or are not UTF-8.
INSERTIONS = [b" ", b"\n", b"\t", b"\r", b"  ", b"-", b"1", b"e", b'"', b"\\", b",", b"\x01",
              b"\x7f", b"\xc3", b"\xa9", b"\xed\xa0\x80", b"\xed\xa0\xbd\xed\xb8\x80",
              b"\xc0\xaf", b"\xf4\x90\x80\x80",
              b"\\u", b"\\uD800", b"\\ude00", b"\\/", b"\x0b", b"\xc2\xa0"]  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(
    documents,
    st.sampled_from(sorted(SPELLINGS)),
    st.lists(st.tuples(st.sampled_from(INSERTIONS), st.integers(0, 10_000)), max_size=3),
)
def test_nothing_is_re_spelt_into_what_the_stdlib_would_not_read_it_as(value, spelling, edits):
    body = SPELLINGS[spelling](value)
    for inserted, where in edits:
        at = where % (len(body) + 1)
        body = body[:at] + inserted + body[at:]
    text = stored_form.stored_text(body, MAX_JSON_DEPTH)
    if text is not None:
        assert text == stdlib_stored(body), body


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": "ann", "hp": [10, 20], "ok": true, "at": null}',
        b'{\n    "name": "\\u00e9t\\u00e9"\n}\n',
        '{"text":"été 世界 🎉","ts":1700000000.1234567}'.encode(),
        b'{"url":"https:\\/\\/example.com\\/a"}',
        b'["\\u00E9", "\\uD83D\\uDE00", "\\u0041"]',
        b" \r\n\t[ ] ",
        '"\x7f\u2028"'.encode(),
    ],
    ids=["python", "indented", "javascript", "php", "escapes", "only-whitespace", "del-and-2028"],
)
def test_a_body_spelt_otherwise_is_held_as_its_stored_form_without_a_parse(body, monkeypatch):
    def no_parse(data: bytes) -> codec.Document:
        raise AssertionError("parsed")

    monkeypatch.setattr(codec, "parse_document", no_parse)
    document = parse_value(body)
    assert document.stored == stdlib_stored(body)
    assert document.doc == json.loads(body)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[1 2]", "is not valid JSON"),
        (b"[- 1]", "is not valid JSON"),
        (b"[tr ue]", "is not valid JSON"),
        (b"[1.5 e3]", "is not valid JSON"),
        (b'["a\x01b"]', "is not valid JSON"),
        (b'[ "abc', "is not valid JSON"),
        (b'[ "\\x" ]', "is not valid JSON"),
        (b'[ "\\u12" ]', "is not valid JSON"),
        (b'[ "\xc3" ]', "is not UTF-8"),
        (b'[ "\xed\xa0\x80" ]', "is not UTF-8"),
        (b'[ "\xed\xa0\xbd\xed\xb8\x80" ]', "is not UTF-8"),
        (b'[ "\xc0\xaf" ]', "is not UTF-8"),
        (b'[ "\xf4\x90\x80\x80" ]', "is not UTF-8"),
        (b"\xef\xbb\xbf[1, 2]", "is not valid JSON"),
        (b"[1, 2]\x0b", "is not valid JSON"),
        (b"   ", "is empty"),
    ],
)
def test_what_only_a_parser_may_judge_is_left_to_it_and_refused_as_before(body, words):
    assert stored_form.stored_text(body, MAX_JSON_DEPTH) is None
    with pytest.raises(HttpError) as refused:
        parse_value(body)
    assert refused.value.status == 400
    assert words in refused.value.message


NOT_PROVEN = {
    "lone-high": b'["\\ud800" ]',
    "lone-low": b'["\\udc00", 1]',
    "repeated-key": b'{"a": 1, "a": 2}',
    "same-key-escaped": b'{"\\u0061": 1, "a": 2}',
    "float-not-repr": b"[1.50, 2]",
    "beyond-64-bits": b"[12345678901234567890 ]",
    "upper-exponent": b"[1E5, 2]",
}


@pytest.mark.parametrize("body", NOT_PROVEN.values(), ids=NOT_PROVEN.keys())
def test_a_body_re_spelt_but_not_proven_is_parsed_into_the_stored_form(body):
    assert stored_form.stored_text(body, MAX_JSON_DEPTH) is None
    document = parse_value(body)
    assert codec.encode_bytes(document) == stdlib_stored(body)


def test_nesting_re_spelt_is_held_to_the_same_limit():
    limit = MAX_JSON_DEPTH
    assert (
        stored_form.stored_text(b"[ " * limit + b"]" * limit, limit) == b"[" * limit + b"]" * limit
    )
    assert stored_form.stored_text(b"[ " * (limit + 1) + b"]" * (limit + 1), limit) is None


def test_compacted_and_stored_text_take_any_buffer_and_refuse_what_is_not_one():
    assert stored_form.compacted(bytearray(b"[1, 2]")) == b"[1,2]"
    assert stored_form.compacted(memoryview(b' "\\/" ')) == b'"/"'
    assert stored_form.compacted(b"") is None
    assert stored_form.compacted(b"[1,2]") is None  # nothing to change
    with pytest.raises(TypeError):
        stored_form.compacted("[1, 2]")
    proven = bytearray(b"[1,2]")
    assert stored_form.stored_text(proven, MAX_JSON_DEPTH) is proven  # as it came
    assert stored_form.stored_text(memoryview(b"[1, 2]"), MAX_JSON_DEPTH) == b"[1,2]"
    with pytest.raises(TypeError, match="stored_text\\(\\) takes data and max_depth"):
        stored_form.stored_text(b"[1]")
    with pytest.raises(ValueError, match="max_depth must be from 0 to 1000"):
        stored_form.stored_text(b"[1]", -1)


def test_a_text_far_larger_once_escaped_is_re_spelt_whole():
    # Every character 4 bytes of UTF-8 and 12 of escapes: three times the body's size.
    value = ["😀" * 50_000, {"k": "é" * 10_000}]
    body = json.dumps(value, ensure_ascii=False).encode()
    assert stored_form.stored_text(body, MAX_JSON_DEPTH) == stored(value)
