"""Every open connection, within bounds: how many, how long idle, how long a head may take.

One :class:`Connections` per daemon admits each new connection (at the cap of
``max_connections`` it closes the longest-idle one to make room, so that a
flood of idle sockets cannot lock real clients out; when none is idle, the
newcomer is refused), and sweeps them all every :data:`SWEEP_INTERVAL`
seconds for deadlines: a head that takes longer than ``header_timeout``, a
body longer than ``body_timeout``, a keep-alive connection idle longer than
``keep_alive_timeout``, a client that has not read its answers for that long
either. A sweep replaces a timer per request, which cost a
tenth of a cached read to arm and cancel; the price is that deadlines are
kept to within a sweep interval.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from chanstore import logs
from chanstore.metrics import Metrics

__all__ = ["SWEEP_INTERVAL", "Connection", "Connections", "Limits"]

log = logs.get_logger()

#: Seconds between two sweeps for deadlines.
SWEEP_INTERVAL = 0.5
#: Reasons a connection ends, the ``reason`` label of the closed-connections counter.
REASONS = ("client", "idle_timeout", "header_timeout", "body_timeout", "write_timeout",
           "evicted", "refused", "error", "shutdown", "stream_ended")  # fmt: skip


@dataclass(frozen=True)
class Limits:
    """What one connection, and all of them together, may hold."""

    max_connections: int = 4096
    #: Bytes of a request line and headers together.
    max_header_bytes: int = 32 * 1024
    max_body_bytes: int = 1024 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    keep_alive_timeout: float = 30.0
    #: Requests read ahead of their answers on one connection before reading pauses.
    max_pipelined: int = 16
    #: Seconds between keep-alive comments on an idle change-feed stream.
    heartbeat_interval: float = 15.0


class Connection(Protocol):
    """What :class:`Connections` asks of a connection."""

    def idle(self) -> bool: ...

    def check_deadlines(self, now: float) -> None: ...

    def close_for(self, reason: str) -> None: ...

    def stop_serving(self) -> None: ...


class Connections:
    """The open connections, least recently active first."""

    def __init__(self, limits: Limits, metrics: Metrics) -> None:
        self.limits = limits
        #: The loop's clock as of the last sweep: what connections stamp their
        #: phases with, so that no request pays for reading the clock.
        self.now = 0.0
        self._open: OrderedDict[Connection, None] = OrderedDict()
        self._gauge = metrics.http_connections
        metrics.http_connections_max.set(limits.max_connections)
        self._closed = {reason: metrics.http_connections_closed.labels(reason)
                        for reason in REASONS}  # fmt: skip
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    def __len__(self) -> int:
        return len(self._open)

    def start(self) -> None:
        """Start sweeping (on the running loop)."""
        self.now = asyncio.get_running_loop().time()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="connections")

    def admit(self, connection: Connection) -> bool:
        """Take ``connection`` in, making room at the cap; False when there is none."""
        if len(self._open) >= self.limits.max_connections and not self._evict_one():
            return False
        self._open[connection] = None
        self._gauge.set(len(self._open))
        return True

    def active(self, connection: Connection) -> None:
        """``connection`` just received something: it is the most recently active."""
        self._open.move_to_end(connection)

    def closed(self, connection: Connection, reason: str) -> None:
        """``connection`` ended, for ``reason`` (one of :data:`REASONS`)."""
        if self._open.pop(connection, False) is None:
            self._gauge.set(len(self._open))
        self._closed[reason].inc()
        if not self._open:
            self._stopped.set()

    def refused(self) -> None:
        """A connection was turned away at the cap."""
        self._closed["refused"].inc()

    def _evict_one(self) -> bool:
        for connection in self._open:  # least recently active first
            if connection.idle():
                connection.close_for("evicted")
                return True
        return False

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.now = loop.time()
            for connection in list(self._open):
                try:
                    connection.check_deadlines(self.now)
                except Exception:
                    log.exception("connection_sweep_crashed")

    def cut(self) -> None:
        """Close every connection now, answered or not (a second stop signal)."""
        for connection in list(self._open):
            connection.close_for("shutdown")

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections now, the others once their answers are written;
        after ``timeout`` seconds, close whatever is left."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self._open):
            connection.stop_serving()
        if self._open:
            self._stopped.clear()
            try:
                await asyncio.wait_for(self._stopped.wait(), timeout)
            except TimeoutError:
                log.warning("connections_cut", count=len(self._open))
        self.cut()
