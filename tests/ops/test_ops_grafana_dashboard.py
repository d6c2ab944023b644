"""grafana/: the dashboard's shape, and its provisioning files.

Grafana itself is not packaged for Debian, so what Grafana would do with the
files is checked by reading them; that every panel's query runs and returns
data is shown against a real Prometheus in test_ops_prometheus_e2e.py. Which
metrics the dashboard must show is what a real daemon's /metrics exports.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from ops_support import (
    DASHBOARDS,
    GRAFANA_DIR,
    Daemon,
    dashboard_panels,
    load_yaml,
    variable_query,
)
from prometheus_client.parser import text_string_to_metric_families

DATASOURCE_UID = "${datasource}"
#: Metrics some panel must show: what an operator looks at first.
REQUIRED_METRICS = (
    "chanstore_http_requests_total",
    "chanstore_backend_operation_duration_seconds_bucket",
    "chanstore_backend_operation_errors_total",
    "chanstore_cache_requests_total",
    "chanstore_cache_entries",
    "chanstore_channels",
    "chanstore_config_reloads_total",
    "chanstore_config_last_reload_successful",
    "chanstore_config_last_reload_success_timestamp_seconds",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "chanstore_http_connections",
    "chanstore_http_connections_closed_total",
    "chanstore_integrity_problems_total",
    "chanstore_watchers",
    "chanstore_watchers_max",
    "chanstore_feed_events_sent_total",
    "chanstore_watchers_ended_total",
    "chanstore_invalidation_link_up",
    "chanstore_cache_invalidations_total",
    "chanstore_ready",
)
#: The change feed's route, as the daemon labels its requests.
FEED_ROUTE = "/v1/channels/{channel}/-/events"
_RANGE = re.compile(r"\[([^\]]*)\]")
_USE = re.compile(r"\$\{?(\w+)\}?")


@pytest.fixture(params=DASHBOARDS, ids=lambda path: path.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return json.loads(request.param.read_text(encoding="utf-8"))


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard_panels(dashboard) for target in panel["targets"]]


def test_a_dashboard_ships() -> None:
    assert [path.name for path in DASHBOARDS] == ["chanstore.json"]


def test_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "chanstore"
    assert dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    ids += [p["id"] for row in dashboard["panels"] for p in row.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_datasource_variable(dashboard: dict[str, Any]) -> None:
    variable = variables(dashboard)["datasource"]
    assert variable["type"] == "datasource"
    assert variable["query"] == "prometheus"


def test_every_panel_and_query_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in dashboard_panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]


def test_no_datasource_is_named_but_the_variable(dashboard: dict[str, Any]) -> None:
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', json.dumps(dashboard)))
    assert uids <= {DATASOURCE_UID, dashboard["uid"]}, uids


@pytest.mark.parametrize("name", ["container", "backend"])
def test_container_and_backend_variables(dashboard: dict[str, Any], name: str) -> None:
    variable = variables(dashboard)[name]
    assert variable["type"] == "query"
    assert re.fullmatch(rf"label_values\(\w+(\{{.*\}})?, {name}\)", variable_query(variable))
    assert variable["multi"] is True
    assert variable["includeAll"] is True
    # "All" as a regex, so a value that appears later still matches.
    assert variable["allValue"] == ".*"


def test_variables_are_regex_matchers(dashboard: dict[str, Any]) -> None:
    # Multi-value and "All" selections expand to regexes: only =~ matches them.
    texts = expressions(dashboard) + [
        variable_query(v) for v in dashboard["templating"]["list"] if v["type"] == "query"
    ]
    names = set(variables(dashboard)) - {"datasource"}
    for text in texts:
        for match in _USE.finditer(text):
            name = match.group(1)
            if name.startswith("__"):
                continue
            assert name in names, f"{text}: ${name} is not a variable"
            assert text[: match.start()].endswith('=~"'), f"{text}: ${name} not in a =~ matcher"


def test_container_and_backend_filter_the_backend_panels(dashboard: dict[str, Any]) -> None:
    for expr in expressions(dashboard):
        if "chanstore_backend_" in expr:
            assert 'container=~"$container"' in expr and 'backend=~"$backend"' in expr, expr
        if "chanstore_cache_" in expr or "chanstore_integrity_" in expr:
            assert 'container=~"$container"' in expr, expr


def test_every_panel_has_a_unit(dashboard: dict[str, Any]) -> None:
    for panel in dashboard_panels(dashboard):
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"


def test_rates_use_rate_interval(dashboard: dict[str, Any]) -> None:
    # A graph's windows follow the scrape interval; an instant query (a stat of
    # what happened over the dashboard's time range) may take the whole range.
    for panel in dashboard_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            windows = {"$__rate_interval"}
            if target.get("instant"):
                windows.add("$__range")
            for window in _RANGE.findall(expr):
                assert window in windows, f"{panel['title']}: {expr}: range [{window}]"
            if re.search(r"\b(rate|irate|increase)\(", expr):
                assert any(f"[{window}]" in expr for window in windows), expr


def test_operator_panels_are_there(dashboard: dict[str, Any]) -> None:
    text = "\n".join(expressions(dashboard))
    for metric in REQUIRED_METRICS:
        assert re.search(rf"\b{metric}\b", text), f"no panel shows {metric}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert re.search(
            rf"histogram_quantile\({quantile}, sum by \([^)]*operation[^)]*\) "
            r"\(rate\(chanstore_backend_operation_duration_seconds_bucket",
            text,
        ), f"no backend p{quantile[2:]} by operation"
    stats = [p for p in dashboard_panels(dashboard) if p["type"] == "stat"]
    stat_text = " ".join(t["expr"] for p in stats for t in p["targets"])
    assert "chanstore_config_last_reload_successful" in stat_text
    assert "chanstore_config_last_reload_success_timestamp_seconds" in stat_text


def test_every_exported_chanstore_metric_is_on_a_dashboard(
    start_daemon: Callable[..., Daemon],
) -> None:
    # What a real daemon exports, so that a metric added to the daemon without
    # a panel (or a variable) that shows it fails here.
    text = start_daemon().metrics_text()
    exported = {f.name for f in text_string_to_metric_families(text)
                if f.name.startswith("chanstore_")}  # fmt: skip
    assert {"chanstore_http_requests", "chanstore_watchers"} <= exported, exported
    queries = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        queries += expressions(dashboard)
        queries += [variable_query(v) for v in dashboard["templating"]["list"]]
    shown = "\n".join(queries)
    # The parser names a counter without _total and a histogram without _bucket.
    suffix = "(_total|_bucket|_count|_sum)?"
    missing = [name for name in sorted(exported) if not re.search(rf"\b{name}{suffix}\b", shown)]
    assert not missing, f"exported, but no dashboard shows: {missing}"


def _row_panels(dashboard: dict[str, Any], title: str) -> list[dict[str, Any]]:
    """The panels laid out under the row ``title``, down to the next row."""
    rows = sorted(
        (p["gridPos"]["y"], p["title"]) for p in dashboard["panels"] if p["type"] == "row"
    )
    (top,) = [y for y, name in rows if name == title]
    bottom = min((y for y, _name in rows if y > top), default=float("inf"))
    return [p for p in dashboard["panels"]
            if p["type"] != "row" and top < p["gridPos"]["y"] < bottom]  # fmt: skip


def test_change_feed_row(dashboard: dict[str, Any]) -> None:
    panels = _row_panels(dashboard, "Change feed")
    by_expr = {t["expr"]: p for p in panels for t in p["targets"]}

    def panel_of(pattern: str) -> dict[str, Any]:
        found = [p for expr, p in by_expr.items() if re.search(pattern, expr)]
        assert found, f"no panel of the Change feed row matches {pattern}"
        return found[0]

    # Open streams against the cap, in one panel.
    assert panel_of(r"^chanstore_watchers\{") is panel_of(r"^chanstore_watchers_max\{")
    assert panel_of(r"rate\(chanstore_feed_events_sent_total\{")
    ended = panel_of(r"sum by \(reason\) \(rate\(chanstore_watchers_ended_total\{")
    assert ended["fieldConfig"]["defaults"]["unit"] == "ops"
    # The feed's requests by status, the refusals picked out in colour.
    requests = panel_of(rf'sum by \(status\) .*route="{re.escape(FEED_ROUTE)}"')
    colored = {o["matcher"]["options"] for o in requests["fieldConfig"]["overrides"]
               if o["matcher"]["id"] == "byName"
               and any(prop["id"] == "color" for prop in o["properties"])}  # fmt: skip
    assert {"410", "503"} <= colored, colored
    for target in requests["targets"]:
        assert target["legendFormat"] == "{{status}}"  # the names the overrides match
    # Conditional writes that lost (412), by route.
    conflicts = panel_of(r'sum by \([^)]*route[^)]*\) .*status="412"')
    assert conflicts["fieldConfig"]["defaults"]["unit"] == "reqps"


def test_several_daemons_row(dashboard: dict[str, Any]) -> None:
    panels = _row_panels(dashboard, "Several daemons")
    by_expr = {t["expr"]: p for p in panels for t in p["targets"]}

    def panel_of(pattern: str) -> dict[str, Any]:
        found = [p for expr, p in by_expr.items() if re.search(pattern, expr)]
        assert found, f"no panel of the Several daemons row matches {pattern}"
        return found[0]

    # Up or down, per daemon and link; ready or not (draining, a link down), per
    # daemon: states, each series named after its daemon.
    for pattern, labels in ((r"^chanstore_invalidation_link_up\{", ("instance", "link")),
                            (r"^chanstore_ready\{", ("instance",))):  # fmt: skip
        panel = panel_of(pattern)
        assert panel["type"] in {"state-timeline", "stat"}, panel["title"]
        mapped = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
        assert {"0", "1"} <= set(mapped), panel["title"]
        assert mapped["0"]["color"] == "red" and mapped["1"]["color"] == "green", mapped
        for target in panel["targets"]:
            for label in labels:
                assert f"{{{{{label}}}}}" in target["legendFormat"], panel["title"]
    # Invalidations heard per second, by container and daemon (a silent daemon shows).
    heard = panel_of(
        r"sum by \((instance, container|container, instance)\) "
        r"\(rate\(chanstore_cache_invalidations_total\{"
    )
    assert heard["fieldConfig"]["defaults"]["unit"] == "ops"
    # Beside it, the writes to redis containers that others should hear.
    writes = panel_of(r'chanstore_backend_operation_duration_seconds_count\{[^}]*backend="redis"')
    assert writes["fieldConfig"]["defaults"]["unit"] == "ops"


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    boxes = [(p["title"], p["gridPos"]) for p in dashboard["panels"]]
    for i, (title, a) in enumerate(boxes):
        assert a["x"] + a["w"] <= 24, title
        for other, b in boxes[i + 1 :]:
            apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                     or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])  # fmt: skip
            assert apart, f"{title!r} overlaps {other!r}"


def test_datasource_provisioning() -> None:
    config = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "chanstore.yml")
    assert config["apiVersion"] == 1
    (datasource,) = config["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["access"] == "proxy"
    assert datasource["url"].startswith("http")
    # $__rate_interval is computed from the scrape interval the datasource declares.
    assert datasource["jsonData"]["timeInterval"] == "15s"


def test_dashboard_provisioning() -> None:
    config = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "chanstore.yml")
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
