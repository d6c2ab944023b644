"""End to end: a real Prometheus scrapes a real daemon; the dashboard and the rules run on it.

The daemon gets traffic that includes a rejected reload, a backend that
cannot be reached, two stored values that do not decode (one read before
Prometheus starts, one after: integrity problems), conditional writes that
lose, change-feed requests (a stream, an expired cursor, a failing
backend), and a redis container it shares with a second daemon, which writes
what the first has read (invalidations heard over a link that is up, beside
the unreachable Redis's link, down); Prometheus (the shipped scrape job and
rule files, at a 1 s interval) scrapes the first daemon while the traffic
goes on. Then every query of the
dashboard, with Grafana's variables filled in as "All", must run and return
data; every rule expression must run; every rule must evaluate healthy; and
the alerts that this traffic calls for must be pending or firing.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ops_support import (
    DASHBOARDS,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    Daemon,
    Prometheus,
    Traffic,
    dashboard_panels,
    free_port,
    load_yaml,
    ops_db_config,
    rules,
    running_redis,
    shared_redis_entry,
    substitute,
    variable_query,
    wait_until,
)

from support import RedisServer

pytestmark = pytest.mark.slow

#: Scrapes to wait for before querying: more than a $__rate_interval (10 s) of samples.
SCRAPES = 12
TIMEOUT = 90


def prometheus_config(target: str) -> dict[str, Any]:
    """The shipped prometheus.yml, scraping ``target`` every second."""
    config = copy.deepcopy(load_yaml(PROMETHEUS_CONFIG))
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str((PROMETHEUS_DIR / path).resolve()) for path in config["rule_files"]]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "chanstore"]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [target]}]
    return config


@pytest.fixture(scope="module")
def e2e_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The Redis the e2e daemon shares with its peer."""
    with running_redis(tmp_path_factory.mktemp("e2e-redis")) as server:
        yield server


@pytest.fixture(scope="module")
def scraped(
    prometheus_binary: str, e2e_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """A Prometheus that has scraped a busy daemon a dozen times and evaluated its rules."""
    folder = tmp_path_factory.mktemp("e2e")
    shared = shared_redis_entry(e2e_redis)
    entries = [*ops_db_config(free_port()), shared]
    daemon = Daemon(folder / "daemon", entries)
    peer = Daemon(folder / "peer", [shared])  # not scraped: the other daemon of the Redis
    plant_torn_values(daemon.folder)
    daemon.start()
    prometheus: Prometheus | None = None
    try:
        peer.start()
        with Traffic(daemon, ["profiles", "health_bars"], "scores",
                     peer=peer, shared_container="shared") as traffic:  # fmt: skip
            # A reload that is applied, then one that is rejected and stays so.
            daemon.write_config([*entries, {"implementation": "json", "name": "extra",
                                            "settings": {"root_dir": "data"}}])  # fmt: skip
            assert daemon.http.post("/-/reload").status_code == 200
            daemon.write_config('[{"implementation": "json", "name": "profiles", "settings": ')
            rejected = daemon.http.post("/-/reload")
            assert rejected.status_code == 400, rejected.text
            read_torn_value(daemon, TORN_KEYS[0])

            prometheus = Prometheus(prometheus_binary, folder / "prometheus",
                                    prometheus_config(daemon.target)).start()  # fmt: skip
            wait_until(lambda: _scrapes(prometheus) >= SCRAPES, TIMEOUT,
                       f"{SCRAPES} successful scrapes of the daemon")  # fmt: skip
            # The integrity problems counter goes from 1 to 2 while Prometheus watches.
            read_torn_value(daemon, TORN_KEYS[1])
            wait_until(lambda: _rules_evaluated(prometheus), TIMEOUT, "every rule evaluated")
            assert traffic.statuses.get(503), "the unreachable backend never failed a request"
            assert traffic.statuses.get(200), traffic.statuses
            # Conditional writes that lost, and a feed cursor that expired.
            assert traffic.statuses.get(412) and traffic.statuses.get(410), traffic.statuses
            assert traffic.peer_statuses.get(200), traffic.peer_statuses
        yield prometheus
    except BaseException:
        print("daemon log:\n" + daemon.log_text())
        if prometheus is not None:
            print("prometheus log:\n" + prometheus.log_text())
        raise
    finally:
        if prometheus is not None:
            prometheus.stop()
        peer.stop()
        daemon.stop()


#: Keys of health_bars (loaded key by key, not as a whole) in channel ``damaged``,
#: whose stored values are torn files.
TORN_KEYS = ("torn-1", "torn-2")


def plant_torn_values(daemon_folder: Path) -> None:
    """Files of :data:`TORN_KEYS` in the json root of health_bars that do not decode."""
    folder = daemon_folder / "data" / "service_chanstore" / "channel_damaged" / "health_bars"
    folder.mkdir(parents=True)
    for key in TORN_KEYS:
        (folder / f"{key}.json").write_bytes(b'{"type": "dict", "value": {"h')


def read_torn_value(daemon: Daemon, key: str) -> None:
    """Read one torn value: the daemon answers corrupt and counts an integrity problem."""
    response = daemon.http.get(f"/v1/channels/damaged/health_bars/{key}")
    assert response.status_code == 500, response.text
    assert response.json()["code"] == "corrupt", response.text


def _scrapes(prometheus: Prometheus) -> float:
    answer = prometheus.query('sum_over_time(up{job="chanstore"}[1m])')
    result = answer.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else 0.0


def _rules_evaluated(prometheus: Prometheus) -> bool:
    # A rule's health is "unknown" until its first evaluation.
    groups = prometheus.api("rules")["data"]["groups"]
    return bool(groups) and all(
        rule["health"] != "unknown" for group in groups for rule in group["rules"]
    )


def _dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _panel_queries() -> list[tuple[str, str]]:
    queries = []
    for path in DASHBOARDS:
        dashboard = _dashboard(path)
        for panel in dashboard_panels(dashboard):
            for target in panel["targets"]:
                queries.append((f"{panel['title']} [{target['refId']}]",
                                substitute(target["expr"], dashboard)))  # fmt: skip
    return queries


PANEL_QUERIES = _panel_queries()


@pytest.mark.parametrize(("panel", "expr"), PANEL_QUERIES, ids=[p for p, _ in PANEL_QUERIES])
def test_dashboard_query_returns_data(scraped: Prometheus, panel: str, expr: str) -> None:
    answer = scraped.query(expr)
    assert answer["status"] == "success", f"{panel}: {expr}\n{answer}"
    assert answer["data"]["result"], f"{panel}: no data for {expr}"


def test_dashboard_variables_find_the_containers_and_backends(scraped: Prometheus) -> None:
    for path in DASHBOARDS:
        dashboard = _dashboard(path)
        found = {}
        for variable in dashboard["templating"]["list"]:
            if variable["type"] != "query":
                continue
            query = substitute(variable_query(variable), dashboard)
            metric, label = query.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
            # What Grafana asks Prometheus for a label_values() variable.
            answer = scraped.api(f"label/{label}/values", **{"match[]": metric})
            assert answer["status"] == "success", f"{variable['name']}: {answer}"
            found[variable["name"]] = set(answer["data"])
        assert {"profiles", "health_bars", "scores"} <= found["container"], found
        assert {"json", "redis"} <= found["backend"], found
        assert found["job"] == {"chanstore"}, found


def _named_routes() -> set[str]:
    texts = [rule["expr"] for kind in ("record", "alert") for _path, rule in rules(kind)]
    texts += [expr for _panel, expr in PANEL_QUERIES]
    return {route for text in texts for route in re.findall(r'\broute="([^"]*)"', text)}


NAMED_ROUTES = sorted(_named_routes())


@pytest.mark.parametrize("route", NAMED_ROUTES)
def test_routes_named_by_rules_and_panels_are_the_daemons(scraped: Prometheus, route: str) -> None:
    # A route template that the daemon never labels requests with would make an
    # alert that never fires and a panel that stays empty.
    answer = scraped.query(f'chanstore_http_requests_total{{route="{route}"}}')
    assert answer["data"]["result"], f"no request was counted under route {route!r}"


RULES = [(rule.get("alert") or rule["record"], rule["expr"]) for kind in ("record", "alert")
         for _path, rule in rules(kind)]  # fmt: skip


@pytest.mark.parametrize(("name", "expr"), RULES, ids=[name for name, _ in RULES])
def test_rule_expression_runs(scraped: Prometheus, name: str, expr: str) -> None:
    answer = scraped.query(expr)
    assert answer["status"] == "success", f"{name}: {expr}\n{answer}"


def test_prometheus_loaded_every_rule_and_each_evaluates_healthy(scraped: Prometheus) -> None:
    groups = scraped.api("rules")["data"]["groups"]
    loaded = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(loaded) == {name for name, _expr in RULES}
    for name, rule in loaded.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


def test_recorded_series_have_data(scraped: Prometheus) -> None:
    for _path, rule in rules("record"):
        answer = scraped.query(rule["record"])
        assert answer["data"]["result"], f"{rule['record']} recorded nothing"


def test_the_alerts_this_traffic_calls_for(scraped: Prometheus) -> None:
    # scores' Redis does not exist: not ready, every operation fails. The last
    # reload was rejected: ChanstoreConfigReloadFailed has no `for`, it fires.
    # A second torn value of health_bars was read while Prometheus watched:
    # ChanstoreDataDamaged has no `for` either. (The first was read before
    # Prometheus started: alone, it would not fire.) scores' Redis does not
    # exist: its invalidation link is down too (shared's is up).
    expected = {
        ("ChanstoreNotReady", "scores"): {"pending", "firing"},
        ("ChanstoreBackendErrorRatio", "scores"): {"pending", "firing"},
        ("ChanstoreConfigReloadFailed", None): {"firing"},
        ("ChanstoreDataDamaged", "health_bars"): {"firing"},
        ("ChanstoreInvalidationLinkDown", None): {"pending", "firing"},
    }

    def states() -> dict[tuple[str, str | None], str]:
        alerts = scraped.api("alerts")["data"]["alerts"]
        return {(a["labels"]["alertname"], a["labels"].get("container")): a["state"]
                for a in alerts}  # fmt: skip

    def all_there() -> bool:
        seen = states()
        return all(seen.get(key) in allowed for key, allowed in expected.items())

    try:
        wait_until(all_there, TIMEOUT, "the expected alerts", interval=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"alerts: {states()}") from exc
    unexpected = {key for key in states() if key not in expected}
    assert not unexpected, f"alerts this traffic should not raise: {unexpected}"
