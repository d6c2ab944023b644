"""HTTP/1.1 to the other workers of a group, over their private Unix sockets.

Each worker of ``chanstore serve --workers N`` serves the API a second time
on a Unix socket in the group's private (0700) folder, for its peers: the
requests another worker relays to the owner of a json container, and the
gathering of metrics, readiness and reload verdicts. :class:`PeerPool` keeps
a bounded number of keep-alive connections to one peer; a request that finds
them all busy waits its turn, all within one deadline, so that a peer that
does not answer is a clean :class:`PeerUnavailable` (the caller's 503), never
a pile of waiting requests. A peer that is starting (or restarting) has no
socket yet: connecting is retried until the deadline.

A streamed answer (``text/event-stream``, the change feed) gets a connection
of its own, outside the pool, handed to a :class:`StreamSink` that reads it
at its own pace (see :mod:`chanstore.server.forwarding`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any, Protocol

import httptools

from chanstore.http import cross_origin

__all__ = ["PeerAnswer", "PeerPool", "PeerUnavailable", "StreamSink", "request_once"]

#: Seconds between two tries to connect to a peer whose socket is not there yet.
CONNECT_RETRY = 0.05
#: Bytes of a whole (not streamed) answer relayed at most.
MAX_ANSWER_BYTES = 256 * 1024 * 1024
#: Seconds an idle pooled connection is kept (the peer closes idle ones after 30 s).
IDLE_SECONDS = 20.0
#: Headers that belong to one hop, never relayed.
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade",
                         b"expect", b"content-length", b"host", b"x-request-id",
                         b"proxy-connection", b"trailer"})  # fmt: skip
#: Headers of a request never relayed: those above, and where a browser says the request
#: comes from, which the door that took the request has judged against its own ``Host``
#: (the relay names another).
NOT_RELAYED = HOP_HEADERS | cross_origin.HEADERS


class PeerUnavailable(Exception):
    """The peer did not answer in time, or its connection broke."""


class PeerAnswer:
    """A peer's answer: status, headers (lower-case names, hop headers dropped), body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        for header, value in self.headers:
            if header == name:
                return value
        return None


class StreamSink(Protocol):
    """Takes a streamed answer's body as it arrives."""

    def received(self, data: bytes) -> None: ...

    def finished(self, complete: bool) -> None: ...


def encode_request(method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                   request_id: str = "", *, keep_alive: bool = True) -> bytes:  # fmt: skip
    """The request as bytes; the original's headers in :data:`NOT_RELAYED` are left out."""
    lines = [b"%s %s HTTP/1.1\r\nhost: chanstore\r\n" % (method.encode(), target)]
    lines += [b"%s: %s\r\n" % (n, v) for n, v in headers if n not in NOT_RELAYED]
    if request_id:
        lines.append(b"x-request-id: %s\r\n" % request_id.encode())
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"content-length: %d\r\n\r\n" % len(body))
    lines.append(body)
    return b"".join(lines)


class PeerConnection(asyncio.Protocol):
    """One connection to a peer: one request at a time, its answer parsed by httptools."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.used_at = time.monotonic()
        self._answer: asyncio.Future[PeerAnswer] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._sink: StreamSink | None = None
        self._streamable = False
        self._streaming = False
        self._ended_early = False
        self._keep_alive = True

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(PeerUnavailable(f"a peer's answer could not be parsed: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(PeerUnavailable("the peer closed the connection"))
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.finished(False)

    # -- httptools callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = []
        self._size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self._keep_alive = self.parser.should_keep_alive()
        if self._streamable and any(name == b"content-type" and value.startswith(
                b"text/event-stream") for name, value in self._headers):  # fmt: skip
            self._resolve(PeerAnswer(self.parser.get_status_code(), self._relayed(), b""))
            self._streaming = True

    def on_body(self, body: bytes) -> None:
        if self._sink is not None:
            self._sink.received(body)
            return
        self._size += len(body)
        if self._size > MAX_ANSWER_BYTES and not self._streaming:
            self._fail(PeerUnavailable(f"a peer's answer is over {MAX_ANSWER_BYTES} bytes"))
            self.close()
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.finished(True)
            self.close()
            return
        if self._streaming:
            self._ended_early = True  # its sink is not attached yet: attach() tells it
            return
        self._resolve(PeerAnswer(self.parser.get_status_code(), self._relayed(),
                                 b"".join(self._body)))  # fmt: skip
        if not self._keep_alive:
            self.close()

    # -- use ---------------------------------------------------------------------------

    def send(self, data: bytes, *, streamable: bool = False) -> asyncio.Future[PeerAnswer]:
        """Send one request; its answer (for a stream: its head, the body to a sink)."""
        self._answer = asyncio.get_running_loop().create_future()
        self._streamable = streamable
        self._streaming = False
        self.transport.write(data)
        return self._answer

    def attach(self, sink: StreamSink) -> None:
        """Hand the rest of a streamed answer's body (and what came already) to ``sink``."""
        self._sink = sink
        if self._body:
            pending, self._body = b"".join(self._body), []
            sink.received(pending)
        if self._ended_early or self.lost:
            self._sink = None
            sink.finished(self._ended_early)
            self.close()

    @property
    def reusable(self) -> bool:
        return not self.lost and self._keep_alive and self._answer is None

    def pause(self, yes: bool) -> None:
        if self.lost:
            return
        if yes:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.lost = True

    def _relayed(self) -> list[tuple[bytes, bytes]]:
        return [(name, value) for name, value in self._headers if name not in HOP_HEADERS]

    def _resolve(self, answer: PeerAnswer) -> None:
        future, self._answer = self._answer, None
        self.used_at = time.monotonic()
        if future is not None and not future.done():
            future.set_result(answer)

    def _fail(self, error: Exception) -> None:
        future, self._answer = self._answer, None
        if future is not None and not future.done():
            future.set_exception(error)


async def connect(path: str, deadline: float) -> PeerConnection:
    """A connection to the peer at ``path``, retried until ``deadline`` (loop time)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            _, connection = await loop.create_unix_connection(PeerConnection, path)
            return connection
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if loop.time() + CONNECT_RETRY >= deadline:
                raise PeerUnavailable(f"the peer is not serving ({exc.strerror})") from None
            await asyncio.sleep(CONNECT_RETRY)
        except OSError as exc:
            raise PeerUnavailable(f"the peer cannot be reached ({exc.strerror})") from None


class PeerPool:
    """At most ``size`` keep-alive connections to the peer at ``path``."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self._idle: list[PeerConnection] = []
        self._open = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def request(self, data: bytes, timeout: float) -> PeerAnswer:
        """Send the encoded request ``data``; the answer within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                connection = await self._acquire(deadline)
                try:
                    answer = await connection.send(data)
                except BaseException:
                    connection.close()
                    self._release(connection)
                    raise
                self._release(connection)
                return answer
        except TimeoutError:
            raise PeerUnavailable(f"the peer did not answer within {timeout:g}s") from None

    async def stream(self, data: bytes, timeout: float) -> tuple[PeerAnswer, PeerConnection]:
        """Send a request whose answer may be a stream, on a connection of its own: the
        answer (its head only, for a stream) and the connection, which the caller closes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        connection: PeerConnection | None = None
        try:
            async with asyncio.timeout_at(deadline):
                connection = await connect(self.path, deadline)
                answer = await connection.send(data, streamable=True)
        except TimeoutError:
            if connection is not None:
                connection.close()
            raise PeerUnavailable(f"the peer did not answer within {timeout:g}s") from None
        except BaseException:
            if connection is not None:
                connection.close()
            raise
        return answer, connection

    async def _acquire(self, deadline: float) -> PeerConnection:
        while True:
            while self._idle:
                connection = self._idle.pop()
                if connection.reusable and time.monotonic() - connection.used_at < IDLE_SECONDS:
                    return connection
                connection.close()
                self._open -= 1
            if self._open < self.size:
                self._open += 1
                try:
                    return await connect(self.path, deadline)
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, but leaving (a timeout): the turn goes on
                else:
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        self._waiting.remove(waiter)
                raise

    def _release(self, connection: PeerConnection) -> None:
        if connection.reusable:
            self._idle.append(connection)
        else:
            connection.close()
            self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._open -= len(self._idle)
        self._idle.clear()


async def request_once(path: str, method: str, target: str, timeout: float,
                       body: bytes = b"") -> PeerAnswer:  # fmt: skip
    """One request to the peer at ``path`` on a connection of its own (a gathering:
    metrics, readiness, a reload's verdict)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    connection: PeerConnection | None = None
    try:
        async with asyncio.timeout_at(deadline):
            connection = await connect(path, deadline)
            return await connection.send(
                encode_request(method, target.encode(), [], body, keep_alive=False)
            )
    except TimeoutError:
        raise PeerUnavailable(f"the peer did not answer within {timeout:g}s") from None
    finally:
        if connection is not None:
            connection.close()
