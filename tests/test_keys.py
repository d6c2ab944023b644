"""chanstore.keys: what a key may be, and the encodings of keys and ids into names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chanstore.errors import InvalidKey
from chanstore.keys import (
    MAX_CHANNEL_ID_BYTES,
    MAX_KEY_BYTES,
    check_channel_id,
    check_key,
    decode_domain_part,
    decode_filename,
    encode_domain_part,
    encode_filename,
)
from support import ODD_KEYS

# Any text a key may be: no NUL, no lone surrogates (they are not UTF-8).
key_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1
)


class Sub(str):
    pass


def test_limits_are_the_designs():
    assert MAX_KEY_BYTES == 1024
    assert MAX_CHANNEL_ID_BYTES == 256


@pytest.mark.parametrize("key", ODD_KEYS, ids=range(len(ODD_KEYS)))
def test_odd_keys_are_valid(key):
    assert check_key(key) == key


def test_str_subclass_becomes_str():
    checked = check_key(Sub("k"))
    assert checked == "k"
    assert type(checked) is str


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("", "empty"),
        ("a\x00b", "NUL"),
        ("x" * 1025, "1025 bytes"),
        ("€" * 342, "1026 bytes"),
        ("lone \ud800 surrogate", "not valid Unicode"),
        (1, "must be a str, not int"),
        (None, "must be a str, not NoneType"),
        (b"bytes", "must be a str, not bytes"),
    ],
)
def test_invalid_keys_say_why(key, says):
    with pytest.raises(InvalidKey, match="key") as raised:
        check_key(key)
    assert says in str(raised.value)
    assert raised.value.kind == "invalid_key"


def test_key_limit_is_in_bytes_not_characters():
    assert check_key("€" * 341) == "€" * 341  # 1023 bytes
    assert check_key("x" * 1024) == "x" * 1024


def test_channel_ids():
    assert check_channel_id(123) == "123"
    assert check_channel_id("c" * 256) == "c" * 256
    with pytest.raises(InvalidKey, match="channel id is 257 bytes"):
        check_channel_id("c" * 257)
    with pytest.raises(InvalidKey, match=r"channel id .* NUL"):
        check_channel_id("a\x00")
    with pytest.raises(InvalidKey, match="channel id must be a str, not bool"):
        check_channel_id(True)


@pytest.mark.parametrize(
    "key", ["user-1", "HP", "玩家", "emoji 🎉", "a b", "a.b", ".", "..", "name.json", "_x"]
)
def test_plain_keys_keep_their_file_names(key):
    # The original SDK wrote <key>.json: its files must be found under the same name.
    assert encode_filename(key) == key


@pytest.mark.parametrize(
    ("key", "name"),
    [("a/b", "a%2Fb"), ("%", "%25"), ("%2F", "%252F"), ("a\\b", "a%5Cb"), ("\n\x7f", "%0A%7F")],
)
def test_unsafe_characters_are_percent_encoded(key, name):
    assert encode_filename(key) == name
    assert decode_filename(name) == key


@given(key_text)
def test_filename_encoding_round_trips_and_stays_one_name(key):
    name = encode_filename(key)
    assert decode_filename(name) == key
    assert "/" not in name
    assert "\\" not in name
    assert all(ord(char) >= 0x20 and char != "\x7f" for char in name)


@given(key_text, key_text)
def test_filename_encoding_is_injective(first, second):
    if first != second:
        assert encode_filename(first) != encode_filename(second)


@given(key_text)
def test_domain_parts_have_no_separator_and_round_trip(part):
    encoded = encode_domain_part(part)
    assert "." not in encoded
    assert "/" not in encoded
    assert decode_filename(encoded) == part


@pytest.mark.parametrize(
    ("part", "encoded"),
    [("svc", "svc"), (42, "42"), ("a.b", "a%2Eb"), ("..", "%2E%2E"), ("a%2Eb", "a%252Eb")],
)
def test_domain_part_encoding(part, encoded):
    assert encode_domain_part(part) == encoded


@given(key_text)
def test_decode_domain_part_reverses_encode_domain_part(part):
    """The chanstore backend reads the service id, channel id and container name back
    out of the domain it is given."""
    assert decode_domain_part(encode_domain_part(part)) == part


@pytest.mark.parametrize(
    ("encoded", "part"),
    [("svc", "svc"), ("42", "42"), ("a%2Eb", "a.b"), ("%2E%2E", ".."), ("a%252Eb", "a%2Eb"),
     ("a%2Fb%5C", "a/b\\"), ("Ünï", "Ünï")],
)  # fmt: skip
def test_decode_domain_part(encoded, part):
    assert decode_domain_part(encoded) == part
