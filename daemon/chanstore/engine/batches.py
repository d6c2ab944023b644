"""Applying a batch of queued writes to the backends, in order, in as few calls as possible.

A batch usually spans several channels, so several backends. It is cut into
*runs* wherever a key repeats, so that within a run every key is written at
most once and the runs apply in order. Within a run, sets are grouped by
:attr:`~chanstore.backends.base.DatabaseInterface.together_key`: backends that
share it (Redis domains on one connection pool) are stored by one
``set_many_together`` call (one pipeline), each other backend by its own; a
backend's deletes go in one ``delete_many``. The calls of one run go out at
the same time on the fan-out threads, so a run costs about one round trip or
one disk flush rather than one per channel. Where the backends apply one call's
parts in order (Redis), consecutive runs of unconditional sets go out in one
call: a key that repeats costs no round trip of its own.

Conditional writes (one :class:`~chanstore.engine.lanes.Condition` shared by
the writes made together) stay whole within one run. A backend that checks
conditions itself (Redis: one script) gets them through
``apply_if_together``; for any other backend their expectations are read
here, just before the run is stored, and the writes that pass join the run's
other writes: the lanes order every write of a domain, so nothing can change
in between, and conditional writes share the run's one flush.

A set that a later set of the same key replaces within the batch is not
stored at all where the backend allows it (``sees_every_write`` false: json)
and the batch holds no conditional write: it gets the later write's result,
and both are acknowledged together, once the later one is stored. So a key
written over and over (a health bar) costs one file and one run per batch,
not a run, and a journal flush, per write.

Each write's result is True (stored; for a delete: the key existed), False (a
delete of an absent key), or the error it met.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

from chanstore.backends.base import DatabaseInterface
from chanstore.errors import BulkWriteError, PreconditionFailed
from chanstore.versions import Change, conflicts, etags_of

__all__ = ["Outcome", "Queued", "apply_batch", "apply_batch_on_loop", "stores_on_loop"]

#: A write's result: stored (or, for a delete, existed), or the error it met.
Outcome = bool | BaseException
#: One backend's share of a run: its sets, key -> index in the batch.
_Part = tuple[DatabaseInterface, dict[str, int]]


#: :meth:`Owner.known_etag`'s answer when only the backend knows.
UNKNOWN_ETAG = "?"


class Owner(Protocol):
    """Who follows a queued write (its channel's copy of the container)."""

    def known_etag(self, key: str) -> str | None:
        """The ETag of what ``key`` holds as far as memory knows (None: absent), or
        :data:`UNKNOWN_ETAG`. Called on a lane's thread."""
        ...


class Queued(Protocol):
    """What a batch is made of: one set (``delete`` false) or delete of ``key``,
    made together with its neighbours that share its ``condition``, if it has one."""

    backend: DatabaseInterface
    key: str
    value: Any
    delete: bool
    condition: Any
    etag: str | None
    owner: Any


def stores_on_loop(batch: Sequence[Queued]) -> bool:
    """Whether :func:`apply_batch_on_loop` can store ``batch``: sets and conditional
    writes only, to backends that store on the event loop themselves (``stores_on_loop``)
    and check conditions themselves."""
    for write in batch:
        kind = type(write.backend)
        if not kind.stores_on_loop:
            return False
        if write.condition is not None:
            if not kind.checks_conditions:
                return False
        elif write.delete:
            return False
    return True


def apply_batch(batch: Sequence[Queued], fan_out: Executor | None = None) -> list[Outcome]:
    """Apply ``batch`` in order, on this thread and ``fan_out``; each write's outcome."""
    replaced = _replaced_within(batch)
    if not replaced:
        return _apply_in_runs(batch, fan_out)
    kept = [index for index in range(len(batch)) if index not in replaced]
    results: list[Outcome] = [False] * len(batch)
    for index, outcome in zip(kept, _apply_in_runs([batch[i] for i in kept], fan_out),
                              strict=True):  # fmt: skip
        results[index] = outcome
    for index in sorted(replaced, reverse=True):  # a later write's result is known first
        results[index] = results[replaced[index]]
    return results


def _replaced_within(batch: Sequence[Queued]) -> dict[int, int]:
    """Sets that the next write of their key in ``batch``, a set too, replaces: each one's
    index, to that write's. Nothing where the backend sees every write, or where a
    conditional write could read what a replaced set stored."""
    if any(write.condition is not None for write in batch):
        return {}
    replaced: dict[int, int] = {}
    later: dict[tuple[int, str], int] = {}
    for index in range(len(batch) - 1, -1, -1):
        write = batch[index]
        token = (id(write.backend), write.key)
        after = later.get(token)
        if (after is not None and not write.delete and not batch[after].delete
                and not type(write.backend).sees_every_write):  # fmt: skip
            replaced[index] = after
        later[token] = index
    return replaced


def _apply_in_runs(batch: Sequence[Queued], fan_out: Executor | None) -> list[Outcome]:
    results: list[Outcome] = [False] * len(batch)
    # The batch's writes so far, by key: the one stored, or None where it failed.
    stored: dict[tuple[int, str], Queued | None] = {}
    for run in _runs(batch):
        plain, units = _split(batch, run)
        by_backend = [unit for unit in units if type(batch[unit[0]].backend).checks_conditions]
        checked_here = [unit for unit in units if unit not in by_backend]
        plain.extend(_passing(batch, checked_here, results, stored))
        sets, deletes = _groups(batch, plain)
        calls: list[Callable[[], None]] = [
            functools.partial(_store_together, parts, batch, results) for parts in sets.values()
        ]
        calls.extend(functools.partial(_remove, backend, indexes, results)
                     for backend, indexes in deletes.values())  # fmt: skip
        calls.extend(functools.partial(_apply_together, group, batch, results)
                     for group in _unit_groups(batch, by_backend))  # fmt: skip
        _call_all(calls, fan_out)
        _note_stored(batch, run, results, stored)
    return results


async def apply_batch_on_loop(batch: Sequence[Queued]) -> list[Outcome]:
    """:func:`apply_batch` for a batch that :func:`stores_on_loop`, with no thread at all.

    Runs that can go out together do (see :func:`_steps`): a key written by
    many clients at once (a health bar) costs one round trip per batch, not
    one per write.
    """
    results: list[Outcome] = [False] * len(batch)
    for step in _steps(batch):
        sets: dict[Hashable, list[_Part]] = {}
        units: list[list[int]] = []
        for run in step:
            plain, run_units = _split(batch, run)
            units.extend(run_units)
            for together, parts in _groups(batch, plain)[0].items():
                sets.setdefault(together, []).extend(parts)  # a later run's parts after
        await asyncio.gather(
            *(_store_together_async(parts, batch, results) for parts in sets.values()),
            *(_apply_together_async(group, batch, results)
              for group in _unit_groups(batch, units)),
        )  # fmt: skip
    return results


def _steps(batch: Sequence[Queued]) -> Iterator[list[range]]:
    """The batch's runs, each step stored at once: consecutive runs of unconditional sets
    to backends that :attr:`~chanstore.backends.base.DatabaseInterface.keeps_part_order`
    go in one step (each run's parts after the runs before), any other run alone."""
    joined: list[range] = []
    for run in _runs(batch):
        if all(batch[index].condition is None and type(batch[index].backend).keeps_part_order
               for index in run):  # fmt: skip
            joined.append(run)
            continue
        if joined:
            yield joined
            joined = []
        yield [run]
    if joined:
        yield joined


def _runs(batch: Sequence[Queued]) -> Iterator[range]:
    """The batch cut wherever a key (of one backend) repeats, in order; writes made
    together under one condition are never cut apart."""
    start = 0
    while start < len(batch):
        seen: set[tuple[int, str]] = set()
        end = start
        while end < len(batch):
            together = _together_from(batch, end)
            tokens = {(id(batch[index].backend), batch[index].key) for index in together}
            if tokens & seen:
                break
            seen |= tokens
            end = together.stop
        yield range(start, end)
        start = end


def _together_from(batch: Sequence[Queued], index: int) -> range:
    """The writes made together with ``batch[index]``, the first of them."""
    condition = batch[index].condition
    end = index + 1
    if condition is not None:
        while end < len(batch) and batch[end].condition is condition:
            end += 1
    return range(index, end)


def _split(batch: Sequence[Queued], run: range) -> tuple[list[int], list[list[int]]]:
    """The run's unconditional writes, and its conditional ones, each condition's together."""
    plain: list[int] = []
    units: list[list[int]] = []
    index = run.start
    while index < run.stop:
        together = _together_from(batch, index)
        if batch[index].condition is None:
            plain.append(index)
        else:
            units.append(list(together))
        index = together.stop
    return plain, units


def _passing(batch: Sequence[Queued], units: list[list[int]], results: list[Outcome],
             stored: dict[tuple[int, str], Queued | None]) -> list[int]:  # fmt: skip
    """The writes of ``units`` whose expectations hold; a unit that fails is answered here.

    For backends that do not check conditions themselves: the write lanes
    order every write of the domain, so what a key holds now is what the
    batch's own earlier writes stored, else what its owner's memory holds,
    else what the backend answers; nothing can change it before this run is
    stored.
    """
    passing: list[int] = []
    for unit in units:
        first = batch[unit[0]]
        expect = first.condition.expect
        try:
            current = _current_etags(first, list(expect), stored)
        except Exception as exc:  # noqa: BLE001 - the unit's answer
            for index in unit:
                results[index] = exc
            continue
        failed = conflicts(expect, current)
        if failed:
            error = PreconditionFailed(failed)
            for index in unit:
                results[index] = error
        else:
            passing.extend(unit)
    return passing


def _current_etags(write: Queued, keys: list[str],
                   stored: dict[tuple[int, str], Queued | None]) -> dict[str, str]:  # fmt: skip
    """The ETags of those ``keys`` of ``write``'s domain that exist now."""
    current: dict[str, str] = {}
    unknown: list[str] = []
    for key in keys:
        token = (id(write.backend), key)
        if token in stored:
            earlier = stored[token]
            if earlier is None or (not earlier.delete and earlier.etag is None):
                unknown.append(key)  # it failed (it may have landed), or was not made here
            elif not earlier.delete:
                current[key] = earlier.etag
            continue
        known = write.owner.known_etag(key)
        if known is UNKNOWN_ETAG:
            unknown.append(key)
        elif known is not None:
            current[key] = known
    if unknown:
        current.update(etags_of(write.backend.get_many(unknown)))
    return current


def _note_stored(batch: Sequence[Queued], run: range, results: list[Outcome],
                 stored: dict[tuple[int, str], Queued | None]) -> None:  # fmt: skip
    """Remember what the run stored, for the conditions of the runs after it; a key
    whose write failed is read from the backend again."""
    for index in run:
        write = batch[index]
        outcome = results[index]
        if isinstance(outcome, PreconditionFailed):
            continue  # it changed nothing
        stored[id(write.backend), write.key] = None if isinstance(outcome, BaseException) else write


def _groups(
    batch: Sequence[Queued], indexes: Iterable[int]
) -> tuple[dict[Hashable, list[_Part]], dict[int, _Part]]:
    """The writes' sets by together key (then backend), and their deletes by backend."""
    by_backend: dict[int, _Part] = {}
    deletes: dict[int, _Part] = {}
    for index in indexes:
        write = batch[index]
        table = deletes if write.delete else by_backend
        table.setdefault(id(write.backend), (write.backend, {}))[1][write.key] = index
    sets: dict[Hashable, list[_Part]] = {}
    for backend, indexes_of in by_backend.values():
        sets.setdefault((type(backend), backend.together_key), []).append((backend, indexes_of))
    return sets, deletes


def _unit_groups(batch: Sequence[Queued], units: list[list[int]]) -> list[list[list[int]]]:
    """Units grouped by together key, for one apply_if_together call each."""
    groups: dict[Hashable, list[list[int]]] = {}
    for unit in units:
        backend = batch[unit[0]].backend
        groups.setdefault((type(backend), backend.together_key), []).append(unit)
    return list(groups.values())


def _changes(batch: Sequence[Queued], group: list[list[int]]) -> list[tuple[Any, Change]]:
    parts = []
    for unit in group:
        writes = [batch[index] for index in unit]
        change = Change(
            sets={write.key: write.value for write in writes if not write.delete},
            deletes=[write.key for write in writes if write.delete],
            expect=writes[0].condition.expect,  # type: ignore[union-attr]
        )
        parts.append((writes[0].backend, change))
    return parts


def _note_units(group: list[list[int]], answers: Sequence[Any], batch: Sequence[Queued],
                results: list[Outcome]) -> None:  # fmt: skip
    for unit, answer in zip(group, answers, strict=True):
        existed = set() if isinstance(answer, BaseException) else set(answer)
        for index in unit:
            write = batch[index]
            if isinstance(answer, BaseException):
                results[index] = answer
            else:
                results[index] = write.key in existed if write.delete else True


def _apply_together(group: list[list[int]], batch: Sequence[Queued],
                    results: list[Outcome]) -> None:  # fmt: skip
    parts = _changes(batch, group)
    try:
        answers = type(parts[0][0]).apply_if_together(parts)
    except Exception as exc:  # noqa: BLE001 - every failure is the writes' answer
        answers = [exc] * len(parts)
    _note_units(group, answers, batch, results)


async def _apply_together_async(group: list[list[int]], batch: Sequence[Queued],
                                results: list[Outcome]) -> None:  # fmt: skip
    parts = _changes(batch, group)
    try:
        answers = await type(parts[0][0]).apply_if_together_async(parts)
    except Exception as exc:  # noqa: BLE001 - every failure is the writes' answer
        answers = [exc] * len(parts)
    _note_units(group, answers, batch, results)


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
