"""Readiness: whether every container's backend can serve now, and if not, why.

The answer names containers and error kinds only: ``/readyz`` needs no token,
so it must not show channel ids, paths or hosts; the details go to the logs.
It also keeps ``chanstore_ready`` and ``chanstore_backend_up`` in step.

A container is not ready while its backend does not answer, while its last
write failed, and for a while after its backend lost the data (kind
``data_lost``: see :data:`~chanstore.engine.containers.DATA_LOST_HOLD`); each
check also hands on the integrity problems the backends found by themselves.
"""

from __future__ import annotations

import asyncio

from chanstore import logs
from chanstore.engine.containers import Containers
from chanstore.errors import error_kind
from chanstore.instrumentation import engine_label
from chanstore.metrics import Metrics

__all__ = ["Readiness"]

log = logs.get_logger()


class Readiness:
    """Checks every container's backend; remembers what it last reported."""

    def __init__(self, containers: Containers, metrics: Metrics) -> None:
        self.containers = containers
        self.metrics = metrics
        #: The (backend, container) labels chanstore_backend_up was last set for.
        self._labels: set[tuple[str, str]] = set()
        self._logged: dict[str, str] = {}

    async def check(self) -> dict[str, str]:
        """Each container that cannot serve now, with the kind of its failure."""
        runtimes = list(self.containers)
        failures = await asyncio.gather(*(runtime.check() for runtime in runtimes))
        # A reload may have retired some meanwhile: only those still served count.
        checked = [(runtime, failure) for runtime, failure in zip(runtimes, failures, strict=True)
                   if self.containers.get(runtime.name) is runtime]  # fmt: skip
        problems = {runtime.name: error_kind(failure) for runtime, failure in checked if failure}
        self._log_changes(checked)
        labels = set()
        for runtime, failure in checked:
            label = (engine_label(runtime.spec.engine), runtime.name)
            labels.add(label)
            # About the backend alone: a daemon whose invalidation link is down is not
            # ready, but its backend answers (reads go to it).
            down = failure is not None and error_kind(failure) != "invalidation_link_down"
            self.metrics.backend_up.labels(*label).set(0 if down else 1)
        for gone in self._labels - labels:
            self.metrics.backend_up.remove(*gone)
        self._labels = labels
        self.metrics.ready.set(0 if problems else 1)
        return problems

    def _log_changes(self, checked: list) -> None:
        """Log a container's failure when it starts or changes, and its recovery."""
        now = {runtime.name: str(failure) for runtime, failure in checked if failure}
        for name, reason in now.items():
            if self._logged.get(name) != reason:
                log.error("container_not_ready", container=name, error=reason)
        for name in self._logged.keys() - now.keys():
            log.info("container_ready_again", container=name)
        self._logged = now
