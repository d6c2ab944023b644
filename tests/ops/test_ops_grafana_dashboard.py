"""grafana/: the dashboard's shape, and its provisioning files.

Grafana itself is not packaged for Debian, so what Grafana would do with the
files is checked by reading them; that every panel's query runs and returns
data is shown against a real Prometheus in test_ops_prometheus_e2e.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from ops_support import DASHBOARDS, GRAFANA_DIR, dashboard_panels, load_yaml, variable_query

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
)
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
