"""Values to type-marked JSON and back, in the original SDK's format.

JSON carries dicts, lists, strings, numbers, booleans and null. Anything else
chanstore stores is written as a *type mark*::

    {"_moobius_type": "<module.Class>", "_moobius_val": <JSON>}

exactly as the original SDK wrote dataclasses, so data moves between the two:
sets and tuples are marked ``builtins.set`` and ``builtins.tuple`` (which the
original revives with its generic constructor), and a dataclass is marked with
its module and class name, its value being :func:`dataclasses.asdict` of it.

Reviving a mark never looks a name up in the interpreter: only the builtins
above and the classes an application has :func:`register_type`-ed are revived.
The original revived *any* importable name (``pydoc.locate``), so stored data
could make it call an arbitrary function. A mark chanstore does not know is
left as the plain dict it is, so nothing is lost when the value is written back;
the first time each such name is met, a warning says so and how to register
the class (an application that forgot ``register_type`` would otherwise get a
dict where it expects its dataclass, and no word why). Processes that only
carry values in their stored form, such as the daemon, turn the warning off
with :func:`warn_unregistered`.

A value that arrives already in the stored form (an HTTP body) is wrapped in a
:class:`Document` and written exactly as it is; :func:`revive` is the object
hook that decodes, for callers that build a decoder of their own.

JSON is parsed and written by orjson (a C library, 3-4 times the stdlib's
speed on large values; ``bench/json_libraries.py``), and the text is byte for
byte what the stdlib's ``json`` wrote (ASCII, ``\\uXXXX`` escapes, ``repr``
floats), so ETags, files and the original SDK's reading are unchanged. Where
orjson would differ (integers beyond 64 bits, which it parses as floats; floats
in [1e-9, 1e-4), which it writes unlike ``repr``; lone surrogates; NaN, which
it writes as null) the stdlib does the work, as it always did.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import dacite
import orjson

from chanstore import json_shape, logs, stored_form
from chanstore.errors import UnstorableValue

__all__ = [
    "TYPE_KEY",
    "VALUE_KEY",
    "Document",
    "UnknownMark",
    "decode",
    "encode",
    "encode_bytes",
    "mark_name",
    "parse",
    "parse_document",
    "proven_document",
    "register_type",
    "registered_types",
    "stored_document",
    "to_json_shape",
    "unregister_type",
    "warn_unregistered",
]

TYPE_KEY = "_moobius_type"
VALUE_KEY = "_moobius_val"

T = TypeVar("T", bound=type)

_registry: dict[str, type] = {}
# The mark each registered class is written with: the name it was registered
# under, so that what is written reads back as the same class.
_marks: dict[type, str] = {}
_registry_lock = threading.Lock()
_DACITE_CONFIG = dacite.Config(cast=[tuple, set, frozenset], strict=False)

#: How many distinct unregistered mark names are warned about, each once: the
#: names come from stored data, which must not be able to grow memory or flood the log.
MAX_WARNED_MARKS = 256
_warned: set[str] = set()
_warn = True

# Marks the original SDK (or chanstore) wrote for builtins, revived without
# consulting the registry: they are containers of already-decoded JSON.
_BUILTIN_REVIVERS: dict[str, Callable[[Any], Any]] = {
    "builtins.set": lambda value: set(map(_hashable, value)),
    "builtins.frozenset": lambda value: frozenset(map(_hashable, value)),
    "builtins.tuple": tuple,
    "NoneType": lambda _value: None,
    # A plain dict that happens to look like a mark, stored as its items.
    "builtins.dict": lambda value: dict(map(tuple, value)),
}


class UnknownMark(dict):  # type: ignore[type-arg]
    """A type mark nothing here revives: read as the plain dict it is.

    It is written back exactly as it was read (a plain dict shaped like a
    mark would be escaped instead), so data that names a class this
    application does not know survives a round trip through chanstore.
    """


#: What a :class:`Document` kept as its stored bytes alone holds in place of the document.
_UNPARSED: Any = object()


class Document:
    """A JSON document to store verbatim: it is already the stored, type-marked form.

    ``Document(doc)`` where ``doc`` came from a JSON parser (dicts with str
    keys, lists, str, int, float, bool, None). :func:`to_json_shape` gives
    ``doc`` back unchanged: a dict in it shaped like a type mark *is* a mark
    and is not escaped as a plain dict would be, so a value copied over HTTP
    reads back with its type (a set stays a set).
    """

    __slots__ = ("_doc", "etag", "file_form", "parsed", "stored")

    def __init__(self, doc: Any, *, parsed: bool = False) -> None:
        self._doc = doc
        #: Its compact stored form when the writer made it already, so that
        #: :func:`encode` does not make it again (the daemon makes it once per write).
        self.stored: bytes | str | None = None
        #: The ETag of :attr:`stored`, when the writer computed it (see
        #: :func:`chanstore.versions.stored_with_etag`); set and cleared with it.
        self.etag: str | None = None
        #: True when ``doc`` came from a parser that refuses NaN and infinities
        #: (:func:`parse`): its floats need no check when it is written.
        self.parsed = parsed
        #: :attr:`stored` indented by 2 (the original's file form), when the writer made
        #: it ahead of a write to a backend that writes it (the daemon makes it beside the
        #: event loop, so that the write lane does not); dropped with the stored form it
        #: was made of, and once written (:meth:`keep_only_stored`, ``keep_stored(None)``).
        self.file_form: bytes | None = None

    @property
    def doc(self) -> Any:
        """The document; parsed again from :attr:`stored` if it was kept as that alone
        (:meth:`keep_only_stored`)."""
        doc = self._doc
        if doc is _UNPARSED:
            doc = self._doc = parse(_as_bytes(self.stored))  # type: ignore[arg-type]
        return doc

    def keep_stored(self, stored: bytes | None, etag: str | None = None) -> None:
        """Keep ``stored`` (and its ETag) as this document's stored form, or forget it (None;
        not when the stored form is all this document holds). The file form goes unless
        ``stored`` is the stored form it was made of."""
        if stored is not self.stored:
            self.file_form = None  # it was made of the stored form kept till now
        if stored is None and self._doc is _UNPARSED:
            return
        self.stored = stored
        self.etag = etag if stored is not None else None

    def keep_only_stored(self) -> None:
        """Hold this document as its stored bytes alone, parsed again only if it is asked
        for as a document: a large value's parsed form takes 2.5 times its bytes, and
        the daemon, which answers the bytes, rarely needs it. A file form made for its
        write is dropped too."""
        self.file_form = None
        if self.stored is not None:
            self._doc = _UNPARSED

    def __eq__(self, other: object) -> bool:
        # As JSON: 1 and true (or 1 and 1.0) are different documents, key order is not.
        if not isinstance(other, Document):
            return NotImplemented
        return _canonical(self.doc) == _canonical(other.doc)

    __hash__ = None  # type: ignore[assignment] - a document is mutable

    def __repr__(self) -> str:
        return f"Document({self.doc!r})"


def _canonical(doc: Any) -> Any:
    try:
        return json.dumps(doc, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError):
        return doc  # not JSON: compared as it is


def mark_name(cls: type) -> str:
    """The type mark the original SDK writes for instances of ``cls``."""
    return f"{cls.__module__}.{cls.__name__}"


def register_type(cls: T | None = None, *, name: str | None = None) -> Any:
    """Allow values marked with ``cls``'s name to be revived as ``cls``.

    Use it as a decorator (``@register_type``) or call it
    (``register_type(Profile)``). ``name`` overrides the mark, for data written
    when the class lived in another module: instances are then written with it
    too, so that they read back as ``cls``. Only dataclasses and classes whose
    constructor takes the marked JSON value are sensible here.
    """

    def register(target: T) -> T:
        mark = name or mark_name(target)
        with _registry_lock:
            _registry[mark] = target
            _marks[target] = mark
        return target

    return register(cls) if cls is not None else register


def unregister_type(cls_or_name: type | str) -> None:
    """Forget a registration made with :func:`register_type`."""
    with _registry_lock:
        if isinstance(cls_or_name, str):
            names = [cls_or_name]
        else:
            names = [name for name, cls in _registry.items() if cls is cls_or_name]
        for name in names:
            cls = _registry.pop(name, None)
            if cls is not None and _marks.get(cls) == name:
                del _marks[cls]


def warn_unregistered(enabled: bool) -> None:
    """Whether reading a mark of an unregistered type logs a warning (the default: yes).

    A process that serves values in their stored form and never revives an
    application's classes (the daemon) turns it off: there, such a mark is
    expected, not a forgotten :func:`register_type`.
    """
    global _warn  # noqa: PLW0603 - process-wide, like the registry itself
    _warn = enabled


def _unregistered(name: str) -> None:
    """Warn, once per name, that values marked ``name`` read back as opaque marks."""
    if not _warn or name in _warned:
        return
    with _registry_lock:
        if name in _warned or len(_warned) > MAX_WARNED_MARKS:
            return
        _warned.add(name)
        last = len(_warned) > MAX_WARNED_MARKS
    if last:
        logs.get_logger().warning(
            "unregistered_type", mark=name, limit=MAX_WARNED_MARKS,
            message="more than this many unregistered type names were read; no more are "
            "reported in this process",
        )  # fmt: skip
        return
    cls_name = name.rpartition(".")[2] or name
    logs.get_logger().warning(
        "unregistered_type", mark=name,
        message=f"values marked {name!r} read back as opaque chanstore.codec.UnknownMark "
        f"dicts, because no class is registered under that name: call "
        f"chanstore.codec.register_type({cls_name}) (or register_type(cls, name={name!r}) "
        "if the class moved) before reading them",
    )  # fmt: skip


def registered_types() -> dict[str, type]:
    """A copy of the registry: mark name to class."""
    with _registry_lock:
        return dict(_registry)


def to_json_shape(value: Any) -> Any:
    """``value`` with every non-JSON part replaced by its type mark: ``value`` itself
    where it holds none (proven in C by :func:`chanstore.json_shape.plain`), else a copy.

    Raises :class:`UnstorableValue` for what JSON cannot hold faithfully: a
    non-string dict key (JSON would silently turn ``1`` into ``"1"``), NaN or
    an infinity, an object that is not a dataclass, or a value that contains
    itself (or nests deeper than the interpreter's recursion limit).
    """
    if json_shape.plain(value, TYPE_KEY, VALUE_KEY):
        return value
    try:
        return _shape(value)
    except RecursionError:
        # A caller's mistake like the others, not a failure of the backend's.
        raise UnstorableValue(
            "the value cannot be stored: it contains itself, or nests deeper than "
            f"{sys.getrecursionlimit()} levels"
        ) from None


def _shape(value: Any) -> Any:
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise UnstorableValue(f"{value!r} cannot be stored: JSON has no NaN or infinity")
        return value
    if kind is Document:
        return value.doc
    if kind is dict:
        if len(value) == 2 and TYPE_KEY in value and VALUE_KEY in value:
            # A plain dict shaped like a mark would be revived as one: store it
            # as its items, so it reads back as the dict it is.
            items = [[key, _shape(item)] for key, item in value.items()]
            return {TYPE_KEY: "builtins.dict", VALUE_KEY: items}
        return {_checked_key(k): _shape(v) for k, v in value.items()}
    if kind is UnknownMark:
        return {key: _shape(item) for key, item in value.items()}
    if kind is list:
        return [_shape(item) for item in value]
    if kind is tuple:
        return {TYPE_KEY: "builtins.tuple", VALUE_KEY: [_shape(i) for i in value]}
    if kind is set or kind is frozenset:
        items = [_shape(item) for item in value]
        return {TYPE_KEY: f"builtins.{kind.__name__}", VALUE_KEY: items}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = _shape(dataclasses.asdict(value))
        return {TYPE_KEY: _marks.get(kind) or mark_name(kind), VALUE_KEY: fields}
    # Subclasses of the JSON types (IntEnum, OrderedDict, ...) are stored as their base.
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return _shape(base(value))
    if isinstance(value, dict):
        return _shape(dict(value))
    if isinstance(value, list):
        return _shape(list(value))
    raise UnstorableValue(
        f"a value of type {kind.__qualname__} cannot be stored: expected JSON types "
        "(dict, list, str, int, float, bool, None), a set, a tuple or a dataclass"
    )


def encode(value: Any, *, indent: int | None = None) -> str:
    """``value`` as type-marked JSON text (``indent=2`` is the original's file form)."""
    return encode_bytes(value, indent=indent).decode("ascii")


def encode_bytes(value: Any, *, indent: int | None = None) -> bytes:
    """:func:`encode` as the ASCII bytes that are stored (and hashed for the ETag)."""
    if value.__class__ is Document and value.stored is not None:
        stored = value.stored
        stored = stored if stored.__class__ is bytes else stored.encode("ascii")  # type: ignore[union-attr]
        if indent is None:
            return stored  # type: ignore[return-value]
        if indent == 2 and value.file_form is not None:  # made ahead of the write
            return value.file_form
        if indent == 2 and stored_form.COMPILED:  # the file form, re-spaced in C
            return stored_form.indented(stored)  # type: ignore[arg-type]
    shaped = to_json_shape(value)
    # The floats of a shaped value were checked; a Document's were only if it was parsed.
    checked = value.__class__ is not Document or value.parsed
    out = _fast_dumps(shaped, indent, checked)
    if out is not None:
        return out
    try:
        if indent is None:
            text = json.dumps(shaped, separators=(",", ":"), allow_nan=False)
        else:
            text = json.dumps(shaped, indent=indent, allow_nan=False)
    except (TypeError, ValueError) as exc:  # only a Document's contents are not checked above
        raise UnstorableValue(f"the value cannot be stored as JSON: {exc}") from exc
    return text.encode("ascii")


def _fast_dumps(shaped: Any, indent: int | None, checked: bool) -> bytes | None:
    """``shaped`` as the stdlib writes it (ASCII), by orjson; None where only the stdlib can."""
    if indent is None:
        option = 0
    elif indent == 2:
        option = orjson.OPT_INDENT_2
    else:
        return None
    try:
        out = orjson.dumps(shaped, option=option)
    except TypeError:  # integers beyond 64 bits, lone surrogates, keys or types it refuses
        return None
    if not checked and b"null" in out:
        return None  # perhaps a NaN or an infinity, which orjson writes as null
    if (b"0.0000" in out and _repr_differs(out)) or _may_hold_short_exponent(out):
        return None
    if not out.isascii() or b"\x7f" in out:
        return _escaped_as_stdlib(out, indent)
    return out


def _escaped_as_stdlib(out: bytes, indent: int | None) -> bytes:
    """orjson's ``out`` with its non-ASCII characters and DEL (which orjson writes as they
    are, and never outside a string) escaped as the stdlib escapes them.

    In C where the extension is built (:func:`chanstore.stored_form.compacted`, which
    also takes out an indented form's whitespace: that form is then re-spaced in C), at
    about a microsecond per kilobyte; a codec error handler called for every run of
    such characters cost 2.3 ms for 100 KB of chat text that is not all ASCII."""
    if stored_form.COMPILED:
        escaped = stored_form.compacted(out)  # None only if it refused orjson's text: never
        if escaped is not None:
            return escaped if indent is None else stored_form.indented(escaped)
    if not out.isascii():
        out = out.decode("utf-8").encode("ascii", _ESCAPE_ERRORS)
    return out.replace(b"\x7f", b"\\u007f")


#: orjson writes floats from 1e-5 to 1e-4 as 0.0000ddd and smaller ones with a
#: one-digit exponent (1e-7); ``repr``, and so the stdlib, writes 1e-05 and 1e-07.
_SHORT_EXPONENT = re.compile(rb"e-[1-9](?![0-9])").search


def _may_hold_short_exponent(out: bytes) -> bool:
    # A negative exponent needs a '-': a one-byte search (memchr) rules out most values
    # in microseconds, where searching for b"e-" takes 0.7 ms for 900 KB of text.
    return b"-" in out and b"e-" in out and _SHORT_EXPONENT(out) is not None


_DIGITS = frozenset(b"0123456789")


def _repr_differs(out: bytes) -> bool:
    """Whether ``out`` may hold a float orjson wrote as 0.0000ddd (``repr``: d.dde-05);
    a match inside a string only sends the value to the stdlib."""
    at = out.find(b"0.0000")
    while at != -1:
        if at == 0 or out[at - 1] not in _DIGITS:
            return True
        at = out.find(b"0.0000", at + 6)
    return False


def _escaped(error: UnicodeError) -> tuple[str, int]:
    """The codec error handler that escapes non-ASCII text as ``json.dumps`` does."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    parts = []
    for char in error.object[error.start : error.end]:
        code = ord(char)
        if code < 0x10000:
            parts.append(f"\\u{code:04x}")
        else:
            code -= 0x10000
            parts.append(f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}")
    return "".join(parts), error.end


_ESCAPE_ERRORS = "chanstore.json_escape"
codecs.register_error(_ESCAPE_ERRORS, _escaped)


def decode(text: str | bytes, *, revive: bool = True) -> Any:
    """The value that :func:`encode` (or the original SDK) wrote as ``text``.

    With ``revive=False``, the stored document itself, as a :class:`Document`
    (type marks left as they are), for callers that carry values in their
    stored form. Raises :class:`ValueError` when ``text`` is not JSON
    (``json.JSONDecodeError``) or holds a registered type's mark whose value
    does not fit that type.
    """
    data = _as_bytes(text)
    if data is not None:
        doc = _fast_loads(data)
        if doc is not _SLOW:
            if not revive:
                return Document(doc, parsed=True)
            if not json_shape.may_name(data, _MARK):
                return doc
            try:
                return _revive_all(doc)
            except RecursionError:
                pass  # deeper than Python recurses here: the stdlib's decoder reads it
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8")  # a UnicodeDecodeError is a ValueError too
    if not revive:
        return Document(_PLAIN_DECODER.decode(text))
    # One decoder for every call: json.loads with a hook builds a new one each time.
    return _DECODER.decode(text)


def parse(data: bytes) -> Any:
    """``data`` as strict JSON: NaN, infinities and numbers that overflow are refused.

    Raises ``UnicodeDecodeError``, ``json.JSONDecodeError`` (saying where),
    another ``ValueError`` (saying why) or ``RecursionError``, as the stdlib's
    parser does; what orjson parses exactly is parsed by orjson.
    """
    doc = _fast_loads(data)
    if doc is not _SLOW:
        return doc
    return _STRICT_DECODER.decode(data.decode("utf-8"))


def parse_document(data: bytes) -> Document:
    """``data`` parsed as :func:`parse` does, as a :class:`Document` that holds its stored form.

    The stored form is made here, once. When it is ``data`` itself (compact,
    ASCII, every number and escape as the stdlib writes them: what chanstore's
    clients send), the document keeps ``data`` and the scan for integers that
    orjson reads inexactly is skipped: such an integer would have been written
    back otherwise.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        return _holding_stored(parse(data), data)  # the stdlib reads it, or says what is wrong
    stored = _fast_dumps(doc, None, True)
    if stored != data and json_shape.long_integer(data):
        return _holding_stored(parse(data), data)
    return _holding_stored(doc, data, stored)


def proven_document(data: bytes, max_depth: int) -> Document | None:
    """``data``'s document held as its stored bytes alone, when they are had without
    parsing it (:func:`chanstore.stored_form.stored_text`: ``data`` itself, or ``data``
    re-spelt) and it nests no deeper than ``max_depth``; None when they are not, and
    :func:`parse_document` then says what it is."""
    stored = stored_form.stored_text(data, max_depth)
    return None if stored is None else stored_document(stored)


def stored_document(data: bytes) -> Document:
    """A Document held as ``data`` alone, unparsed until its document is asked for: ``data``
    must be proven a stored form (:func:`chanstore.stored_form.proves`)."""
    document = Document(_UNPARSED, parsed=True)
    document.stored = data
    return document


def _holding_stored(doc: Any, data: bytes, stored: bytes | None = None) -> Document:
    """``doc``, parsed from ``data``, as a Document holding its stored form (``data`` itself
    when that is it); ``stored``: that form, when orjson could write it."""
    document = Document(doc, parsed=True)
    if stored is None:
        stored = encode_bytes(document)  # what only the stdlib writes
    document.stored = data if stored == data else stored
    return document


_SLOW = object()
_MARK = TYPE_KEY.encode()


def _as_bytes(text: str | bytes) -> bytes | None:
    if text.__class__ is bytes:
        return text  # type: ignore[return-value]
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return None  # lone surrogates: only the stdlib reads their escapes back
    return bytes(text)


def _fast_loads(data: bytes) -> Any:
    """``data`` parsed by orjson, or ``_SLOW`` where the stdlib must parse it (it decides
    what an error is, and reads what orjson refuses or would read inexactly)."""
    if json_shape.long_integer(data):
        return _SLOW
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return _SLOW


def _revive_all(node: Any) -> Any:
    """What the decoder with :func:`revive` as its object hook makes: innermost first."""
    if node.__class__ is dict:
        for key, item in node.items():
            if item.__class__ is dict or item.__class__ is list:
                node[key] = _revive_all(item)
        return revive(node)
    for index, item in enumerate(node):
        if item.__class__ is dict or item.__class__ is list:
            node[index] = _revive_all(item)
    return node


def _checked_key(key: Any) -> str:
    if type(key) is str:
        return key
    raise UnstorableValue(
        f"dict key {key!r} ({type(key).__name__}) cannot be stored: JSON object keys "
        "must be str, and converting it would change the value that reads back"
    )


def _hashable(item: Any) -> Any:
    # Members of a set came back from JSON; lists among them were tuples.
    return tuple(_hashable(i) for i in item) if isinstance(item, list) else item


def revive(obj: dict[str, Any]) -> Any:
    """The object hook that revives type marks: ``json.loads(text, object_hook=revive)``.

    JSON decoders call it innermost first, so marks nest. Only the builtins
    and registered types are revived; any other mark stays an :class:`UnknownMark`.
    """
    if len(obj) != 2 or TYPE_KEY not in obj or VALUE_KEY not in obj:
        return obj
    name, value = obj[TYPE_KEY], obj[VALUE_KEY]
    if not isinstance(name, str):
        return obj
    builtin = _BUILTIN_REVIVERS.get(name)
    if builtin is not None:
        try:
            return builtin(value)
        except (TypeError, ValueError):
            return UnknownMark(obj)
    cls = _registry.get(name)
    if cls is None:
        if name not in _warned:
            _unregistered(name)
        return UnknownMark(obj)
    # A value that does not fit its class is a corrupt value (a ValueError, as
    # for text that is not JSON), not a crash of whatever is reading it.
    try:
        if dataclasses.is_dataclass(cls) and isinstance(value, dict):
            return dacite.from_dict(data_class=cls, data=value, config=_DACITE_CONFIG)
        return cls(value)
    except (dacite.DaciteError, TypeError, ValueError) as exc:
        raise ValueError(f"a {name} value does not fit the registered class: {exc}") from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e999 is valid JSON grammar but overflows to infinity, which no backend can store.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


_DECODER = json.JSONDecoder(object_hook=revive)
_PLAIN_DECODER = json.JSONDecoder()
_STRICT_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
