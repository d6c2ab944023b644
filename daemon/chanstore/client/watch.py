"""The change feed (DESIGN.md section 6): a channel's changes as they happen.

:meth:`Client.watch` and :meth:`AsyncClient.watch` yield a channel's changes
as :class:`WatchEvent` s, resuming by themselves after a dropped connection::

    with client.watch("c1", containers=["stats"]) as events:
        for event in events:        # ready, then set and delete as they happen
            print(event.kind, event.key, event.value)

:class:`Watch` and :class:`AsyncWatch` open the connections; what a watch
knows between them (where to resume, and when) is one ``_Feed`` they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import httpx

from chanstore.client.api import feed_path
from chanstore.client.bodies import revive_document
from chanstore.client.errors import ClientError, CursorExpired, raise_for, unreachable
from chanstore.client.sse import WATCH_MAX_EVENT_BYTES, RawEvent, SSEDecoder

__all__ = [
    "WATCH_FIRST_DELAY",
    "WATCH_IDLE_TIMEOUT",
    "WATCH_MAX_DELAY",
    "AsyncWatch",
    "Watch",
    "WatchEvent",
]

#: Seconds a change-feed stream may stay silent before it is taken for dead and
#: reopened: three times the daemon's heartbeat (a comment line at least every 15 s).
WATCH_IDLE_TIMEOUT = 45.0
#: The wait before reopening a stream, until the daemon sends its own (``retry:``).
WATCH_FIRST_DELAY = 1.0
#: The longest wait between two attempts to reopen a stream.
WATCH_MAX_DELAY = 10.0

#: Where a watch says it resumes: the logger of the whole package, which
#: ``chanstore watch`` shows on stderr.
_log = logging.getLogger("chanstore.client")


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event of a channel's change feed (:meth:`Client.watch`).

    ``kind`` is ``"ready"`` (the stream is open and every change after
    ``cursor`` follows; a watch yields one after each connection it opens,
    the first and every automatic resume), ``"set"`` (``key`` of
    ``container`` now holds ``value``, revived like :meth:`Client.get`'s,
    whose ETag is ``etag``) or ``"delete"`` (``key`` of ``container`` is
    gone). ``cursor`` is the event's id: ``watch(..., since=cursor)`` resumes
    after it. ``document`` is the value in its stored form, type marks and
    all, as the daemon sent it (None for ready and delete, as are ``value``
    and ``etag``; ``container`` and ``key`` are None for ready).
    """

    kind: Literal["ready", "set", "delete"]
    channel: str
    container: str | None
    key: str | None
    value: Any
    etag: str | None
    cursor: str
    document: Any = field(default=None, repr=False, compare=False)


class _End(NamedTuple):
    """The daemon's ``end`` event: it closes the stream now, for ``reason``."""

    reason: str


def _checked_cursor(cursor: str | None) -> str | None:
    """``since``, which is sent as a header: printable ASCII, no spaces around it."""
    if cursor is None:
        return None
    if not isinstance(cursor, str):
        raise TypeError(f"since must be a str (an event's cursor), not {type(cursor).__name__}")
    if not cursor or not all(" " < char < "\x7f" for char in cursor):
        raise ValueError(f"since={cursor!r:.100} is not a cursor (printable ASCII)")
    return cursor


def _check_watch_limits(idle_timeout: float, max_event_bytes: int) -> None:
    if not idle_timeout > 0:
        raise ValueError(f"idle_timeout must be positive, not {idle_timeout!r}")
    if not max_event_bytes > 0:
        raise ValueError(f"max_event_bytes must be positive, not {max_event_bytes!r}")


class _Feed:
    """What a watch knows between its connections: where to resume, and when.

    It does no I/O; :class:`Watch` and :class:`AsyncWatch` open the
    connections and hand it what they read.
    """

    def __init__(self, url: str, channel: str, containers: Iterable[str] | str | None,
                 since: str | None, max_event_bytes: int) -> None:  # fmt: skip
        self.url = url
        self.channel = channel
        self.path = feed_path(channel, containers)
        #: The id of the last event handed over (or ``since``): where a resume starts.
        self.cursor = _checked_cursor(since)
        self.max_event_bytes = max_event_bytes
        self.base_delay = WATCH_FIRST_DELAY
        self.failures = 0  # connections in a row that failed before their ready
        self.opened = False  # a stream was opened once: from then on, failures are retried
        self.resumed = False  # the current connection asked for the events after a cursor
        self.ready = False  # the current connection's ready arrived
        self.why = "the stream ended"

    def headers(self) -> dict[str, str]:
        """The headers of the next connection (``Last-Event-ID`` once there is a cursor)."""
        self.resumed = self.cursor is not None
        self.ready = False
        headers = {"accept": "text/event-stream", "cache-control": "no-cache"}
        if self.cursor is not None:
            headers["last-event-id"] = self.cursor
        return headers

    def decoder(self) -> SSEDecoder:
        return SSEDecoder(self.cursor or "", self.max_event_bytes)

    def opens(self, response: httpx.Response) -> bool:
        """Whether ``response`` (its body read unless 200) opens a stream: False when it
        is to be asked again later (503 and the like); raises for every other answer."""
        status = response.status_code
        if status == 200:
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                raise ClientError(f"the daemon answered {kind!r:.100} to a watch, "
                                  "not text/event-stream", status)  # fmt: skip
            self.opened = True
            return True
        if status in (502, 503, 504):
            self.failures += 1
            self.why = f"{status}: {response.text[:200]}"
            return False
        try:
            raise_for(response)
        except CursorExpired as exc:
            exc.cursor = self.cursor
            raise
        raise ClientError(f"{status}: a watch was answered with no stream", status)

    def lost(self, exc: httpx.TransportError) -> None:
        """The connection failed or broke: DaemonUnreachable before any stream opened,
        else it will be opened again."""
        if not self.opened:
            raise unreachable(self.url, exc) from exc
        if not self.ready:
            self.failures += 1
        self.why = f"connection lost ({type(exc).__name__}: {exc})"

    def interpret(self, raw: RawEvent, decoder: SSEDecoder) -> WatchEvent | _End | None:
        """The event to hand over for ``raw``, an :class:`_End`, or None (nothing to hand)."""
        if decoder.retry is not None:
            self.base_delay = min(max(decoder.retry, 0.05), WATCH_MAX_DELAY)
        if raw.type == "ready":
            self.ready = True
            self.failures = 0
            # Resumed, the events after our cursor may follow this ready: keep the cursor.
            if raw.id and not self.resumed:
                self.cursor = raw.id
            return WatchEvent("ready", self.channel, None, None, None, None, raw.id)
        if raw.type in ("set", "delete"):
            try:
                return self._change(raw)
            finally:
                # Even past an event that cannot be read, so that since=cursor skips it.
                if raw.id:
                    self.cursor = raw.id
        if raw.type == "end":
            try:
                reason = json.loads(raw.data).get("reason")
            except (ValueError, AttributeError):
                reason = None
            return _End(str(reason or "unknown"))
        if raw.id:  # an event this client does not know: passed over, never asked again
            self.cursor = raw.id
        return None

    def _change(self, raw: RawEvent) -> WatchEvent:
        try:
            data = json.loads(raw.data)
            container, key = data["container"], data["key"]
            if not isinstance(container, str) or not isinstance(key, str):
                raise TypeError("container and key must be strings")
            if raw.type == "delete":
                return WatchEvent("delete", self.channel, container, key, None, None, raw.id)
            etag, document = data["etag"], data["value"]
            if not isinstance(etag, str):
                raise TypeError("etag must be a string")
            value = revive_document(document)
        except (ValueError, KeyError, TypeError) as exc:
            what = f"a {raw.type} event of the change feed cannot be read"
            message = f"{what} ({exc}): {raw.data:.200}"
            raise ClientError(message) from exc
        return WatchEvent("set", self.channel, container, key, value, etag, raw.id, document)

    def ended(self, end: _End | None) -> None:
        """The stream ended: with the daemon's ``end`` event, or without a word."""
        if end is not None:
            self.why = f"the daemon ended the stream ({end.reason})"
        else:
            self.why = "the stream ended without an end event"
            if not self.ready:
                self.failures += 1

    def delay(self) -> float:
        """Seconds to wait before the next connection: the daemon's ``retry`` (1 s until
        it says), doubled for each failure in a row past the first, at most
        WATCH_MAX_DELAY, each drawn from its upper half."""
        ceiling = min(WATCH_MAX_DELAY, self.base_delay * 2 ** max(0, self.failures - 1))
        delay = ceiling * random.uniform(0.5, 1.0)
        level = logging.INFO if self.failures == 0 else logging.WARNING
        _log.log(level, "watch of channel %r: %s; resuming after cursor %s in %.2f s",
                 self.channel, self.why, self.cursor, delay)  # fmt: skip
        return delay


class _SyncClient(Protocol):
    """What a :class:`Watch` uses of the Client that opened it (its stream is one of the pool's)."""

    url: str
    timeout: float
    _http: httpx.Client


class _AsyncClient(Protocol):
    """What an :class:`AsyncWatch` uses of the AsyncClient that opened it."""

    url: str
    timeout: float
    _http: httpx.AsyncClient


def _socket_of(response: httpx.Response) -> Any:
    """The socket under a streaming response, when the transport says (httpcore does):
    a socket.socket, or asyncio's TransportSocket, which has ``shutdown`` too."""
    stream = response.extensions.get("network_stream")
    try:
        sock = stream.get_extra_info("socket") if stream is not None else None
    except Exception:  # noqa: BLE001 - a transport without it: closing from elsewhere then waits
        return None
    return sock if callable(getattr(sock, "shutdown", None)) else None


def _shut(sock: Any) -> None:
    """Wake whoever reads ``sock`` (in another thread or task): it reads the end of the stream."""
    if sock is not None:
        with contextlib.suppress(OSError):  # closed already
            sock.shutdown(socket.SHUT_RDWR)


class Watch(Iterator[WatchEvent]):
    """A channel's change feed as an iterator of :class:`WatchEvent` (:meth:`Client.watch`).

    The first ``next()`` opens the stream. When the connection drops, goes
    silent for ``idle_timeout`` seconds (the daemon's heartbeat comes at least
    every 15 s), or the daemon ends the stream (shutdown, reload, a reader too
    slow), it opens it again, with ``Last-Event-ID`` set to :attr:`cursor`,
    after a jittered delay that doubles with each failure in a row (from the
    daemon's ``retry``, at most WATCH_MAX_DELAY); a ``ready`` event follows
    each connection. It raises DaemonUnreachable when the first connection
    fails, :class:`CursorExpired` when the daemon no longer holds the events
    after the cursor (read again, then watch without ``since``), and
    ClientError for other refusals (401, 404 unknown container, 400 malformed
    cursor); a 503 (too many watchers) is asked again later.

    :meth:`close` (also on leaving a ``with`` block) closes the connection; it
    may be called from another thread, and the thread waiting in ``next()``
    then gets StopIteration.
    """

    def __init__(self, client: _SyncClient, channel: str,
                 containers: Iterable[str] | str | None, since: str | None, *,
                 idle_timeout: float = WATCH_IDLE_TIMEOUT,
                 max_event_bytes: int = WATCH_MAX_EVENT_BYTES) -> None:  # fmt: skip
        _check_watch_limits(idle_timeout, max_event_bytes)
        self._client = client
        self._feed = _Feed(client.url, channel, containers, since, max_event_bytes)
        self._timeout = httpx.Timeout(client.timeout, read=idle_timeout)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socket: Any = None  # the stream's socket, while one is open
        self._events = self._run()

    @property
    def channel(self) -> str:
        return self._feed.channel

    @property
    def cursor(self) -> str | None:
        """The cursor of the last event handed over (or ``since``): where a resume starts."""
        return self._feed.cursor

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> WatchEvent:
        return next(self._events)

    def close(self) -> None:
        """Close the stream and end the iteration; from any thread, any number of times."""
        self._stop.set()
        with self._lock:
            _shut(self._socket)
        # ValueError: another thread is inside next(); its stream was shut, so it returns.
        with contextlib.suppress(ValueError):
            self._events.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _hold(self, response: httpx.Response | None) -> None:
        with self._lock:
            self._socket = _socket_of(response) if response is not None else None
            if self._stop.is_set():
                _shut(self._socket)

    def _run(self) -> Generator[WatchEvent, None, None]:
        feed, http = self._feed, self._client._http  # the client's own pool
        while not self._stop.is_set():
            try:
                with http.stream("GET", feed.path, headers=feed.headers(),
                                 timeout=self._timeout) as response:  # fmt: skip
                    if response.status_code != 200:
                        response.read()
                    if feed.opens(response):
                        self._hold(response)
                        try:
                            yield from self._read(response)
                        finally:
                            self._hold(None)
            except httpx.TransportError as exc:
                if self._stop.is_set():
                    return
                feed.lost(exc)
            if self._stop.is_set() or self._stop.wait(feed.delay()):
                return

    def _read(self, response: httpx.Response) -> Generator[WatchEvent, None, None]:
        feed = self._feed
        decoder = feed.decoder()
        for chunk in response.iter_bytes():
            for raw in decoder.feed(chunk):
                outcome = feed.interpret(raw, decoder)
                if isinstance(outcome, _End):
                    feed.ended(outcome)
                    return
                if outcome is not None:
                    yield outcome
        feed.ended(None)


class AsyncWatch(AsyncIterator[WatchEvent]):
    """A channel's change feed as an async iterator (:meth:`AsyncClient.watch`).

    It behaves as :class:`Watch` does. :meth:`aclose` (also on leaving an
    ``async with`` block) closes the connection; called from another task
    while one waits in ``anext()``, it shuts the stream and that task gets
    StopAsyncIteration. Cancelling the task that iterates works too.
    """

    def __init__(self, client: _AsyncClient, channel: str,
                 containers: Iterable[str] | str | None, since: str | None, *,
                 idle_timeout: float = WATCH_IDLE_TIMEOUT,
                 max_event_bytes: int = WATCH_MAX_EVENT_BYTES) -> None:  # fmt: skip
        _check_watch_limits(idle_timeout, max_event_bytes)
        self._client = client
        self._feed = _Feed(client.url, channel, containers, since, max_event_bytes)
        self._timeout = httpx.Timeout(client.timeout, read=idle_timeout)
        self._stopped = False
        self._wake: asyncio.Event | None = None
        self._socket: Any = None  # the stream's socket, while one is open
        self._events = self._run()

    @property
    def channel(self) -> str:
        return self._feed.channel

    @property
    def cursor(self) -> str | None:
        """The cursor of the last event handed over (or ``since``): where a resume starts."""
        return self._feed.cursor

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Close the stream and end the iteration, any number of times."""
        self._stopped = True
        if self._wake is not None:
            self._wake.set()
        _shut(self._socket)
        # RuntimeError: another task is inside anext(); its stream was shut, so it returns.
        with contextlib.suppress(RuntimeError):
            await self._events.aclose()

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _hold(self, response: httpx.Response | None) -> None:
        self._socket = _socket_of(response) if response is not None else None
        if self._stopped:
            _shut(self._socket)

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the watch is closed meanwhile; whether it was."""
        if self._wake is None:
            self._wake = asyncio.Event()
        if not self._stopped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), seconds)
        return self._stopped

    async def _run(self) -> AsyncGenerator[WatchEvent, None]:
        feed, http = self._feed, self._client._http  # the client's own pool
        while not self._stopped:
            try:
                async with http.stream("GET", feed.path, headers=feed.headers(),
                                       timeout=self._timeout) as response:  # fmt: skip
                    if response.status_code != 200:
                        await response.aread()
                    if feed.opens(response):
                        self._hold(response)
                        try:
                            decoder, end = feed.decoder(), None
                            async for chunk in response.aiter_bytes():
                                for raw in decoder.feed(chunk):
                                    outcome = feed.interpret(raw, decoder)
                                    if isinstance(outcome, _End):
                                        end = outcome
                                        break
                                    if outcome is not None:
                                        yield outcome
                                if end is not None:
                                    break
                            feed.ended(end)
                        finally:
                            self._hold(None)
            except httpx.TransportError as exc:
                if self._stopped:
                    return
                feed.lost(exc)
            if self._stopped or await self._pause(feed.delay()):
                return
