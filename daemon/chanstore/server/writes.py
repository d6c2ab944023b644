"""Write lanes: writes applied in the order they were acknowledged, in batches.

Each container has a few lanes; a key always goes to the same lane, so writes
to one key are applied, and acknowledged, in the order they arrived. A lane
takes everything that queued up while its previous batch was being written
and writes it as one batch on its own thread: one ``set_many`` per backend
(one Redis round trip, or one folder fsync for many files) instead of one
call per write. A batch usually spans several channels, so several backends:
their calls run at the same time, on the container's fan-out threads, so that
the batch costs about one round trip or one disk flush rather than one per
channel (a file system merges concurrent fsyncs into one journal commit). A
write is acknowledged only when its batch is stored, so batching makes
nothing less durable; it only shares the cost of the disk or the round trip
among the writes that were waiting anyway.

A batch of sets to backends that can store on the event loop (Redis, with
redis-py's asyncio client: ``set_many_together_async``) is stored there, with
no thread at all: one pipeline per connection pool, awaited by the lane.

Lanes belong to one container, so a slow or dead backend stalls only the
writes to its own container.
"""

from __future__ import annotations

import asyncio
import functools
import zlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from chanstore.backends.base import DatabaseInterface
from chanstore.errors import BulkWriteError

__all__ = [
    "MAX_BATCH",
    "Write",
    "WriteLanes",
    "applies_on_loop",
    "apply_batch",
    "apply_batch_async",
]

#: Writes one batch holds at most; the rest wait for the next batch.
MAX_BATCH = 512
#: Threads per container that write to the several backends of one batch at once.
FAN_OUT_THREADS = 8


def _loop_future() -> asyncio.Future[bool]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False, slots=True)
class Write:
    """One queued set (``delete`` false) or delete of ``key`` in ``backend``.

    ``settle``, if given, is called on the event loop with the outcome (True or
    False, or the error) as soon as the backend answered, before ``future`` is
    resolved and even if nobody waits for ``future`` any more (it may have
    been cancelled): what must follow a stored write (the cache) never
    depends on the caller still being there.
    """

    backend: DatabaseInterface
    key: str
    value: Any = None
    delete: bool = False
    future: asyncio.Future[bool] = field(default_factory=_loop_future)
    settle: Callable[[bool | BaseException], None] | None = None


class WriteLanes:
    """The write lanes of one container."""

    def __init__(self, name: str, lanes: int) -> None:
        self.name = name
        self._fan_out = ThreadPoolExecutor(FAN_OUT_THREADS, f"chanstore-fan-out-{name}")
        self._lanes = [_Lane(f"{name}-{index}", self._fan_out) for index in range(lanes)]

    def submit(self, write: Write) -> asyncio.Future[bool]:
        """Queue ``write``; the future is True once stored (for a delete: the key existed)."""
        index = zlib.crc32(write.key.encode("utf-8", "surrogatepass")) % len(self._lanes)
        self._lanes[index].submit(write)
        return write.future

    @property
    def queued(self) -> int:
        """Writes queued or being written."""
        return sum(lane.queued for lane in self._lanes)

    async def close(self) -> None:
        """Finish every queued write, then stop the lanes' threads."""
        await asyncio.gather(*(lane.close() for lane in self._lanes))
        self._fan_out.shutdown(wait=True)


class _Lane:
    def __init__(self, name: str, fan_out: Executor) -> None:
        self._queue: list[Write] = []
        self._writing = 0
        self._fan_out = fan_out
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
        the lane waits for more: each write's ``settle`` holds its channel, which
        would otherwise stay in memory after it left the registry.
        """
        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        self._writing = len(batch)
        try:
            if applies_on_loop(batch):
                results = await apply_batch_async(batch)
            else:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._thread, apply_batch, batch, self._fan_out
                )
        except Exception as exc:  # noqa: BLE001 - the pool itself failed: fail the batch
            results = [exc] * len(batch)
        finally:
            self._writing = 0
        for write, result in zip(batch, results, strict=True):
            _resolve(write, result)

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        await self._task
        self._thread.shutdown(wait=True)


def _resolve(write: Write, result: bool | BaseException) -> None:
    if write.settle is not None:
        write.settle(result)
    if write.future.done():  # the caller gave up waiting (cancelled)
        return
    if isinstance(result, BaseException):
        write.future.set_exception(result)
    else:
        write.future.set_result(result)


def apply_batch(
    batch: Sequence[Write], fan_out: Executor | None = None
) -> list[bool | BaseException]:
    """Apply ``batch`` in order; each write's result is True/False or the error it met.

    The batch is cut wherever a key repeats, so that within one run every
    key is written at most once and runs apply in order. Within a run, the
    calls to different backends (and a backend's sets and its deletes, which
    touch other keys) run at the same time on ``fan_out`` when it is given.
    """
    results: list[bool | BaseException] = [False] * len(batch)
    for run in _runs(batch):
        _apply_run(batch, run, results, fan_out)
    return results


def applies_on_loop(batch: Sequence[Write]) -> bool:
    """Whether :func:`apply_batch_async` can store ``batch``: sets only, to backends
    whose class offers ``set_many_together_async`` (see :func:`_together_key`)."""
    return all(
        not write.delete and getattr(type(write.backend), "set_many_together_async", None)
        for write in batch
    )


async def apply_batch_async(batch: Sequence[Write]) -> list[bool | BaseException]:
    """:func:`apply_batch` for a batch that :func:`applies_on_loop`, on the event loop.

    No thread is involved: each run's sets go out as one
    ``set_many_together_async`` call per connection pool, all at once.
    """
    results: list[bool | BaseException] = [False] * len(batch)
    for run in _runs(batch):
        together: dict[Hashable, list[tuple[DatabaseInterface, dict[str, int]]]] = {}
        for backend, sets, _deletes in _groups(batch, run).values():
            together.setdefault(_together_key(backend), []).append((backend, sets))
        await asyncio.gather(*(_store_together_async(parts, batch, results)
                               for parts in together.values()))  # fmt: skip
    return results


def _runs(batch: Sequence[Write]) -> Iterator[range]:
    """The batch cut wherever a key (of one backend) repeats, in order."""
    start = 0
    while start < len(batch):
        seen: set[tuple[int, str]] = set()
        end = start
        while end < len(batch):
            token = (id(batch[end].backend), batch[end].key)
            if token in seen:
                break
            seen.add(token)
            end += 1
        yield range(start, end)
        start = end


def _groups(
    batch: Sequence[Write], run: range
) -> dict[int, tuple[DatabaseInterface, dict[str, int], dict[str, int]]]:
    """The run's writes by backend: each backend's sets and deletes, key -> index in batch."""
    groups: dict[int, tuple[DatabaseInterface, dict[str, int], dict[str, int]]] = {}
    for index in run:
        write = batch[index]
        _backend, sets, deletes = groups.setdefault(id(write.backend), (write.backend, {}, {}))
        (deletes if write.delete else sets)[write.key] = index
    return groups


def _apply_run(batch: Sequence[Write], run: range, results: list[bool | BaseException],
               fan_out: Executor | None) -> None:  # fmt: skip
    groups = _groups(batch, run)
    calls: list[Callable[[], None]] = []
    together: dict[Hashable, list[tuple[DatabaseInterface, dict[str, int]]]] = {}
    for backend, sets, deletes in groups.values():
        if sets:
            key = _together_key(backend)
            if key is None:
                calls.append(functools.partial(_store, backend, batch, sets, results))
            else:
                together.setdefault(key, []).append((backend, sets))
        if deletes:
            calls.append(functools.partial(_remove, backend, deletes, results))
    for parts in together.values():
        calls.append(functools.partial(_store_together, parts, batch, results))
    _call_all(calls, fan_out)


def _together_key(backend: DatabaseInterface) -> Hashable | None:
    """Equal for backends whose sets one ``set_many_together`` call can store; None if alone.

    A backend class may offer ``set_many_together(parts)``: the ``set_many``
    of several of its instances in one go (Redis: one pipeline for every
    domain on one connection pool), one error or None per part, each part
    measured as that instance's ``set_many``. ``together_key`` says which
    instances it can take at once.
    """
    if getattr(type(backend), "set_many_together", None) is None:
        return None
    return (type(backend), backend.together_key)  # type: ignore[attr-defined]


def _store_together(
    parts: list[tuple[DatabaseInterface, dict[str, int]]],
    batch: Sequence[Write],
    results: list[bool | BaseException],
) -> None:
    if len(parts) == 1:
        backend, sets = parts[0]
        _store(backend, batch, sets, results)
        return
    try:
        errors = type(parts[0][0]).set_many_together(  # type: ignore[attr-defined]
            _together_items(parts, batch)
        )
    except Exception as exc:  # noqa: BLE001 - every failure is the writes' answer
        errors = [exc] * len(parts)
    _note_together(parts, errors, results)


async def _store_together_async(
    parts: list[tuple[DatabaseInterface, dict[str, int]]],
    batch: Sequence[Write],
    results: list[bool | BaseException],
) -> None:
    try:
        errors = await type(parts[0][0]).set_many_together_async(  # type: ignore[attr-defined]
            _together_items(parts, batch)
        )
    except Exception as exc:  # noqa: BLE001 - every failure is the writes' answer
        errors = [exc] * len(parts)
    _note_together(parts, errors, results)


def _together_items(
    parts: list[tuple[DatabaseInterface, dict[str, int]]], batch: Sequence[Write]
) -> list[tuple[DatabaseInterface, dict[str, Any]]]:
    return [(backend, {key: batch[index].value for key, index in sets.items()})
            for backend, sets in parts]  # fmt: skip


def _note_together(
    parts: list[tuple[DatabaseInterface, dict[str, int]]],
    errors: Sequence[BaseException | None],
    results: list[bool | BaseException],
) -> None:
    for (_backend, sets), error in zip(parts, errors, strict=True):
        # A part that stopped part-way (json: a file that could not be written
        # after the others were) names the keys it did store.
        done = set(error.done) if isinstance(error, BulkWriteError) else set()
        for key, index in sets.items():
            results[index] = True if error is None or key in done else error


def _call_all(calls: list[Callable[[], None]], fan_out: Executor | None) -> None:
    """Make every call, at the same time on ``fan_out`` when there are several.

    Each call records its outcome in the results and raises nothing.
    """
    if fan_out is None or len(calls) < 2:
        for call in calls:
            call()
        return
    others = [fan_out.submit(call) for call in calls[1:]]
    calls[0]()  # this thread makes one of them itself
    for other in others:
        other.result()


def _store(backend: DatabaseInterface, batch: Sequence[Write], sets: dict[str, int],
           results: list[bool | BaseException]) -> None:  # fmt: skip
    def store() -> set[str]:
        backend.set_many({key: batch[index].value for key, index in sets.items()})
        return set(sets)

    _answer(store, sets, results)


def _remove(backend: DatabaseInterface, deletes: dict[str, int],
            results: list[bool | BaseException]) -> None:  # fmt: skip
    _answer(lambda: set(backend.delete_many(list(deletes))), deletes, results)


def _answer(
    call: Callable[[], set[str]], indexes: dict[str, int], results: list[bool | BaseException]
) -> None:
    """Each key's result of ``call``: True when it is among the keys ``call`` returns
    (stored, or deleted because it existed), False otherwise, or the error it met."""
    try:
        succeeded = call()
    except BulkWriteError as exc:
        done = set(exc.done)
        for key, index in indexes.items():
            results[index] = True if key in done else exc
    except Exception as exc:  # noqa: BLE001 - every failure is the writes' answer
        for index in indexes.values():
            results[index] = exc
    else:
        for key, index in indexes.items():
            results[index] = key in succeeded
