"""Reads and writes of channels' keys: what the HTTP layer asks of the storage side.

Reads of cached keys are answered from memory, on the event loop, as
already-encoded bodies (:meth:`Store.cached_body`); anything else reads the
backend on the container's threads. Writes go onto the container's write
lanes (:mod:`chanstore.engine.lanes`) and are acknowledged once stored.

Every failure is an exception carrying its kind: :class:`UnknownContainer`,
:class:`~chanstore.errors.BackendError` and its subclasses; the HTTP layer
words them. A key whose stored value cannot be decoded reads as an
:class:`~chanstore.cache.UnreadableValue` (a ``CorruptValue``), never as
absent: it is listed, and a delete or a write clears it.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Generator, Mapping
from typing import Any, NamedTuple

from chanstore.cache import ABSENT, UNKNOWN
from chanstore.engine.channels import ChannelTable, Slot, encode_answer, encode_for_writing
from chanstore.engine.containers import Containers
from chanstore.engine.lanes import Condition, Write
from chanstore.versions import Expectation

__all__ = ["ABSENT", "NO_EXPECTATION", "Pending", "Store"]

#: One change of a write: key, value, whether it deletes, and the value's answer
#: (its stored form and ETag; None for a delete).
_Item = tuple[str, Any, bool, "tuple[bytes, str] | None"]


class NoExpectation:
    """The type of :data:`NO_EXPECTATION`."""


#: A write that requires nothing of the key (None would mean "must be absent").
NO_EXPECTATION = NoExpectation()


class Pending(NamedTuple):
    """A write under way: its future, and the ETag the value will have (None: a delete)."""

    future: asyncio.Future[bool]
    etag: str | None

    def __await__(self) -> Generator[Any, None, bool]:
        """Awaiting a pending write awaits its future."""
        return self.future.__await__()


class Store:
    """The keys of every channel, read from memory or the backends, written through lanes."""

    def __init__(self, table: ChannelTable, containers: Containers) -> None:
        self.table = table
        self.containers = containers

    def check_container(self, name: str) -> None:
        """Raise UnknownContainer unless the running db_config has container ``name``."""
        self.containers[name]

    def writes_file_form(self, name: str) -> bool:
        """Whether container ``name`` writes values in the original's file form, which a
        writer may make ahead (see :attr:`~chanstore.codec.Document.file_form`)."""
        runtime = self.containers.get(name)
        return runtime is not None and runtime.spec.engine.writes_file_form

    # -- reading -------------------------------------------------------------

    def cached_body(self, channel_id: str, name: str, key: str) -> Any:
        """The body and ETag of ``key`` answered from memory alone: ``(bytes, etag)``,
        ABSENT, or None to ask :meth:`read_body` (the channel or container is not in
        memory, or the key is not). Raises UnreadableValue for a stored value that
        cannot be decoded."""
        slot = self.table.ready_slot(channel_id, name)
        if slot is None or not slot.runtime.coherent:
            return None
        value = slot.cached.memory.peek(key)  # type: ignore[union-attr]
        if value is UNKNOWN:
            return None
        return ABSENT if value is ABSENT else slot.body_of(key, value)

    async def read_body(self, channel_id: str, name: str, key: str) -> Any:
        """The body and ETag of ``key``, or ABSENT; raises UnreadableValue if it is damaged."""
        async with self.table.using(channel_id) as channel:
            slot = await self.table.slot(channel, name)
            cached = slot.cached
            assert cached is not None
            value = cached.memory.peek(key) if slot.runtime.coherent else UNKNOWN
            if value is UNKNOWN:
                value = await slot.runtime.run(_fetch_fresh, cached, key)
                # Encoded now but not kept: a write may have landed meanwhile, and
                # the next read answers from memory anyway.
                return ABSENT if value is ABSENT else encode_answer(value)
            return ABSENT if value is ABSENT else slot.body_of(key, value)

    async def get_many(self, channel_id: str, name: str, keys: list[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist; a damaged one maps to its UnreadableValue,
        so one bad key does not fail the others."""
        async with self.table.using(channel_id) as channel:
            slot = await self.table.slot(channel, name)
            cached = slot.cached
            assert cached is not None
            found: dict[str, Any] = {}
            unknown: list[str] = []
            if not slot.runtime.coherent:
                return await slot.runtime.run(_fetch_many_fresh, cached, keys)
            for key in keys:
                value = cached.memory.peek(key)
                if value is UNKNOWN:
                    unknown.append(key)
                elif value is not ABSENT:
                    found[key] = value
            if unknown:
                found.update(await slot.runtime.run(cached.fetch_many, unknown))
            return found

    async def keys_page(
        self, channel_id: str, name: str, after: str | None, limit: int
    ) -> tuple[list[str], str | None]:
        """Up to ``limit`` keys after ``after`` in key order, and the cursor of the next page."""
        async with self.table.using(channel_id) as channel:
            slot = await self.table.slot(channel, name)
            cached = slot.cached
            assert cached is not None
            if cached.memory.complete and slot.runtime.coherent:
                keys = slot.page(after, limit + 1)
            else:
                keys = await slot.runtime.run(_page_of_backend, cached, after, limit + 1)
        if len(keys) > limit:
            return keys[:limit], keys[limit - 1]
        return keys, None

    # -- writing -------------------------------------------------------------

    def write(self, channel_id: str, name: str, key: str, value: Any, *, delete: bool = False,
              expect: Expectation | NoExpectation = NO_EXPECTATION,
              request_id: str = "") -> Pending:  # fmt: skip
        """Store ``value`` (or delete ``key``), if ``key`` meets ``expect`` when one is given.

        Answers the new ETag (None for a delete) and a future: True once
        stored (for a delete: whether the key existed), or failing with
        :class:`~chanstore.errors.PreconditionFailed`. Queued at once when
        the channel's container is in memory.
        """
        answer = None if delete else encode_for_writing(value)
        expected = None if expect is NO_EXPECTATION else {key: expect}
        change = [(key, value, delete, answer)]
        slot = self.table.ready_slot(channel_id, name)
        if slot is None or self.containers.get(name) is not slot.runtime:
            later = self._write_later(channel_id, name, change, expected, request_id)
            future = asyncio.ensure_future(later)
        else:
            (future,) = self._submit(slot, change, expected, request_id)
        return Pending(future, None if answer is None else answer[1])

    async def put_many(self, channel_id: str, name: str, items: Mapping[str, Any],
                       request_id: str = "", *,
                       expect: dict[str, Expectation] | None = None) -> dict[str, str]:  # fmt: skip
        """Store every item, and only if every key of ``expect`` meets its expectation
        (else nothing: PreconditionFailed). Returns each key's new ETag once stored."""
        answers = {key: encode_for_writing(value) for key, value in items.items()}
        change = [(key, value, False, answers[key]) for key, value in items.items()]
        await self._write_many(channel_id, name, change, expect, request_id)
        return {key: answer[1] for key, answer in answers.items()}

    async def delete_many(self, channel_id: str, name: str, keys: list[str],
                          request_id: str = "") -> list[str]:  # fmt: skip
        """Delete ``keys``; those that existed."""
        change = [(key, None, True, None) for key in keys]
        existed = await self._write_many(channel_id, name, change, None, request_id)
        return [key for key, was in zip(keys, existed, strict=True) if was]

    async def _write_later(self, channel_id: str, name: str, change: list[_Item],
                           expect: dict[str, Expectation] | None,
                           request_id: str) -> bool:  # fmt: skip
        (result,) = await self._write_many(channel_id, name, change, expect, request_id)
        return result

    async def _write_many(self, channel_id: str, name: str, change: list[_Item],
                          expect: dict[str, Expectation] | None,
                          request_id: str) -> list[bool]:  # fmt: skip
        async with self.table.using(channel_id) as channel:
            slot = await self.table.slot(channel, name)
            return await _all(self._submit(slot, change, expect, request_id))

    def _submit(self, slot: Slot, change: list[_Item], expect: dict[str, Expectation] | None,
                request_id: str) -> list[asyncio.Future[bool]]:  # fmt: skip
        cached = slot.cached
        assert cached is not None
        if expect is None:
            return [self._submit_one(slot, item, request_id) for item in change]
        condition = Condition(expect, len(change))
        writes = []
        for key, value, delete, answer in change:
            write = Write(cached.database, key, value, delete, slot, request_id, slot.channel.id)
            write.condition = condition
            if answer is not None:
                write.body, write.etag = answer
            slot.write_begun(key)
            writes.append(write)
        return slot.runtime.lanes.submit_together(writes)

    def _submit_one(self, slot: Slot, item: _Item, request_id: str) -> asyncio.Future[bool]:
        key, value, delete, answer = item
        cached = slot.cached
        assert cached is not None
        if delete and cached.memory.peek(key) is ABSENT:
            # Deleting what the complete cache knows is absent.
            absent: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            absent.set_result(False)
            return absent
        slot.write_begun(key)
        write = Write(cached.database, key, value, delete, slot, request_id, slot.channel.id)
        if answer is not None:
            write.body, write.etag = answer
        return slot.runtime.lanes.submit(write)


async def _all(futures: list[asyncio.Future[bool]]) -> list[bool]:
    if len(futures) == 1:
        return [await futures[0]]
    return list(await asyncio.gather(*futures))


def _fetch_fresh(cached: Any, key: str) -> Any:
    """``key`` read from the backend (memory is not trusted, or does not know it)."""
    return cached.fetch(key, fresh=True)


def _fetch_many_fresh(cached: Any, keys: list[str]) -> dict[str, Any]:
    return cached.fetch_many(keys, fresh=True)


def _page_of_backend(cached: Any, after: str | None, limit: int) -> list[str]:
    """A page of a container that is not all in memory, read from its backend."""
    keys = sorted(set(cached.database.all_keys()))
    start = 0 if after is None else bisect.bisect_right(keys, after)
    return keys[start : start + limit]
