"""The export format: a line per key, checked line by line on the way in."""

from __future__ import annotations

import json

import pytest

from chanstore import codec
from chanstore.errors import ConfigError
from chanstore.transfer.records import MAX_PROBLEMS, encode_record, read_records


def test_a_record_round_trips_in_its_stored_form():
    value = codec.Document({"_moobius_type": "builtins.set", "_moobius_val": [1, 2]})
    line = encode_record("c/1", "stats", "ü 🎉", value)
    assert line.endswith("\n") and line.isascii()
    assert json.loads(line) == {"channel": "c/1", "container": "stats", "key": "ü 🎉",
                                "value": value.doc}  # fmt: skip
    (record,) = read_records([line.encode()], ["stats"])
    assert (record.channel, record.container, record.key) == ("c/1", "stats", "ü 🎉")
    assert codec.decode(codec.encode(record.value)) == {1, 2}


def test_blank_lines_are_skipped():
    line = encode_record("c", "stats", "k", codec.Document(1))
    assert len(list(read_records([b"\n", line.encode(), b"   \n"], ["stats"]))) == 1


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"{not json", "line 1: not JSON"),
        (b"[1, 2]", "expected a JSON object with channel, container, key, value, not list"),
        (b'{"channel": "c", "container": "stats", "key": "k"}', "missing value"),
        (b'{"channel": "c", "container": "stats", "key": "k", "value": 1, "x": 2}',
         "unknown field 'x'"),
        (b'{"channel": "c", "container": "nope", "key": "k", "value": 1}',
         "container 'nope' is not in the db_config (it has: stats)"),
        (b'{"channel": "c", "container": "stats", "key": "a\\u0000b", "value": 1}', "NUL"),
        (b'{"channel": 7, "container": "stats", "key": "k", "value": 1}',
         "channel must be a string, not int"),
        (b'{"channel": "c", "container": "stats", "key": "k", "value": NaN}', "NaN"),
        (json.dumps({"channel": "c" * 300, "container": "stats", "key": "k", "value": 1})
         .encode(), "channel id is 300 bytes of UTF-8; the limit is 256"),
    ],
)  # fmt: skip
def test_a_bad_line_is_named_with_what_was_expected(line, says):
    with pytest.raises(ConfigError) as caught:
        list(read_records([line], ["stats"]))
    assert says in str(caught.value)
    assert str(caught.value).startswith("line 1:")


def test_no_record_is_given_once_a_line_was_bad_and_every_bad_line_is_named():
    good = encode_record("c", "stats", "k", codec.Document(1)).encode()
    lines = [good, b"oops", good, b"{}", good]
    given = []
    with pytest.raises(ConfigError) as caught:
        given.extend(read_records(lines, ["stats"]))
    assert len(given) == 1  # the one before the first bad line; a caller checks first
    assert [problem.split(":")[0] for problem in caught.value.problems] == ["line 2", "line 4"]


def test_the_problems_named_are_bounded():
    with pytest.raises(ConfigError) as caught:
        list(read_records([b"x"] * 1000, ["stats"]))
    assert len(caught.value.problems) == MAX_PROBLEMS
