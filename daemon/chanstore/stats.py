"""``chanstore stats``: a running daemon's health at a glance, from its /metrics.

For people who do not run Grafana. Two scrapes ``interval`` seconds apart
give the rates; quantiles come from the histogram buckets' growth between
them (or from their totals when nothing happened in between), interpolated
within a bucket the way PromQL's ``histogram_quantile`` does.

Readiness and integrity problems (a Redis that lost its data, a damaged
journal) are shown from the last scrape: they are states and totals, not
rates, and a person who runs ``stats`` after a page must see them even when
the interval itself was quiet.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Sample", "histogram_quantile", "render", "scrape_samples"]

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    """One scrape: every series' value, keyed by name and sorted labels."""

    taken: float
    values: dict[tuple[str, Labels], float]

    def series(self, name: str) -> dict[Labels, float]:
        return {labels: v for (n, labels), v in self.values.items() if n == name}


def parse(text: str, taken: float) -> Sample:
    """A Sample from Prometheus exposition ``text``."""
    values: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Sample(taken, values)


def scrape_samples(fetch: callable, interval: float) -> tuple[Sample, Sample]:  # type: ignore[valid-type]
    """Two samples from ``fetch()`` (the /metrics text), ``interval`` seconds apart."""
    first = parse(fetch(), time.monotonic())
    time.sleep(interval)
    return first, parse(fetch(), time.monotonic())


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile from cumulative ``(upper bound, count)`` buckets, or None."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            width = count - lower_count
            fraction = (rank - lower_count) / width if width else 1.0
            return lower_bound + (bound - lower_bound) * fraction
        lower_bound, lower_count = bound, count
    return lower_bound


def _delta(before: Sample, after: Sample, name: str) -> dict[Labels, float]:
    old = before.series(name)
    return {labels: value - old.get(labels, 0.0) for labels, value in after.series(name).items()}


def _grouped_quantiles(
    before: Sample, after: Sample, name: str, keep: tuple[str, ...], q: float
) -> dict[tuple[str, ...], float | None]:
    growth = _delta(before, after, name + "_bucket")
    use_totals = not any(growth.values())
    source = after.series(name + "_bucket") if use_totals else growth
    grouped: dict[tuple[str, ...], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, count in source.items():
        label_map = dict(labels)
        group = tuple(label_map.get(k, "") for k in keep)
        grouped[group][float(label_map["le"])] += count
    return {group: histogram_quantile(q, b.items()) for group, b in sorted(grouped.items())}


def _ratio(part: float, whole: float) -> str:
    return f"{part / whole:.1%}" if whole else "n/a (no traffic)"


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1e6:.0f} µs" if value < 0.001 else f"{value * 1e3:.1f} ms"


def _errors_line(errors: float, operations: float) -> str:
    if not operations:
        return "no backend operations in this interval"
    return f"{_ratio(errors, operations)} of {operations:.0f} operations"


def _reload_line(successful: float, applied_at: float) -> str:
    verdict = "applied" if successful else "REJECTED (the previous config is serving)"
    if not applied_at:
        return verdict
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(applied_at))
    return f"{verdict}; last config applied {when}"


def _readiness_line(after: Sample, problems: Mapping[str, str] | None) -> str:
    """Ready or not, by the last scrape; with /readyz's problems, each container's kind."""
    if problems:
        return "NOT READY: " + ", ".join(f"{name} ({kind})" for name, kind in problems.items())
    ready = after.series("chanstore_ready")
    backends = after.series("chanstore_backend_up")
    down = sorted(dict(labels).get("container", "?") for labels, up in backends.items() if not up)
    if not ready:
        return "unknown (no chanstore_ready in /metrics)"
    if all(ready.values()) and not down:
        return "ready"
    return "NOT READY" + (": " + ", ".join(down) if down else "") + " (/readyz says why)"


def _integrity_lines(before: Sample, after: Sample) -> list[str]:
    """One line per container and kind of integrity problem found since the daemon started."""
    name = "chanstore_integrity_problems_total"
    old = before.series(name)
    lines = []
    for labels, total in sorted(after.series(name).items()):
        if total:
            where = dict(labels)
            container, kind = where.get("container", "?"), where.get("kind", "?")
            new = total - old.get(labels, 0.0)
            counts = f"{total:.0f} since start" + (f", {new:.0f} new" if new else "")
            lines.append(f"    {container:<20} {kind:<16} {counts}")
    if not lines:
        return ["  integrity       no problems found since the daemon started"]
    return ["  integrity problems by container / kind (see the error log):", *lines]


def render(before: Sample, after: Sample, problems: Mapping[str, str] | None = None) -> str:
    """The summary a person reads; ``problems`` is what /readyz answered, when asked."""
    elapsed = max(after.taken - before.taken, 1e-9)
    requests = _delta(before, after, "chanstore_http_requests_total")
    total = sum(requests.values())
    failed = sum(v for labels, v in requests.items() if dict(labels)["status"] >= "500")
    errors = sum(_delta(before, after, "chanstore_backend_operation_errors_total").values())
    operations = sum(
        _delta(before, after, "chanstore_backend_operation_duration_seconds_count").values()
    )
    cache = _delta(before, after, "chanstore_cache_requests_total")
    hits = sum(v for labels, v in cache.items() if dict(labels)["result"] == "hit")
    channels = sum(after.series("chanstore_channels").values())
    reload_ok = sum(after.series("chanstore_config_last_reload_successful").values())
    reload_at = sum(after.series("chanstore_config_last_reload_success_timestamp_seconds").values())
    lines = [
        f"chanstore over the last {elapsed:.1f}s",
        f"  requests        {total / elapsed:.1f}/s, {_ratio(failed, total)} answered 5xx",
        "  backend errors  " + _errors_line(errors, operations),
        f"  cache hit ratio {_ratio(hits, sum(cache.values()))}",
        f"  channels        {channels:.0f} in memory",
        "  last reload     " + _reload_line(reload_ok, reload_at),
        "  readiness       " + _readiness_line(after, problems),
        *_integrity_lines(before, after),
        "  backend p99 by backend / container / operation:",
    ]
    quantiles = _grouped_quantiles(
        before,
        after,
        "chanstore_backend_operation_duration_seconds",
        ("backend", "container", "operation"),
        0.99,
    )
    if not quantiles:
        lines.append("    (no backend operations yet)")
    for (backend, container, operation), p99 in quantiles.items():
        if p99 is not None:
            lines.append(f"    {backend:<8} {container:<20} {operation:<12} {_seconds(p99)}")
    return "\n".join(lines)
