"""The ``chanstore`` command as an operator types it: check-config, get/set/delete/keys, serve."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

from daemon_harness import DaemonProcess, free_port, json_entry, run_cli
from test_daemon_clients import AWKWARD_KEYS, ContractDouble


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps([json_entry("stats"), {"implementation": "redis",
                    "name": "mana", "settings": {"host": "127.0.0.1", "port": 6379}}]))  # fmt: skip

    result = run_cli("check-config", str(good))

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{good}: ok, 2 containers: stats (json), mana (redis)\n"
    good.write_text(json.dumps([json_entry("stats")]))
    assert run_cli("check-config", str(good)).stdout == f"{good}: ok, 1 container: stats (json)\n"


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


def test_keys_follows_every_page_in_key_order(daemon: DaemonProcess, channel: str) -> None:
    listen = ["--listen", daemon.listen]
    with daemon.client() as client:
        client.set_many(channel, "stats", dict.fromkeys(AWKWARD_KEYS, 1))
    ordered = sorted(AWKWARD_KEYS)

    paged = run_cli("keys", channel, "stats", "--page-size", "2", *listen)
    assert paged.returncode == 0, paged.stderr
    assert paged.stdout.splitlines() == ordered
    whole = run_cli("keys", channel, "stats", *listen)
    assert whole.stdout.splitlines() == ordered

    first = run_cli("keys", channel, "stats", "--limit", "3", *listen)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == ordered[:3]
    assert run_cli("keys", channel, "profiles", *listen).stdout == ""


def test_keys_refuses_numbers_out_of_range(daemon: DaemonProcess, channel: str) -> None:
    listen = ["--listen", daemon.listen]
    too_big = run_cli("keys", channel, "stats", "--page-size", "10001", *listen)
    assert too_big.returncode == 2
    assert "at most 10000" in too_big.stderr
    for flag, value in (("--limit", "0"), ("--page-size", "-1"), ("--limit", "many")):
        refused = run_cli("keys", channel, "stats", flag, value, *listen)
        assert refused.returncode == 2, (flag, value)
        assert flag in refused.stderr
        assert refused.stdout == ""


def test_get_and_set_speak_the_stored_form(daemon: DaemonProcess, channel: str) -> None:
    """``set`` stores the JSON document it is given; ``get`` prints the one the daemon holds."""
    listen = ["--listen", daemon.listen]
    marked_set = {"_moobius_type": "builtins.set", "_moobius_val": ["a"]}
    stored = run_cli("set", channel, "stats", "tags", json.dumps(marked_set), *listen)
    assert stored.returncode == 0, stored.stderr
    with daemon.client() as client:
        assert client.get(channel, "stats", "tags") == {"a"}
        client.set(channel, "stats", "pair", (1, "x"))
    shown = run_cli("get", channel, "stats", "tags", *listen)
    assert json.loads(shown.stdout) == marked_set
    pair = run_cli("get", channel, "stats", "pair", *listen)
    assert json.loads(pair.stdout) == {"_moobius_type": "builtins.tuple", "_moobius_val": [1, "x"]}

    # What get prints, set takes back as it is.
    copied = run_cli("set", channel, "stats", "pair-copy", pair.stdout, *listen)
    assert copied.returncode == 0, copied.stderr
    with daemon.client() as client:
        assert client.get(channel, "stats", "pair-copy") == (1, "x")

    for not_json in ("NaN", "[Infinity]", "{oops"):
        refused = run_cli("set", channel, "stats", "bad", not_json, *listen)
        assert refused.returncode == 2, not_json
        assert "not JSON" in refused.stderr
    assert daemon.get(channel, "stats", "bad").status_code == 404


def test_keys_prints_each_page_as_it_arrives() -> None:
    """The first page is on stdout while the second is still being answered."""
    ordered = sorted(AWKWARD_KEYS)
    with ContractDouble(AWKWARD_KEYS) as double:
        double.hold_after = 1  # the second listing request waits for double.release
        command = [sys.executable, "-m", "chanstore.cli", "keys", "c", "stats",
                   "--page-size", "2", "--listen", double.listen]  # fmt: skip
        # Block-buffered stdout, as a pipe gets it by default: the command must flush.
        env = {name: value for name, value in os.environ.items()
               if name != "PYTHONUNBUFFERED" and not name.startswith("CHANSTORE_")}  # fmt: skip
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, env=env) as process:  # fmt: skip
            assert process.stdout is not None and process.stderr is not None
            # The first page arrives while the second is held back (for up to 20 s; the
            # command's own request timeout is 15 s), not when the command exits.
            ready, _, _ = select.select([process.stdout], [], [], 10)
            assert ready, "the first page was not printed while the second was awaited"
            early = [process.stdout.readline().rstrip("\n") for _ in range(2)]
            assert double.holding.wait(timeout=10), "the second page was never asked for"
            double.release.set()
            rest = process.stdout.read().splitlines()
            errors = process.stderr.read()
            assert process.wait(timeout=30) == 0, errors
    assert early == ordered[:2]
    assert early + rest == ordered


def test_keys_limit_asks_for_no_more_than_it_prints() -> None:
    with ContractDouble(AWKWARD_KEYS) as double:
        listed = run_cli("keys", "c", "stats", "--limit", "3", "--page-size", "2",
                         "--listen", double.listen)  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines() == sorted(AWKWARD_KEYS)[:3]
        assert [query["limit"] for query in double.listings()] == [["2"], ["2"]]

        small = run_cli("keys", "c", "stats", "--limit", "5", "--listen", double.listen)
        assert small.stdout.splitlines() == sorted(AWKWARD_KEYS)[:5]
        assert double.listings()[2:] == [{"limit": ["5"]}]
