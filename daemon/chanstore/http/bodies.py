"""JSON request bodies in, JSON response bodies out.

A value's body is stored as the JSON document it is (see
:class:`chanstore.codec.Document`), so any JSON value round-trips exactly and
a type-marked document keeps its type for in-process readers. Bodies that no
backend could store faithfully are refused with a 400 saying why: invalid
UTF-8 or JSON, NaN and infinities, numbers that overflow, nesting deeper
than :data:`MAX_JSON_DEPTH`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from chanstore.codec import Document
from chanstore.http.errors import HttpError

__all__ = ["MAX_JSON_DEPTH", "json_body", "parse_json", "parse_value"]

#: Nesting deeper than this is refused: no chat state needs it, and it would
#: only exhaust recursion further down.
MAX_JSON_DEPTH = 64


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # 1e999 is valid JSON grammar but overflows to infinity, which no backend can store.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


# One decoder for every request: json.loads with options builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def parse_json(body: bytes, what: str = "the body") -> Any:
    """``body`` as JSON; 400 saying why when it is not."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HttpError(400, f"{what} is not UTF-8: byte {exc.start} is invalid") from None
    if not text.strip():
        raise HttpError(400, f"{what} is empty; expected a JSON value")
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise HttpError(400, f"{what} is not valid JSON: line {exc.lineno} column "
                             f"{exc.colno}: {exc.msg}") from None  # fmt: skip
    except ValueError as exc:
        raise HttpError(400, f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise HttpError(400, f"{what} is nested too deeply") from None
    # Every level of nesting opens with a bracket, so a text with few brackets
    # (the usual case) cannot be too deep and need not be walked.
    brackets = text.count("[") + text.count("{")
    if brackets > MAX_JSON_DEPTH and _depth_exceeds(value, MAX_JSON_DEPTH):
        raise HttpError(400, f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def parse_value(body: bytes, what: str = "the body") -> Document:
    """A value to store: the JSON document ``body`` holds, kept as it is."""
    return Document(parse_json(body, what))


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
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
