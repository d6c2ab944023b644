"""chanstore stats: quantiles from buckets and the summary from two scrapes."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from chanstore.metrics import Metrics
from chanstore.stats import histogram_quantile, parse, render


def test_quantile_interpolates_within_a_bucket_like_promql() -> None:
    buckets = [(0.001, 0.0), (0.01, 50.0), (0.1, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.055)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.0982)


def test_quantile_of_nothing_is_unknown() -> None:
    assert histogram_quantile(0.99, []) is None
    assert histogram_quantile(0.99, [(0.1, 0.0), (math.inf, 0.0)]) is None


def test_quantile_in_the_open_bucket_is_the_highest_bound() -> None:
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1


def scrape(metrics: Metrics, taken: float):
    return parse(generate_latest(metrics.registry).decode(), taken)


def test_summary_reports_rates_ratios_and_backend_p99() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.reload_successful.set(1)
    metrics.reload_success_timestamp.set(1_700_000_000)
    before = scrape(metrics, 0.0)
    for _ in range(18):
        metrics.http_requests.labels("GET", "/v1/channels/{channel}/{container}/{key}", "200").inc()
    metrics.http_requests.labels("PUT", "/v1/channels/{channel}/{container}/{key}", "503").inc(2)
    metrics.cache_requests.labels("stats", "hit").inc(9)
    metrics.cache_requests.labels("stats", "miss").inc(1)
    durations = metrics.backend_duration.labels("json", "stats", "set_many")
    for _ in range(100):
        durations.observe(0.002)
    metrics.backend_errors.labels("json", "stats", "set_many", "disk_full").inc(5)
    metrics.channels.set(3)
    after = scrape(metrics, 10.0)

    summary = render(before, after)

    assert "2.0/s, 10.0% answered 5xx" in summary
    assert "5.0% of 100 operations" in summary
    assert "cache hit ratio 90.0%" in summary
    assert "3 in memory" in summary
    assert "applied" in summary
    set_line = next(line for line in summary.splitlines() if "set_many" in line)
    assert set_line.split() == ["json", "stats", "set_many", "2.5", "ms"]


def test_summary_says_when_the_last_reload_was_rejected() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.reload_successful.set(0)
    sample = scrape(metrics, 0.0)
    assert "REJECTED" in render(sample, scrape(metrics, 1.0))


def test_summary_says_ready_and_that_no_integrity_problem_was_found() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.ready.set(1)
    metrics.backend_up.labels("redis", "mana").set(1)
    summary = render(scrape(metrics, 0.0), scrape(metrics, 1.0))
    assert "readiness       ready" in summary
    assert "integrity       no problems found since the daemon started" in summary


def test_summary_shows_a_redis_that_lost_its_data() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.ready.set(0)
    metrics.backend_up.labels("json", "stats").set(1)
    metrics.backend_up.labels("redis", "mana").set(0)
    before = scrape(metrics, 0.0)
    metrics.integrity_problems.labels("mana", "data_lost").inc()
    after = scrape(metrics, 2.0)

    summary = render(before, after)
    assert "readiness       NOT READY: mana (/readyz says why)" in summary
    lines = summary.splitlines()
    heading = lines.index("  integrity problems by container / kind (see the error log):")
    assert lines[heading + 1].split() == ["mana", "data_lost", "1", "since", "start,", "1", "new"]
    # A quiet interval after the loss still shows it: a total, not a rate.
    quiet = render(after, scrape(metrics, 4.0))
    assert "mana                 data_lost        1 since start" in quiet
    assert "new" not in quiet.split("integrity problems")[1]
    # Given /readyz's answer, the kind is named too.
    assert "NOT READY: mana (data_lost)" in render(before, after, {"mana": "data_lost"})
