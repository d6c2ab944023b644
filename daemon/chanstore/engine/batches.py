"""Applying a batch of queued writes to the backends, in order, in as few calls as possible.

A batch usually spans several channels, so several backends. It is cut into
*runs* wherever a key repeats, so that within a run every key is written at
most once and the runs apply in order. Within a run, sets are grouped by
:attr:`~chanstore.backends.base.DatabaseInterface.together_key`: backends that
share it (Redis domains on one connection pool) are stored by one
``set_many_together`` call (one pipeline), each other backend by its own; a
backend's deletes go in one ``delete_many``. The calls of one run go out at
the same time on the fan-out threads, so a run costs about one round trip or
one disk flush rather than one per channel.

Each write's result is True (stored; for a delete: the key existed), False (a
delete of an absent key), or the error it met.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

from chanstore.backends.base import DatabaseInterface
from chanstore.errors import BulkWriteError

__all__ = ["Outcome", "Queued", "apply_batch", "apply_batch_on_loop", "stores_on_loop"]

#: A write's result: stored (or, for a delete, existed), or the error it met.
Outcome = bool | BaseException
#: One backend's share of a run: its sets, key -> index in the batch.
_Part = tuple[DatabaseInterface, dict[str, int]]


class Queued(Protocol):
    """What a batch is made of: one set (``delete`` false) or delete of ``key``."""

    backend: DatabaseInterface
    key: str
    value: Any
    delete: bool


def stores_on_loop(batch: Sequence[Queued]) -> bool:
    """Whether :func:`apply_batch_on_loop` can store ``batch``: sets only, to backends
    that store on the event loop themselves (``stores_on_loop``)."""
    return all(not write.delete and type(write.backend).stores_on_loop for write in batch)


def apply_batch(batch: Sequence[Queued], fan_out: Executor | None = None) -> list[Outcome]:
    """Apply ``batch`` in order, on this thread and ``fan_out``; each write's outcome."""
    results: list[Outcome] = [False] * len(batch)
    for run in _runs(batch):
        sets, deletes = _groups(batch, run)
        calls: list[Callable[[], None]] = [
            functools.partial(_store_together, parts, batch, results) for parts in sets.values()
        ]
        calls.extend(functools.partial(_remove, backend, indexes, results)
                     for backend, indexes in deletes.values())  # fmt: skip
        _call_all(calls, fan_out)
    return results


async def apply_batch_on_loop(batch: Sequence[Queued]) -> list[Outcome]:
    """:func:`apply_batch` for a batch that :func:`stores_on_loop`, with no thread at all."""
    results: list[Outcome] = [False] * len(batch)
    for run in _runs(batch):
        sets, _deletes = _groups(batch, run)
        await asyncio.gather(*(_store_together_async(parts, batch, results)
                               for parts in sets.values()))  # fmt: skip
    return results


def _runs(batch: Sequence[Queued]) -> Iterator[range]:
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
    batch: Sequence[Queued], run: range
) -> tuple[dict[Hashable, list[_Part]], dict[int, _Part]]:
    """The run's sets by together key (then backend), and its deletes by backend."""
    by_backend: dict[int, _Part] = {}
    deletes: dict[int, _Part] = {}
    for index in run:
        write = batch[index]
        table = deletes if write.delete else by_backend
        table.setdefault(id(write.backend), (write.backend, {}))[1][write.key] = index
    sets: dict[Hashable, list[_Part]] = {}
    for backend, indexes in by_backend.values():
        sets.setdefault((type(backend), backend.together_key), []).append((backend, indexes))
    return sets, deletes


def _values(parts: list[_Part], batch: Sequence[Queued]) -> list[tuple[DatabaseInterface, dict]]:
    return [(backend, {key: batch[index].value for key, index in indexes.items()})
            for backend, indexes in parts]  # fmt: skip


def _store_together(parts: list[_Part], batch: Sequence[Queued], results: list[Outcome]) -> None:
    try:
        errors = type(parts[0][0]).set_many_together(_values(parts, batch))
    except Exception as exc:  # noqa: BLE001 - every failure is the writes' answer
        errors = [exc] * len(parts)
    _note(parts, errors, results)


async def _store_together_async(
    parts: list[_Part], batch: Sequence[Queued], results: list[Outcome]
) -> None:
    try:
        errors = await type(parts[0][0]).set_many_together_async(_values(parts, batch))
    except Exception as exc:  # noqa: BLE001 - every failure is the writes' answer
        errors = [exc] * len(parts)
    _note(parts, errors, results)


def _note(
    parts: list[_Part], errors: Sequence[BaseException | None], results: list[Outcome]
) -> None:
    for (_backend, indexes), error in zip(parts, errors, strict=True):
        # A part that stopped part-way (json: a file that could not be written
        # after the others were) names the keys it did store.
        done = set(error.done) if isinstance(error, BulkWriteError) else set()
        for key, index in indexes.items():
            results[index] = True if error is None or key in done else error


def _remove(backend: DatabaseInterface, indexes: dict[str, int], results: list[Outcome]) -> None:
    try:
        existed = set(backend.delete_many(list(indexes)))
    except BulkWriteError as exc:
        done = set(exc.done)
        for key, index in indexes.items():
            results[index] = True if key in done else exc
    except Exception as exc:  # noqa: BLE001 - every failure is the writes' answer
        for index in indexes.values():
            results[index] = exc
    else:
        for key, index in indexes.items():
            results[index] = key in existed


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
