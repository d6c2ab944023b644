"""chanstore.metrics: plain counts (requests, cache hits) fold into what the metrics give."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from chanstore.metrics import HTTP_BUCKETS, Metrics

ROUTE = "/v1/channels/{channel}/{container}/{key}"
# Below, on and above bucket bounds, and past the last finite one.
DURATIONS = [0.0, 1e-7, HTTP_BUCKETS[0], HTTP_BUCKETS[0] * 1.5, HTTP_BUCKETS[3],
             HTTP_BUCKETS[-1], HTTP_BUCKETS[-1] * 10, 1e-5, 1e-5]  # fmt: skip


def samples(metrics: Metrics, route: str) -> dict[str, float]:
    """Every http sample of ``route`` (the route label left out, so that two routes
    compare; creation times left out, which differ)."""
    found = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.labels.get("route") == route and not sample.name.endswith("_created"):
                labels = {k: v for k, v in sample.labels.items() if k != "route"}
                found[f"{sample.name}{sorted(labels.items())}"] = sample.value
    return found


def test_folded_requests_equal_observed_ones() -> None:
    metrics = Metrics(CollectorRegistry())
    deferred = metrics.deferred_requests("GET", ROUTE, "200")
    for seconds in DURATIONS:
        deferred.observe(seconds)
        metrics.http_requests.labels("GET", "observed", "200").inc()
        metrics.http_duration.labels("GET", "observed").observe(seconds)
    # Nothing reaches the registry before a fold (the children exist, at zero).
    assert set(samples(metrics, ROUTE).values()) == {0.0}

    metrics.fold()
    folded, observed = samples(metrics, ROUTE), samples(metrics, "observed")
    assert folded == pytest.approx(observed)
    assert folded["chanstore_http_requests_total[('method', 'GET'), ('status', '200')]"] == len(
        DURATIONS
    )

    metrics.fold()  # nothing new: nothing changes
    assert samples(metrics, ROUTE) == pytest.approx(observed)
    deferred.observe(HTTP_BUCKETS[0])
    metrics.fold()
    count = "chanstore_http_request_duration_seconds_count[('method', 'GET')]"
    assert samples(metrics, ROUTE)[count] == len(DURATIONS) + 1


def test_cache_counts_fold_into_a_plain_scrape() -> None:
    """A library user's generate_latest sees every hit, folded once, with no fold() call."""
    metrics = Metrics(CollectorRegistry(auto_describe=True))
    counts = metrics.cache_counts("box")
    assert metrics.cache_counts("box") is counts
    # Both children exist at zero from the start, as a plain counter's labels() made them.
    text = generate_latest(metrics.registry).decode()
    assert 'chanstore_cache_requests_total{container="box",result="hit"} 0.0' in text
    assert 'chanstore_cache_requests_total{container="box",result="miss"} 0.0' in text
    counts.hits += 5
    counts.misses += 2
    for _ in range(2):  # a second scrape adds nothing twice
        text = generate_latest(metrics.registry).decode()
        assert 'chanstore_cache_requests_total{container="box",result="hit"} 5.0' in text
        assert 'chanstore_cache_requests_total{container="box",result="miss"} 2.0' in text
    counts.hits += 1
    metrics.fold()
    assert metrics.cache_requests.labels("box", "hit")._value.get() == 6
