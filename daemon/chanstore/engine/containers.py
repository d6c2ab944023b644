"""The containers of the running db_config, and what all channels' copies of one share.

A :class:`ContainerRuntime` holds a container's spec, the threads its backend
calls run on, its write lanes, and the last write failure (which readiness
reports). :class:`Containers` maps names to runtimes; a reload swaps entries
(see :mod:`chanstore.engine.reconfigure`).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from chanstore import logs
from chanstore.backends.base import DatabaseInterface
from chanstore.config import ContainerSpec
from chanstore.engine.errors import BackendTimeout, UnknownContainer
from chanstore.engine.lanes import WriteLanes
from chanstore.engine.settings import EngineSettings
from chanstore.errors import BackendUnavailable, IntegrityProblem
from chanstore.instrumentation import attach
from chanstore.keys import encode_domain_part
from chanstore.metrics import Metrics

__all__ = ["ContainerRuntime", "Containers"]

T = TypeVar("T")
log = logs.get_logger()

#: Threads per container for backend reads, loads and readiness probes.
READ_THREADS = 4


class ContainerRuntime:
    """What all channels' copies of one container share: spec, threads, write lanes."""

    def __init__(self, spec: ContainerSpec, settings: EngineSettings, metrics: Metrics) -> None:
        self.spec = spec
        self.settings = settings
        self.metrics = metrics
        self.lanes = WriteLanes(spec.name, settings.write_lanes, settings.backend_timeout)
        self.executor = ThreadPoolExecutor(READ_THREADS, f"chanstore-{spec.name}")
        #: The last write failure, until a write succeeds again (readiness reports it).
        self.write_problem: BaseException | None = None
        self._probe: DatabaseInterface | None = None
        self._unloaded: tuple[ContainerSpec, ContainerSpec] | None = None

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

    def wrote(self, outcome: bool | BaseException) -> None:
        """Note a write's outcome: a failure stays the container's problem until a write works."""
        self.write_problem = outcome if isinstance(outcome, BaseException) else None

    async def check(self) -> BaseException | None:
        """Why this container's backend cannot serve now, or None."""
        try:
            problems = await self.run(self._check_available)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return exc
        for problem in problems:
            self.metrics.integrity_problems.labels(self.spec.name, problem.kind).inc()
            log.error("integrity_problem", container=self.spec.name, kind=problem.kind,
                      error=problem.message)  # fmt: skip
        if isinstance(self.write_problem, BackendUnavailable | BackendTimeout):
            # The backend is reachable again: a probe settles an outage, or a
            # not-ready daemon that is sent no writes would never be ready again.
            self.write_problem = None
        return self.write_problem

    def _check_available(self) -> list[IntegrityProblem]:
        """Probe the backend; the integrity problems it found since the last probe."""
        if self._probe is None:
            domain = f"service_{encode_domain_part(self.settings.service_id)}"
            self._probe = self.spec.engine(domain=domain, **self.spec.settings)
            attach(self._probe, container=self.spec.name, metrics=self.metrics)
        self._probe.check_available()
        return self._probe.integrity_problems()

    async def close(self) -> None:
        """Finish queued writes, then release the threads and the probe."""
        await self.lanes.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self._probe is not None:
            self._probe.close()


class Containers:
    """The running db_config's containers by name."""

    def __init__(self, runtimes: dict[str, ContainerRuntime]) -> None:
        self.runtimes = runtimes

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
