"""Write lanes: writes applied in the order they were acknowledged, in batches.

Each container has a few lanes; a channel always goes to the same lane, so
writes to one channel's container are applied, and acknowledged, in the order
they arrived, and writes made together (a conditional bulk write) stay in one
lane and one batch. A lane
takes everything that queued up while its previous batch was being written
and applies it as one batch (see :mod:`chanstore.engine.batches`): one Redis
round trip, or one journal flush, shared by the writes that were waiting
anyway. A write is acknowledged only once its batch is stored, so batching
makes nothing less durable.

A batch of sets to backends that store on the event loop (Redis, with
redis-py's asyncio client) is stored there; any other batch on the lane's
own thread. Lanes belong to one container, so a slow or dead backend stalls
only the writes to its own container.

A batch that outlives the backend timeout fails its writes' futures with
:class:`~chanstore.engine.errors.BackendTimeout` (one timer per batch, not per
write), while the lane keeps waiting for the backend: the writes may still
land, and their owners hear of it through :meth:`WriteOwner.settled`.
"""

from __future__ import annotations

import asyncio
import contextvars
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import structlog

from chanstore import logs
from chanstore.backends.base import DatabaseInterface
from chanstore.engine.batches import Outcome, apply_batch, apply_batch_on_loop, stores_on_loop
from chanstore.engine.errors import BackendTimeout
from chanstore.errors import error_kind
from chanstore.versions import Expectation

__all__ = ["MAX_BATCH", "Condition", "Write", "WriteLanes", "WriteOwner"]

log = logs.get_logger()

#: Writes one batch holds at most; the rest wait for the next batch.
MAX_BATCH = 512
#: Threads per container that write to the several backends of one batch at once.
FAN_OUT_THREADS = 8
#: Request ids a failed batch's log event names at most.
LOGGED_REQUEST_IDS = 20


class WriteOwner(Protocol):
    """Whoever must follow a stored write (the cache): told first, whoever still waits."""

    def settled(self, write: Write, outcome: Outcome) -> None: ...


class Condition:
    """What a conditional write requires, shared by the writes made together with it.

    ``expect`` maps keys to their expectations (see :mod:`chanstore.versions`);
    the writes of one condition are stored together or not at all, and each
    write's future fails with :class:`~chanstore.errors.PreconditionFailed`
    when an expectation does not hold.
    """

    __slots__ = ("expect", "size")

    def __init__(self, expect: dict[str, Expectation], size: int) -> None:
        self.expect = expect
        #: How many writes are made together under this condition.
        self.size = size


class Write:
    """One queued set (``delete`` false) or delete of ``key`` in ``backend``.

    ``future`` ends with the outcome once the backend answered; ``owner``
    hears of it just before, even if nobody waits for the future any more.
    A set carries its value's stored form (``body``) and ETag, made once on
    the event loop for the answer, the cache and the change feed. Writes with
    the same ``route`` (a channel) take the same lane, so they are applied in
    the order they were queued.
    """

    __slots__ = ("backend", "body", "condition", "delete", "etag", "future", "key", "owner",
                 "request_id", "route", "value")  # fmt: skip

    def __init__(self, backend: DatabaseInterface, key: str, value: Any, delete: bool,  # noqa: PLR0917
                 owner: WriteOwner, request_id: str = "", route: str = "") -> None:  # fmt: skip
        self.backend = backend
        self.key = key
        self.value = value
        self.delete = delete
        self.owner = owner
        self.request_id = request_id
        self.route = route
        self.body: bytes | None = None
        self.etag: str | None = None
        self.condition: Condition | None = None
        self.future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()


class WriteLanes:
    """The write lanes of one container."""

    def __init__(self, name: str, lanes: int, timeout: float) -> None:
        self.name = name
        self._fan_out = ThreadPoolExecutor(FAN_OUT_THREADS, f"chanstore-fan-out-{name}")
        self._lanes = [_Lane(f"{name}-{index}", self._fan_out, timeout) for index in range(lanes)]

    def submit(self, write: Write) -> asyncio.Future[bool]:
        """Queue ``write``; its future is True once stored (for a delete: the key existed)."""
        self._lane(write.route).submit(write)
        return write.future

    def submit_together(self, writes: list[Write]) -> list[asyncio.Future[bool]]:
        """Queue ``writes`` (one route, one :class:`Condition`) to be applied as one."""
        lane = self._lane(writes[0].route)
        for write in writes:
            lane.submit(write)
        return [write.future for write in writes]

    def _lane(self, route: str) -> _Lane:
        lanes = self._lanes
        return lanes[0] if len(lanes) == 1 else lanes[_lane_of(route, len(lanes))]

    @property
    def queued(self) -> int:
        """Writes queued or being written."""
        return sum(lane.queued for lane in self._lanes)

    async def close(self) -> None:
        """Finish every queued write, then stop the lanes' threads."""
        await asyncio.gather(*(lane.close() for lane in self._lanes))
        self._fan_out.shutdown(wait=True)


def _lane_of(route: str, lanes: int) -> int:
    return zlib.crc32(route.encode("utf-8", "surrogatepass")) % lanes


class _Lane:
    def __init__(self, name: str, fan_out: ThreadPoolExecutor, timeout: float) -> None:
        self.name = name
        self._queue: list[Write] = []
        self._writing = 0
        self._fan_out = fan_out
        self._timeout = timeout
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"chanstore-write-{name}")
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lane {name}")

    @property
    def queued(self) -> int:
        return len(self._queue) + self._writing

    def submit(self, write: Write) -> None:
        if self._closing:
            raise RuntimeError("write lane is closed")
        self._queue.append(write)
        self._wakeup.set()

    async def _run(self) -> None:
        while not (self._closing and not self._queue):
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._write_batch()

    async def _write_batch(self) -> None:
        """Write the next batch, then settle its writes.

        A frame of its own, so that nothing of the batch stays referenced while
        the lane waits for more (each write's owner holds its channel).
        """
        end = _batch_end(self._queue)
        batch, self._queue = self._queue[:end], self._queue[end:]
        self._writing = len(batch)
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self._timeout, _expire, batch, self.name, self._timeout)
        # Backend events logged while this batch is stored name its requests.
        context = contextvars.copy_context()
        request_ids = [write.request_id for write in batch[:LOGGED_REQUEST_IDS]]
        context.run(structlog.contextvars.bind_contextvars, request_ids=request_ids)
        try:
            if stores_on_loop(batch):
                results = await loop.create_task(apply_batch_on_loop(batch), context=context)
            else:
                results = await loop.run_in_executor(
                    self._thread, context.run, apply_batch, batch, self._fan_out
                )
        except Exception as exc:  # noqa: BLE001 - the pool itself failed: fail the batch
            results = [exc] * len(batch)
        finally:
            self._writing = 0
            deadline.cancel()
        for write, result in zip(batch, results, strict=True):
            _resolve(write, result)

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        await self._task
        self._thread.shutdown(wait=True)


def _batch_end(queue: list[Write]) -> int:
    """Where the next batch ends: at MAX_BATCH, but never inside writes made together."""
    end = min(MAX_BATCH, len(queue))
    while end < len(queue) and queue[end].condition is not None \
            and queue[end].condition is queue[end - 1].condition:  # fmt: skip
        end += 1
    return end


def _resolve(write: Write, outcome: Outcome) -> None:
    write.owner.settled(write, outcome)
    if write.future.done():  # timed out, or the caller gave up waiting
        return
    if isinstance(outcome, BaseException):
        write.future.set_exception(outcome)
    else:
        write.future.set_result(outcome)


def _expire(batch: list[Write], lane: str, timeout: float) -> None:
    late = BackendTimeout(f"the backend did not store the write within {timeout:g}s "
                          "(it may still land)")  # fmt: skip
    pending = [write for write in batch if not write.future.done()]
    for write in pending:
        write.future.set_exception(late)
    if pending:
        log.error("write_batch_timed_out", lane=lane, writes=len(pending),
                  error_kind=error_kind(late),
                  request_ids=[w.request_id for w in pending[:LOGGED_REQUEST_IDS]])  # fmt: skip
