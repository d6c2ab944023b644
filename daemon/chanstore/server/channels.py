"""The channels the daemon holds in memory, and the containers they share.

A :class:`ChannelRegistry` creates a channel's :class:`~chanstore.storage.MoobiusStorage`
on first use and fills in each container as it is first asked for (loading
or clearing it as its db_config entry says), so that a dead backend fails
only the requests for its own containers. Channels leave memory when idle
for ``idle_timeout`` seconds, or when more than ``max_channels`` are held;
their data stays in the backends.

Threads and the event loop
--------------------------
Everything here runs on the event loop except backend calls, which run on the
container's own threads (:class:`ContainerRuntime`). Cached reads are
answered on the loop without a lock (:meth:`CachedDict.lookup`); the loop only
ever takes a CachedDict's lock when no thread can hold it for long, because
writes go through the write lanes and misses call the backend directly.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from chanstore import codec, logs
from chanstore.backends.base import DatabaseInterface
from chanstore.cache import ABSENT, UNKNOWN, CachedDict
from chanstore.config import ContainerSpec, DbConfig
from chanstore.errors import BackendError, BackendUnavailable, ChanstoreError, error_kind
from chanstore.instrumentation import NOT_FOUND, attach, engine_label, failure_kind
from chanstore.keys import encode_domain_part
from chanstore.metrics import Metrics
from chanstore.server.settings import DaemonSettings
from chanstore.server.writes import Write, WriteLanes
from chanstore.storage import MoobiusStorage

__all__ = ["Changes", "ChannelRegistry", "ContainerRuntime", "UnknownContainer"]

T = TypeVar("T")
log = logs.get_logger()

READ_THREADS = 4
#: Tables of channels smaller than this are not worth rebuilding when channels leave.
COMPACT_ABOVE = 1024


class UnknownContainer(ChanstoreError, LookupError):
    """A request named a container that the running db_config does not have."""

    kind = "unknown_container"


class BackendTimeout(BackendError):
    """A backend did not answer within the daemon's ``backend_timeout``."""

    kind = "timeout"


class ContainerRuntime:
    """What all channels' copies of one container share: spec, threads, write lanes."""

    def __init__(self, spec: ContainerSpec, settings: DaemonSettings, metrics: Metrics) -> None:
        self.spec = spec
        self.settings = settings
        self.metrics = metrics
        self.lanes = WriteLanes(spec.name, settings.write_lanes)
        self.executor = ThreadPoolExecutor(READ_THREADS, f"chanstore-{spec.name}")
        #: The last write failure, until a write succeeds again (readiness reports it).
        self.write_problem: str | None = None
        #: Whether that failure was the backend being unreachable, which a probe
        #: that reaches it again settles (else readiness would wait for a write
        #: that a not-ready daemon may never be sent).
        self.write_problem_unreachable = False
        self._probe: DatabaseInterface | None = None
        self._unloaded: tuple[ContainerSpec, ContainerSpec] | None = None

    @property
    def unloaded_spec(self) -> ContainerSpec:
        """``spec`` with load and clear off, made once per spec rather than per channel.

        A channel's copy is opened with it; the registry then loads or clears it.
        """
        if self._unloaded is None or self._unloaded[0] is not self.spec:
            self._unloaded = (self.spec, dataclasses.replace(self.spec, load=False, clear=False))
        return self._unloaded[1]

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on this container's threads, within the backend timeout."""
        # The thread runs in the request's logging context (request id, channel).
        call = functools.partial(contextvars.copy_context().run, function, *args)
        future = asyncio.get_running_loop().run_in_executor(self.executor, call)
        try:
            return await asyncio.wait_for(future, self.settings.backend_timeout)
        except TimeoutError:
            raise BackendTimeout(
                f"container {self.spec.name!r}: the {self.spec.implementation} backend did not "
                f"answer within {self.settings.backend_timeout:g}s"
            ) from None

    async def check(self) -> str | None:
        """Why this container's backend cannot serve now, or None."""
        try:
            await self.run(self._check_available)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return str(exc)
        if self.write_problem_unreachable:
            self.write_problem = None
            self.write_problem_unreachable = False
        return self.write_problem

    def _check_available(self) -> None:
        if self._probe is None:
            domain = f"service_{encode_domain_part(self.settings.service_id)}"
            self._probe = self.spec.engine(domain=domain, **self.spec.settings)
            attach(self._probe, container=self.spec.name, metrics=self.metrics)
        self._probe.check_available()

    async def close(self) -> None:
        """Finish queued writes, then release the threads and the probe."""
        await self.lanes.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._probe is not None:
            self._probe.close()


class Slot:
    """One channel's copy of one container."""

    __slots__ = ("cached", "encoded", "preparing", "ready", "runtime", "writes")

    def __init__(self, runtime: ContainerRuntime) -> None:
        self.runtime = runtime
        self.cached: CachedDict | None = None
        #: Cached values as response bodies, made on first read (None until then:
        #: most channels in memory never answer a read from it).
        self.encoded: dict[str, bytes] | None = None
        self.preparing: asyncio.Future[None] | None = None
        self.ready = False
        #: Writes applied so far; a read of the backend caches its answer only
        #: if no write landed while it was reading.
        self.writes = 0

    def applied(self, key: str, value: Any, deleted: bool) -> None:
        """Bring the cache up to date with a write the backend now holds."""
        assert self.cached is not None
        self.writes += 1
        if self.encoded:
            self.encoded.pop(key, None)
        if deleted:
            self.cached.discard(key)
        else:
            self.cached.remember(key, value)

    def failed(self, key: str) -> None:
        """Forget the cached value of ``key``: a write of it failed, and may still land.

        (A Redis that stalled applies the commands it had received once it
        resumes.) The next read asks the backend; a read under way now does
        not cache what it finds.
        """
        assert self.cached is not None
        self.writes += 1
        if self.encoded:
            self.encoded.pop(key, None)
        self.cached.unsure(key)

    def body_of(self, key: str, value: Any) -> bytes:
        """``value`` as a JSON response body, made once per value."""
        if self.encoded is None:
            self.encoded = {}
        body = self.encoded.get(key)
        if body is None:
            body = json.dumps(codec.to_json_shape(value), separators=(",", ":")).encode()
            self.encoded[key] = body
        return body


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


@dataclass(frozen=True)
class Changes:
    """What a new db_config changed, by container name."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        return {name: list(getattr(self, name)) for name in ("added", "removed", "changed",
                                                              "updated")}  # fmt: skip


class ChannelRegistry:
    """Every channel in memory, and the containers of the running db_config."""

    def __init__(self, settings: DaemonSettings, config: DbConfig, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.config = config
        self.runtimes = {spec.name: ContainerRuntime(spec, settings, metrics) for spec in config}
        self._channels: OrderedDict[str, Channel] = OrderedDict()
        #: The most channels held since the table of channels was last rebuilt.
        self._channels_peak = 0
        # clear: true empties a channel's container the first time this
        # process creates it, not again after it was dropped for idleness.
        self._cleared: set[tuple[str, str]] = set()
        self._retiring: set[asyncio.Task[None]] = set()
        #: The (backend, container) labels chanstore_backend_up was last set for.
        self._up_labels: set[tuple[str, str]] = set()

    # -- reading -------------------------------------------------------------

    def cached_body(self, channel_id: str, name: str, key: str) -> Any:
        """The response body for a key answered from memory alone.

        Returns the body, :data:`ABSENT`, or None when the slow path must run.
        """
        channel = self._channels.get(channel_id)
        if channel is None:
            return None
        slot = channel.slots.get(name)
        if slot is None or not slot.ready:
            return None
        value = slot.cached.lookup(key)  # type: ignore[union-attr]
        if value is UNKNOWN:
            return None
        self._touch(channel)
        return ABSENT if value is ABSENT else slot.body_of(key, value)

    async def get_body(self, channel_id: str, name: str, key: str) -> bytes | Any:
        """The response body for ``key``, or ABSENT."""
        async with self._using(channel_id) as channel:
            slot = await self._slot(channel, name)
            value = slot.cached.lookup(key)  # type: ignore[union-attr]
            if value is UNKNOWN:
                value = await self._read_backend(slot, key)
            return ABSENT if value is ABSENT else slot.body_of(key, value)

    async def get_many(self, channel_id: str, name: str, keys: list[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist."""
        async with self._using(channel_id) as channel:
            slot = await self._slot(channel, name)
            cached = slot.cached
            assert cached is not None
            found: dict[str, Any] = {}
            unknown: list[str] = []
            for key in keys:
                value = cached.lookup(key)
                if value is UNKNOWN:
                    unknown.append(key)
                elif value is not ABSENT:
                    found[key] = value
            if unknown:
                writes_before = slot.writes
                for _ in unknown:
                    cached.count_miss()
                fetched = await slot.runtime.run(cached.database.get_many, unknown)
                for key, value in fetched.items():
                    if isinstance(value, BackendError):
                        raise value
                    found[key] = value
                    if slot.writes == writes_before:
                        cached.remember(key, value)
            return found

    async def keys(self, channel_id: str, name: str) -> list[str]:
        """Every key of a channel's container."""
        async with self._using(channel_id) as channel:
            slot = await self._slot(channel, name)
            cached = slot.cached
            assert cached is not None
            if cached.loaded:
                return list(cached)
            stored = await slot.runtime.run(cached.database.all_keys)
            return list(dict.fromkeys(stored))

    async def _read_backend(self, slot: Slot, key: str) -> Any:
        cached = slot.cached
        assert cached is not None
        cached.count_miss()
        writes_before = slot.writes
        ok, value = await slot.runtime.run(cached.database.get_value, key)
        if not ok:
            if failure_kind(value, default=NOT_FOUND) == NOT_FOUND:
                return ABSENT
            raise _as_backend_error(value)
        if slot.writes == writes_before:
            cached.remember(key, value)
        return value

    # -- writing -------------------------------------------------------------

    async def put(self, channel_id: str, name: str, key: str, value: Any) -> None:
        """Store ``value``; returns once the backend holds it."""
        await self._write(channel_id, name, key, value, delete=False)

    async def delete(self, channel_id: str, name: str, key: str) -> bool:
        """Delete ``key``; whether it existed."""
        return await self._write(channel_id, name, key, None, delete=True)

    async def put_many(self, channel_id: str, name: str, items: dict[str, Any]) -> None:
        """Store every item; returns once the backend holds them all."""
        await self._write_many(channel_id, name, [(k, v, False) for k, v in items.items()])

    async def delete_many(self, channel_id: str, name: str, keys: list[str]) -> list[str]:
        """Delete ``keys``; those that existed."""
        results = await self._write_many(channel_id, name, [(k, None, True) for k in keys])
        return [key for key, existed in zip(keys, results, strict=True) if existed]

    def write_soon(self, channel_id: str, name: str, key: str, value: Any, *,
                   delete: bool = False) -> asyncio.Future[bool]:  # fmt: skip
        """:meth:`put` or :meth:`delete` as a future, queued now when it can be.

        For a loaded container of a channel in memory (the usual case), the
        write goes on its lane at once, with no task; otherwise (the channel
        is still to be created or loaded) a task runs the awaitable method.
        Either way the future ends as awaiting that method would.
        """
        channel = self._channels.get(channel_id)
        slot = channel.slots.get(name) if channel is not None else None
        if (
            channel is None
            or slot is None
            or not slot.ready
            or self.runtimes.get(name) is not slot.runtime
        ):
            return asyncio.ensure_future(self._write(channel_id, name, key, value, delete))
        assert slot.cached is not None
        self._touch(channel)
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[bool] = loop.create_future()
        if delete and slot.cached.lookup(key) is ABSENT:
            outcome.set_result(False)  # deleting what the complete cache knows is absent
            return outcome
        written = self._submit(channel, slot, key, value, delete)
        timeout = self.settings.backend_timeout
        timer = loop.call_later(timeout, _expire, [written], name, timeout)

        def settle(written: asyncio.Future[bool]) -> None:
            timer.cancel()
            error = written.exception()
            if error is None:
                outcome.set_result(written.result())
            elif isinstance(error, ChanstoreError) and not isinstance(error, BackendError):
                outcome.set_exception(_as_backend_error(error))
            else:
                outcome.set_exception(error)

        written.add_done_callback(settle)
        return outcome

    async def _write(self, channel_id: str, name: str, key: str, value: Any, delete: bool) -> bool:
        (result,) = await self._write_many(channel_id, name, [(key, value, delete)])
        return result

    async def _write_many(
        self, channel_id: str, name: str, writes: list[tuple[str, Any, bool]]
    ) -> list[bool]:
        async with self._using(channel_id) as channel:
            slot = await self._slot(channel, name)
            cached = slot.cached
            assert cached is not None
            if len(writes) == 1 and writes[0][2] and cached.lookup(writes[0][0]) is ABSENT:
                return [False]  # deleting what the complete cache knows is absent
            futures = [self._submit(channel, slot, key, value, delete)
                       for key, value, delete in writes]  # fmt: skip
            done = await self._await_writes(slot, futures)
            return done

    def _submit(self, channel: Channel, slot: Slot, key: str, value: Any,
                delete: bool) -> asyncio.Future[bool]:  # fmt: skip
        assert slot.cached is not None
        runtime = slot.runtime
        channel.busy += 1

        def settled(result: bool | BaseException) -> None:
            # Runs on the loop as the lane finishes, even if the request gave up waiting.
            channel.busy -= 1
            if isinstance(result, BaseException):
                runtime.write_problem = f"last write failed: {result}"
                runtime.write_problem_unreachable = isinstance(result, BackendUnavailable)
                slot.failed(key)
            else:
                runtime.write_problem = None
                runtime.write_problem_unreachable = False
                slot.applied(key, value, deleted=delete)

        return runtime.lanes.submit(Write(slot.cached.database, key, value, delete, settle=settled))

    async def _await_writes(self, slot: Slot, futures: list[asyncio.Future[bool]]) -> list[bool]:
        # A timer fails the futures still pending when the timeout passes (cheaper
        # than asyncio.timeout on every write). The lane brings the cache up to
        # date itself when the write lands anyway (Write.settle), whoever waits.
        timeout = self.settings.backend_timeout
        timer = asyncio.get_running_loop().call_later(
            timeout, _expire, futures, slot.runtime.spec.name, timeout
        )
        try:
            if len(futures) == 1:
                return [await futures[0]]
            return list(await asyncio.gather(*futures))
        except BackendError:
            raise
        except ChanstoreError as exc:
            raise _as_backend_error(exc) from exc
        finally:
            timer.cancel()

    # -- channels and slots --------------------------------------------------

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    def container(self, name: str) -> ContainerRuntime:
        """The runtime of container ``name``; UnknownContainer lists the known ones."""
        runtime = self.runtimes.get(name)
        if runtime is None:
            known = ", ".join(self.runtimes) or "none"
            raise UnknownContainer(f"unknown container {name!r}; this daemon serves: {known}")
        return runtime

    def _using(self, channel_id: str) -> _ChannelUse:
        return _ChannelUse(self, channel_id)

    def _channel(self, channel_id: str) -> Channel:
        channel = self._channels.get(channel_id)
        if channel is None:
            storage = MoobiusStorage(
                self.settings.service_id, channel_id, (), strict_mode=True, metrics=self.metrics
            )
            channel = self._channels[channel_id] = Channel(channel_id, storage)
            self._channels_peak = max(self._channels_peak, len(self._channels))
            self.metrics.channels.set(len(self._channels))
            self._evict_over_limit(keep=channel)
        self._touch(channel)
        return channel

    def _touch(self, channel: Channel) -> None:
        channel.last_used = time.monotonic()
        self._channels.move_to_end(channel.id)

    async def _slot(self, channel: Channel, name: str) -> Slot:
        runtime = self.container(name)
        slot = channel.slots.get(name)
        if slot is None or slot.runtime is not runtime:
            slot = channel.slots[name] = Slot(runtime)
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
        spec = slot.runtime.spec
        if slot.cached is None:
            try:
                cached = await slot.runtime.run(
                    channel.storage.add_spec, slot.runtime.unloaded_spec
                )
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
            if self.runtimes.get(spec.name) is not slot.runtime:
                # A reload retired this container while its backend was being opened.
                channel.storage.remove_container(spec.name).close()
                raise UnknownContainer(f"container {spec.name!r} was removed by a reload")
            slot.cached = cached
        if spec.clear and (channel.id, spec.name) not in self._cleared:
            await slot.runtime.run(slot.cached.clear)
            self._cleared.add((channel.id, spec.name))
        elif spec.load:
            await slot.runtime.run(slot.cached.load)
        slot.ready = True
        # Let this task go: kept, a finished task holds its coroutine, its context
        # (request id, channel) and an entry in asyncio's set of tasks for as long
        # as the channel stays in memory.
        slot.preparing = None

    def _evict_over_limit(self, keep: Channel) -> None:
        excess = len(self._channels) - self.settings.max_channels
        if excess <= 0:
            return
        victims = [c for c in self._channels.values() if c is not keep and c.evictable()][:excess]
        self._evict(victims)

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

    def _evict(self, channels: Iterable[Channel]) -> None:
        for channel in channels:
            del self._channels[channel.id]
            channel.storage.close()
        self.metrics.channels.set(len(self._channels))
        self._compact()

    def _compact(self) -> None:
        """Rebuild the table of channels once most of them have left.

        A dict never gives back the room it grew to when entries are deleted,
        so after a burst of channels left it would keep a table sized for the
        burst; a copy is sized for what is left (order, the LRU order, is kept).
        """
        count = len(self._channels)
        if count > self._channels_peak // 4:
            return
        if self._channels_peak > COMPACT_ABOVE:
            self._channels = OrderedDict(self._channels)
        self._channels_peak = count

    # -- configuration -------------------------------------------------------

    def apply_config(self, config: DbConfig) -> Changes:
        """Serve ``config`` from now on; only what changed is rebuilt."""
        old, new = self.config.by_name(), config.by_name()
        changes = Changes(
            added=tuple(n for n in new if n not in old),
            removed=tuple(n for n in old if n not in new),
            changed=tuple(n for n in new if n in old and not old[n].same_backend(new[n])),
            updated=tuple(
                n for n in new if n in old and old[n].same_backend(new[n]) and old[n] != new[n]
            ),
        )
        for name in changes.removed + changes.changed:
            self._retire(name)
        for name in changes.added + changes.changed:
            self.runtimes[name] = ContainerRuntime(new[name], self.settings, self.metrics)
        for name in changes.updated:
            self.runtimes[name].spec = new[name]
        self.runtimes = {name: self.runtimes[name] for name in new}
        self.config = config
        return changes

    def _retire(self, name: str) -> None:
        """Stop serving container ``name``; its queued writes still finish."""
        runtime = self.runtimes.pop(name)
        slots = []
        for channel in self._channels.values():
            slot = channel.slots.pop(name, None)
            if slot is not None:
                slots.append(slot)
                if name in channel.storage.containers:
                    channel.storage.remove_container(name)
        task = asyncio.get_running_loop().create_task(_close_retired(runtime, slots))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- health and shutdown -------------------------------------------------

    async def readiness(self) -> dict[str, str]:
        """Each container whose backend cannot serve now, with the reason.

        Also sets ``chanstore_ready`` and ``chanstore_backend_up`` to the answer,
        and drops the ``chanstore_backend_up`` series of containers no longer served.
        """
        runtimes = dict(self.runtimes)
        problems = await asyncio.gather(*(runtime.check() for runtime in runtimes.values()))
        # A reload may have retired some of them meanwhile: only those still served count.
        checked = {name: problem for (name, runtime), problem
                   in zip(runtimes.items(), problems, strict=True)
                   if self.runtimes.get(name) is runtime}  # fmt: skip
        found = {name: problem for name, problem in checked.items() if problem}
        labels = {(engine_label(runtimes[name].spec.engine), name) for name in checked}
        for backend, name in labels:
            self.metrics.backend_up.labels(backend, name).set(0 if name in found else 1)
        for gone in self._up_labels - labels:
            self.metrics.backend_up.remove(*gone)
        self._up_labels = labels
        self.metrics.ready.set(0 if found else 1)
        return found

    async def close(self) -> None:
        """Finish every queued write, then close every backend."""
        await asyncio.gather(*(runtime.close() for runtime in self.runtimes.values()))
        await asyncio.gather(*self._retiring, return_exceptions=True)
        self._evict(list(self._channels.values()))


class _ChannelUse:
    """``async with``: the channel, marked busy so it is not dropped meanwhile."""

    __slots__ = ("_channel", "_channel_id", "_registry")

    def __init__(self, registry: ChannelRegistry, channel_id: str) -> None:
        self._registry = registry
        self._channel_id = channel_id
        self._channel: Channel | None = None

    async def __aenter__(self) -> Channel:
        # Every event this request causes from here on names its channel.
        structlog.contextvars.bind_contextvars(channel=self._channel_id)
        self._channel = self._registry._channel(self._channel_id)
        self._channel.busy += 1
        return self._channel

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._channel is not None
        self._channel.busy -= 1


async def _close_retired(runtime: ContainerRuntime, slots: list[Slot]) -> None:
    try:
        await runtime.close()
    finally:
        for slot in slots:
            if slot.cached is not None:
                slot.cached.close()


def _expire(futures: list[asyncio.Future[bool]], name: str, timeout: float) -> None:
    late = BackendTimeout(f"container {name!r}: the backend did not store the write within "
                          f"{timeout:g}s (it may still land)")  # fmt: skip
    for future in futures:
        if not future.done():
            future.set_exception(late)


def _as_backend_error(failure: Any) -> BackendError:
    cause = getattr(failure, "exception", None) or failure
    if isinstance(cause, BackendError):
        return cause
    error = BackendError(str(failure))
    error.kind = failure_kind(failure, default=error_kind(cause) if isinstance(
        cause, BaseException) else "backend")  # fmt: skip
    return error
