"""Write lanes: writes applied in the order they were acknowledged, in batches.

Each container has a few lanes; a key always goes to the same lane, so writes
to one key are applied, and acknowledged, in the order they arrived. A lane
takes everything that queued up while its previous batch was being written
and writes it as one batch on its own thread: one ``set_many`` per backend
(one Redis round trip, or one folder fsync for many files) instead of one
call per write. A write is acknowledged only when its batch is stored, so
batching makes nothing less durable; it only shares the cost of the disk or
the round trip among the writes that were waiting anyway.

Lanes belong to one container, so a slow or dead backend stalls only the
writes to its own container.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from chanstore.backends.base import DatabaseInterface
from chanstore.errors import BulkWriteError

__all__ = ["MAX_BATCH", "Write", "WriteLanes", "apply_batch"]

#: Writes one batch holds at most; the rest wait for the next batch.
MAX_BATCH = 512


def _loop_future() -> asyncio.Future[bool]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False)
class Write:
    """One queued set (``delete`` false) or delete of ``key`` in ``backend``."""

    backend: DatabaseInterface
    key: str
    value: Any = None
    delete: bool = False
    future: asyncio.Future[bool] = field(default_factory=_loop_future)


class WriteLanes:
    """The write lanes of one container."""

    def __init__(self, name: str, lanes: int) -> None:
        self.name = name
        self._lanes = [_Lane(f"{name}-{index}") for index in range(lanes)]

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


class _Lane:
    def __init__(self, name: str) -> None:
        self._queue: list[Write] = []
        self._writing = 0
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
        loop = asyncio.get_running_loop()
        while not (self._closing and not self._queue):
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                self._writing = len(batch)
                try:
                    results = await loop.run_in_executor(self._thread, apply_batch, batch)
                except Exception as exc:  # noqa: BLE001 - the pool itself failed: fail the batch
                    results = [exc] * len(batch)
                finally:
                    self._writing = 0
                for write, result in zip(batch, results, strict=True):
                    if write.future.done():
                        continue
                    if isinstance(result, BaseException):
                        write.future.set_exception(result)
                    else:
                        write.future.set_result(result)

    async def close(self) -> None:
        self._closing = True
        self._wakeup.set()
        await self._task
        self._thread.shutdown(wait=True)


def apply_batch(batch: Sequence[Write]) -> list[bool | BaseException]:
    """Apply ``batch`` in order; each write's result is True/False or the error it met.

    The batch is cut wherever a key repeats, so that within one run every
    key is written at most once and runs apply in order.
    """
    results: list[bool | BaseException] = [False] * len(batch)
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
        _apply_run(batch, range(start, end), results)
        start = end
    return results


def _apply_run(batch: Sequence[Write], run: range, results: list[bool | BaseException]) -> None:
    groups: dict[int, tuple[DatabaseInterface, dict[str, int], dict[str, int]]] = {}
    for index in run:
        write = batch[index]
        _backend, sets, deletes = groups.setdefault(id(write.backend), (write.backend, {}, {}))
        (deletes if write.delete else sets)[write.key] = index
    for backend, sets, deletes in groups.values():
        if sets:
            _store(backend, batch, sets, results)
        if deletes:
            _remove(backend, deletes, results)


def _store(backend: DatabaseInterface, batch: Sequence[Write], sets: dict[str, int],
           results: list[bool | BaseException]) -> None:  # fmt: skip
    try:
        backend.set_many({key: batch[index].value for key, index in sets.items()})
    except BulkWriteError as exc:
        done = set(exc.done)
        for key, index in sets.items():
            results[index] = True if key in done else exc
    except Exception as exc:  # noqa: BLE001 - every failure is the writes' answer
        for index in sets.values():
            results[index] = exc
    else:
        for index in sets.values():
            results[index] = True


def _remove(backend: DatabaseInterface, deletes: dict[str, int],
            results: list[bool | BaseException]) -> None:  # fmt: skip
    try:
        existed = set(backend.delete_many(list(deletes)))
    except BulkWriteError as exc:
        done = set(exc.done)
        for key, index in deletes.items():
            results[index] = True if key in done else exc
    except Exception as exc:  # noqa: BLE001 - every failure is the writes' answer
        for index in deletes.values():
            results[index] = exc
    else:
        for key, index in deletes.items():
            results[index] = key in existed
