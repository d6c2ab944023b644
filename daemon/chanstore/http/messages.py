"""Requests and responses as the API sees them: plain objects, no I/O.

The connection protocol (:mod:`chanstore.http.protocol`) fills in a
:class:`Request` as the parser reads it and writes each :class:`Response`
with one system call; handlers see neither sockets nor parsers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote_to_bytes

from chanstore.http.errors import HttpError

__all__ = ["JSON_TYPE", "Request", "Response", "Streamed", "split_target"]

JSON_TYPE = b"application/json"
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_UNSEEN: Any = object()
_OK_JSON = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"


class Request:
    """One HTTP request: method, raw path and query, headers, the whole body."""

    __slots__ = ("_given_id", "_segments", "body", "headers", "keep_alive", "method", "path",
                 "query", "request_id", "started", "version")  # fmt: skip

    def __init__(self, method: str, path: bytes, query: bytes = b"",  # noqa: PLR0917
                 headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"",
                 keep_alive: bool = True, started: float = 0.0) -> None:  # fmt: skip
        self.method = method
        self.path = path
        self.query = query
        #: Header names are lower case; values have no surrounding white space.
        self.headers = headers if headers is not None else []
        self.body = body
        self.keep_alive = keep_alive
        self.started = started
        self.request_id = ""
        self._given_id: Any = _UNSEEN
        #: The HTTP version, as the parser says it ("1.1", "1.0").
        self.version = "1.1"
        self._segments: list[str] | None = None

    @property
    def given_id(self) -> bytes | None:
        """The client's ``X-Request-Id``, if it sent one."""
        if self._given_id is _UNSEEN:
            self._given_id = self.header(b"x-request-id")
        return self._given_id

    @given_id.setter
    def given_id(self, value: bytes | None) -> None:
        # The connection notes it while parsing, sparing a search of the headers.
        self._given_id = value

    def header(self, name: bytes) -> bytes | None:
        """The value of header ``name`` (lower case); None when absent."""
        for header, value in self.headers:
            if header == name:
                return value
        return None

    @property
    def segments(self) -> list[str]:
        """The path's segments, each percent-decoded exactly once, as UTF-8 text."""
        if self._segments is None:
            self._segments = split_path(self.path)
        return self._segments

    def query_params(self) -> dict[str, str]:
        """The query's parameters (the last of each name), percent-decoded."""
        try:
            text = self.query.decode("utf-8")
            return dict(parse_qsl(text, keep_blank_values=True, errors="strict"))
        except UnicodeDecodeError:
            raise HttpError(400, "the query is not valid UTF-8 once percent-decoded") from None


#: The scheme and authority that begin a request target in absolute form.
_SCHEME_AND_AUTHORITY = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """The path and query of a request target (the URL of the request line).

    The absolute form (``http://host/path?query``, what a client sends to a
    proxy, and which RFC 9112 has every server accept) is read as its path
    and query; a fragment, which no client should send, is dropped. Any
    other form (``*``, ``host:port``) is left as it is, for :func:`split_path`
    to refuse."""
    if target[:1] != b"/" and (found := _SCHEME_AND_AUTHORITY.match(target)):
        target = target[found.end() :]
        if target[:1] != b"/":
            target = b"/" + target
    if b"#" in target:
        target = target.partition(b"#")[0]
    path, _, query = target.partition(b"?")
    return path, query


def split_path(path: bytes) -> list[str]:
    """``path``'s segments, each percent-decoded exactly once, as UTF-8 text; 400 for
    a request target that is not a path (``OPTIONS *``)."""
    if path[:1] != b"/":
        shown = path[:100].decode("latin-1")
        raise HttpError(400, f"the request target {shown!r} is not a path; expected a path "
                             "that starts with / or an absolute http:// URL")  # fmt: skip
    try:
        if b"%" not in path:
            # Nothing to decode (the usual case): "/" is ASCII, so splitting before
            # or after decoding UTF-8 is the same.
            return path.decode("utf-8").split("/")[1:]
        return [unquote_to_bytes(part).decode("utf-8") for part in path.split(b"/")[1:]]
    except UnicodeDecodeError:
        raise HttpError(400, "the path is not valid UTF-8 once percent-decoded") from None


class Response:
    """An answer: status, body, content type, the value's ETag and any extra headers."""

    __slots__ = ("body", "content_type", "etag", "headers", "status")

    def __init__(self, status: int, body: bytes, content_type: bytes = JSON_TYPE,
                 headers: list[tuple[bytes, bytes]] | None = None,
                 etag: str | None = None) -> None:  # fmt: skip
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.etag = etag

    @classmethod
    def of_error(cls, error: HttpError) -> Response:
        return cls(error.status, error.body(), JSON_TYPE, error.headers or None)

    def encode(self, request_id: str, *, keep_alive: bool = True, head: bool = False) -> bytes:
        """The whole response as bytes, to be written with one call; ``head``: no body."""
        body = self.body
        if self.status == 200 and self.content_type is JSON_TYPE and self.headers is None:
            start = _OK_JSON % len(body)
        else:
            reason = _REASONS.get(self.status, b"Unknown")
            start = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n" % (
                self.status, reason, self.content_type, len(body))  # fmt: skip
            if self.headers:
                start += b"".join(b"%s: %s\r\n" % header for header in self.headers)
        if self.etag is not None:
            start += b'etag: "%s"\r\n' % self.etag.encode()
        if not keep_alive:
            start += b"connection: close\r\n"
        end = b"\r\n" if head else b"\r\n" + body
        return b"%sx-request-id: %s\r\n%s" % (start, request_id.encode(), end)


class Streamed(Protocol):
    """An answer written as it comes (the change feed): its head, then chunks, until it ends.

    The connection writes :meth:`opening` after the head, then whatever
    :meth:`take` gives while the socket takes it (``on_more`` wakes it when
    there is more), a :meth:`heartbeat` when the stream has been quiet, and
    :meth:`closing` once :attr:`ended` says why it ends. :meth:`writable` tells it
    when the socket stops (or goes on) taking what is written; :meth:`release` is
    called once, however the stream ended (the client may leave first).
    """

    status: int
    content_type: bytes

    def opening(self) -> bytes: ...

    def on_more(self, wake: Callable[[], None]) -> None: ...

    def take(self) -> bytes: ...

    @property
    def ended(self) -> str | None: ...

    def closing(self) -> bytes: ...

    def heartbeat(self) -> bytes: ...

    def writable(self, yes: bool) -> None: ...

    def end(self, reason: str) -> None: ...

    def release(self, reason: str) -> None: ...
