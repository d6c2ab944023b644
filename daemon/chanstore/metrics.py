"""Every Prometheus metric chanstore exports, defined in one place.

:class:`Metrics` registers the whole set on one registry. The process-wide
set lives on prometheus_client's default registry (:func:`default_metrics`);
tests and embedders make their own with ``Metrics(CollectorRegistry())`` and
hand it to :class:`~chanstore.storage.MoobiusStorage` or
:class:`~chanstore.cache.CachedDict`.

The hottest counts (cache hits and misses, backend operation durations, the
daemon's cached GETs) are kept in plain Python objects and *folded* into
their metrics when the registry is collected: see :class:`CacheCounts`,
:class:`DeferredDurations` and :class:`DeferredRequests`.

Labels are bounded by construction: ``container`` is a db_config name,
``backend`` an engine name, ``operation`` one of the backend methods, ``error``
one of :func:`chanstore.errors.error_kind`'s words. Channel ids and keys are
never labels.
"""

from __future__ import annotations

import bisect
import collections
import functools
import threading
import time
from typing import Any

import prometheus_client
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

from chanstore.cache_hits import Counts

__all__ = [
    "BACKEND_BUCKETS",
    "HTTP_BUCKETS",
    "CacheCounts",
    "DeferredDurations",
    "DeferredRequests",
    "Metrics",
    "ProcessCollector",
    "default_metrics",
    "install_process_collector",
]

# Storage operations run from ~10 µs (a cached json read, the null backend) to
# seconds (a fsync on a busy disk, a Redis timeout); the client library's
# default buckets start at 5 ms and would put every fast operation in one bucket.
BACKEND_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
HTTP_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


#: Why a change-feed stream ends: the ``reason`` label of chanstore_watchers_ended_total.
WATCHER_END_REASONS = ("client", "slow_reader", "shutdown", "reload", "evicted",
                       "backend_unavailable", "data_lost", "history_lost")  # fmt: skip


class Metrics:
    """The chanstore metric families, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        on = {"registry": self.registry}
        # Registered through a collector that folds every container's pending
        # durations into it first (DeferredDurations), in the place it always had.
        self.backend_duration = Histogram(
            "chanstore_backend_operation_duration_seconds",
            "Time a backend operation took, failures included.",
            ["backend", "container", "operation"],
            buckets=BACKEND_BUCKETS,
            registry=None,
        )
        self._backend_timings: dict[tuple[str, str], dict[str, DeferredDurations]] = {}
        self._backend_timings_lock = threading.Lock()
        self.registry.register(_FoldedFirst(self.backend_duration, self._fold_backend_timings))
        self.backend_errors = Counter(
            "chanstore_backend_operation_errors_total",
            "Backend operations that failed, by kind of failure.",
            ["backend", "container", "operation", "error"],
            **on,
        )
        # Not on the registry itself: registered through a collector that folds
        # the plain counts of every container into it first (CacheCounts).
        self.cache_requests = Counter(
            "chanstore_cache_requests_total",
            "Key lookups in a CachedDict: hit when answered from memory, miss when "
            "the backend was asked.",
            ["container", "result"],
            registry=None,
        )
        self._cache_counts: dict[str, CacheCounts] = {}
        self._cache_counts_lock = threading.Lock()
        self.registry.register(_FoldedFirst(self.cache_requests, self._fold_cache_counts))
        self.cache_entries = Gauge(
            "chanstore_cache_entries",
            "Values held in memory, summed over the channels in memory.",
            ["container"],
            **on,
        )
        self.channels = Gauge("chanstore_channels", "Channels held in memory.", **on)
        self.http_requests = Counter(
            "chanstore_http_requests_total",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            **on,
        )
        self.http_duration = Histogram(
            "chanstore_http_request_duration_seconds",
            "Time from a request's arrival to its response.",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            **on,
        )
        self.reload_successful = Gauge(
            "chanstore_config_last_reload_successful",
            "1 when the last db_config reload was applied, 0 when it was rejected.",
            **on,
        )
        self.reload_success_timestamp = Gauge(
            "chanstore_config_last_reload_success_timestamp_seconds",
            "Unix time of the last db_config load that was applied.",
            **on,
        )
        self.reloads = Counter(
            "chanstore_config_reloads_total",
            "db_config reloads, by result.",
            ["result"],
            **on,
        )
        self.ready = Gauge(
            "chanstore_ready",
            "1 when the last readiness check passed (what /readyz answers), 0 when it failed.",
            **on,
        )
        self.backend_up = Gauge(
            "chanstore_backend_up",
            "1 when the container's backend answered the last readiness check, 0 when not.",
            ["backend", "container"],
            **on,
        )
        self.integrity_problems = Counter(
            "chanstore_integrity_problems_total",
            "Damaged, foreign or lost data found (a value that cannot be read, a damaged "
            "journal, a planted link, a Redis that lost its data), by kind.",
            ["container", "kind"],
            **on,
        )
        self.build_info = Gauge(
            "chanstore_build_info", "Always 1; the labels say which chanstore runs.",
            ["version"], **on,
        )  # fmt: skip
        self.http_connections = Gauge(
            "chanstore_http_connections", "HTTP connections open now.", **on
        )
        self.http_connections_max = Gauge(
            "chanstore_http_connections_max",
            "Open HTTP connections at most (--max-connections): at it, the idlest is closed "
            "to make room, or a new one refused.",
            **on,
        )
        self.http_connections_closed = Counter(
            "chanstore_http_connections_closed_total",
            "HTTP connections that ended, by reason (client, idle_timeout, header_timeout, "
            "body_timeout, evicted to make room, refused at the cap, error, shutdown).",
            ["reason"],
            **on,
        )
        self.cache_invalidations = Counter(
            "chanstore_cache_invalidations_total",
            "Cached keys dropped because another daemon wrote them (heard on the invalidation "
            "link of a shared backend).",
            ["container"],
            **on,
        )
        self.invalidation_link_up = Gauge(
            "chanstore_invalidation_link_up",
            "1 while the invalidation link to a shared backend is up; while 0, its containers "
            "are not answered from memory.",
            ["link"],
            **on,
        )
        self.watchers = Gauge("chanstore_watchers", "Change-feed streams open now.", **on)
        self.watchers_max = Gauge(
            "chanstore_watchers_max",
            "Change-feed streams open at most (--max-watchers): past it, 503 too_many_watchers.",
            **on,
        )
        self.feed_events_sent = Counter(
            "chanstore_feed_events_sent_total",
            "Change-feed events (set, delete) written to watchers' streams.",
            **on,
        )
        self.watchers_ended = Counter(
            "chanstore_watchers_ended_total",
            "Change-feed streams that ended, by reason (client, slow_reader: it fell too far "
            "behind, shutdown, reload, evicted, backend_unavailable, data_lost, history_lost: "
            "the changes it had not read were trimmed from the history).",
            ["reason"],
            **on,
        )
        for reason in WATCHER_END_REASONS:  # each exists at 0, so a rate sees the first
            self.watchers_ended.labels(reason)
        self._deferred: list[DeferredRequests] = []

    def deferred_requests(self, method: str, route: str, status: str) -> DeferredRequests:
        """Requests of these labels counted and timed as :class:`DeferredRequests`."""
        deferred = DeferredRequests(self.http_requests.labels(method, route, status),
                                    self.http_duration.labels(method, route))  # fmt: skip
        self._deferred.append(deferred)
        return deferred

    def backend_timings(
        self, backend: str, container: str, operations: tuple[str, ...]
    ) -> dict[str, DeferredDurations]:
        """The pending durations of each of ``operations`` of ``backend`` as ``container``.

        Made once per (backend, container) and shared (read only) by every
        instance of that container: one dict per container, not per channel.
        """
        timings = self._backend_timings.get((backend, container))
        if timings is None:
            with self._backend_timings_lock:
                timings = self._backend_timings.get((backend, container))
                if timings is None:
                    timings = {
                        operation: DeferredDurations(
                            self.backend_duration.labels(backend, container, operation)
                        )
                        for operation in operations
                    }
                    self._backend_timings[(backend, container)] = timings
        return timings

    def cache_counts(self, container: str) -> CacheCounts:
        """The cache hit and miss counts of ``container``, shared by all its CachedDicts."""
        counts = self._cache_counts.get(container)
        if counts is None:
            with self._cache_counts_lock:
                counts = self._cache_counts.get(container)
                if counts is None:
                    counts = CacheCounts(self.cache_requests.labels(container, "hit"),
                                         self.cache_requests.labels(container, "miss"))  # fmt: skip
                    self._cache_counts[container] = counts
        return counts

    def forget_container(self, name: str) -> None:
        """Remove every series labelled with container ``name`` (a reload removed it)."""
        labelled = {
            self.backend_duration: ("backend", "container", "operation"),
            self.backend_errors: ("backend", "container", "operation", "error"),
            self.cache_entries: ("container",),
            self.backend_up: ("backend", "container"),
            self.integrity_problems: ("container", "kind"),
            self.cache_invalidations: ("container",),
        }
        with self._backend_timings_lock:
            # What is pending for the container goes with its series.
            for labels in [labels for labels in self._backend_timings if labels[1] == name]:
                del self._backend_timings[labels]
        for metric, names in labelled.items():
            for values in _label_sets(metric, names, container=name):
                metric.remove(*values)
        with self._cache_counts_lock:
            if self._cache_counts.pop(name, None) is not None:
                for result in ("hit", "miss"):
                    self.cache_requests.remove(name, result)

    def fold(self) -> None:
        """Bring every plain count into the registry: call before exposing it.

        Cache counts and backend durations are also folded whenever the
        registry is collected; the :class:`DeferredRequests` only here (they
        belong to one thread).
        """
        for deferred in self._deferred:
            deferred.fold()
        self._fold_cache_counts()
        self._fold_backend_timings()

    def _fold_backend_timings(self) -> None:
        with self._backend_timings_lock:
            pending = [timings for by_operation in self._backend_timings.values()
                       for timings in by_operation.values()]  # fmt: skip
        for timings in pending:
            timings.fold()

    def _fold_cache_counts(self) -> None:
        with self._cache_counts_lock:
            for counts in self._cache_counts.values():
                counts.fold()


class CacheCounts(Counts):
    """One container's cache hits and misses, in plain numbers, folded in at scrape time.

    A cache hit takes well under a microsecond; ``Counter.inc()`` (a lock and
    a float) was a large share of it. CachedDicts add to :attr:`hits` and
    :attr:`misses` with no lock; the counter only ever sees the difference
    since the last fold, so folding never writes what the hot path writes.
    Where :mod:`chanstore.cache_hits` is compiled, hits are counted in C and
    none is lost; increments made in Python from threads that race may rarely
    be lost (``+= 1`` is not atomic), which a rate over seconds does not show.
    """

    __slots__ = ("_folded_hits", "_folded_misses", "_hit", "_miss")

    def __init__(self, hit: Any, miss: Any) -> None:
        self._hit = hit
        self._miss = miss
        self.hits = 0  # a C field where chanstore.cache_hits is compiled
        self.misses = 0
        self._folded_hits = 0
        self._folded_misses = 0

    def fold(self) -> None:
        """Add the hits and misses counted since the last fold to the counter."""
        hits, misses = self.hits, self.misses
        if hits != self._folded_hits:
            self._hit.inc(hits - self._folded_hits)
            self._folded_hits = hits
        if misses != self._folded_misses:
            self._miss.inc(misses - self._folded_misses)
            self._folded_misses = misses


class DeferredDurations(collections.deque):  # type: ignore[type-arg]
    """Durations of one histogram child, appended without a lock, folded at scrape time.

    The instrumentation wrapper is on the path of every backend call, and one
    ``observe()`` of prometheus_client (two locks and a walk of the buckets)
    cost more than the rest of it together. The wrapper appends each duration
    here instead (``deque.append`` is atomic: threads lose nothing) and calls
    :meth:`fold` once :data:`FOLD_AT` are pending, so that a process nobody
    scrapes holds a bounded backlog; every collection of the registry folds
    first, so a scrape sees every call, and the exposition is what
    ``observe()`` would have made of the same durations.

    Folding pops what it counts (under a lock of its own, so that two folds
    never race for the same items) and adds it to the child's buckets and sum:
    prometheus_client's internals, as :class:`DeferredRequests` uses them.
    """

    __slots__ = ("_bounds", "_child", "_lock")

    #: Durations pending at most before the appending thread folds them itself.
    FOLD_AT = 1024

    def __init__(self, child: Any) -> None:
        super().__init__()
        self._child = child
        self._bounds = tuple(child._upper_bounds)  # the last one is +Inf
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """One operation that took ``seconds`` (what the wrapper does inline)."""
        self.append(seconds)
        if len(self) >= self.FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Add the pending durations to the histogram child."""
        with self._lock:
            count = len(self)  # only folds pop, so these are here to pop
            if not count:
                return
            popleft = self.popleft
            durations = [popleft() for _ in range(count)]
            # The first bound at or above each duration: the bucket observe() would pick.
            found = collections.Counter(map(functools.partial(bisect.bisect_left, self._bounds),
                                            durations))  # fmt: skip
            child = self._child
            child._sum.inc(sum(durations))
            for index, added in found.items():
                child._buckets[index].inc(added)


class _FoldedFirst(Collector):
    """Exposes ``metric`` as it is, after calling ``fold``: a plain scrape sees every count."""

    def __init__(self, metric: Any, fold: Any) -> None:
        self._metric = metric
        self._fold = fold

    def describe(self) -> Any:
        return self._metric.describe()

    def collect(self) -> Any:
        self._fold()
        return self._metric.collect()


class DeferredRequests:
    """Requests counted and timed in plain Python, folded into the metrics on demand.

    For the daemon's cached GETs, which take a few microseconds each, where a
    histogram's ``observe()`` (two locks and a walk of the buckets) and a
    counter's ``inc()`` were a tenth of the work. :meth:`observe` adds to
    plain numbers; :meth:`fold` adds them to the counter and histogram
    children at once, and the ``/metrics`` page calls it (through
    :meth:`Metrics.fold`) before every exposition, so a scrape sees every
    request. Not thread-safe: observe and fold on one thread (the event loop).

    Folding uses the histogram child's ``_upper_bounds``, ``_buckets`` and
    ``_sum``, prometheus_client's internals (unchanged since 0.4); a test
    checks that a folded histogram equals one fed by ``observe()``.
    """

    __slots__ = ("_bounds", "_buckets", "_count", "_counter", "_histogram", "_sum")

    def __init__(self, counter: Any, histogram: Any) -> None:
        self._counter = counter
        self._histogram = histogram
        self._bounds = tuple(histogram._upper_bounds)  # the last one is +Inf
        self._buckets = [0] * len(self._bounds)
        self._count = 0
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        """One request that took ``seconds``."""
        self._count += 1
        self._sum += seconds
        # The first bound at or above the duration: the bucket observe() would pick.
        self._buckets[bisect.bisect_left(self._bounds, seconds)] += 1

    def fold(self) -> None:
        """Add what was observed since the last fold to the metrics."""
        if not self._count:
            return
        self._counter.inc(self._count)
        self._histogram._sum.inc(self._sum)
        for bucket, count in zip(self._histogram._buckets, self._buckets, strict=True):
            if count:
                bucket.inc(count)
        self._buckets = [0] * len(self._bounds)
        self._count = 0
        self._sum = 0.0


def _label_sets(metric: Any, names: tuple[str, ...], **match: str) -> set[tuple[str, ...]]:
    """The values of labels ``names`` of ``metric``'s series that ``match``, read from
    its public exposition (``collect``)."""
    found = set()
    for family in metric.collect():
        for sample in family.samples:
            if all(sample.labels.get(label) == value for label, value in match.items()):
                found.add(tuple(sample.labels[name] for name in names))
    return found


_default: Metrics | None = None
_default_lock = threading.Lock()


def default_metrics() -> Metrics:
    """The process-wide metrics, on prometheus_client's default registry."""
    global _default  # noqa: PLW0603 - one registry per process is the point
    with _default_lock:
        if _default is None:
            _default = Metrics(REGISTRY)
        return _default


class ProcessCollector(prometheus_client.ProcessCollector):
    """prometheus_client's ``process_*`` metrics, also where ``/proc/stat`` is hidden.

    The stock collector reads the boot time from ``/proc/stat`` and exports
    nothing at all when it cannot; systemd's ``ProcSubset=pid`` (set by the
    shipped unit) leaves only the process folders in ``/proc``. The boot time
    is also the wall clock minus ``CLOCK_BOOTTIME``, and the rest of what the
    collector reads (``/proc/self/stat``, ``limits``, ``fd``) stays visible.
    """

    def _boot_time(self) -> float:
        try:
            return super()._boot_time()
        except OSError:
            return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def install_process_collector(registry: CollectorRegistry = REGISTRY) -> None:
    """Export the process metrics on ``registry`` with :class:`ProcessCollector`.

    On the default registry it takes the place of prometheus_client's own
    collector; where that one was already removed, nothing is added.
    """
    if registry is REGISTRY:
        try:
            REGISTRY.unregister(prometheus_client.PROCESS_COLLECTOR)
        except KeyError:
            return
    ProcessCollector(registry=registry)
