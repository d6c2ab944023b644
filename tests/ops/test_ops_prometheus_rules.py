"""prometheus/: the scrape config and the rules pass promtool, and so do their unit tests.

promtool is the real one (Debian's prometheus package). Beside it, the shipped
files are read to check what promtool does not: every alert the operations
kit promises exists with a severity, a summary, a description and a runbook,
and the unit tests show every alert both firing and not firing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ops_support import (
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    RULE_FILES,
    RULE_TESTS,
    load_yaml,
    rules,
    run_tool,
)

REQUIRED_ALERTS = {
    "ChanstoreDown",
    "ChanstoreNotReady",
    "ChanstoreBackendErrorRatio",
    "ChanstoreBackendLatencyHigh",
    "ChanstoreConfigReloadFailed",
    "ChanstoreDataLost",
    "ChanstoreDataDamaged",
    "ChanstoreConnectionsRefused",
    "ChanstoreConnectionsAtCap",
    "ChanstoreWatchersAtCap",
    "ChanstoreSlowWatchers",
    "ChanstoreInvalidationLinkDown",
    "ChanstoreInvalidationsStalled",
}
SEVERITIES = {"critical", "warning"}


def test_shipped_files_exist() -> None:
    assert PROMETHEUS_CONFIG.is_file()
    assert RULE_FILES, "no rule files in prometheus/rules/"
    assert RULE_TESTS, "no promtool unit tests in prometheus/tests/"


def test_promtool_check_config(promtool: str) -> None:
    # Checks the rule files the config names too.
    output = run_tool(promtool, "check", "config", PROMETHEUS_CONFIG)
    assert "SUCCESS" in output, output


def test_promtool_check_rules(promtool: str) -> None:
    output = run_tool(promtool, "check", "rules", *RULE_FILES)
    assert "SUCCESS" in output, output


def test_promtool_test_rules(promtool: str, tmp_path: Path) -> None:
    # From another folder: the tests find the rules relative to themselves.
    output = run_tool(promtool, "test", "rules", *RULE_TESTS, cwd=tmp_path)
    assert output.count("SUCCESS") == len(RULE_TESTS), output
    assert "FAILED" not in output, output


def test_scrape_config_names_the_job_target_and_rules() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "chanstore"]
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets == ["127.0.0.1:8470"]
    assert job.get("scrape_interval", config["global"]["scrape_interval"]) == "15s"
    named = {(PROMETHEUS_DIR / path).resolve() for path in config["rule_files"]}
    assert named == {path.resolve() for path in RULE_FILES}


def test_required_alerts_have_severity_summary_description_and_runbook() -> None:
    alerts = {rule["alert"]: rule for _path, rule in rules("alert")}
    assert set(alerts) >= REQUIRED_ALERTS, f"missing: {REQUIRED_ALERTS - set(alerts)}"
    for name, rule in alerts.items():
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        for field in ("summary", "description", "runbook"):
            assert annotations.get(field, "").strip(), f"{name} has no {field}"
        # A runbook says what to run: commands are `quoted`.
        assert "`" in annotations["runbook"], f"{name}: the runbook names no command"


def test_the_down_alert_matches_the_shipped_job() -> None:
    (down,) = [rule for _path, rule in rules("alert") if rule["alert"] == "ChanstoreDown"]
    assert 'job="chanstore"' in down["expr"]


def test_config_reload_alert_survives_a_missed_scrape() -> None:
    (rule,) = [r for _p, r in rules("alert") if r["alert"] == "ChanstoreConfigReloadFailed"]
    # An instant selector would vanish on the staleness marker of one failed scrape.
    assert "_over_time(chanstore_config_last_reload_successful[" in rule["expr"]


def test_recorded_series_are_used_and_named_by_convention() -> None:
    recorded = [rule["record"] for _path, rule in rules("record")]
    expressions = " ".join(rule["expr"] for _path, rule in rules("alert"))
    for name in recorded:
        assert name.count(":") == 2, f"{name}: not level:metric:operations"
        users = [r for _p, r in rules("record") if name in r["expr"]]
        assert name in expressions or users, f"{name} is recorded but nothing uses it"


@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda path: path.name)
def test_rule_tests_load_the_shipped_rules(test_file: Path) -> None:
    named = {(test_file.parent / path).resolve() for path in load_yaml(test_file)["rule_files"]}
    assert named <= {path.resolve() for path in RULE_FILES}, named


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: dict[str, set[str]] = {}
    quiet: dict[str, set[str]] = {}
    for test_file in RULE_TESTS:
        for test in load_yaml(test_file)["tests"]:
            for case in test.get("alert_rule_test", []):
                seen = firing if case.get("exp_alerts") else quiet
                seen.setdefault(case["alertname"], set()).add(str(case["eval_time"]))
    for name in {rule["alert"] for _path, rule in rules("alert")}:
        assert firing.get(name), f"no promtool test shows {name} firing"
        assert quiet.get(name), f"no promtool test shows {name} not firing"
