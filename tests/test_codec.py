"""chanstore.codec: values to the original SDK's type-marked JSON and back."""

from __future__ import annotations

import collections
import dataclasses
import enum
import json

import pytest
from structlog.testing import capture_logs

from chanstore import codec
from chanstore.errors import UnstorableValue
from support import VALUES, Inventory, Player, Point, assert_same


@pytest.mark.parametrize("kind", list(VALUES))
@pytest.mark.parametrize("indent", [None, 2])
def test_every_value_kind_round_trips(kind, indent):
    value = VALUES[kind]
    assert_same(codec.decode(codec.encode(value, indent=indent)), value)


@pytest.mark.parametrize(
    "value",
    [{"hp": 100, "name": "alice"}, [1, 2.5, None, True, "ü"], "text", 7, None, {"a": {"b": []}}],
)
def test_json_values_are_written_as_plain_json(value):
    assert codec.encode(value, indent=2) == json.dumps(value, indent=2)
    assert codec.encode(value) == json.dumps(value, separators=(",", ":"))


def test_marks_are_the_original_sdks():
    assert json.loads(codec.encode(Point(1, 2))) == {
        "_moobius_type": "support.Point",
        "_moobius_val": {"x": 1, "y": 2},
    }
    assert json.loads(codec.encode((1, "a"))) == {
        "_moobius_type": "builtins.tuple",
        "_moobius_val": [1, "a"],
    }
    assert json.loads(codec.encode({"only"})) == {
        "_moobius_type": "builtins.set",
        "_moobius_val": ["only"],
    }
    assert json.loads(codec.encode(frozenset())) == {
        "_moobius_type": "builtins.frozenset",
        "_moobius_val": [],
    }


def test_nested_dataclasses_are_marked_once_and_revived_from_type_hints():
    player = VALUES["nested dataclass"]
    shaped = json.loads(codec.encode(player))
    assert shaped["_moobius_type"] == "support.Player"
    # asdict() flattens the nested dataclasses, as the original SDK stored them.
    assert shaped["_moobius_val"]["where"] == {"x": 3, "y": 4}
    revived = codec.decode(json.dumps(shaped))
    assert isinstance(revived.where, Point)
    assert isinstance(revived.inventory, Inventory)
    assert revived == player


def test_mark_name():
    assert codec.mark_name(Player) == "support.Player"
    assert codec.mark_name(set) == "builtins.set"


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (object(), "object"),
        (float("nan"), "NaN"),
        (float("-inf"), "infinity"),
        ({1: "a"}, "dict key 1"),
        ({"ok": {(1, 2): "tuple key"}}, "dict key (1, 2)"),
        ([1, [2, {3}], b"raw"], "bytes"),
        ({"fn": print}, "builtin_function_or_method"),
    ],
)
def test_unstorable_values_say_why(value, says):
    with pytest.raises(UnstorableValue, match="cannot be stored") as raised:
        codec.encode(value)
    assert says in str(raised.value)
    assert raised.value.kind == "invalid_value"


class Color(enum.IntEnum):
    RED = 1


class Name(str):
    pass


class Tags(list):
    pass


def test_subclasses_of_json_types_are_stored_as_their_base():
    assert_same(codec.decode(codec.encode(Color.RED)), 1)
    assert_same(codec.decode(codec.encode(Name("n"))), "n")
    ordered = collections.OrderedDict([("b", 1), ("a", 2)])
    assert_same(codec.decode(codec.encode(ordered)), {"b": 1, "a": 2})
    assert_same(codec.decode(codec.encode(Tags([1, Tags([2])]))), [1, [2]])


@pytest.mark.parametrize("wrapper", [collections.UserList([1]), collections.UserDict({"a": 1})])
def test_user_list_and_user_dict_are_not_json_types(wrapper):
    """They wrap a list or dict without subclassing it: refused, like any other object."""
    assert not isinstance(wrapper, list | dict)
    with pytest.raises(UnstorableValue, match="cannot be stored") as raised:
        codec.encode(wrapper)
    assert type(wrapper).__name__ in str(raised.value)
    # What they wrap is stored as it is.
    assert_same(codec.decode(codec.encode(wrapper.data)), wrapper.data)


@pytest.mark.parametrize(
    "text",
    [
        '{"_moobius_type": "nowhere.Thing", "_moobius_val": {"a": 1}}',
        '{"_moobius_type": 5, "_moobius_val": [1]}',
        '{"_moobius_type": "builtins.set", "_moobius_val": [1], "extra": true}',
        '{"_moobius_type": "builtins.set"}',
        '{"_moobius_type": "builtins.tuple", "_moobius_val": 5}',
    ],
)
def test_marks_that_cannot_be_revived_stay_plain_dicts(text):
    assert codec.decode(text) == json.loads(text)


def test_an_unknown_mark_survives_being_written_back():
    text = '{"_moobius_type": "other.app.Thing", "_moobius_val": {"a": [1, 2]}}'
    assert json.loads(codec.encode(codec.decode(text))) == json.loads(text)


def test_register_type_with_a_name_and_unregister():
    @dataclasses.dataclass
    class Moved:
        a: int

    text = '{"_moobius_type": "old.module.Moved", "_moobius_val": {"a": 1}}'
    assert codec.decode(text) == {"_moobius_type": "old.module.Moved", "_moobius_val": {"a": 1}}
    assert codec.register_type(Moved, name="old.module.Moved") is Moved
    try:
        assert codec.registered_types()["old.module.Moved"] is Moved
        assert codec.decode(text) == Moved(1)
        # Written back under the same mark, so it reads back as the class again.
        assert json.loads(codec.encode(Moved(2)))["_moobius_type"] == "old.module.Moved"
        assert codec.decode(codec.encode(Moved(2))) == Moved(2)
    finally:
        codec.unregister_type("old.module.Moved")
    assert "old.module.Moved" not in codec.registered_types()
    assert codec.decode(text) == json.loads(text)
    assert json.loads(codec.encode(Moved(3)))["_moobius_type"] == codec.mark_name(Moved)


def test_register_type_as_a_decorator_and_unregister_by_class():
    @codec.register_type
    @dataclasses.dataclass
    class Local:
        v: list[int]

    try:
        assert codec.decode(codec.encode(Local([1, 2]))) == Local([1, 2])
    finally:
        codec.unregister_type(Local)
    assert codec.mark_name(Local) not in codec.registered_types()
    assert codec.decode(codec.encode(Local([1]))) == {
        "_moobius_type": codec.mark_name(Local),
        "_moobius_val": {"v": [1]},
    }


def test_registered_types_is_a_copy():
    codec.registered_types()["x.Y"] = Point
    assert "x.Y" not in codec.registered_types()


@pytest.mark.parametrize(
    "stored",
    [
        {"x": 1},  # a field missing
        {"x": "one", "y": 2},  # a field of the wrong type
        ["not", "a", "dict"],
    ],
    ids=["missing-field", "wrong-type", "not-a-dict"],
)
def test_a_registered_mark_whose_value_does_not_fit_is_a_value_error(stored):
    # A value error is what the backends report as a corrupt value for that key.
    text = json.dumps({"_moobius_type": "support.Point", "_moobius_val": stored})
    with pytest.raises(ValueError, match=r"support\.Point"):
        codec.decode(text)


@pytest.mark.parametrize("text", ["", "{", '{"a": 1', "not json", "\x00\x01"])
def test_text_that_is_not_json_is_a_value_error(text):
    with pytest.raises(ValueError):
        codec.decode(text)


def test_decode_accepts_bytes():
    assert codec.decode('{"a": "ü"}'.encode()) == {"a": "ü"}


@pytest.mark.parametrize(
    "value",
    [
        {"_moobius_type": "builtins.set", "_moobius_val": [1, 1, 2]},
        {"_moobius_type": "NoneType", "_moobius_val": 5},
        {"_moobius_type": "builtins.dict", "_moobius_val": [["a", 1]]},
        {"_moobius_type": "os.system", "_moobius_val": "true"},
        {"outer": {"_moobius_type": "builtins.tuple", "_moobius_val": [1, 2]}},
    ],
)
def test_a_plain_dict_shaped_like_a_mark_reads_back_as_itself(value):
    decoded = codec.decode(codec.encode(value))
    assert decoded == value
    assert type(decoded) is dict


def test_an_unknown_mark_is_written_back_exactly_as_it_was_read():
    stored = '{"_moobius_type": "app.models.Profile", "_moobius_val": {"name": "Ann"}}'
    value = codec.decode(stored)
    assert value == {"_moobius_type": "app.models.Profile", "_moobius_val": {"name": "Ann"}}
    assert json.loads(codec.encode(value)) == json.loads(stored)


# -- documents stored verbatim, and the public object hook -------------------------------

MARKED = {"_moobius_type": "builtins.set", "_moobius_val": [1, 2]}
DOCUMENTS = [
    MARKED,
    {"tags": MARKED, "t": {"_moobius_type": "builtins.tuple", "_moobius_val": [1, "a"]}},
    {"_moobius_type": "nowhere.Thing", "_moobius_val": {"a": 1}},
    [1, "two", None, True, 2.5, {"x": []}],
    "text",
    0,
    None,
]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=range(len(DOCUMENTS)))
def test_a_document_is_written_exactly_as_given(doc):
    """No escaping of mark-shaped dicts: the document is already the stored form."""
    assert codec.to_json_shape(codec.Document(doc)) is doc
    assert codec.encode(codec.Document(doc)) == json.dumps(doc, separators=(",", ":"))
    assert codec.encode(codec.Document(doc), indent=2) == json.dumps(doc, indent=2)
    # Read back, its marks are revived as any stored value's are.
    assert_same(codec.decode(codec.encode(codec.Document(doc))), codec.decode(json.dumps(doc)))


def test_a_document_keeps_its_type_where_a_plain_dict_would_not():
    assert codec.decode(codec.encode(codec.Document(MARKED))) == {1, 2}
    assert codec.decode(codec.encode(MARKED)) == MARKED  # a plain dict is escaped: stays a dict


def test_a_document_inside_a_value_is_verbatim_too():
    value = {"copied": codec.Document(MARKED), "own": {3}}
    assert json.loads(codec.encode(value)) == {
        "copied": MARKED,
        "own": {"_moobius_type": "builtins.set", "_moobius_val": [3]},
    }


def test_a_document_that_is_not_json_is_unstorable():
    for doc in [float("nan"), {"a": float("inf")}, object()]:
        with pytest.raises(UnstorableValue):
            codec.encode(codec.Document(doc))


def test_a_file_form_made_ahead_is_written_and_goes_with_the_stored_form_it_was_made_of():
    body = b'{"hp":3,"tags":["a"]}'
    made = json.dumps({"hp": 3, "tags": ["a"]}, indent=2).encode()
    document = codec.stored_document(body)
    document.file_form = made
    assert codec.encode_bytes(document, indent=2) is made  # as made: not indented again
    assert codec.encode_bytes(document) is body
    document.keep_stored(body, "etag")  # the same stored form (the daemon's write path)
    assert document.file_form is made
    document.keep_stored(b'{"hp":4}')  # another stored form: the file form was of the old
    assert document.file_form is None
    assert codec.encode_bytes(document, indent=2) == b'{\n  "hp": 4\n}'
    for forget in (codec.Document.keep_only_stored, lambda d: d.keep_stored(None)):
        held = codec.stored_document(body)  # its bytes are all it holds, yet the form goes
        held.file_form = made
        forget(held)
        assert held.file_form is None and held.stored is body


def test_documents_compare_by_their_contents():
    assert codec.Document({"a": 1}) == codec.Document({"a": 1})
    assert codec.Document({"a": 1, "b": 2}) == codec.Document({"b": 2, "a": 1})
    assert codec.Document([1]) != codec.Document([True])  # as JSON: 1 is not true
    assert codec.Document([1]) != codec.Document([1.0])
    assert codec.Document(1) != 1
    assert repr(codec.Document([1])) == "Document([1])"


@pytest.mark.parametrize("kind", list(VALUES))
def test_revive_is_the_decoders_object_hook(kind):
    text = codec.encode(VALUES[kind])
    assert_same(json.loads(text, object_hook=codec.revive), codec.decode(text))


# -- marks of types nobody registered ------------------------------------------------


@pytest.fixture
def warnings_on():
    """Warnings about unregistered marks on, none given yet (an engine built by another
    test of this process turns them off: the daemon carries marks it never revives)."""
    codec.warn_unregistered(True)
    codec._warned.clear()
    yield
    codec._warned.clear()


def unregistered_warnings(events):
    return [e for e in events if e["event"] == "unregistered_type"]


def test_an_unregistered_dataclass_reads_back_opaque_with_one_warning_per_name(warnings_on):
    @dataclasses.dataclass
    class Profile:
        name: str

    text = codec.encode([Profile("a"), Profile("b")])  # written by a process that has it
    mark = codec.mark_name(Profile)
    with capture_logs() as events:
        first = codec.decode(text)
        again = codec.decode(text)
        codec.decode(json.dumps({"_moobius_type": "other.Thing", "_moobius_val": 1}))
    assert first == again == [{"_moobius_type": mark, "_moobius_val": {"name": n}} for n in "ab"]
    assert isinstance(first[0], codec.UnknownMark)
    warned = unregistered_warnings(events)
    # One per mark name (not per value, nor per read), naming the type and the cure.
    assert [e["mark"] for e in warned] == [mark, "other.Thing"]
    assert warned[0]["log_level"] == "warning"
    assert "chanstore.codec.register_type(Profile)" in warned[0]["message"]
    codec.register_type(Profile)
    try:
        with capture_logs() as events:
            assert codec.decode(text) == [Profile("a"), Profile("b")]
        assert unregistered_warnings(events) == []
    finally:
        codec.unregister_type(Profile)


def test_builtin_marks_and_plain_dicts_warn_of_nothing(warnings_on):
    with capture_logs() as events:
        assert codec.decode(codec.encode({"s": {1}, "t": (1,), "d": {"a": 1}})) == {
            "s": {1}, "t": (1,), "d": {"a": 1},
        }  # fmt: skip
    assert unregistered_warnings(events) == []


def test_stored_data_cannot_flood_the_log_with_mark_names(warnings_on):
    names = [f"random.Name{n}" for n in range(codec.MAX_WARNED_MARKS + 50)]
    text = json.dumps([{"_moobius_type": name, "_moobius_val": 1} for name in names])
    with capture_logs() as events:
        codec.decode(text)
        codec.decode(text)
    warned = unregistered_warnings(events)
    assert len(warned) == codec.MAX_WARNED_MARKS + 1  # each name once, then one "no more"
    assert "no more are reported" in warned[-1]["message"]
    assert len(codec._warned) == codec.MAX_WARNED_MARKS + 1


def test_a_process_that_carries_stored_forms_turns_the_warning_off(warnings_on):
    codec.warn_unregistered(False)
    try:
        with capture_logs() as events:
            codec.decode('{"_moobius_type": "app.Quiet", "_moobius_val": 1}')
        assert unregistered_warnings(events) == []
    finally:
        codec.warn_unregistered(True)
