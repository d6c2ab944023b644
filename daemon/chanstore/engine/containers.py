"""The containers of the running db_config, and what all channels' copies of one share.

A :class:`ContainerRuntime` holds a container's spec, the threads its backend
calls run on, its write lanes, and the last write failure (which readiness
reports). :class:`Containers` maps names to runtimes; a reload swaps entries
(see :mod:`chanstore.engine.reconfigure`).

When a backend reports that it lost the data (``data_lost``: a Redis that
came back empty), the runtime drops every channel's cache of its container
at once, through whoever holds the channels (:meth:`Containers.keep_caches_in`),
so that no cached value outlives the data it copied, and the container is
not ready with that kind for :data:`DATA_LOST_HOLD` seconds.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from chanstore import logs
from chanstore.backends.base import DatabaseInterface
from chanstore.coherence import Invalidations
from chanstore.config import ContainerSpec
from chanstore.engine.errors import BackendTimeout, UnknownContainer
from chanstore.engine.lanes import WriteLanes
from chanstore.engine.settings import EngineSettings
from chanstore.errors import BackendError, ConfigError, IntegrityProblem
from chanstore.instrumentation import attach
from chanstore.keys import encode_domain_part
from chanstore.metrics import Metrics

__all__ = ["DATA_LOST_HOLD", "ContainerRuntime", "Containers"]

T = TypeVar("T")


def _shares_writes(engine: type[DatabaseInterface]) -> bool:
    """Whether backends of ``engine`` may answer an invalidation link (they override it)."""
    return engine.invalidations is not DatabaseInterface.invalidations


class KeyCache(Protocol):
    """One channel's cached copy of a container, as invalidations reach it."""

    def invalidate(self, keys: list[str]) -> None: ...


log = logs.get_logger()

#: Seconds the first readiness check waits for a shared backend's new link to come up.
LINK_START_WAIT = 1.0
#: Threads per container for backend reads, loads and readiness probes.
READ_THREADS = 4

#: Seconds a container stays not ready (kind ``data_lost``) after its backend last
#: reported losing its data. Long enough for every load balancer's health check,
#: several scrapes and the ChanstoreNotReady alert (2 minutes) to see it; short
#: enough that a loss nobody can undo from here does not keep a fleet out of
#: rotation until someone wakes up. The counter and the log keep it for good.
DATA_LOST_HOLD = 300.0


def _nothing_cached(lost: bool = False) -> int:
    return 0


def check_not_served_elsewhere(config: Iterable[ContainerSpec]) -> None:
    """Raise :class:`~chanstore.errors.ConfigError` naming each container whose store
    another daemon serves without hearing of this one's writes (a json root).

    One daemon serves such a store (its ``--workers`` share it): two would each
    answer from memory what the other overwrote. Asked before a daemon serves
    ``config``: at start, and of a reload's config before anything changes
    (stores this process serves already are not asked again).
    """
    problems = []
    for spec in config:
        serving = spec.engine.served_elsewhere(spec.settings)
        if serving is not None:
            problems.append(
                f"container {spec.name!r}: {serving}; one daemon serves a json root (its "
                f"--workers share it): stop the other first, or keep these containers in "
                f"Redis to serve them from several daemons"
            )
    if problems:
        raise ConfigError(problems)


def _mark_served(spec: ContainerSpec) -> Callable[[], None]:
    """Mark the container's store served by this daemon, so that a transfer or another
    daemon about to write there unheard refuses (see
    :meth:`DatabaseInterface.mark_served`); the function that takes the mark back. A
    mark that cannot be taken is logged, and the daemon serves all the same: they then
    cannot tell."""
    try:
        return spec.engine.mark_served(spec.settings)
    except (OSError, BackendError) as exc:
        log.warning("served_mark_failed", container=spec.name, error=str(exc))
        return _nothing_marked


def _nothing_marked() -> None:
    """A mark that was not taken, taken back."""


class ContainerRuntime:
    """What all channels' copies of one container share: spec, threads, write lanes."""

    def __init__(self, spec: ContainerSpec, settings: EngineSettings, metrics: Metrics) -> None:
        self.spec = spec
        self.settings = settings
        self.metrics = metrics
        self.lanes = WriteLanes(spec.name, settings.write_lanes, settings.backend_timeout)
        for kind in spec.engine.INTEGRITY_KINDS:  # every counter exists, at 0, from the start
            metrics.integrity_problems.labels(spec.name, kind)
        self.executor = ThreadPoolExecutor(READ_THREADS, f"chanstore-{spec.name}")
        #: The backend's last report of lost data, while it keeps the container not ready.
        self.data_lost: BackendError | None = None
        #: Seconds a data loss keeps the container not ready (tests shorten it).
        self.data_lost_hold = DATA_LOST_HOLD
        self._lost_until = 0.0
        #: Drops this container's cache in every channel in memory; how many it dropped.
        #: :class:`Containers` connects it to the holder of the channels.
        self.forget_caches: Callable[..., int] = _nothing_cached
        self._probe: DatabaseInterface | None = None
        self._unloaded: tuple[ContainerSpec, ContainerSpec] | None = None
        #: Whether memory may answer: False while the invalidation link of a shared
        #: backend is down (or not up yet), when another daemon's writes go unheard.
        self.coherent = True
        #: Seconds a slot's memory may answer before it is loaded again (shared backends).
        self.max_age = float("inf")
        self._link: Invalidations | None = None
        #: The caches of this container's channels by domain, for invalidations.
        self._caches: dict[str, KeyCache] = {}
        self._unmark = _mark_served(spec)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def unloaded_spec(self) -> ContainerSpec:
        """``spec`` with load and clear off, made once per spec rather than per channel.

        A channel's copy is opened with it; the channel table then loads or clears it.
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

    # -- coherence ----------------------------------------------------------------

    def follow_writes_of(self, backend: DatabaseInterface, cache: KeyCache) -> None:
        """Keep ``cache`` (one channel's copy, over ``backend``) current with the writes
        other processes make, when ``backend`` is shared (it has an invalidation link)."""
        link = backend.invalidations()
        if link is None:
            return
        self._caches[backend.domain] = cache
        if self._link is None:
            self._attach(link)

    def _attach(self, link: Invalidations) -> None:
        self._link = link
        self.max_age = self.settings.cache_max_age
        self.coherent = False  # until the link says it is up
        self.metrics.cache_invalidations.labels(self.spec.name)  # at 0, for rates
        # In a context of its own: the link outlives the request that opened it, and
        # its events must not name that request's channel or id.
        contextvars.Context().run(link.subscribe, self)

    def forget_cache(self, domain: str) -> None:
        """The copy of ``domain`` left memory: no invalidation needs to reach it."""
        self._caches.pop(domain, None)

    def invalidated(self, domain: str, keys: list[str]) -> None:
        """Another daemon wrote ``keys`` of ``domain``: its cached copy forgets them."""
        cache = self._caches.get(domain)
        if cache is not None:
            cache.invalidate(keys)
            self.metrics.cache_invalidations.labels(self.spec.name).inc(len(keys))

    def link_changed(self, up: bool) -> None:
        """The invalidation link went up (drop every cache, then trust memory) or down."""
        link_name = self._link.name if self._link is not None else "?"
        self.metrics.invalidation_link_up.labels(link_name).set(1 if up else 0)
        if not up:
            if self.coherent:
                log.warning("invalidation_link_down", container=self.spec.name, link=link_name)
            self.coherent = False
            return
        dropped = self.forget_caches()
        self.coherent = True
        log.info("invalidation_link_up", container=self.spec.name, link=link_name,
                 caches_dropped=dropped)  # fmt: skip

    async def check(self) -> BaseException | None:
        """Why this container's backend cannot serve now, or None.

        Readiness is the probe's word alone (reachable; for json, a writable
        file system with room): a failed write of one key or one channel's folder
        is that request's answer, never a reason to take the daemon out of a load
        balancer's rotation, and a backend that fails as a whole fails the probe.

        Also hands on what the backend found by itself: each integrity problem
        is logged and counted, and a ``data_lost`` one drops the container's
        caches at once (on the event loop, where they are read).
        """
        try:
            if self._open_link_early():
                await self._link_up_within(LINK_START_WAIT)
            problems = await self.run(self._check_available)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return exc
        for problem in problems:
            self.metrics.integrity_problems.labels(self.spec.name, problem.kind).inc()
            log.error("integrity_problem", container=self.spec.name, kind=problem.kind,
                      error=problem.message)  # fmt: skip
            if problem.kind == "data_lost":
                self._lost(problem)
        if not self.coherent and self._link is not None:
            error = BackendError(f"container {self.spec.name!r}: the invalidation link to "
                                 f"{self._link.name} is down; reads go to the backend")  # fmt: skip
            error.kind = "invalidation_link_down"
            return error
        return self._still_lost()

    def _lost(self, problem: IntegrityProblem) -> None:
        """The backend lost the data: no cache may answer for it any more."""
        dropped = self.forget_caches(lost=True)
        self._lost_until = time.monotonic() + self.data_lost_hold
        error = BackendError(f"container {self.spec.name!r}: {problem.message}")
        error.kind = "data_lost"
        self.data_lost = error
        # What was done about it; the problem itself was logged at error just before.
        log.warning("container_caches_dropped", container=self.spec.name, reason=problem.kind,
                    channels=dropped, not_ready_seconds=self.data_lost_hold)  # fmt: skip

    def _still_lost(self) -> BackendError | None:
        if self.data_lost is not None and time.monotonic() >= self._lost_until:
            self.data_lost = None
        return self.data_lost

    def _open_link_early(self) -> bool:
        """Open a shared backend's invalidation link at the first readiness check, not at
        the first request: a daemon is ready once it hears other daemons' writes, and a
        load balancer's first checks of a new daemon must not find it not ready.
        Whether a link was opened now."""
        if self._link is not None or not _shares_writes(self.spec.engine):
            return False
        if self._probe is None:
            self._probe = self._new_probe()
        link = self._probe.invalidations()
        if link is None:
            return False
        self._attach(link)
        return True

    async def _link_up_within(self, seconds: float) -> None:
        """Give a link just opened a moment to come up (a round trip or two)."""
        deadline = time.monotonic() + seconds
        while not self.coherent and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    @property
    def link(self) -> Invalidations | None:
        """The invalidation link of this container's shared backend, once opened."""
        return self._link

    def _new_probe(self) -> DatabaseInterface:
        domain = f"service_{encode_domain_part(self.settings.service_id)}"
        probe = self.spec.engine(domain=domain, **self.spec.settings)
        attach(probe, container=self.spec.name, metrics=self.metrics)
        return probe

    def _check_available(self) -> list[IntegrityProblem]:
        """Probe the backend; the integrity problems it found since the last probe."""
        if self._probe is None:
            self._probe = self._new_probe()
        self._probe.check_available()
        return self._probe.integrity_problems()

    async def close(self) -> None:
        """Finish queued writes, then release the threads, the link and the probe."""
        if self._link is not None:
            self._link.unsubscribe(self)
        await self.lanes.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._probe is not None:
            self._probe.close()
        self._unmark()


class Containers:
    """The running db_config's containers by name."""

    def __init__(self, runtimes: dict[str, ContainerRuntime]) -> None:
        self._forget: Callable[..., int] | None = None
        self._runtimes: dict[str, ContainerRuntime] = {}
        self.runtimes = runtimes

    @property
    def runtimes(self) -> dict[str, ContainerRuntime]:
        """The runtimes by name; each one set here can drop its caches (see keep_caches_in)."""
        return self._runtimes

    @runtimes.setter
    def runtimes(self, runtimes: dict[str, ContainerRuntime]) -> None:
        # Runtimes are made where the config is applied; being placed here is
        # what every one of them goes through.
        for runtime in runtimes.values():
            runtime.forget_caches = functools.partial(self._forget_caches, runtime)
        self._runtimes = runtimes

    def keep_caches_in(self, forget: Callable[[ContainerRuntime], int]) -> None:
        """Name the holder of the channels' caches (the channel table, once it is made).

        ``forget(runtime)`` drops that container's cache in every channel in
        memory and returns how many it dropped; a runtime calls it when its
        backend lost the data.
        """
        self._forget = forget

    def _forget_caches(self, runtime: ContainerRuntime, lost: bool = False) -> int:
        return 0 if self._forget is None else self._forget(runtime, lost)

    def __getitem__(self, name: str) -> ContainerRuntime:
        """The runtime of container ``name``; UnknownContainer lists the served ones."""
        runtime = self.runtimes.get(name)
        if runtime is None:
            known = ", ".join(self.runtimes) or "none"
            raise UnknownContainer(f"unknown container {name[:200]!r}; this daemon serves: {known}")
        return runtime

    def get(self, name: str) -> ContainerRuntime | None:
        return self.runtimes.get(name)

    def __iter__(self) -> Iterator[ContainerRuntime]:
        return iter(list(self.runtimes.values()))

    def names(self) -> list[str]:
        return list(self.runtimes)

    @property
    def queued_writes(self) -> int:
        return sum(runtime.lanes.queued for runtime in self.runtimes.values())
