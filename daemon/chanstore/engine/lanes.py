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
own thread, which then goes on to the next batch itself while the loop
settles the one before: handing each batch to the thread and its answers
back to the loop took a millisecond in which the disk sat idle (a sixth of
a batch of four 100 KB files). A batch with a conditional write is the
exception: its check reads memory, which every batch before it must have
settled, so it waits for the loop to hand it over. Lanes belong to one
container, so a slow or dead backend stalls only the writes to its own
container.

A batch that outlives the backend timeout fails its writes' futures with
:class:`~chanstore.engine.errors.BackendTimeout` (one timer per batch, not per
write), while the lane keeps waiting for the backend: the writes may still
land, and their owners hear of it through :meth:`WriteOwner.settled`.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
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
        self._lane(writes[0].route).submit(*writes)
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


class _Batch:
    """Writes a lane stores together, and the timer that fails them if the backend is late."""

    __slots__ = ("deadline", "writes")

    def __init__(self, writes: list[Write]) -> None:
        self.writes = writes
        self.deadline: asyncio.TimerHandle | None = None


class _Lane:
    def __init__(self, name: str, fan_out: ThreadPoolExecutor, timeout: float) -> None:
        self.name = name
        self._queue: list[Write] = []
        # The queue is cut into batches on the event loop and on the lane's thread.
        self._queue_lock = threading.Lock()
        self._writing = 0
        self._fan_out = fan_out
        self._timeout = timeout
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"chanstore-write-{name}")
        self._wakeup = asyncio.Event()
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"lane {name}")

    @property
    def queued(self) -> int:
        return len(self._queue) + self._writing

    def submit(self, *writes: Write) -> None:
        """Queue ``writes`` (several: made together, so they stay in one batch)."""
        if self._closing:
            raise RuntimeError("write lane is closed")
        with self._queue_lock:
            self._queue.extend(writes)
        self._wakeup.set()

    async def _run(self) -> None:
        while not (self._closing and not self._queue):
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                await self._write_batch()

    async def _write_batch(self) -> None:
        """Write the next batch (and, on the lane's thread, those after it that may follow
        it there), then settle its writes.

        A frame of its own, so that nothing of the batch stays referenced while
        the lane waits for more (each write's owner holds its channel).
        """
        batch = self._next_batch(on_thread=False)
        if batch is None:  # none queued: the lane's thread takes none while none is on it
            return
        self._start(batch)
        # Backend events logged while a batch is stored name its requests.
        context = contextvars.copy_context()
        if stores_on_loop(batch.writes):
            try:
                results = await self._loop.create_task(
                    apply_batch_on_loop(batch.writes), context=_naming(batch, context)
                )
            except Exception as exc:  # noqa: BLE001 - the pool itself failed: fail the batch
                results = [exc] * len(batch.writes)
            self._settle(batch, results)
            return
        try:
            await self._loop.run_in_executor(self._thread, self._store_on_thread, batch, context)
        except Exception as exc:  # noqa: BLE001 - the pool itself failed: fail the batch
            self._settle(batch, [exc] * len(batch.writes))

    def _store_on_thread(self, batch: _Batch, context: contextvars.Context) -> None:
        """Store ``batch``, then the batches after it for as long as they may follow on this
        thread, each settled on the loop as soon as it is stored: the disk need not wait
        for the loop to settle one batch before the next begins. Raises nothing."""
        while True:
            try:
                results = _naming(batch, context).run(apply_batch, batch.writes, self._fan_out)
            except Exception as exc:  # noqa: BLE001 - every write of the batch answers it
                results = [exc] * len(batch.writes)
            following = self._next_batch(on_thread=True)
            if following is not None:
                self._loop.call_soon_threadsafe(self._start, following)
            self._loop.call_soon_threadsafe(self._settle, batch, results)
            if following is None:
                return
            batch = following

    def _next_batch(self, on_thread: bool) -> _Batch | None:
        """The next batch, taken off the queue; on the lane's thread, None where it must be
        stored from the loop instead: when it stores on the loop, or when it holds a
        conditional write, whose check reads memory, which the batches before it must
        have settled first (:meth:`~chanstore.engine.batches.Owner.known_etag`)."""
        with self._queue_lock:
            queue = self._queue
            if not queue:
                return None
            end = _batch_end(queue)
            writes = queue[:end]
            if on_thread and (stores_on_loop(writes)
                              or any(write.condition is not None for write in writes)):  # fmt: skip
                return None
            self._queue = queue[end:]
            self._writing += end
        return _Batch(writes)

    def _start(self, batch: _Batch) -> None:
        batch.deadline = self._loop.call_later(self._timeout, _expire, batch.writes, self.name,
                                               self._timeout)  # fmt: skip

    def _settle(self, batch: _Batch, results: list[Outcome]) -> None:
        if batch.deadline is not None:
            batch.deadline.cancel()
        with self._queue_lock:
            self._writing -= len(batch.writes)
        for write, result in zip(batch.writes, results, strict=True):
            _resolve(write, result)

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        await self._task
        self._thread.shutdown(wait=True)


def _naming(batch: _Batch, context: contextvars.Context) -> contextvars.Context:
    """A copy of ``context`` that names the batch's requests in the backend's log events."""
    named = context.copy()
    request_ids = [write.request_id for write in batch.writes[:LOGGED_REQUEST_IDS]]
    named.run(structlog.contextvars.bind_contextvars, request_ids=request_ids)
    return named


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
