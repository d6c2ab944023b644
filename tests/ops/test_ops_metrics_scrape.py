"""A real daemon's /metrics: clean for promtool, complete, and its readiness gauges live."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import prometheus_client
import pytest
from ops_support import (
    Daemon,
    Traffic,
    free_port,
    ops_db_config,
    run_tool,
    shared_redis_entry,
    wait_until,
)
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from chanstore.metrics import ProcessCollector
from support import RedisServer

#: Every family of DESIGN.md section 3, the readiness gauges, the connection,
#: change-feed and coherence families, and the process metrics the dashboard shows.
FAMILIES = {
    "chanstore_backend_operation_duration_seconds": "histogram",
    "chanstore_backend_operation_errors": "counter",
    "chanstore_cache_requests": "counter",
    "chanstore_cache_entries": "gauge",
    "chanstore_channels": "gauge",
    "chanstore_http_requests": "counter",
    "chanstore_http_request_duration_seconds": "histogram",
    "chanstore_config_last_reload_successful": "gauge",
    "chanstore_config_last_reload_success_timestamp_seconds": "gauge",
    "chanstore_config_reloads": "counter",
    "chanstore_build_info": "gauge",
    "chanstore_ready": "gauge",
    "chanstore_backend_up": "gauge",
    "chanstore_integrity_problems": "counter",
    "chanstore_http_connections": "gauge",
    "chanstore_http_connections_max": "gauge",
    "chanstore_http_connections_closed": "counter",
    "chanstore_watchers": "gauge",
    "chanstore_watchers_max": "gauge",
    "chanstore_feed_events_sent": "counter",
    "chanstore_watchers_ended": "counter",
    "chanstore_cache_invalidations": "counter",
    "chanstore_invalidation_link_up": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_cpu_seconds": "counter",  # the parser names counters without _total
}

StartDaemon = Callable[..., Daemon]


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples called ``name`` in an exposition, by their sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def exercise(daemon: Daemon) -> None:
    """A little of everything: reads, writes, 4xx, a backend failure, a rejected reload."""
    traffic = Traffic(daemon, ["profiles", "health_bars"], "scores")
    for n in range(12):
        traffic.round(n)
    assert traffic.statuses.get(200) and traffic.statuses.get(404) and traffic.statuses.get(503)
    good = daemon.config.read_text()
    daemon.write_config('[{"implementation": "json", "name": ')
    assert daemon.http.post("/-/reload").status_code == 400
    daemon.write_config(good)
    assert daemon.http.post("/-/reload").status_code == 200


def test_promtool_check_metrics_is_clean_on_a_real_scrape(
    promtool: str, start_daemon: StartDaemon
) -> None:
    daemon = start_daemon()
    exercise(daemon)
    text = daemon.metrics_text()
    output = run_tool(promtool, "check", "metrics", stdin=text.encode())
    assert output.strip() == "", f"promtool check metrics found problems:\n{output}"


def test_the_scrape_has_every_family(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    exercise(daemon)
    families = {f.name: f.type for f in text_string_to_metric_families(daemon.metrics_text())}
    for name, kind in FAMILIES.items():
        assert families.get(name) == kind, f"{name}: {families.get(name)}, not {kind}"


def test_readiness_gauges_follow_the_backends_without_readyz(start_daemon: StartDaemon) -> None:
    entries = ops_db_config(free_port())
    daemon = start_daemon(entries)

    def backend_up() -> dict[tuple[tuple[str, str], ...], float]:
        return samples(daemon.metrics_text(), "chanstore_backend_up")

    # The daemon checks on its own: nobody asks /readyz in this test.
    wait_until(lambda: len(backend_up()) == 3, 30, "chanstore_backend_up for every container")
    assert backend_up() == {
        (("backend", "json"), ("container", "profiles")): 1.0,
        (("backend", "json"), ("container", "health_bars")): 1.0,
        (("backend", "redis"), ("container", "scores")): 0.0,
    }
    assert samples(daemon.metrics_text(), "chanstore_ready") == {(): 0.0}

    # Without the unreachable container the daemon is ready, and the gone
    # container's series leaves the scrape instead of going stale.
    daemon.write_config([entry for entry in entries if entry["name"] != "scores"])
    assert daemon.http.post("/-/reload").status_code == 200
    wait_until(lambda: len(backend_up()) == 2, 30, "scores to leave chanstore_backend_up")
    assert set(backend_up().values()) == {1.0}
    wait_until(
        lambda: samples(daemon.metrics_text(), "chanstore_ready") == {(): 1.0},
        30,
        "chanstore_ready to become 1",
    )


def test_the_change_feed_series_exist_from_the_start(start_daemon: StartDaemon) -> None:
    # The shipped alerts take increase() of slow_reader ends and compare the open
    # streams with the cap: both need their series before the first stream.
    text = start_daemon().metrics_text()
    assert samples(text, "chanstore_watchers_ended_total") == {
        (("reason", reason),): 0.0
        for reason in ("client", "slow_reader", "shutdown", "reload", "evicted",
                       "backend_unavailable", "data_lost", "history_lost")
    }  # fmt: skip
    assert samples(text, "chanstore_watchers") == {(): 0.0}
    assert samples(text, "chanstore_watchers_max") == {(): 1024.0}  # --max-watchers' default
    assert samples(text, "chanstore_feed_events_sent_total") == {(): 0.0}


#: The write operations ChanstoreInvalidationsStalled sums over the daemons of a job.
WRITE_OPERATIONS = ("set", "set_many", "delete", "delete_many", "apply_if")


def test_the_coherence_series_of_two_daemons_over_one_redis(
    shared_redis: RedisServer, start_daemon: StartDaemon
) -> None:
    # What the "Several daemons" row and the coherence alerts read, from two real
    # daemons over one Redis (with a password, which no label may show).
    entry = shared_redis_entry(shared_redis)
    reader, writer = start_daemon([entry]), start_daemon([entry])
    link = f"127.0.0.1:{shared_redis.port}/0"

    def series(daemon: Daemon, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return samples(daemon.metrics_text(), name)

    def link_is(value: float) -> bool:
        return series(reader, "chanstore_invalidation_link_up") == {(("link", link),): value}

    # ChanstoreInvalidationsStalled subtracts a daemon's writes from its job's:
    # each daemon's write operations on a redis container exist, at 0, from the start.
    for daemon in (reader, writer):
        counts = series(daemon, "chanstore_backend_operation_duration_seconds_count")
        for operation in WRITE_OPERATIONS:
            key = (("backend", "redis"), ("container", "shared"), ("operation", operation))
            assert counts.get(key) == 0.0, (operation, counts)

    path = "/v1/channels/lobby/shared/score"
    assert writer.http.put(path, json=1).status_code == 200
    assert reader.http.get(path).json() == 1  # the channel is in the reader's memory now
    wait_until(lambda: link_is(1.0), 10, "the reader's invalidation link up")
    assert shared_redis.password and shared_redis.password not in reader.metrics_text()
    assert writer.http.put(path, json=2).status_code == 200
    # The reader hears the writer's write: one key dropped from its cache of shared.
    invalidations = {(("container", "shared"),): 1.0}
    wait_until(lambda: series(reader, "chanstore_cache_invalidations_total") == invalidations,
               10, "the reader to count the invalidation")  # fmt: skip
    assert reader.http.get(path).json() == 2
    # A daemon's own writes are no invalidation to it (its series exists, at 0).
    assert series(writer, "chanstore_cache_invalidations_total") == {
        (("container", "shared"),): 0.0
    }

    # The link refused while Redis itself answers (an ACL that takes the channel
    # away): the gauge, /readyz and chanstore_ready say so until it is back.
    client = shared_redis.client()
    try:
        client.execute_command("ACL", "SETUSER", "default", "resetchannels")
        wait_until(lambda: link_is(0.0), 10, "the reader's link down")
        # /readyz answers from checks at most READINESS_TTL (1 s) old: within it, it says so.
        wait_until(lambda: reader.http.get("/readyz").status_code == 503, 5,
                   "the reader's /readyz to say its link is down")  # fmt: skip
        ready = reader.http.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["problems"] == {"shared": "invalidation_link_down"}, ready.text
        assert series(reader, "chanstore_ready") == {(): 0.0}
        client.execute_command("ACL", "SETUSER", "default", "allchannels")
        wait_until(lambda: link_is(1.0), 10, "the reader's link back")
        wait_until(lambda: reader.http.get("/readyz").status_code == 200, 10, "the reader ready")
        assert series(reader, "chanstore_ready") == {(): 1.0}
    finally:
        client.close()


def _process_samples(collector_class: type, proc: Path) -> dict[str, float]:
    registry = CollectorRegistry()
    collector_class(proc=str(proc), registry=registry)
    text = generate_latest(registry).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_process_metrics_survive_a_proc_without_stat(tmp_path: Path) -> None:
    # systemd's ProcSubset=pid (in systemd/chanstore.service) leaves /proc with
    # the process folders only: no /proc/stat, where the boot time is read.
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc on this system")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").symlink_to("/proc/self")
    # prometheus_client's own collector exports nothing there...
    assert _process_samples(prometheus_client.ProcessCollector, proc) == {}
    # ...chanstore's exports the same as with the whole of /proc.
    ours = _process_samples(ProcessCollector, proc)
    full = _process_samples(prometheus_client.ProcessCollector, Path("/proc"))
    assert set(ours) == set(full)
    assert ours["process_resident_memory_bytes"] > 0
    assert abs(ours["process_start_time_seconds"] - full["process_start_time_seconds"]) < 5
    assert ours["process_start_time_seconds"] <= time.time()
