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

It also lets the app answer a request the moment its headers are parsed,
without an ASGI request at all: when the app has an ``answer_from_memory``
method (see :meth:`chanstore.server.app.App.answer_from_memory`) and it
returns the whole response, that response is written and the request is
done. This is only tried when every earlier request on the connection has
been answered, so responses keep their order on a pipelined connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingProtocol"]


class CoalescingProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools), one write per response."""

    transport: Any
    _answer_from_memory: Callable[[bytes, bytes, list[tuple[bytes, bytes]]], bytes | None] | None
    #: Whether the request being parsed was answered by answer_from_memory.
    _answered = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # The flow control made above keeps the real transport; the request
        # cycles and the rest of uvicorn write through this one.
        self.transport = _CoalescingTransport(transport, self.loop)
        self._answer_from_memory = getattr(self.app, "answer_from_memory", None)

    def on_headers_complete(self) -> None:
        response = self._answer_now() if self._answer_from_memory is not None else None
        if response is None:
            self._answered = False
            super().on_headers_complete()
            return
        self._answered = True
        self.transport.write(response)
        # What uvicorn does after each response: count it, resume reading, and
        # arm the keep-alive timeout.
        self.on_response_complete()

    def on_body(self, body: bytes) -> None:
        if not self._answered:  # an answered GET's body is read and dropped
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._answered:
            super().on_message_complete()

    def _answer_now(self) -> bytes | None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            return None  # an earlier request is still being answered
        parser = self.parser
        if parser.get_http_version() != "1.1" or not parser.should_keep_alive():
            return None  # the usual path closes the connection as asked
        if parser.should_upgrade():
            return None
        assert self._answer_from_memory is not None
        return self._answer_from_memory(parser.get_method(), self.url, self.headers)

    def on_response_complete(self) -> None:
        self.transport.flush()
        super().on_response_complete()


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
