"""JSON request bodies in, JSON response bodies out.

A value's body is stored as the JSON document it is (see
:class:`chanstore.codec.Document`), so any JSON value round-trips exactly and
a type-marked document keeps its type for in-process readers. Bodies that no
backend could store faithfully are refused with a 400 saying why: invalid
UTF-8 or JSON, NaN and infinities, numbers that overflow, nesting deeper
than :data:`MAX_JSON_DEPTH`. A value's body that is already its stored form is
proven so in C and kept as it came (:mod:`chanstore.stored_form`); one spelt
otherwise only in its whitespace and the escapes of its strings (what Python's
``json.dumps`` and JavaScript's ``JSON.stringify`` send) is re-spelt into it in
C and proven so; any other body is parsed once, by the codec's C parser
(orjson; the stdlib where orjson would differ, and to word what is wrong).

A large value's body is made ready beside the event loop instead
(:mod:`chanstore.http.beside`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from chanstore import codec
from chanstore.codec import Document
from chanstore.http.errors import HttpError

__all__ = [
    "MAX_JSON_DEPTH",
    "json_body",
    "parse_json",
    "parse_value",
    "parsed_value",
]

T = TypeVar("T")

#: Nesting deeper than this is refused: no chat state needs it, and it would
#: only exhaust recursion further down.
MAX_JSON_DEPTH = 64


def parse_json(body: bytes, what: str = "the body") -> Any:
    """``body`` as JSON; 400 saying why when it is not."""
    value = _parsed(codec.parse, body, what)
    _check_depth(value, body, what)
    return value


def parse_value(body: bytes, what: str = "the body") -> Document:
    """A value to store: the JSON document ``body`` holds, kept as it is, with its stored
    form made once (``body`` itself when it is that form already).

    A body proven to be that form (what chanstore's clients send), or proven so once
    re-spelt (see :func:`chanstore.stored_form.stored_text`), is not parsed at all: it is
    kept as those bytes, which is what GET answers and the backend stores."""
    document = codec.proven_document(body, MAX_JSON_DEPTH)
    return parsed_value(body, what) if document is None else document


def parsed_value(body: bytes, what: str = "the body") -> Document:
    """:func:`parse_value` of a body not proven its stored form: parsed, and checked."""
    document = _parsed(codec.parse_document, body, what)
    _check_depth(document.doc, body, what)
    return document


def _parsed(parse: Callable[[bytes], T], body: bytes, what: str) -> T:
    try:
        return parse(body)
    except UnicodeDecodeError as exc:
        raise HttpError(400, f"{what} is not UTF-8: byte {exc.start} is invalid") from None
    except json.JSONDecodeError as exc:
        if not body.decode("utf-8").strip():
            raise HttpError(400, f"{what} is empty; expected a JSON value") from None
        raise HttpError(400, f"{what} is not valid JSON: line {exc.lineno} column "
                             f"{exc.colno}: {exc.msg}") from None  # fmt: skip
    except ValueError as exc:
        raise HttpError(400, f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise HttpError(400, f"{what} is nested too deeply") from None


#: Bodies up to this size are first counted for brackets; a larger one is checked at once,
#: which costs less than counting it (and chat state that large holds many brackets).
_COUNTED = 64 * 1024


def _check_depth(value: Any, body: bytes, what: str) -> None:
    # Every level of nesting opens with a bracket, so a text with few brackets
    # (the usual case) cannot be too deep and need not be walked.
    if len(body) <= _COUNTED and body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return
    if _may_be_too_deep(value) and _depth_exceeds(value, MAX_JSON_DEPTH):
        raise HttpError(400, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")


#: In the indented form a container nested deeper than the limit starts a line
#: indented by two spaces per level above it, and nothing else does (strings
#: hold no raw newline): its absence is proof, in C, without a walk in Python.
_TOO_DEEP_LINE = b"\n" + b"  " * MAX_JSON_DEPTH


def _may_be_too_deep(value: Any) -> bool:
    try:
        return _TOO_DEEP_LINE in orjson.dumps(value, option=orjson.OPT_INDENT_2)
    except TypeError:  # what orjson does not write (integers beyond 64 bits): walked
        return True


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def json_body(value: Any) -> bytes:
    """``value`` as a compact UTF-8 JSON body."""
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits, lone surrogates: as the stdlib words them
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
