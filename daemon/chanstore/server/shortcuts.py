"""Requests answered without ASGI: cached reads and single-key writes.

uvicorn turns every request into an ASGI cycle: an asyncio task, ``receive``
and ``send`` messages and the awaits between them. For the two requests a
chat service makes most, reading a key that is in memory and storing one
key, that machinery costs more than the work itself. So the protocol (see
protocol.py) offers each request to :class:`Shortcuts` first:

* :meth:`Shortcuts.answer_now` answers a GET of a cached key the moment its
  headers are parsed, from the already-encoded body.
* :meth:`Shortcuts.claim` takes a PUT or DELETE of one key; once its body has
  arrived, :meth:`Shortcuts.answer_claimed` queues the write on the
  container's lane and answers when the lane reports it stored, through a
  callback rather than a task.

Anything unusual (a percent-encoded or odd path, a query, a missing token, a
chunked body, debug logging) is declined and goes through
:meth:`chanstore.server.app.App.handle` as before. The answers are the ones
``handle`` gives: same status, body and headers (``x-request-id`` included),
same metrics; both paths share the routes' error messages and mapping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING

from chanstore import logs
from chanstore.cache import ABSENT
from chanstore.errors import InvalidKey
from chanstore.keys import check_key
from chanstore.server.http import BODY_TIMEOUT, HttpError, parse_json

if TYPE_CHECKING:
    from chanstore.server.app import App

__all__ = ["Address", "Headers", "Respond", "Shortcuts", "response_bytes"]

Headers = list[tuple[bytes, bytes]]
#: Channel, container and key of a single-key request.
Address = tuple[str, str, str]
#: Called with the whole response once a claimed request is answered.
Respond = Callable[[bytes], None]

_PREFIX = b"/v1/channels/"
_CLAIMED_METHODS = (b"PUT", b"DELETE")
_JSON_OK = b'{"ok":true}'
#: response_bytes(200, ...), spelled out for the commonest answer of all.
_OK_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
    b"x-request-id: %s\r\n\r\n%s"
)

log = logs.get_logger()


def response_bytes(status: int, body: bytes, request_id: str,
                   extra: Headers | None = None) -> bytes:  # fmt: skip
    """A whole HTTP/1.1 JSON response, as uvicorn writes what ``send_response`` sends."""
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
        status, HTTPStatus(status).phrase.encode(), len(body))  # fmt: skip
    if extra:
        head += b"".join(b"%s: %s\r\n" % (name, value) for name, value in extra)
    return b"%sx-request-id: %s\r\n\r\n%s" % (head, request_id.encode(), body)


class Shortcuts:
    """The requests of one :class:`~chanstore.server.app.App` that skip ASGI."""

    def __init__(self, app: App, route: str) -> None:
        """Shortcuts for ``app``'s single-key ``route``, named so in metrics and logs."""
        self.app = app
        self.route = route
        self.registry = app.registry
        # The commonest answers are counted and timed in plain numbers, folded
        # into the metrics before each scrape (see DeferredRequests).
        self._cached_get = app.metrics.deferred_requests("GET", route, "200")
        self._written = {method.encode(): app.metrics.deferred_requests(method, route, "200")
                         for method in ("PUT", "DELETE")}  # fmt: skip

    def answer_now(self, method: bytes, url: bytes, headers: Headers) -> bytes | None:
        """The whole response to a GET of a cached key, or None to decline."""
        if method != b"GET":
            return None
        started = time.perf_counter()
        address = self._address(url, headers)
        if address is None:
            return None
        channel, container, key = address
        # No key check needed: a key is in the cache only once it has passed
        # check_key, and its channel check_channel_id, so a hit proves both valid.
        body = self.registry.cached_body(channel, container, key)
        if body is None or body is ABSENT:
            return None  # a miss or a 404: the usual path reads or words it
        response = _OK_HEAD % (len(body), self.app.request_id(headers).encode(), body)
        self._cached_get.observe(time.perf_counter() - started)
        return response

    def claim(self, method: bytes, url: bytes, headers: Headers) -> Address | None:
        """The request's address if :meth:`answer_claimed` will answer it once its body is in."""
        if method not in _CLAIMED_METHODS:
            return None
        length = _header(headers, b"content-length")
        if method == b"DELETE":
            if length is not None or _header(headers, b"transfer-encoding") is not None:
                return None
        # A known length within the limit: a chunked or oversized body is the
        # usual path's to refuse, with its 413.
        elif length is None or not length.isdigit() or int(length) > self.app.max_body:
            return None
        return self._address(url, headers)

    def answer_claimed(self, method: bytes, address: Address, headers: Headers, body: bytes,
                       respond: Respond) -> None:  # fmt: skip
        """Store or delete the key at ``address`` (what :meth:`claim` returned), then
        ``respond`` (maybe later, from a lane's callback)."""
        started = time.perf_counter()
        method_name = method.decode()
        request_id = self.app.request_id(headers)

        def answer(status: int, payload: bytes, extra: Headers | None = None) -> None:
            respond(response_bytes(status, payload, request_id, extra))
            elapsed = time.perf_counter() - started
            if status == 200:
                self._written[method].observe(elapsed)
            else:
                self.app.observe(method_name, self.route, status, elapsed)

        def fail(error: HttpError) -> None:
            if error.status >= 500:
                log.error("request_failed", method=method_name, route=self.route,
                          status=error.status, error=error.message, request_id=request_id,
                          channel=channel)  # fmt: skip
            answer(error.status, error.body(), error.headers)

        channel, container, key = address
        try:
            self.app.check_channel_and_container(channel, container)
            _check_key(key)
            value = parse_json(body) if method == b"PUT" else None
        except HttpError as error:
            fail(error)
            return
        future = self.registry.write_soon(channel, container, key, value,
                                          delete=method == b"DELETE")  # fmt: skip

        def settled(future: asyncio.Future[bool]) -> None:
            try:
                existed = self.app.backend_outcome(future)
            except HttpError as error:
                fail(error)
                return
            if method == b"DELETE" and not existed:
                fail(self.app.not_found(key, container))
            else:
                answer(200, _JSON_OK)

        future.add_done_callback(settled)

    #: Seconds a claimed request's body may take to arrive, as on the usual path.
    body_timeout = BODY_TIMEOUT

    def body_timed_out(self, method: bytes, headers: Headers) -> bytes:
        """The 408 answer to a claimed request whose body did not arrive in time."""
        error = HttpError(408, f"the body did not arrive within {self.body_timeout:g}s")
        self.app.observe(method.decode(), self.route, 408, self.body_timeout)
        return response_bytes(408, error.body(), self.app.request_id(headers))

    def _address(self, url: bytes, headers: Headers) -> Address | None:
        """Channel, container and key of a plain ``/v1/channels/c/container/key`` URL."""
        if not url.startswith(_PREFIX) or logs.debug_enabled():
            return None  # debug logging: the usual path logs every request
        if b"%" in url or b"?" in url or b"#" in url:
            return None
        parts = url.split(b"/")
        if len(parts) != 6:  # "", "v1", "channels", channel, container, key
            return None
        if not self.app.authorized(_header(headers, b"authorization")):
            return None
        try:
            return parts[3].decode(), parts[4].decode(), parts[5].decode()
        except UnicodeDecodeError:
            return None


def _check_key(key: str) -> None:
    try:
        check_key(key)
    except InvalidKey as exc:
        raise HttpError(400, str(exc)) from None


def _header(headers: Headers, name: bytes) -> bytes | None:
    for header, value in headers:
        if header == name:
            return value
    return None
