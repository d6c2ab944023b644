"""/metrics of a running daemon: bounded labels, the families an operator scrapes."""

from __future__ import annotations

from daemon_harness import DaemonProcess, key_path, metric, wait_until
from prometheus_client.parser import text_string_to_metric_families

import chanstore

KEY_ROUTE = "/v1/channels/{channel}/{container}/{key}"


def test_a_wrong_method_is_counted_under_its_route(daemon: DaemonProcess, channel: str) -> None:
    assert daemon.http.post(key_path(channel, "stats", "k")).status_code == 405
    text = daemon.metrics_text()
    assert metric(text, "chanstore_http_requests_total", method="POST", route=KEY_ROUTE,
                  status="405") >= 1  # fmt: skip


def test_metrics_after_traffic_use_route_templates_never_ids(
    daemon: DaemonProcess, channel: str
) -> None:
    odd_channel = f"{channel}-secret channel/ü"
    odd_key = f"{channel}-private-key"
    assert daemon.put(odd_channel, "stats", odd_key, 1).status_code == 200
    assert daemon.get(odd_channel, "stats", odd_key).status_code == 200  # a cache hit
    assert daemon.get(odd_channel, "profiles", odd_key).status_code == 404  # a miss
    daemon.http.post(key_path(odd_channel, "stats") + "/-/get", json={"keys": [odd_key]})
    daemon.http.get(f"/v1/channels/{channel}/nosuch/{odd_key}")  # 404 unknown container
    daemon.http.get(f"/nowhere/{channel}")  # 404 unknown route

    text = daemon.metrics_text()

    assert channel not in text
    assert odd_key not in text
    routes = {
        sample.labels["route"]
        for family in text_string_to_metric_families(text)
        if family.name == "chanstore_http_requests"
        for sample in family.samples
    }
    assert KEY_ROUTE in routes
    assert "/v1/channels/{channel}/{container}/-/get" in routes
    assert all(route.startswith("/") or route == "unmatched" for route in routes), routes
    assert metric(text, "chanstore_http_requests_total", method="PUT", route=KEY_ROUTE,
                  status="200") >= 1  # fmt: skip
    assert metric(text, "chanstore_http_requests_total", method="GET", route=KEY_ROUTE,
                  status="404") >= 2  # fmt: skip
    assert metric(text, "chanstore_http_request_duration_seconds_count", method="GET",
                  route=KEY_ROUTE) >= 3  # fmt: skip
    assert metric(text, "chanstore_backend_operation_duration_seconds_count", backend="json",
                  container="stats", operation="set_many") >= 1  # fmt: skip
    assert metric(text, "chanstore_cache_requests_total", container="stats", result="hit") >= 1
    assert metric(text, "chanstore_cache_requests_total", container="profiles",
                  result="hit") is not None  # fmt: skip
    assert metric(text, "chanstore_channels") >= 1
    assert metric(text, "chanstore_build_info", version=chanstore.__version__) == 1
    assert metric(text, "chanstore_config_last_reload_successful") == 1
    assert metric(text, "chanstore_config_last_reload_success_timestamp_seconds") > 0


def test_channels_count_what_is_in_memory(daemon: DaemonProcess, channel: str) -> None:
    before = daemon.metric("chanstore_channels")
    for index in range(5):
        daemon.put(f"{channel}-{index}", "stats", "HP", index)
    assert daemon.metric("chanstore_channels") == before + 5


def test_idle_channels_leave_memory_and_come_back(start_daemon, channel: str) -> None:
    daemon = start_daemon(args=["--idle-timeout", "0.5"])
    for index in range(5):
        assert daemon.put(f"{channel}-{index}", "stats", "HP", index).status_code == 200
    assert daemon.metric("chanstore_channels") >= 1

    wait_until(lambda: daemon.metric("chanstore_channels") == 0, 15, "idle channels to leave")

    # Their data stayed in the backend: asking again brings the channel back.
    assert daemon.get(f"{channel}-3", "stats", "HP").json() == 3
    assert daemon.keys(f"{channel}-4", "stats") == ["HP"]
    assert daemon.metric("chanstore_channels") >= 1


def test_max_channels_bounds_what_is_in_memory(start_daemon, channel: str) -> None:
    daemon = start_daemon(args=["--max-channels", "3"])
    for index in range(8):
        assert daemon.put(f"{channel}-{index}", "stats", "HP", index).status_code == 200
        assert daemon.metric("chanstore_channels") <= 3

    # The channels that left memory still have their data.
    for index in range(8):
        assert daemon.get(f"{channel}-{index}", "stats", "HP").json() == index
    assert daemon.metric("chanstore_channels") == 3
