"""uvicorn's httptools protocol, writing each response with one system call.

uvicorn writes a response's status line and headers as soon as the app sends
``http.response.start``, and the body when it sends ``http.response.body``;
on uvloop every ``transport.write`` is a ``write(2)`` of its own. So each
small answer cost two system calls and woke the client twice, and on a cached
GET those calls are a large part of the whole cost.

:class:`CoalescingProtocol` gives uvicorn a transport that collects the
writes and sends them together when the response is complete, or at the
latest on the event loop's next turn (a ``100 Continue``, an error answer
that uvicorn writes itself), so nothing waits longer than that, and the order
of the bytes never changes. Flow control still watches the real transport.

It also offers each request to the app's ``shortcuts`` (see shortcuts.py),
which answer cached reads and single-key writes without an ASGI request: a
read the moment its headers are parsed, a write (a "claim") once its body is
in and its lane has stored it. A shortcut is only tried when every earlier
request on the connection has been answered, and a claim stands in for
uvicorn's request cycle until it is answered, so that requests pipelined
behind it wait their turn: responses keep their order.
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from chanstore.server.shortcuts import Address, Shortcuts

__all__ = ["CoalescingProtocol"]


class CoalescingProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools), one write per response, with shortcuts."""

    transport: Any
    _shortcuts: Shortcuts | None
    #: Whether the request being parsed was answered as soon as its headers were.
    _answered = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # The flow control made above keeps the real transport; the request
        # cycles and the rest of uvicorn write through this one.
        self.transport = _CoalescingTransport(transport, self.loop)
        self._shortcuts = getattr(self.app, "shortcuts", None)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        claim = self.cycle
        if isinstance(claim, _Claim) and claim.receiving and claim.timer is None:
            # The body did not come with the headers: from now on it has a deadline
            # (most bodies do come with them, and so never cost a timer).
            assert self._shortcuts is not None
            claim.timer = self.loop.call_later(
                self._shortcuts.body_timeout, self._body_too_slow, claim
            )

    def on_message_begin(self) -> None:
        # uvicorn builds the request's ASGI scope here (three dicts); a request
        # that a shortcut answers never needs one, so it is made later, by
        # _on_asgi_headers_complete, and only for the requests that take ASGI.
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def _on_asgi_headers_complete(self) -> None:
        """uvicorn's on_headers_complete, after uvicorn's own on_message_begin."""
        url, headers, expect_100_continue = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.expect_100_continue = url, expect_100_continue
        self.headers = self.scope["headers"] = headers
        super().on_headers_complete()

    def on_headers_complete(self) -> None:
        self._answered = False
        shortcuts = self._shortcuts
        if shortcuts is None or not self._may_shortcut():
            self._on_asgi_headers_complete()
            return
        method = self.parser.get_method()
        response = shortcuts.answer_now(method, self.url, self.headers)
        if response is not None:
            self._answered = True
            self.transport.write(response)
            # What uvicorn does after each response: count it, resume reading, and
            # arm the keep-alive timeout.
            self.on_response_complete()
            return
        # A client that waits for 100 Continue gets it from the usual path.
        address = (
            None if self.expect_100_continue else shortcuts.claim(method, self.url, self.headers)
        )
        if address is None:
            self._on_asgi_headers_complete()
            return
        # The claim stands in for uvicorn's cycle: requests pipelined behind it
        # queue until it is answered, as they would behind a cycle.
        self.cycle = _Claim(method, address, self.headers)  # type: ignore[assignment]

    def on_body(self, body: bytes) -> None:
        if self._answered:
            return  # an answered GET's body is read and dropped
        claim = self.cycle
        if isinstance(claim, _Claim):
            claim.body += body
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._answered:
            return
        claim = self.cycle
        if not isinstance(claim, _Claim):
            super().on_message_complete()
            return
        claim.receiving = False
        if claim.timer is not None:
            claim.timer.cancel()
        assert self._shortcuts is not None
        respond = functools.partial(self._respond, claim)
        self._shortcuts.answer_claimed(claim.method, claim.address, claim.headers,
                                       bytes(claim.body), respond)  # fmt: skip

    def _may_shortcut(self) -> bool:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return False  # an earlier request is still being answered
        parser = self.parser
        if parser.get_http_version() != "1.1" or not parser.should_keep_alive():
            return False  # the usual path closes the connection as asked
        return not parser.should_upgrade()

    def _respond(self, claim: _Claim, response: bytes) -> None:
        """Answer a claimed request (once), as uvicorn's cycle ends a response."""
        if claim.response_complete:
            return
        claim.response_complete = True
        if claim.timer is not None:
            claim.timer.cancel()
        if claim.disconnected:
            return
        self.transport.write(response)
        if not claim.keep_alive:  # the server is shutting down, or the body timed out
            self.transport.close()
        self.on_response_complete()

    def _body_too_slow(self, claim: _Claim) -> None:
        if claim.response_complete or claim.disconnected:
            return
        claim.keep_alive = False  # the rest of the body would be read as a request
        assert self._shortcuts is not None
        self._respond(claim, self._shortcuts.body_timed_out(claim.method, claim.headers))

    def on_response_complete(self) -> None:
        self.transport.flush()
        super().on_response_complete()


class _Claim:
    """A request the shortcuts answer; it stands in for uvicorn's request cycle.

    uvicorn reads ``response_complete`` (to queue pipelined requests),
    ``keep_alive`` (cleared on shutdown), ``disconnected`` and
    ``message_event`` (set when the connection is lost) of the current cycle.
    """

    __slots__ = ("address", "body", "disconnected", "headers", "keep_alive", "method",
                 "receiving", "response_complete", "timer")  # fmt: skip

    def __init__(self, method: bytes, address: Address, headers: list[tuple[bytes, bytes]]) -> None:
        self.method = method
        self.address = address
        self.headers = headers
        self.body = bytearray()
        self.receiving = True
        self.response_complete = False
        self.keep_alive = True
        self.disconnected = False
        self.timer: asyncio.TimerHandle | None = None

    @property
    def message_event(self) -> _Claim:
        return self

    def set(self) -> None:
        """As ``message_event``: no task waits on a claim; a lost connection is
        seen through ``disconnected`` when the answer comes."""


class _CoalescingTransport:
    """A transport whose writes wait for :meth:`flush` or the loop's next turn."""

    __slots__ = ("_loop", "_pending", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_scheduled)

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Write everything collected so far, with one call."""
        if not self._pending:
            return
        pending = self._pending
        self._pending = []
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def is_closing(self) -> bool:
        # Asked on every response: worth not going through __getattr__.
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def _flush_scheduled(self) -> None:
        self._scheduled = False
        self.flush()

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading, ...: the real transport's.
        return getattr(self._transport, name)
