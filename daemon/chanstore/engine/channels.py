"""The channels the daemon holds in memory.

A :class:`ChannelTable` creates a channel's :class:`~chanstore.storage.MoobiusStorage`
on first use and fills in each container (a :class:`Slot`) as it is first
asked for, loading or clearing it as its db_config entry says, so that a dead
backend fails only the requests for its own containers. Channels leave memory
when idle for ``idle_timeout`` seconds, or when more than ``max_channels``
are held; their data stays in the backends.

Everything here runs on the event loop except backend calls, which run on the
container's threads. A slot's cache is used through the CachedDict's public
in-memory seam (:class:`~chanstore.cache.CacheMemory`): the loop peeks at it
without a lock, and the write lanes tell it what they stored.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import structlog

from chanstore import codec, logs
from chanstore.backends.journal_direct import DIRECT_BYTES
from chanstore.cache import ABSENT, UNKNOWN, CachedDict, UnreadableValue
from chanstore.engine.batches import UNKNOWN_ETAG
from chanstore.engine.containers import ContainerRuntime, Containers
from chanstore.engine.errors import UnknownContainer
from chanstore.engine.lanes import Write
from chanstore.engine.settings import EngineSettings
from chanstore.engine.watchers import MemoryHistory, Watcher, end_watchers
from chanstore.errors import BackendUnavailable, ChanstoreError, PreconditionFailed, error_kind
from chanstore.history import ChangeEvent
from chanstore.metrics import Metrics
from chanstore.storage import MoobiusStorage
from chanstore.versions import etag_of, etag_of_stored, stored_with_etag

__all__ = ["Channel", "ChannelTable", "Slot"]

log = logs.get_logger()

#: Tables of channels smaller than this are not worth rebuilding when channels leave.
COMPACT_ABOVE = 1024
#: The answer for a None value: answered, not kept per key (a null container reads
#: every key as None, and must not grow memory with every key it is asked for).
NULL_ANSWER = (b"null", etag_of_stored(b"null"))
#: A written value whose stored form is at least this large is kept in memory as those
#: bytes alone: what the daemon answers. The json backend writes a file this large
#: directly, not through its journal, so no later checkpoint has to parse it again.
KEPT_AS_BYTES = DIRECT_BYTES


class Slot:
    """One channel's copy of one container: its CachedDict, made ready on first use."""

    __slots__ = ("cached", "channel", "encoded", "history", "loaded_at", "overtaken", "preparing",
                 "ready", "runtime", "sorted_keys", "watchers", "writing")  # fmt: skip

    def __init__(self, runtime: ContainerRuntime, channel: Channel) -> None:
        self.runtime = runtime
        self.channel = channel
        self.cached: CachedDict | None = None
        #: Cached values as response bodies with their ETags, made on first read or
        #: by a write (None until then: most channels in memory never answer a read).
        self.encoded: dict[str, tuple[bytes, str]] | None = None
        #: The complete cache's keys in order, made on the first listing and kept
        #: up to date by writes, so that each page costs a bisection, not a sort.
        self.sorted_keys: list[str] | None = None
        self.preparing: asyncio.Future[None] | None = None
        self.ready = False
        #: When memory was last made whole from the backend (for the max age).
        self.loaded_at = 0.0
        #: The change history this daemon keeps for the container (a backend that keeps
        #: none), from the moment it is first watched; and who watches it.
        self.history: MemoryHistory | None = None
        self.watchers: list[Watcher] = []
        #: This daemon's writes under way, by key; and those of their keys that another
        #: daemon wrote (or that memory dropped) meanwhile (None while there are none).
        self.writing: dict[str, int] | None = None
        self.overtaken: set[str] | None = None

    def body_of(self, key: str, value: Any) -> tuple[bytes, str]:
        """The response body of ``value``, the value memory holds for ``key`` now, and its ETag.

        Raises for an :class:`~chanstore.cache.UnreadableValue` (a stored
        value that cannot be decoded), checked only when a body is made: a
        body already made costs no more.
        """
        encoded = self.encoded
        if encoded is None:
            encoded = self.encoded = {}
        found = encoded.get(key)
        if found is None:
            if value is None:
                return NULL_ANSWER
            if value.__class__ is UnreadableValue:
                raise value.fresh()
            found = encoded[key] = encode_answer(value)
        return found

    def write_begun(self, key: str) -> None:
        """A write of ``key`` is submitted: the channel is busy until it settles."""
        self.channel.busy += 1
        writing = self.writing
        if writing is None:
            writing = self.writing = {}
        writing[key] = writing.get(key, 0) + 1

    def _write_ended(self, key: str) -> bool:
        """A write of ``key`` settled: whether the key was overtaken while it was under way."""
        self.channel.busy -= 1
        writing, overtaken = self.writing, self.overtaken
        if writing is None or key not in writing:
            return False  # not begun by write_begun (never so in the daemon): nothing to tell
        left = writing[key] - 1
        if left:
            writing[key] = left
        elif len(writing) == 1:
            self.writing = None
        else:
            del writing[key]
        if overtaken is None or key not in overtaken:
            return False
        if not left:
            overtaken.discard(key)
            if not overtaken:
                self.overtaken = None
        return True

    def _overtake(self, keys: Iterable[str]) -> None:
        writing = self.writing
        if writing is not None:
            under_way = [key for key in keys if key in writing]
            if under_way:
                self.overtaken = (self.overtaken or set()) | set(under_way)

    def settled(self, write: Write, outcome: bool | BaseException) -> None:
        """A lane's word on a write of this slot: bring the cache (and the feed) up to date."""
        memory = self.cached.memory  # type: ignore[union-attr]
        key = write.key
        overtaken = self._write_ended(key)
        encoded = self.encoded
        if encoded:
            encoded.pop(key, None)
        if isinstance(outcome, BaseException):
            if write.condition is not None and isinstance(outcome, PreconditionFailed):
                return  # nothing was changed
            # A write that timed out or lost its connection may still land: what
            # the backend holds is not known, so the next read asks it.
            memory.unsure(key)
            self.sorted_keys = None
        elif overtaken:
            # Another daemon wrote the key, or memory was dropped, while this write was
            # under way, and this write's answer came after: its invalidation and this
            # answer come on two connections, so which write landed last is not known
            # here, and memory kept this value over the newer one. The next read asks.
            memory.unsure(key)
            self.sorted_keys = None
            self._tell_watchers(write, outcome)
        elif write.delete:
            memory.deleted(key)
            self._unlist(key)
            self._tell_watchers(write, outcome)
        else:
            if write.value.__class__ is codec.Document:
                _keep_once(write.value)
            memory.stored(key, write.value)
            if memory.keeps_writes:  # a null container lists nothing
                self._list(key)
                if encoded is not None and write.body is not None:
                    encoded[key] = (write.body, write.etag)  # type: ignore[assignment]
            self._tell_watchers(write, outcome)

    def _tell_watchers(self, write: Write, outcome: bool) -> None:
        """The change a write made, in the history this daemon keeps (if it keeps one)."""
        if self.history is None:
            return
        if not write.delete:
            self._publish(self.history.append("set", write.key, write.body, write.etag))
        elif outcome:  # a key that existed
            self._publish(self.history.append("delete", write.key, None, None))

    def invalidate(self, keys: list[str]) -> None:
        """Another daemon wrote ``keys``: memory forgets them (and that it is complete);
        a read of the backend in flight for this copy is not cached, nor a write of this
        daemon's under way (see :meth:`settled`)."""
        memory = self.cached.memory  # type: ignore[union-attr]
        encoded = self.encoded
        self._overtake(keys)
        for key in keys:
            memory.unsure(key)
            if encoded:
                encoded.pop(key, None)
        self.sorted_keys = None

    def known_etag(self, key: str) -> str | None:
        """The ETag of ``key``'s value as memory holds it (None: absent), or UNKNOWN_ETAG.

        Asked on a write lane's thread just before a conditional write of a
        backend this daemon owns: every write of the key is settled by then
        (the lane orders them), so memory is current for the keys it holds.
        """
        encoded = self.encoded
        if encoded is not None and (found := encoded.get(key)) is not None:
            return found[1]
        value = self.cached.memory.held(key)  # type: ignore[union-attr]
        if value is UNKNOWN:
            return UNKNOWN_ETAG
        if value is ABSENT:
            return None
        return etag_of(value)

    def _publish(self, event: ChangeEvent) -> None:
        name = self.runtime.name
        for watcher in self.watchers:
            watcher.push(name, event)

    def stop_following(self) -> None:
        """This copy leaves memory: invalidations need not reach it."""
        if self.cached is not None:
            self.runtime.forget_cache(self.cached.database.domain)

    def end_watchers(self, reason: str) -> None:
        """End every stream watching this copy, and let its history go."""
        end_watchers(self.watchers, reason)
        if self.history is not None:
            self.history.release()
            self.history = None

    def forget(self, lost: bool = False) -> None:
        """Drop what memory holds of this copy: the next request loads it again, so no
        cached value or body outlives what it copied. ``lost``: because the backend
        lost the data (not only because memory can no longer be trusted).

        Cleared in place rather than replaced, so that a write in flight still
        settles into the same memory and the reload that follows picks it up.
        """
        if self.cached is not None:
            self.cached.forget()
        if self.writing is not None:
            self._overtake(self.writing)  # settled, they must not be trusted either
        if lost:
            # Its watchers must re-read too: the loss itself is no event they could be sent.
            end_watchers(self.watchers, "data_lost")
        self.encoded = None
        self.sorted_keys = None
        self.ready = False

    def page(self, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` keys of the complete cache after ``after``, in order."""
        keys = self.sorted_keys
        if keys is None:
            keys = self.sorted_keys = sorted(self.cached.memory.keys())  # type: ignore[union-attr]
        start = 0 if after is None else bisect.bisect_right(keys, after)
        return keys[start : start + limit]

    def _list(self, key: str) -> None:
        keys = self.sorted_keys
        if keys is not None:
            index = bisect.bisect_left(keys, key)
            if index == len(keys) or keys[index] != key:
                keys.insert(index, key)

    def _unlist(self, key: str) -> None:
        keys = self.sorted_keys
        if keys is not None:
            index = bisect.bisect_left(keys, key)
            if index < len(keys) and keys[index] == key:
                del keys[index]


def _keep_once(document: codec.Document) -> None:
    """What memory keeps of a written document: the document, or a large one's stored bytes
    (the smaller of the two: a parsed document takes 2.5 times its bytes), not both."""
    stored = document.stored
    if stored is not None and len(stored) >= KEPT_AS_BYTES:
        document.keep_only_stored()
    else:
        document.keep_stored(None)


def encode_answer(value: Any) -> tuple[bytes, str]:
    """A value as the JSON document the backend holds (type marks and all), and its ETag:
    a large value held as its stored bytes has its ETag too, which is not computed again."""
    return stored_with_etag(value)


def encode_for_writing(value: Any) -> tuple[bytes, str]:
    """:func:`encode_answer` of a value about to be written: a Document keeps its stored
    form and ETag until the write settles, so that the backend does not make them again."""
    body, etag = stored_with_etag(value)
    if value.__class__ is codec.Document:
        value.keep_stored(body, etag)  # the same bytes reach the backend and the cache
    return body, etag


class Channel:
    """A channel in memory."""

    __slots__ = ("busy", "id", "last_used", "slots", "storage")

    def __init__(self, channel_id: str, storage: MoobiusStorage) -> None:
        self.id = channel_id
        self.storage = storage
        self.slots: dict[str, Slot] = {}
        self.last_used = time.monotonic()
        #: Requests and writes under way; a busy channel is never dropped.
        self.busy = 0

    def evictable(self) -> bool:
        return self.busy == 0 and all(
            slot.preparing is None or slot.preparing.done() for slot in self.slots.values()
        )


class ChannelTable:
    """Every channel in memory, least recently used first."""

    def __init__(self, settings: EngineSettings, containers: Containers, metrics: Metrics) -> None:
        self.settings = settings
        self.containers = containers
        self.metrics = metrics
        self._channels: OrderedDict[str, Channel] = OrderedDict()
        #: The most channels held since the table was last rebuilt.
        self._peak = 0
        # clear: true empties a channel's container the first time this
        # process creates it, not again after it was dropped for idleness.
        self._cleared: set[tuple[str, str]] = set()
        containers.keep_caches_in(self.forget_caches)

    def __len__(self) -> int:
        return len(self._channels)

    def __iter__(self) -> Iterable[Channel]:
        return iter(list(self._channels.values()))

    def ready_slot(self, channel_id: str, name: str) -> Slot | None:
        """The slot if it can answer from memory now (channel in memory, container ready)."""
        channel = self._channels.get(channel_id)
        if channel is None:
            return None
        slot = channel.slots.get(name)
        if slot is None or not slot.ready:
            return None
        if time.monotonic() - slot.loaded_at > slot.runtime.max_age:
            slot.ready = False  # the backstop behind the invalidation link: load it again
            return None
        self.touch(channel)
        return slot

    def using(self, channel_id: str) -> _ChannelUse:
        """``async with``: the channel (created if need be), marked busy meanwhile."""
        return _ChannelUse(self, channel_id)

    def channel(self, channel_id: str) -> Channel:
        """The channel in memory, created (empty) if it is not."""
        channel = self._channels.get(channel_id)
        if channel is None:
            storage = MoobiusStorage(
                self.settings.service_id, channel_id, (), strict_mode=True, metrics=self.metrics
            )
            channel = self._channels[channel_id] = Channel(channel_id, storage)
            self._peak = max(self._peak, len(self._channels))
            self.metrics.channels.set(len(self._channels))
            self._evict_over_limit(keep=channel)
        self.touch(channel)
        return channel

    def touch(self, channel: Channel) -> None:
        channel.last_used = time.monotonic()
        self._channels.move_to_end(channel.id)

    async def slot(self, channel: Channel, name: str) -> Slot:
        """Channel's copy of container ``name``, opened and loaded (or cleared) first."""
        runtime = self.containers[name]
        slot = channel.slots.get(name)
        if slot is None or slot.runtime is not runtime:
            slot = channel.slots[name] = Slot(runtime, channel)
        if slot.ready and time.monotonic() - slot.loaded_at > runtime.max_age:
            slot.ready = False
        if slot.ready:
            return slot
        if slot.preparing is None:
            slot.preparing = asyncio.ensure_future(self._prepare(channel, slot))
        preparing = slot.preparing
        try:
            await asyncio.shield(preparing)
        except BaseException:
            if preparing.done() and slot.preparing is preparing:
                slot.preparing = None  # the next request tries again
            raise
        return slot

    async def _prepare(self, channel: Channel, slot: Slot) -> None:
        runtime = slot.runtime
        spec = runtime.spec
        if slot.cached is None:
            slot.cached = await self._open(channel, runtime)
        # Loaded again (a max age passed, a cache was dropped): bodies and the key
        # index made from what memory held before must not outlive it.
        slot.encoded = None
        slot.sorted_keys = None
        if spec.clear and (channel.id, spec.name) not in self._cleared:
            await runtime.run(slot.cached.clear)
            self._cleared.add((channel.id, spec.name))
        elif spec.load:
            await runtime.run(slot.cached.load)
        else:
            slot.cached.forget()  # not loaded: what memory held before is not trusted
        slot.loaded_at = time.monotonic()
        slot.ready = True
        # Let this task go: kept, a finished task holds its coroutine and its
        # context for as long as the channel stays in memory.
        slot.preparing = None

    async def _open(self, channel: Channel, runtime: ContainerRuntime) -> CachedDict:
        spec = runtime.spec
        try:
            cached = await runtime.run(channel.storage.add_spec, runtime.unloaded_spec)
        except ChanstoreError:
            raise
        except Exception as exc:
            # Opening the backend failed (a json folder that cannot be made):
            # a backend failure with its reason, not a crash of the request.
            error = BackendUnavailable(
                f"container {spec.name!r}: the {spec.implementation} backend cannot be "
                f"opened: {exc}"
            )
            error.kind = error_kind(exc)
            raise error from exc
        # The daemon carries values in their stored form (so that every daemon
        # answers the same bytes and ETags), and sizes the backend's own history.
        cached.database.revive_values = False
        cached.database.history_length = self.settings.event_history
        if self.containers.get(spec.name) is not runtime:
            # A reload retired this container while its backend was being opened.
            channel.storage.remove_container(spec.name).close()
            raise UnknownContainer(f"container {spec.name!r} was removed by a reload")
        slot = channel.slots.get(spec.name)
        if slot is not None:
            runtime.follow_writes_of(cached.database, slot)
        return cached

    def drop_container(self, name: str) -> list[Slot]:
        """Take container ``name`` out of every channel; the slots it had."""
        slots = []
        for channel in self._channels.values():
            slot = channel.slots.pop(name, None)
            if slot is not None:
                slot.end_watchers("reload")
                slot.stop_following()
                slots.append(slot)
                if name in channel.storage.containers:
                    channel.storage.remove_container(name)
        return slots

    def forget_caches(self, runtime: ContainerRuntime, lost: bool = False) -> int:
        """Drop every channel's cache of ``runtime``'s container; how many were dropped.

        For a backend that lost the data those caches copy: each slot is made
        ready again by the next request, from what the backend holds then.
        """
        dropped = 0
        for channel in self._channels.values():
            slot = channel.slots.get(runtime.name)
            if slot is not None and slot.runtime is runtime:
                slot.forget(lost)
                dropped += 1
        return dropped

    def sweep_idle(self) -> int:
        """Drop channels unused for ``idle_timeout`` seconds; how many were dropped."""
        deadline = time.monotonic() - self.settings.idle_timeout
        victims = []
        for channel in self._channels.values():  # least recently used first
            if channel.last_used > deadline:
                break
            if channel.evictable():
                victims.append(channel)
        self._evict(victims)
        return len(victims)

    def evict_all(self) -> None:
        self._evict(list(self._channels.values()))

    def _evict_over_limit(self, keep: Channel) -> None:
        excess = len(self._channels) - self.settings.max_channels
        if excess > 0:
            victims = [c for c in self._channels.values() if c is not keep and c.evictable()]
            self._evict(victims[:excess])

    def _evict(self, channels: Iterable[Channel]) -> None:
        for channel in channels:
            del self._channels[channel.id]
            for slot in channel.slots.values():
                slot.end_watchers("evicted")
                slot.stop_following()
            channel.storage.close()
        self.metrics.channels.set(len(self._channels))
        self._compact()

    def _compact(self) -> None:
        """Rebuild the table once most channels have left.

        A dict never gives back the room it grew to when entries are deleted,
        so after a burst of channels left it would keep a table sized for the
        burst; a copy is sized for what is left (the LRU order is kept).
        """
        count = len(self._channels)
        if count > self._peak // 4:
            return
        if self._peak > COMPACT_ABOVE:
            self._channels = OrderedDict(self._channels)
        self._peak = count


class _ChannelUse:
    """``async with``: the channel, marked busy so it is not dropped meanwhile."""

    __slots__ = ("_channel", "_channel_id", "_table")

    def __init__(self, table: ChannelTable, channel_id: str) -> None:
        self._table = table
        self._channel_id = channel_id
        self._channel: Channel | None = None

    async def __aenter__(self) -> Channel:
        # Every event this request causes from here on names its channel.
        structlog.contextvars.bind_contextvars(channel=self._channel_id)
        self._channel = self._table.channel(self._channel_id)
        self._channel.busy += 1
        return self._channel

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._channel is not None
        self._channel.busy -= 1
