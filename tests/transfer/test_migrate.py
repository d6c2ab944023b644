"""``chanstore migrate``: json to Redis, Redis to a cluster, reruns, dry runs and filters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import redis as redis_py
from test_export_import import CHANNELS, every_value
from transfer_fixtures import SERVICE, fill, read_back, report, storage

from support import VALUES, assert_same, wait_until


def test_json_to_redis_copies_every_channel_and_reports_per_container(configs, cli,
                                                                       redis_server):  # fmt: skip
    old, new = configs.json(), configs.redis()
    fill(old, {channel: {"stats": every_value(), "profiles": {"p": channel}}
               for channel in CHANNELS})  # fmt: skip
    ran = cli("migrate", "--from", str(old), "--to", str(new), "--verify")
    assert ran.status == 0, ran.stderr
    rows = report(ran.stdout)
    keys = str(len(every_value()) * len(CHANNELS))
    # channels, keys, copied, unchanged, deleted, damaged, target keys, verdict
    assert rows["stats"][:7] == ["3", keys, keys, "0", "0", "0", keys]
    assert rows["stats"][7:] == ["ok,", "values", "verified"]
    assert rows["profiles"][:7] == ["3", "3", "3", "0", "0", "0", "3"]
    for channel in CHANNELS:
        for key, value in every_value().items():
            assert_same(read_back(new, channel, "stats")[key], value, key[:20])
    rerun = cli("migrate", "--from", str(old), "--to", str(new))
    assert report(rerun.stdout)["stats"][:4] == ["3", keys, "0", keys]


def test_a_rerun_after_sigkill_copies_nothing_twice(configs, cli, redis_server, tmp_path):
    old, new = configs.json(), configs.redis()
    per_channel = 50
    total = fill(old, {f"c{n}": {"stats": {f"k{i}": i for i in range(per_channel)}}
                       for n in range(200)})  # fmt: skip
    client = redis_server.client()
    env = {**os.environ, "CHANSTORE_SERVICE_ID": SERVICE}
    command = [sys.executable, "-m", "chanstore.cli", "migrate", "--from", str(old),
               "--to", str(new), "--batch-size", "5"]  # fmt: skip
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_until(lambda: len(domains(client)) >= 20, 60, "the migration to be under way")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    landed = sum(client.hlen(name) for name in domains(client))
    assert 0 < landed < total, "the migration was killed mid-way"
    rerun = cli("migrate", "--from", str(old), "--to", str(new), "--verify")
    assert rerun.status == 0, rerun.stderr
    row = report(rerun.stdout)["stats"]
    assert row[:7] == ["200", str(total), str(total - landed), str(landed), "0", "0", str(total)]
    # Every write of a key records one change event: each key was written exactly once.
    assert sum(client.xlen(name) for name in client.scan_iter(match=b"chanstore:-events:*")) \
        == total  # fmt: skip


def test_ctrl_c_stops_cleanly_and_a_rerun_finishes(configs, cli, redis_server, tmp_path):
    old, new = configs.json(), configs.redis()
    total = fill(old, {f"c{n}": {"stats": {f"k{i}": i for i in range(40)}} for n in range(150)})
    client = redis_server.client()
    env = {**os.environ, "CHANSTORE_SERVICE_ID": SERVICE}
    command = [sys.executable, "-m", "chanstore.cli", "migrate", "--from", str(old),
               "--to", str(new), "--batch-size", "5"]  # fmt: skip
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: len(domains(client)) >= 10, 60, "the migration to be under way")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "interrupted; nothing stored is lost: run the same command again to finish" in stderr
    rerun = cli("migrate", "--from", str(old), "--to", str(new))
    assert rerun.status == 0
    assert report(rerun.stdout)["stats"][6] == str(total)


def test_dry_run_reports_what_it_would_copy_and_writes_nothing(configs, cli, redis_server):
    old, new = configs.json(), configs.redis()
    fill(old, {"c1": {"stats": {"a": 1, "b": 2}}})
    fill(new, {"c1": {"stats": {"a": 1}}})
    ran = cli("migrate", "--from", str(old), "--to", str(new), "--dry-run")
    assert ran.status == 0, ran.stderr
    assert "would copy" in ran.stdout.splitlines()[0]
    assert report(ran.stdout)["stats"][:4] == ["1", "2", "1", "1"]
    assert read_back(new, "c1", "stats") == {"a": 1}


def test_filters_take_only_the_named_channels_and_containers(configs, cli, redis_server):
    old, new = configs.json(), configs.redis()
    fill(old, {"c1": {"stats": {"a": 1}, "profiles": {"b": 2}}, "c2": {"stats": {"c": 3}}})
    ran = cli("migrate", "--from", str(old), "--to", str(new), "--channel", "c1",
              "--container", "stats")  # fmt: skip
    assert ran.status == 0, ran.stderr
    assert read_back(new, "c1", "stats") == {"a": 1}
    assert read_back(new, "c1", "profiles") == {}
    assert read_back(new, "c2", "stats") == {}


def test_a_target_holding_more_keys_than_the_source_fails_the_count(configs, cli,
                                                                    redis_server):  # fmt: skip
    old, new = configs.json(), configs.redis()
    fill(old, {"c1": {"stats": {"a": 1}}})
    fill(new, {"c1": {"stats": {"stray": 0}}})
    ran = cli("migrate", "--from", str(old), "--to", str(new))
    assert ran.status == 1
    assert "FAILED: 1 channels' counts differ" in ran.stdout
    assert "channel 'c1': the source holds 1 keys, the target 2" in ran.stdout
    assert read_back(new, "c1", "stats") == {"a": 1, "stray": 0}  # never deletes unasked


def test_delete_extra_removes_what_the_source_no_longer_holds(configs, cli,
                                                              redis_server):  # fmt: skip
    old, new = configs.json(), configs.redis()
    fill(old, {"c1": {"stats": {"a": 1, "b": 2}}})
    assert cli("migrate", "--from", str(old), "--to", str(new)).status == 0
    held = storage(old, "c1")
    del held.stats["b"]  # deleted at the source after the first copy
    held.close()
    dry = cli("migrate", "--from", str(old), "--to", str(new), "--delete-extra", "--dry-run")
    assert "would delete" in dry.stdout.splitlines()[0]
    assert report(dry.stdout)["stats"][:5] == ["1", "1", "0", "1", "1"]
    assert read_back(new, "c1", "stats") == {"a": 1, "b": 2}
    ran = cli("migrate", "--from", str(old), "--to", str(new), "--delete-extra")
    assert ran.status == 0, ran.stdout
    assert report(ran.stdout)["stats"][:7] == ["1", "1", "0", "1", "1", "0", "1"]
    assert read_back(new, "c1", "stats") == {"a": 1}
    assert read_back(old, "c1", "stats") == {"a": 1}


def test_containers_in_only_one_config_are_left_and_none_in_common_is_an_error(configs, cli):
    old = configs.json(names=("stats",))
    other = configs.json(root="other", names=("boards",))
    ran = cli("migrate", "--from", str(old), "--to", str(other))
    assert ran.status == 2
    assert "name no container in common" in ran.stderr


def test_redis_to_a_cluster(configs, cli, redis_server, cluster):
    old = configs.redis()
    new = configs.redis(mode="cluster", nodes=cluster.settings()["nodes"],
                        socket_timeout=2.0)  # fmt: skip
    channels = {f"c{n}": {"stats": {"v": VALUES["set"], "n": n}} for n in range(60)}
    total = fill(old, channels)
    ran = cli("migrate", "--from", str(old), "--to", str(new), "--verify")
    assert ran.status == 0, ran.stderr + ran.stdout
    assert report(ran.stdout)["stats"][:3] == ["60", str(total), str(total)]
    shards = set()
    for port in cluster.primary_ports():
        node = redis_py.Redis(port=port)
        if any(True for _ in node.scan_iter(match=b"chanstore:{service_svc.*", count=100)):
            shards.add(port)
        node.close()
    assert len(shards) == 3, "the channels landed on every primary"
    assert read_back(new, "c7", "stats") == {"v": {1, 2, 3}, "n": 7}
    # The other way too: a cluster is listed on every primary.
    back = configs.redis(prefix="back:")
    ran = cli("migrate", "--from", str(new), "--to", str(back))
    assert ran.status == 0, ran.stderr + ran.stdout
    assert report(ran.stdout)["stats"][:3] == ["60", str(total), str(total)]


def domains(client) -> list[bytes]:
    return [name for name in client.scan_iter(match=b"chanstore:service_*", count=1000)]
