"""Requests for a container another worker owns: relayed to it, its answer relayed unchanged.

A json root has one writer (its journal has one owner), so in a group of
workers every container whose backend is not shared (see
:func:`chanstore.server.group.shared_everywhere`) is served by worker 0 alone;
a request for one that arrives at another worker is sent on to worker 0 over
its private socket by :class:`Forwarder`, and worker 0's answer (status,
headers, ETag included, and body) is the answer. The change feed is relayed
as it comes by :class:`RelayedStream`, with backpressure: while the client
does not read, the relay stops reading from worker 0 once it holds
:data:`RELAY_BUFFER` bytes, and worker 0's own bounds (``--watcher-buffer-bytes``,
``slow_reader``) apply as they would to a client of its own.

The relaying worker counts the request in its metrics (under its route and
the status it answered); worker 0 serves it on its private socket without
counting it again.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from chanstore import logs
from chanstore.http.errors import HttpError
from chanstore.http.messages import JSON_TYPE, Request, Response
from chanstore.server.peers import (
    PeerAnswer,
    PeerConnection,
    PeerPool,
    PeerUnavailable,
    encode_request,
)

__all__ = ["RELAY_BUFFER", "Forwarder", "RelayedStream"]

log = logs.get_logger()

#: Bytes of a relayed stream held here at most before reading from the owner pauses.
RELAY_BUFFER = 256 * 1024
#: Bytes of one unfinished event held at most (an event is one line of JSON and a few
#: fields: a value is at most --max-body-bytes).
MAX_EVENT_BYTES = 64 * 1024 * 1024
_END_REASON = re.compile(rb'"reason":"([a-z_]+)"')
_HEARTBEAT = b": keep-alive\n\n"


class Forwarder:
    """Relays requests to the worker at the other end of ``pool`` within ``timeout`` seconds."""

    def __init__(self, pool: PeerPool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def forward(self, request: Request) -> Response:
        """The owner's answer to ``request``."""
        try:
            answer = await self.pool.request(self._encoded(request), self.timeout)
        except PeerUnavailable as exc:
            raise _unavailable(exc) from None
        return _response(answer)

    async def stream(self, request: Request) -> Response | RelayedStream:
        """The owner's answer to a change-feed request: the stream, relayed as it comes, or
        the answer that refused it (410, 503, 404...)."""
        try:
            answer, connection = await self.pool.stream(self._encoded(request), self.timeout)
        except PeerUnavailable as exc:
            raise _unavailable(exc) from None
        if connection.lost or answer.header(b"content-type") != b"text/event-stream":
            connection.close()
            return _response(answer)
        stream = RelayedStream(answer.status, connection)
        try:
            await asyncio.wait_for(stream.opened, self.timeout)
        except BaseException:
            stream.release("client")
            raise
        return stream

    def _encoded(self, request: Request) -> bytes:
        # HEAD goes on as GET: the answer's length is then known, and the client's own
        # connection leaves the body out.
        method = "GET" if request.method == "HEAD" else request.method
        target = request.path + b"?" + request.query if request.query else request.path
        return encode_request(method, target, request.headers, request.body, request.request_id)


def _unavailable(exc: PeerUnavailable) -> HttpError:
    return HttpError(503, f"the worker that serves this container did not answer: {exc}",
                     code="backend_unavailable")  # fmt: skip


def _end_event_at(whole: bytes) -> int:
    """Where the owner's closing ``end`` event starts in ``whole`` (whole events), or -1."""
    if whole.startswith(b"event: end\n"):
        return 0
    found = whole.find(b"\n\nevent: end\n")
    return found + 2 if found >= 0 else -1


def _response(answer: PeerAnswer) -> Response:
    """The peer's answer as this worker writes it: the same status, headers and body."""
    content_type = JSON_TYPE
    headers = []
    for name, value in answer.headers:
        if name == b"content-type":
            content_type = JSON_TYPE if value == JSON_TYPE else value
        else:
            headers.append((name, value))
    return Response(answer.status, answer.body, content_type, headers or None)


class RelayedStream:
    """A change feed served by another worker, written to this worker's client as it comes.

    The owner's events are passed on whole (an event is never split between
    two writes); its closing ``end`` event is held back and written as this
    stream's :meth:`closing`. When the owner's connection breaks, the stream
    ends with ``reason: shutdown`` (its client resumes from its last cursor).
    """

    content_type = b"text/event-stream"

    def __init__(self, status: int, connection: PeerConnection) -> None:
        self.status = status
        self._connection = connection
        self._events = bytearray()  # whole events, ready to be written
        self._partial = b""  # the start of an event still arriving
        self._end_event = b""
        self._ended: str | None = None
        self._wake: Callable[[], None] | None = None
        self._front_writable = True
        self._paused = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        connection.attach(self)

    # -- what the owner sends (a StreamSink) --------------------------------------------

    def received(self, data: bytes) -> None:
        text = self._partial + data if self._partial else data
        cut = text.rfind(b"\n\n")
        if cut < 0:
            self._partial = text
            if len(text) > MAX_EVENT_BYTES:
                self._finish("shutdown")
            return
        whole, self._partial = text[: cut + 2], text[cut + 2 :]
        end = _end_event_at(whole)
        if end >= 0:
            self._end_event = whole[end:]
            whole = whole[:end]
        self._events += whole
        if not self.opened.done():
            self.opened.set_result(None)
        self._flow()
        self._tell()

    def finished(self, complete: bool) -> None:
        reason = "shutdown"
        if complete and (found := _END_REASON.search(self._end_event)):
            reason = found.group(1).decode()
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self._ended is None:
            self._ended = reason
        if not self.opened.done():
            self.opened.set_exception(
                HttpError(
                    503,
                    "the worker that serves this container ended the stream before it began",
                    code="backend_unavailable",
                )
            )
        self._connection.close()
        self._tell()

    # -- Streamed, for this worker's connection ---------------------------------------

    def opening(self) -> bytes:
        return self.take()

    def on_more(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        if self._events or self._ended is not None:
            wake()

    def take(self) -> bytes:
        if not self._events:
            return b""
        data = bytes(self._events)
        self._events.clear()
        self._flow()
        return data

    @property
    def ended(self) -> str | None:
        return self._ended

    def closing(self) -> bytes:
        if self._end_event:
            return self._end_event
        return b'event: end\ndata: {"reason":"%s"}\n\n' % (self._ended or "shutdown").encode()

    def heartbeat(self) -> bytes:
        return _HEARTBEAT

    def writable(self, yes: bool) -> None:
        self._front_writable = yes
        self._flow()

    def end(self, reason: str) -> None:
        """This worker stops: the stream ends now, for ``reason``; the owner's side closes."""
        self._end_event = b""
        self._finish(reason)

    def release(self, reason: str) -> None:
        if self._ended is None:
            self._ended = reason
        self._connection.close()

    # -- flow --------------------------------------------------------------------------

    def _flow(self) -> None:
        """Read from the owner while this worker's client reads and little is held here."""
        pause = not self._front_writable or len(self._events) > RELAY_BUFFER
        if pause != self._paused and self._ended is None:
            self._paused = pause
            self._connection.pause(pause)

    def _tell(self) -> None:
        if self._wake is not None:
            self._wake()
