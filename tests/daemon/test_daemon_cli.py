"""The ``chanstore`` command as an operator types it: check-config, get/set/delete/keys, serve."""

from __future__ import annotations

import json
from pathlib import Path

from daemon_harness import DaemonProcess, free_port, json_entry, run_cli


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps([json_entry("stats"), {"implementation": "redis",
                    "name": "mana", "settings": {"host": "127.0.0.1", "port": 6379}}]))  # fmt: skip

    result = run_cli("check-config", str(good))

    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert "stats (json)" in result.stdout
    assert "mana (redis)" in result.stdout


def test_check_config_rejects_a_bad_file_naming_entry_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([
        json_entry("stats"),
        {"implementation": "nosuch", "name": "mana"},
        {"implementation": "json", "name": "profiles", "load": "yes"},
    ]))  # fmt: skip

    result = run_cli("check-config", str(bad))

    assert result.returncode != 0
    assert "invalid" in result.stderr
    assert "entry 1" in result.stderr
    assert "'implementation'" in result.stderr
    assert "nosuch" in result.stderr
    assert "entry 2" in result.stderr
    assert "'load'" in result.stderr
    assert "entry 0" not in result.stderr


def test_check_config_rejects_invalid_json_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"implementation": "json",')
    result = run_cli("check-config", str(broken))
    assert result.returncode != 0
    assert "not valid JSON" in result.stderr

    missing = run_cli("check-config", str(tmp_path / "nowhere.json"))
    assert missing.returncode != 0
    assert "nowhere.json" in missing.stderr


def test_get_set_delete_keys_against_the_daemon(daemon: DaemonProcess, channel: str) -> None:
    listen = ["--listen", daemon.listen]

    stored = run_cli("set", channel, "stats", "HP", '{"now": 5, "max": 10}', *listen)
    assert stored.returncode == 0, stored.stderr
    assert daemon.get(channel, "stats", "HP").json() == {"now": 5, "max": 10}
    assert run_cli("set", channel, "stats", "a/b c", '"odd"', *listen).returncode == 0

    shown = run_cli("get", channel, "stats", "HP", *listen)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"now": 5, "max": 10}
    odd = run_cli("get", channel, "stats", "a/b c", env={"CHANSTORE_LISTEN": daemon.listen})
    assert json.loads(odd.stdout) == "odd"

    listed = run_cli("keys", channel, "stats", *listen)
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.splitlines()) == ["HP", "a/b c"]

    deleted = run_cli("delete", channel, "stats", "HP", *listen)
    assert deleted.returncode == 0, deleted.stderr
    assert daemon.get(channel, "stats", "HP").status_code == 404

    absent = run_cli("get", channel, "stats", "HP", *listen)
    assert absent.returncode != 0
    assert "HP" in absent.stderr
    assert run_cli("delete", channel, "stats", "HP", *listen).returncode != 0


def test_data_commands_refuse_bad_input_and_say_why(daemon: DaemonProcess, channel: str) -> None:
    listen = ["--listen", daemon.listen]

    not_json = run_cli("set", channel, "stats", "HP", "{oops", *listen)
    assert not_json.returncode != 0
    assert "not JSON" in not_json.stderr
    unknown = run_cli("set", channel, "nosuch", "HP", "1", *listen)
    assert unknown.returncode != 0
    assert "nosuch" in unknown.stderr
    assert daemon.keys(channel, "stats") == []

    nobody = run_cli("keys", channel, "stats", "--listen", f"127.0.0.1:{free_port()}")
    assert nobody.returncode != 0
    assert "no chanstore daemon" in nobody.stderr


def test_serve_refuses_a_bad_config_or_address(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"implementation": "nosuch", "name": "x"}]))
    result = run_cli("serve", "--db-config", str(bad), "--listen", f"127.0.0.1:{free_port()}",
                     "--log-format", "json", timeout=30)  # fmt: skip
    assert result.returncode != 0
    assert "entry 0" in result.stderr

    good = tmp_path / "good.json"
    good.write_text(json.dumps([json_entry("stats")]))
    no_port = run_cli("serve", "--db-config", str(good), "--listen", "127.0.0.1:http",
                      timeout=30)  # fmt: skip
    assert no_port.returncode != 0
    assert "HOST:PORT" in no_port.stderr


def test_serve_takes_its_settings_from_chanstore_variables(start_daemon, channel: str) -> None:
    daemon = start_daemon(
        token="env-token-123",
        settings_in_environment=True,
        env={"CHANSTORE_MAX_BODY_BYTES": "100", "CHANSTORE_SERVICE_ID": "from-env"},
    )
    assert "--listen" not in daemon.command()

    with daemon.client() as client:
        client.set(channel, "stats", "HP", 1)
        assert client.get(channel, "stats", "HP") == 1
    assert (daemon.data_dir / "service_from-env" / f"channel_{channel}").is_dir()
    assert daemon.http.put(f"/v1/channels/{channel}/stats/big", json="x" * 200).status_code == 413
    anonymous = run_cli("get", channel, "stats", "HP", "--listen", daemon.listen)
    assert anonymous.returncode != 0


def test_a_flag_wins_over_its_variable(start_daemon, channel: str) -> None:
    daemon = start_daemon(
        args=["--max-body-bytes", "5000"], env={"CHANSTORE_MAX_BODY_BYTES": "100"}
    )
    assert daemon.put(channel, "stats", "big", "x" * 1000).status_code == 200
    assert daemon.put(channel, "stats", "bigger", "x" * 6000).status_code == 413
