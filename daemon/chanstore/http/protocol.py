"""The HTTP/1.1 connection protocol, on httptools: the one door every request comes through.

:class:`HttpProtocol` reads requests with httptools' parser and hands each
complete one to :meth:`Api.handle <chanstore.http.api.Api.handle>`; it owns
everything about the connection and nothing about the API:

* **Order.** Requests are answered one at a time, in the order they came:
  a pipelined request is dispatched only once the one before it is answered,
  so a PUT then a GET of the same key reads the new value, and an error for
  a later request (a parse error, a head too large) never overtakes an
  earlier answer.
* **Bounds.** A head over ``max_header_bytes`` is a 431, a body over
  ``max_body_bytes`` a 413 (before it is read, when its length is known);
  at most ``max_pipelined`` requests are read ahead of their answers.
  Deadlines (head, body, keep-alive) are kept by
  :class:`~chanstore.http.connections.Connections`' sweep.
* **Backpressure both ways.** While the socket's write buffer is full, the
  connection neither reads nor answers: a client that never reads holds one
  buffer of answers, not all of them.
* **HTTP/1.1 as clients speak it.** Keep-alive, HTTP/1.0, chunked bodies,
  ``Expect: 100-continue``, HEAD. Requests the parser rejects, and requests
  HTTP/1.1 forbids (no ``Host``, two ``Authorization`` headers), get a JSON
  400 counted like any answer, and the connection closes after it.
* **Browsers.** What a web page may not have a browser ask is a 403 before
  its body is read (:mod:`chanstore.http.cross_origin`).

Each answer is written with one system call; answers made while one read is
parsed (pipelined cached reads) go out together with one call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from time import perf_counter
from typing import Any

import httptools

from chanstore import logs
from chanstore.http import codings, cross_origin
from chanstore.http.api import Api
from chanstore.http.connections import Connections, Limits
from chanstore.http.errors import HttpError
from chanstore.http.messages import Request, Response, Streamed, split_target

__all__ = ["HttpProtocol"]

log = logs.get_logger()

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Headers the connection checks itself (the API reads the rest from the request).
_CHECKED = frozenset({b"host", b"authorization", b"content-length", b"expect", b"x-request-id",
                      b"content-encoding", b"transfer-encoding",
                      *cross_origin.HEADERS})  # fmt: skip
#: The versions of HTTP the door speaks; a request line that names another (HTTP/2.0 as text,
#: HTTP/0.9) gets a 400, as the parser gives the versions it refuses itself (HTTP/1.2), not
#: an answer in a version it did not ask for. Not 505: a 5xx means the daemon failed.
_VERSIONS = frozenset({"1.1", "1.0"})
#: Bytes parsed at a time, so that a backlogged connection stops between slices.
FEED_SLICE = 16 * 1024
#: The parser of every closed connection: one that calls nothing back.
_NO_PARSER = httptools.HttpRequestParser(object())
#: Seconds, and bytes, a refused client's input is read and dropped before the close.
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024
#: Seconds a closed connection's unread answers wait for a client that is not reading.
ABANDON_AFTER = 10.0
#: Bytes of answers collected during one read before they are written out.
COLLECT_AT_MOST = 64 * 1024
_TOO_MANY = Response(503, HttpError(503, "too many connections; try again shortly",
                                    code="too_many_connections").body())  # fmt: skip
# Phases of the request being read.
_IDLE, _HEAD, _BODY = 0, 1, 2


class _Stop(Exception):
    """Raised in a parser callback to stop parsing the rest of what was read."""


class HttpProtocol(asyncio.Protocol):
    """One HTTP/1.1 connection."""

    def __init__(self, api: Api, connections: Connections) -> None:
        self.api = api
        self.connections = connections
        self.limits: Limits = connections.limits
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        # The request being read.
        self.phase = _IDLE
        self.phase_since = 0.0
        self.head_bytes = 0
        self.head_read = 0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        #: The headers the connection itself checks (a short list, usually one: Host).
        self.checked: list[tuple[bytes, bytes]] = []
        self.host = self.from_browser = False  # whether it has a Host, a browser's header
        self.request_id: bytes | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        #: What the Content-Length still promises of the body being read (0 when chunked):
        #: parsed in one piece, since it is read in full before the request is complete.
        self.body_left = 0
        self.request: Request | None = None
        self.awaiting_continue = False
        # Requests read, waiting for their turn; each with the error that answers it, if
        # any, and whether that error came before the head was understood (unmatched).
        self.queue: deque[tuple[Request, HttpError | None, bool]] = deque()
        self.in_flight: Request | None = None
        self.served = 0
        self.writes: list[bytes] | None = None  # collected while a read is parsed
        self.reading = True
        self.write_paused = False
        self.paused_since = 0.0
        self.input_closed = False  # nothing more is read: the connection closes after its answers
        self.closed = False
        #: Why the connection will close, when the daemon decided it (a timeout, shutdown).
        self.end_reason: str | None = None
        self._pumping = False
        self._feeding = False
        #: Whether the answers are all out and what the client still sends is read and
        #: dropped for a moment before the close, so that the close does not reset the
        #: connection and destroy the last answer before the client has read it.
        self.lingering = False
        self.linger_since = 0.0
        self.discarded = 0
        self.refused = False
        self._begun_in_read = False
        #: What was read but not yet parsed, while the connection is backlogged.
        self.unread = b""
        self.writes_size = 0
        #: The streamed answer being written (the change feed), and how it is framed.
        self.stream: Streamed | None = None
        self.chunked = True
        self.stream_wrote_at = 0.0
        self.stream_woken = False

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.phase_since = self.connections.now
        if not self.connections.admit(self):
            self.closed = True
            self.connections.refused()
            transport.write(_TOO_MANY.encode("-", keep_alive=False))
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.stream is not None:
            # Nothing is asked on a streaming connection: what comes is dropped.
            self._discard(len(data))
            return
        if self.input_closed or self.closed:
            return
        self.connections.active(self)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse ``data`` a slice at a time, keeping what is left once the connection
        is backlogged (answers not being read, too many requests waiting)."""
        self._feeding = True
        self.writes = []
        self.writes_size = 0
        try:
            offset, size = 0, len(data)
            view = memoryview(data) if size > FEED_SLICE else None
            while offset < size and not (self.input_closed or self.closed):
                if self.write_paused or len(self.queue) >= self.limits.max_pipelined:
                    self.unread = data[offset:]
                    self._pause_reading()
                    break
                end = offset + max(FEED_SLICE, self.body_left)
                piece = data if view is None or (offset == 0 and end >= size) else view[offset:end]
                offset = end
                in_head = self.phase == _HEAD
                self._begun_in_read = False
                try:
                    self.parser.feed_data(piece)
                except httptools.HttpParserUpgrade:
                    self.input_closed = True  # answered; no other protocol is spoken here
                except httptools.HttpParserError as exc:
                    if not self.input_closed:
                        error = HttpError(400, f"malformed request: {_reason(exc)}")
                        self._refuse_current(error, parsed=False)
                if in_head and self.phase == _HEAD and not self._begun_in_read:
                    self._head_spans_reads(len(piece))
        finally:
            self._feeding = False
            self._flush()
            self.writes = None
        if self.input_closed:
            self._after_write()

    def _head_spans_reads(self, size: int) -> None:
        """A head that spans reads: httptools holds its unfinished header itself, so
        the reads are what bounds it."""
        if self.input_closed:
            return
        self.head_read += size
        if self.head_read > self.limits.max_header_bytes:
            self._head_too_large()

    def eof_received(self) -> bool | None:
        if self.lingering or self.stream is not None:
            self._end_stream("client")
            self._close_now()
            return None
        self.input_closed = True
        if self.in_flight is None and not self.queue:
            self.close_for("client")
        return True  # keep the transport open to write what is still being answered

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_stream("client")
        if not self.closed:
            self.closed = True
            self.connections.closed(self, "client" if exc is None else "error")
        self.queue.clear()
        # The parser calls back into this protocol, which holds it: a cycle that only the
        # garbage collector would free (1.4 KiB a connection, tens of MiB after a flood).
        # A closed connection parses nothing more; the method of a request it was
        # reading was logged when it was refused.
        self.parser = _NO_PARSER

    def pause_writing(self) -> None:
        self.write_paused = True
        self.paused_since = self.connections.now
        if self.stream is not None:
            self.stream.writable(False)
            return  # a stream keeps reading, to notice its client leaving
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume_reading()
        if self.stream is not None:
            self.stream.writable(True)
            self._stream_more()
            return
        self._pump()

    # -- httptools callbacks -------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun_in_read = True
        self.phase = _HEAD
        self.phase_since = self.connections.now
        self.head_bytes = self.head_read = 0
        self.url = b""
        self.headers = []
        self.checked = []
        self.host = self.from_browser = False
        self.request_id = None

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > self.limits.max_header_bytes:
            self._head_too_large()
            raise _Stop
        name = name.lower()
        value = value.strip(b" \t")
        self.headers.append((name, value))
        if name in _CHECKED:
            if name == b"host":
                self.host = True
            elif name == b"x-request-id":
                self.request_id = value
            else:
                self.checked.append((name, value))
                if name in cross_origin.HEADERS:
                    self.from_browser = True

    def on_headers_complete(self) -> None:
        parser = self.parser
        path, query = split_target(self.url)
        request = self.request = Request(
            parser.get_method().decode("ascii", "replace"), path, query, self.headers, b"",
            parser.should_keep_alive(), perf_counter(),
        )  # fmt: skip
        request.version = version = parser.get_http_version()
        request.given_id = self.request_id
        self.phase = _BODY
        self.phase_since = self.connections.now
        self.body = []
        self.body_size = 0
        if (version != "1.1" or not self.host or self.checked) and (
            refusal := self._refusal(request)
        ):
            self._refuse_current(refusal)
            raise _Stop
        self.body_left = self._content_length()
        if self.checked and (b"expect", b"100-continue") in self.checked:
            if self.in_flight is None and not self.queue:
                self._write(_CONTINUE)
            else:
                self.awaiting_continue = True

    def on_body(self, body: bytes) -> None:
        self.body_size += len(body)
        self.body_left -= len(body)
        if self.body_size > self.limits.max_body_bytes:
            limit = self.limits.max_body_bytes
            self._refuse_current(HttpError(413, f"the body is over the limit of {limit} bytes"))
            raise _Stop
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = self.request
        assert request is not None
        body = self.body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        self.request = None
        self.phase = _IDLE
        self.phase_since = self.connections.now
        self.awaiting_continue = False
        self.queue.append((request, None, True))
        if len(self.queue) >= self.limits.max_pipelined:
            self._pause_reading()
        self._pump()

    # -- answering -------------------------------------------------------------------

    def _pump(self) -> None:
        """Dispatch queued requests, one at a time, while answers can be written."""
        if self._pumping:
            return  # an answer given during a dispatch: the loop below goes on
        self._pumping = True
        try:
            while self.queue and self.in_flight is None and not self.write_paused:
                request, refusal, parsed = self.queue.popleft()
                self.in_flight = request
                if refusal is None:
                    self.api.handle(request, self._respond)
                else:
                    self.api.refuse(request, refusal, self._respond, parsed=parsed)
        finally:
            self._pumping = False
        if not self.queue and self.reading is False and not self.write_paused:
            self._resume_reading()

    def _respond(self, request: Request, response: Response | Streamed) -> None:
        """Write the answer to the request in flight; then the next one's turn."""
        if self.closed or request is not self.in_flight:
            if response.__class__ is not Response:
                response.release("client")  # type: ignore[union-attr]
            return  # the client left meanwhile
        self.in_flight = None
        self.served += 1
        if response.__class__ is not Response:
            self._begin_stream(request, response)  # type: ignore[arg-type]
            return
        last = self.input_closed and not self.queue
        keep_alive = request.keep_alive and not last
        data = response.encode(request.request_id, keep_alive=keep_alive,
                               head=request.method == "HEAD")  # fmt: skip
        if keep_alive and request.version == "1.0":
            data = data.replace(b"\r\n", b"\r\nconnection: keep-alive\r\n", 1)
        self._write(data)
        self.phase_since = self.connections.now
        if not keep_alive:
            self.close_for("client")
            return
        if self.awaiting_continue and not self.queue:
            self.awaiting_continue = False
            self._write(_CONTINUE)
        if not self._pumping:
            self._pump()
            self._after_write()

    def _write(self, data: bytes) -> None:
        writes = self.writes
        if writes is None:
            if not self.closed:
                self.transport.write(data)
            return
        writes.append(data)
        self.writes_size += len(data)
        if self.writes_size > COLLECT_AT_MOST:
            # Large answers go out now, so that a full socket buffer pauses the
            # connection before more are made.
            self._flush()

    def _flush(self) -> None:
        """Write the answers collected while a read was parsed, with one call."""
        writes = self.writes
        if writes and not self.closed:
            self.writes = []
            self.writes_size = 0
            self.transport.write(writes[0] if len(writes) == 1 else b"".join(writes))

    def _after_write(self) -> None:
        """Close a connection whose input ended once its last answer is out."""
        if self.input_closed and self.in_flight is None and not self.queue and not self.closed:
            self.close_for("client")

    # -- streamed answers --------------------------------------------------------------

    def _begin_stream(self, request: Request, stream: Streamed) -> None:
        """Write the head of a streamed answer, then what it has; the connection is its
        from now on (requests pipelined behind it are never answered)."""
        self.input_closed = True
        self.queue.clear()
        self.chunked = request.version != "1.0"
        framing = b"transfer-encoding: chunked\r\n" if self.chunked else b"connection: close\r\n"
        self._write(b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ncache-control: no-store\r\n%s"
                    b"x-request-id: %s\r\n\r\n" % (stream.status, stream.content_type, framing,
                                                    request.request_id.encode()))  # fmt: skip
        if request.method == "HEAD":
            stream.release("client")
            self.close_for("client")
            return
        self.stream = stream
        # Reading goes on, so that a client that leaves is noticed at once.
        self.reading = True
        self.transport.resume_reading()
        self._write_chunk(stream.opening())
        stream.on_more(self._stream_wake)
        self._stream_more()

    def _stream_wake(self) -> None:
        """The stream has more: write it once this turn of the loop is done, so that the
        events of one batch of writes go out in one system call, not one each."""
        if not self.stream_woken:
            self.stream_woken = True
            asyncio.get_running_loop().call_soon(self._stream_more)

    def _stream_more(self) -> None:
        """Write what the stream has while the socket takes it; end it once it ended."""
        self.stream_woken = False
        stream = self.stream
        if stream is None or self.closed:
            return
        while not self.write_paused:
            data = stream.take()
            if not data:
                break
            self._write_chunk(data)
        reason = stream.ended
        if reason is None:
            return
        if reason != "slow_reader":  # a slow reader resumes from its cursor instead
            while data := stream.take():
                self._write_chunk(data)
        self._write_chunk(stream.closing())
        if self.chunked:
            self._write(b"0\r\n\r\n")
        self._end_stream(reason)
        self.close_for("shutdown" if reason == "shutdown" else "stream_ended")

    def _write_chunk(self, data: bytes) -> None:
        self._write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        self.stream_wrote_at = self.connections.now

    def _end_stream(self, reason: str) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.release(reason)

    # -- refusals --------------------------------------------------------------------

    def _refusal(self, request: Request) -> HttpError | None:
        """What the connection itself refuses about a request whose head has arrived."""
        checked = dict(self.checked)
        if request.version not in _VERSIONS:
            return HttpError(400, f"HTTP/{request.version[:10]} is not supported; send HTTP/1.1 "
                                  "(or HTTP/1.0)", code="unsupported_version")  # fmt: skip
        if request.version == "1.1" and not self.host:
            return HttpError(400, "an HTTP/1.1 request must have a Host header")
        if self.from_browser and (
            refused := cross_origin.refusal(request.method, self.checked, request.header(b"host"))
        ):
            return refused
        if len(checked) < len(self.checked) and self._repeated(b"authorization"):
            return HttpError(400, "more than one Authorization header")
        if (length := self._content_length()) > self.limits.max_body_bytes:
            limit = self.limits.max_body_bytes
            return HttpError(413, f"the body is {length} bytes; the limit is {limit}")
        if coding := codings.refusal(self.checked, length):
            return coding
        if checked.get(b"expect") == b"100-continue":
            return self.api.precheck(request)
        return None

    def _content_length(self) -> int:
        """The body's length as its head gives it (0 when it does not: chunked, or none)."""
        for name, value in self.checked:
            if name == b"content-length" and value.isdigit():
                return int(value)
        return 0

    def _repeated(self, name: bytes) -> bool:
        return sum(1 for header, _ in self.checked if header == name) > 1

    def _count_head(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > self.limits.max_header_bytes:
            self._head_too_large()
            raise _Stop

    def _head_too_large(self) -> None:
        limit = self.limits.max_header_bytes
        self._refuse_current(HttpError(431, f"the request head is over {limit} bytes"))

    def _refuse_current(self, error: HttpError, *, parsed: bool = True) -> None:
        """Answer the request being read with ``error`` in its turn, then close."""
        if self.input_closed:
            return
        self.input_closed = True
        self.refused = True
        self._pause_reading()
        request = self.request
        if request is None:  # the head is not all there
            request, parsed = self._partial_request(), False
        request.keep_alive = False
        self.request = None
        self.phase = _IDLE
        self.queue.append((request, error, parsed))
        self._pump()

    def _partial_request(self) -> Request:
        """The request being read as far as it got: for counting and logging its refusal."""
        path = split_target(self.url)[0] or b"/"
        # The parser's method is only known once the URL began (before, it reads as DELETE).
        method = self.parser.get_method().decode("ascii", "replace") if self.url else "other"
        return Request(method, path, b"", self.headers, b"", False, perf_counter())

    # -- for Connections ---------------------------------------------------------------

    def idle(self) -> bool:
        """Whether nothing is being read or answered: the connection can go at no loss."""
        return (self.phase == _IDLE and self.in_flight is None and not self.queue
                and self.stream is None)  # fmt: skip

    def check_deadlines(self, now: float) -> None:
        if self.closed:
            return
        if self.lingering:
            if now - self.linger_since > LINGER_SECONDS:
                self._close_now()
            return
        waited = now - self.phase_since
        limits = self.limits
        if self.stream is not None and not self.write_paused \
                and now - self.stream_wrote_at >= limits.heartbeat_interval:  # fmt: skip
            self._write_chunk(self.stream.heartbeat())
        if self.write_paused and now - self.paused_since > limits.keep_alive_timeout:
            # A client that stopped reading its answers: its buffer stays bounded,
            # but it must not hold a connection for ever.
            self.close_for("write_timeout")
        elif self.phase == _HEAD and waited > limits.header_timeout:
            self._timed_out("header_timeout", f"the request head did not arrive within "
                                              f"{limits.header_timeout:g}s")  # fmt: skip
        elif self.phase == _BODY and waited > limits.body_timeout:
            self._timed_out("body_timeout", f"the body did not arrive within "
                                            f"{limits.body_timeout:g}s")  # fmt: skip
        elif self.idle() and not self.input_closed:
            if self.served == 0 and waited > limits.header_timeout:
                self.close_for("header_timeout")
            elif self.served and waited > limits.keep_alive_timeout:
                self.close_for("idle_timeout")

    def _timed_out(self, reason: str, message: str) -> None:
        self.end_reason = reason
        self._refuse_current(HttpError(408, message, code=reason))

    def close_for(self, reason: str) -> None:
        """Close the connection (after what was written), counting why."""
        if self.closed:
            return
        if self.lingering:  # evicted, or the daemon stops: no more waiting
            self._close_now()
            return
        self._flush()
        self.queue.clear()
        self.end_reason = self.end_reason or reason
        if self.refused and not self.transport.is_closing() and self.transport.can_write_eof():
            # The client may still be sending what was refused: half-close, and read
            # and drop its bytes for a moment (a close with unread input is a reset).
            self.lingering = True
            self.linger_since = self.connections.now
            self.unread = b""
            self.transport.write_eof()
            self.reading = True
            self.transport.resume_reading()
            return
        self._close_now()

    def _close_now(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        self.connections.closed(self, self.end_reason or "client")
        self.transport.close()
        if self.write_paused:
            # close() waits for the client to take what is buffered: a client that
            # never reads would hold the socket and the buffer for as long as it
            # likes. It gets a while longer, then both go.
            asyncio.get_running_loop().call_later(ABANDON_AFTER, self.transport.abort)

    def _discard(self, size: int) -> None:
        self.discarded += size
        if self.discarded > LINGER_BYTES:
            self._close_now()

    def stop_serving(self) -> None:
        """The daemon is stopping: close now if idle, else once the answer in flight is out;
        a stream ends (with its reason) at once."""
        if self.stream is not None:
            self.stream.end("shutdown")
            return
        self.input_closed = True
        self._pause_reading()
        if self.idle():
            self.close_for("shutdown")
        else:
            self.end_reason = "shutdown"

    # -- reading ---------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if self.reading and not self.closed:
            self.reading = False
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self.reading and not self.input_closed and not self.closed:
            self.reading = True
            self.transport.resume_reading()
            if self.unread and not self._feeding:
                unread, self.unread = self.unread, b""
                self._feed(unread)


def _reason(exc: Exception) -> str:
    """httptools' words for a parse error."""
    cause = exc.__context__
    if cause is not None and not isinstance(cause, _Stop):
        # A callback failed: a fault here, not in the request. Said loudly, answered 400.
        log.error("http_parser_callback_crashed", error=repr(cause))
    return str(exc) or type(exc).__name__
