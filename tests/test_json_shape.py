"""json_shape: a value proven its own JSON shape is encoded as it is, and only such a value; a
text's long integers and mark names are found as Python finds them.

The proof lets ``to_json_shape`` skip its copy. A value it wrongly called
plain would be written without its type marks (a tuple read back as a list, a
dict shaped like a mark revived as something else) or with a NaN orjson
writes as null; so the property is checked against the walk itself, over
values that mix every kind the walk knows. The text questions are checked
against the Python answers they replace.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chanstore import codec, json_shape
from chanstore.errors import UnstorableValue
from support import assert_same

pytestmark = pytest.mark.skipif(not json_shape.COMPILED, reason="the extension is not in use")

MARKS = (codec.TYPE_KEY, codec.VALUE_KEY)


def plain(value) -> bool:
    return json_shape.plain(value, *MARKS)


def walked(value):
    """``to_json_shape`` as it was before the proof: the walk, always a copy."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json_shape, "plain", lambda *_args: False)
        return codec.to_json_shape(value)


@dataclasses.dataclass
class Point:
    x: int
    y: float


class Level(enum.IntEnum):
    LOW = 1


class Name(str):
    pass


def nested(depth: int, inner=0):
    value = inner
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


PLAIN = {
    "scalars": [None, True, False, 0, -(2**80), 1.5, -0.0, 5e-324, "", "é\x00\ud800"],
    "chat": {"user": "zoë", "text": "hi", "ts": 1.7e9, "reactions": ["a"], "n": None},
    "one mark key": {codec.TYPE_KEY: "x"},
    "mark keys and a third": {codec.TYPE_KEY: "x", codec.VALUE_KEY: 1, "other": 2},
    "two keys, one a mark key": {codec.TYPE_KEY: "x", "other": 2},
    "254 containers deep": nested(254),
}
NOT_PLAIN = {
    "NaN": float("nan"),
    "infinity, deep inside": {"a": [1, {"b": [math.inf]}]},
    "tuple": (1, 2),
    "set": {1},
    "frozenset": frozenset({1}),
    "dataclass": Point(1, 2.0),
    "IntEnum": Level.LOW,
    "str subclass as a value": [Name("x")],
    "str subclass as a key": {Name("k"): 1},
    "int key": {1: "one"},
    "OrderedDict": collections.OrderedDict(a=1),
    "a dict shaped like a mark, inside": [{"ok": {codec.TYPE_KEY: "t", codec.VALUE_KEY: 1}}],
    "UnknownMark": codec.UnknownMark({codec.TYPE_KEY: "x.Y", codec.VALUE_KEY: 1}),
    "Document": codec.Document({"a": 1}),
    "bytes": b"x",
    "255 containers deep, which orjson refuses": nested(255),
}


@pytest.mark.parametrize("name", list(PLAIN))
def test_a_value_of_json_types_only_is_plain_and_its_own_shape(name):
    value = PLAIN[name]
    assert plain(value)
    assert_same(walked(value), value)
    assert codec.to_json_shape(value) is value  # not copied


@pytest.mark.parametrize("name", list(NOT_PLAIN))
def test_a_value_the_walk_changes_or_refuses_is_not_plain(name):
    value = NOT_PLAIN[name]
    assert not plain(value)
    with contextlib.suppress(UnstorableValue):
        assert codec.to_json_shape(value) is not value


def test_a_value_that_contains_itself_is_refused_without_a_crash():
    looped: list = [1]
    looped.append({"again": looped})
    assert not plain(looped)
    with pytest.raises(UnstorableValue, match="contains itself"):
        codec.encode_bytes(looped)


def test_the_arguments_are_checked():
    with pytest.raises(TypeError, match="takes value, type_key and value_key"):
        json_shape._compiled.plain({})
    with pytest.raises(TypeError, match="must be str"):
        json_shape._compiled.plain({}, b"_moobius_type", codec.VALUE_KEY)


def test_without_the_extension_nothing_is_proven(monkeypatch):
    monkeypatch.setattr(json_shape, "_compiled", None)
    assert not json_shape.plain({"a": 1}, *MARKS)


# -- the property, over values that mix every kind the walk knows -------------------------

plain_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
odd_leaves = st.sampled_from(
    [math.nan, math.inf, -math.inf, Level.LOW, Name("n"), Point(1, 0.5), b"raw", frozenset({1})]
)
# Mostly plain, so that many values are plain all through and many hold one odd part.
leaves = st.one_of(*[plain_leaves] * 6, odd_leaves)
keys = st.one_of(st.text(max_size=4), st.sampled_from([*MARKS, Name("k")]), st.integers(0, 3))
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(keys, inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.tuples(inner).map(lambda pair: {codec.TYPE_KEY: "t", codec.VALUE_KEY: pair[0]}),
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(values)
def test_plain_exactly_when_the_walk_gives_the_value_back_as_it_is(value):
    try:
        shaped = walked(value)
    except UnstorableValue:
        assert not plain(value)
        return
    assert plain(value) == _same_types(shaped, value)
    if plain(value):
        assert_same(shaped, value)


@settings(max_examples=300, deadline=None)
@given(values)
def test_encoding_is_byte_for_byte_what_the_walk_gives(value):
    """With the proof and with every value walked: the same bytes, or the same refusal."""
    for indent in (None, 2):
        proven = _encoded(value, indent)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(json_shape, "plain", lambda *_args: False)
            walked = _encoded(value, indent)
        assert proven == walked


def _encoded(value, indent):
    try:
        return codec.encode_bytes(value, indent=indent)
    except UnstorableValue as exc:
        return ("refused", str(exc))


def _same_types(shaped, value) -> bool:
    """Whether ``shaped`` is ``value`` again: the same exact types all the way down."""
    if type(shaped) is not type(value):
        return False
    if type(value) is dict:
        return list(shaped) == list(value) and all(
            _same_types(shaped[key], value[key]) for key in value
        )
    if type(value) is list:
        return len(shaped) == len(value) and all(map(_same_types, shaped, value))
    if type(value) is float and math.isnan(value):
        return False
    return shaped == value


# -- texts: the questions asked before orjson parses, against the Python answers ---------

#: Runs of digits long and short, what may come before them, and what spells a mark.
pieces = st.one_of(
    st.text("0123456789", min_size=1, max_size=40),
    st.sampled_from([".", "e", "E", "-", " ", "x", '"', "_", "\\", "\\u00", "_moobius_type"]),
)
texts = st.lists(pieces, max_size=30).map(lambda parts: "".join(parts).encode())


def answers(data: bytes) -> tuple[bool, bool]:
    return json_shape.long_integer(data), json_shape.may_name(data, codec._MARK)


@settings(max_examples=500, deadline=None)
@given(texts)
def test_the_text_questions_are_answered_as_python_answers_them(data):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(json_shape, "_compiled", None)
        expected = answers(data)
    assert answers(data) == expected


@pytest.mark.parametrize("before", [b"", b" ", b"-", b"[", b".", b"e", b"E", b"1."])
@pytest.mark.parametrize("digits", [18, 19, 40])
def test_a_run_of_digits_is_found_wherever_it_lies_in_the_chunks_read(before, digits):
    """At every offset against the 16-byte chunks (and in the bytes after the last one)."""
    counts = digits >= 19 and not before.endswith((b".", b"e", b"E"))
    for offset in range(40):
        for after in (b"", b",", b"x" * 20):
            data = b"x" * offset + before + b"7" * digits + after
            assert json_shape.long_integer(data) is counts, (offset, data)


def test_a_megabyte_of_digits_is_read_once():
    """A fraction's digits are never an integer, however many; each run is measured once."""
    assert not json_shape.long_integer(b"0." + b"5" * (1 << 20))
    assert json_shape.long_integer(b"0." + b"5" * (1 << 20) + b",1" + b"0" * 19)


@pytest.mark.parametrize("data", [b"", b"_", b"\\u0", b'{"_moobius_typ":1}', b"_moobius_type"[1:]])
def test_a_text_without_the_name_or_an_escape_names_nothing(data):
    assert not json_shape.may_name(data, codec._MARK)


def test_an_empty_name_is_in_every_text_as_python_says():
    assert json_shape.may_name(b"", b"") and json_shape.may_name(b"x", b"")


@pytest.mark.parametrize(
    "data", [b"_moobius_type", b'"x\\u005fmoobius"', b"\\u00", b"__moobius_type_"]
)
def test_a_text_with_the_name_or_an_escape_may_name_it(data):
    assert json_shape.may_name(data, codec._MARK)
