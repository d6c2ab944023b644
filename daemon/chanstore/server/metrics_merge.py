"""One exposition for a group of workers: each worker's metrics, merged by a table.

Any worker answers ``GET /metrics`` for all of them: it gathers the others'
expositions over their private sockets and merges them with its own, so a
scrape, a dashboard and the alerts see one daemon, as before (no ``worker``
label). How each metric merges is decided here, per metric, in :data:`MERGE`:

* counters and histograms add up (each worker counted what it served);
* gauges that count things (channels, cached values, connections, watchers,
  memory, file descriptors) add up, and so do the caps beside them
  (``--max-connections`` and ``--max-watchers`` hold per worker, so the
  group's cap is their sum);
* state gauges (ready, a backend or invalidation link up, the last reload
  applied) take the least value: the group is ready only when every worker
  is, and a reload counts as applied only once every worker applied it;
* reloads are counted by the worker that counted most: every worker reloads
  on every trigger, so one reload of the group is one of each worker;
* the start time is the earliest start, ``build_info`` and ``python_info`` the
  same 1 everywhere.

A metric not in the table (a new one) is added up if it is a counter or a
histogram and, if a gauge, also added up, with a warning in the log once;
the tests check that the table names every metric the daemon exports.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from chanstore import logs

__all__ = ["MAX", "MERGE", "MIN", "SUM", "merge_expositions", "parse_exposition", "render"]

log = logs.get_logger()

SUM, MIN, MAX = "sum", "min", "max"

#: How each metric family (as a parser names it: a counter without ``_total``) merges.
MERGE: dict[str, str] = {
    # Counted by each worker for what it served.
    "chanstore_backend_operation_duration_seconds": SUM,
    "chanstore_backend_operation_errors": SUM,
    "chanstore_cache_requests": SUM,
    "chanstore_http_requests": SUM,
    "chanstore_http_request_duration_seconds": SUM,
    "chanstore_integrity_problems": SUM,
    "chanstore_http_connections_closed": SUM,
    "chanstore_cache_invalidations": SUM,
    "chanstore_feed_events_sent": SUM,
    "chanstore_watchers_ended": SUM,
    # Things held now, in all the workers' memory together.
    "chanstore_cache_entries": SUM,
    "chanstore_channels": SUM,
    "chanstore_http_connections": SUM,
    "chanstore_http_connections_max": SUM,
    "chanstore_watchers": SUM,
    "chanstore_watchers_max": SUM,
    # States: the group has them only when every worker has.
    "chanstore_ready": MIN,
    "chanstore_backend_up": MIN,
    "chanstore_invalidation_link_up": MIN,
    "chanstore_config_last_reload_successful": MIN,
    "chanstore_config_last_reload_success_timestamp_seconds": MIN,
    # Every worker reloads on every trigger: one reload of the group is one of each.
    "chanstore_config_reloads": MAX,
    "chanstore_build_info": MAX,
    # The processes.
    "process_cpu_seconds": SUM,
    "process_resident_memory_bytes": SUM,
    "process_virtual_memory_bytes": SUM,
    "process_open_fds": SUM,
    "process_max_fds": SUM,
    "process_start_time_seconds": MIN,
    "python_info": MAX,
    "python_gc_objects_collected": SUM,
    "python_gc_objects_uncollectable": SUM,
    "python_gc_collections": SUM,
}

_warned: set[str] = set()


def parse_exposition(text: str) -> list[Metric]:
    """The metric families of a Prometheus text exposition."""
    return list(text_string_to_metric_families(text))


def rule_of(family: Metric) -> str:
    """How ``family`` merges (see :data:`MERGE`)."""
    rule = MERGE.get(family.name)
    if rule is not None:
        return rule
    if family.type == "gauge" and family.name not in _warned:
        _warned.add(family.name)
        log.warning("metric_merge_unknown", metric=family.name, merged_as=SUM)
    return SUM


def merge_expositions(expositions: Iterable[Iterable[Metric]]) -> list[Metric]:
    """The families of every exposition, merged: one sample per name and label set."""
    merged: dict[str, tuple[Metric, str, dict[tuple[str, tuple[Any, ...]], float]]] = {}
    for families in expositions:
        for family in families:
            entry = merged.get(family.name)
            if entry is None:
                entry = merged[family.name] = (
                    Metric(family.name, family.documentation, family.type),
                    rule_of(family),
                    {},
                )
            _, rule, values = entry
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                before = values.get(key)
                value = sample.value
                values[key] = value if before is None else _combine(rule, before, value)
    result = []
    for metric, _, values in merged.values():
        for (name, labels), value in values.items():
            metric.add_sample(name, dict(labels), value)
        result.append(metric)
    return result


def _combine(rule: str, a: float, b: float) -> float:
    if rule == SUM:
        return a + b
    if rule == MIN:
        return min(a, b)
    return max(a, b)


class _Families:
    """The merged families, as something ``generate_latest`` collects."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def render(families: list[Metric]) -> bytes:
    """The text exposition of ``families``."""
    return generate_latest(_Families(families))  # type: ignore[arg-type]
