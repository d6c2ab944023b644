"""The little HTTP this daemon needs, on bare ASGI: requests, bodies, JSON answers.

No framework: the routes are few and fixed, and a framework's per-request
work would cost more than the cached read it wraps.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

__all__ = [
    "HttpError",
    "Request",
    "json_body",
    "parse_json",
    "read_body",
    "send_response",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON_TYPE = b"application/json"
#: Nesting deeper than this is refused: no chat state needs it, and it would
#: only exhaust recursion further down.
MAX_JSON_DEPTH = 64
#: Seconds a client may take to send its whole body.
BODY_TIMEOUT = 10.0


_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "no_route",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "body_too_large",
    500: "internal",
    503: "backend_unavailable",
}


class HttpError(Exception):
    """An answer other than success: status, message, a machine-readable code, headers."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")
        self.headers = headers or []

    def body(self) -> bytes:
        """The JSON error body: ``{"error": message, "code": code}``."""
        return json_body({"error": self.message, "code": self.code})


class ClientGone(Exception):
    """The client disconnected before its request was read."""


class Request:
    """One HTTP request: method, decoded path segments, and lazy access to the rest."""

    __slots__ = ("_headers", "method", "receive", "request_id", "scope", "segments")

    def __init__(self, scope: Scope, receive: Receive, segments: list[str]) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.segments = segments
        self.request_id = ""
        self._headers: dict[bytes, bytes] | None = None

    def header(self, name: bytes) -> bytes | None:
        if self._headers is None:
            self._headers = {k.lower(): v for k, v in self.scope["headers"]}
        return self._headers.get(name)

    def query(self) -> dict[str, str]:
        from urllib.parse import parse_qsl  # noqa: PLC0415 - rarely needed

        raw = self.scope.get("query_string", b"").decode("latin-1")
        return dict(parse_qsl(raw, keep_blank_values=True))


def split_path(raw_path: bytes) -> list[str]:
    """The path's segments, each percent-decoded exactly once, as UTF-8 text."""
    try:
        if b"%" not in raw_path:
            # Nothing to decode (the usual case): one decode and one split. "/" is
            # ASCII, so splitting before or after decoding UTF-8 is the same.
            return raw_path.decode("utf-8").split("/")[1:]
        return [unquote_to_bytes(part).decode("utf-8") for part in raw_path.split(b"/")[1:]]
    except UnicodeDecodeError:
        raise HttpError(400, "the path is not valid UTF-8 once percent-decoded") from None


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body; 413 past ``limit`` bytes, 408 if it takes too long."""
    length = request.header(b"content-length")
    if length is not None:
        if not length.isdigit():
            raise HttpError(400, "Content-Length is not a number")
        if int(length) > limit:
            raise HttpError(413, f"the body is {int(length)} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    more = True
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            while more:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise HttpError(413, f"the body is over the limit of {limit} bytes")
                chunks.append(chunk)
                more = message.get("more_body", False)
    except TimeoutError:
        raise HttpError(408, f"the body did not arrive within {BODY_TIMEOUT:g}s") from None
    return b"".join(chunks)


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
    """``body`` as JSON; 400 saying why when it is not (NaN, deep nesting included)."""
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
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = JSON_TYPE,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    all_headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
    ]
    if headers:
        all_headers.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})
