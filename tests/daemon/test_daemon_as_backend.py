"""The daemon as a backend: an in-process MoobiusStorage whose containers live in a real daemon.

``implementation: "chanstore"`` (DESIGN.md section 8) moves a service's storage
into ``chanstore serve`` by editing its db_config: the original SDK's code
runs unchanged, every mapping operation reaches the daemon, values keep their
types, and the CachedDict follows the channel's change feed, so that writes
other clients make are seen within moments, across a restart of the daemon too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import for_the_module
from daemon_harness import DaemonProcess, free_port, json_entry, run_cli, wait_until

from chanstore import MoobiusStorage, codec, get_engine
from chanstore.backends import remote_clients, remote_feed
from chanstore.backends.remote import ChanstoreDatabase
from chanstore.cache import ABSENT, UNKNOWN, CachedDict
from chanstore.client import Client
from chanstore.codec import Document
from chanstore.errors import BackendError, BackendUnavailable, ConfigError, WriteRefused

SERVICE = "e2e"  # the harness's --service-id
CONTAINERS = ["health_bars", "mana_bars", "stats"]
#: Seconds within which another client's write must reach the in-process cache.
SEEN_WITHIN = 1.0


@dataclass
class Profile:
    name: str
    level: int
    tags: set[str]


@pytest.fixture(scope="module")
def module_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon of json containers health_bars, mana_bars and stats, for this module."""
    yield from for_the_module(
        DaemonProcess(tmp_path_factory.mktemp("as-backend"), [json_entry(n) for n in CONTAINERS])
    )


@pytest.fixture(autouse=True)
def profile_registered() -> Iterator[None]:
    codec.register_type(Profile)
    yield
    codec.unregister_type(Profile)


@pytest.fixture(autouse=True)
def nothing_left_running() -> Iterator[None]:
    """Every test closes what it opened: no feed thread and no client is left behind."""
    yield
    wait_until(lambda: remote_feed.feeds_running() == 0, 5, "the feeds to stop")
    assert len(remote_clients.clients) == 0
    wait_until(lambda: not feed_threads(), 5, "the feed threads to end")


def feed_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("chanstore-feed")]


def entries(url: str, *names: str, load: bool = True, **settings: Any) -> list[dict[str, Any]]:
    """db_config entries of containers ``names`` stored in the daemon at ``url``."""
    return [{"implementation": "chanstore", "name": name, "load": load, "clear": False,
             "settings": {"url": url, **settings}} for name in names or CONTAINERS]  # fmt: skip


@pytest.fixture
def storage(daemon: DaemonProcess, channel: str) -> Iterator[MoobiusStorage]:
    """A strict MoobiusStorage of a fresh channel, over the module's daemon (loaded)."""
    built = MoobiusStorage(SERVICE, channel, entries(daemon.url), strict_mode=True)
    yield built
    built.close()


@pytest.fixture
def other(daemon: DaemonProcess) -> Iterator[Client]:
    """Another client of the daemon: its writes are the ones the cache must hear of."""
    with daemon.client() as client:
        yield client


def seen(predicate: Any, what: str, within: float = SEEN_WITHIN) -> float:
    """Seconds until ``predicate()`` held; fails past ``within``."""
    started = time.monotonic()
    wait_until(predicate, within, what, interval=0.002)
    return time.monotonic() - started


# -- the original SDK's code, unchanged ---------------------------------------------


def test_the_original_sdks_example_runs_unchanged(daemon: DaemonProcess, channel: str,
                                                  tmp_path: Path) -> None:  # fmt: skip
    """The reference's db_config, with "chanstore" for the implementation: a list, or a
    .json file name; the mana_bars entry keeps the original's stray root_dir."""
    db_config = [
        {"implementation": "chanstore", "name": "health_bars", "load": True, "clear": False,
         "settings": {"url": daemon.url}},
        {"implementation": "chanstore", "name": "mana_bars", "load": True, "clear": False,
         "settings": {"url": daemon.url, "root_dir": "json_db"}},
    ]  # fmt: skip
    config_file = tmp_path / "db_config.json"
    config_file.write_text(json.dumps(db_config))

    class Service:  # what each demo's on_start() does
        client_id = SERVICE

        def __init__(self, db_config: Any) -> None:
            self.db_config = db_config

        def on_start(self, channel_id: str) -> MoobiusStorage:
            return MoobiusStorage(self.client_id, channel_id, db_config=self.db_config)

    first = Service(db_config).on_start(channel)
    first.health_bars["alice"] = 100
    first.mana_bars["alice"] = {"mp": 7, "spells": ("fire", "ice")}
    first.health_bars["alice"] -= 10
    first.close()

    again = Service(str(config_file)).on_start(channel)
    try:
        assert again.health_bars["alice"] == 90
        assert again.mana_bars["alice"] == {"mp": 7, "spells": ("fire", "ice")}
        assert dict(again.health_bars.items()) == {"alice": 90}
    finally:
        again.close()
    assert daemon.get(channel, "health_bars", "alice").json() == 90


# -- the mapping, through the daemon ----------------------------------------------------


def test_every_mapping_operation_reaches_the_daemon(storage: MoobiusStorage, other: Client,
                                                    channel: str) -> None:  # fmt: skip
    stats = storage.stats
    assert stats.loaded and len(stats) == 0 and list(stats) == []
    stats["hp"] = 10
    stats.update({"mp": 5, "xp": [1, 2]}, gold=3)
    assert (stats["hp"], stats.get("mp"), stats.get("none", "dflt")) == (10, 5, "dflt")
    assert "xp" in stats and "none" not in stats
    assert len(stats) == 4 and sorted(stats) == ["gold", "hp", "mp", "xp"]
    assert stats.setdefault("hp", 0) == 10 and stats.setdefault("new", 0) == 0
    assert stats.pop("gold") == 3 and stats.pop("gold", None) is None
    del stats["new"]
    with pytest.raises(KeyError):
        del stats["new"]
    key, value = stats.popitem()
    assert key not in stats and value is not None
    stats["hp"] = 11
    assert sorted(other.keys(channel, "stats")) == sorted(stats)
    assert {k: other.get(channel, "stats", k) for k in stats} == dict(stats.items())

    stats.clear()
    assert len(stats) == 0 and other.keys(channel, "stats") == []

    # A container not loaded asks the daemon for what it does not hold.
    other.set_many(channel, "mana_bars", {"a": 1, "b": 2})
    lazy = MoobiusStorage(SERVICE, channel, entries(storage.stats.database.url, "mana_bars",
                                                    load=False))  # fmt: skip
    try:
        assert not lazy.mana_bars.loaded
        assert (lazy.mana_bars["a"], "b" in lazy.mana_bars, len(lazy.mana_bars)) == (1, True, 2)
        assert lazy.mana_bars.fetch_many(["a", "b", "c"]) == {"a": 1, "b": 2}
        assert lazy.mana_bars.fetch("c") is ABSENT
    finally:
        lazy.close()


ODD_KEYS = ["a/b", "..", ".", "%2F", "Ünïcødé ✓ 频道", "k" * 300, "é" * 150, "line\nbreak"]


def test_values_and_odd_keys_round_trip(storage: MoobiusStorage, other: Client,
                                        channel: str) -> None:  # fmt: skip
    values = {
        "set": {"a", "b"},
        "tuple": (1, "two", (3,)),
        "profile": Profile("alice", 3, {"admin"}),
        "nested": {"inner": [{"deep": {1, 2}}], "mark-like": {"_moobius_type": "x",
                                                              "_moobius_val": 1}},
        "plain": [None, True, 1.5, "s"],
    }  # fmt: skip
    stats = storage.stats
    stats.update(values)
    for key in ODD_KEYS:
        stats[key] = {"key": key}
    assert len("k" * 300) == 300 and len(("é" * 150).encode()) == 300

    fresh = MoobiusStorage(SERVICE, channel, entries(stats.database.url, "stats"))
    try:
        for key, value in values.items():
            assert fresh.stats[key] == value
            assert type(fresh.stats[key]) is type(value)
            assert other.get(channel, "stats", key) == value  # the daemon holds the typed form
        for key in ODD_KEYS:
            assert fresh.stats[key] == {"key": key}
        assert sorted(fresh.stats) == sorted([*values, *ODD_KEYS])
    finally:
        fresh.close()


def test_the_backend_answers_stored_documents_when_values_are_not_revived(
    daemon: DaemonProcess, other: Client, channel: str
) -> None:
    """As the daemon itself reads its backends: values in their stored form."""
    other.set(channel, "stats", "tags", {"x"})
    backend = ChanstoreDatabase(f"service_{SERVICE}.channel_{channel}.stats", url=daemon.url)
    try:
        assert backend.get_value("tags") == (True, {"x"})
        backend.revive_values = False
        ok, document = backend.get_value("tags")
        assert ok and document == Document({"_moobius_type": "builtins.set", "_moobius_val": ["x"]})
        assert backend.load_all() == {"tags": document}
        ok, message = backend.get_value("missing")
        assert not ok and message.kind == "not_found"
    finally:
        backend.close()


# -- other clients' writes ----------------------------------------------------------------


@pytest.mark.parametrize("load", [True, False])
def test_another_clients_writes_reach_the_cache(daemon: DaemonProcess, other: Client,
                                                channel: str, load: bool) -> None:  # fmt: skip
    storage = MoobiusStorage(SERVICE, channel, entries(daemon.url, "stats", load=load))
    stats = storage.stats
    try:
        stats["hp"] = 1
        assert stats["hp"] == 1  # held in memory now
        latencies = []
        for value in range(2, 22):
            started = time.monotonic()
            other.set(channel, "stats", "hp", value)
            seen(lambda v=value: stats.memory.peek("hp") == v, "the cache to hear of the write")
            latencies.append(time.monotonic() - started)  # from the write's request on
        assert stats["hp"] == 21
        other.delete(channel, "stats", "hp")
        seen(lambda: stats.memory.held("hp") in (ABSENT, UNKNOWN), "the cache to hear of it")
        assert "hp" not in stats
        other.set(channel, "stats", "new", {"n"})
        if load:  # a complete memory takes in keys it never held
            seen(lambda: stats.memory.peek("new") == {"n"}, "the new key")
            assert len(stats) == 1 and list(stats) == ["new"]
        else:
            assert stats["new"] == {"n"}
        print(f"\nload={load}: another client's write, from its request to the cache: "
              f"median {statistics.median(latencies) * 1000:.1f} ms, "
              f"max {max(latencies) * 1000:.1f} ms")  # fmt: skip
    finally:
        storage.close()


def test_a_value_changed_in_place_and_saved_is_never_swapped_for_its_echo(
    storage: MoobiusStorage, other: Client, channel: str
) -> None:
    """The change feed brings back this process's own writes too; they must not replace the
    object a caller is changing in place between its read and its save."""
    stats = storage.stats
    stats["bar"] = {"hp": 500}
    for _ in range(300):
        stats["bar"]["hp"] -= 1
        stats.save("bar")
    assert stats["bar"] == {"hp": 200}
    assert other.get(channel, "stats", "bar") == {"hp": 200}


def test_the_cache_agrees_with_the_daemon_after_racing_writers(
    storage: MoobiusStorage, other: Client, channel: str
) -> None:
    """This process and another client write the same keys at once: once both stop, the
    cache holds what the daemon holds, whichever write each key saw last."""
    stats = storage.stats
    stop = time.monotonic() + 2.0

    def elsewhere() -> None:
        with Client(other.url) as mine:
            i = 0
            while time.monotonic() < stop:
                mine.set(channel, "stats", f"k{i % 5}", {"by": "other", "i": i})
                if i % 7 == 0:
                    with contextlib.suppress(KeyError):
                        mine.delete(channel, "stats", f"k{(i + 2) % 5}")
                i += 1

    thread = threading.Thread(target=elsewhere)
    thread.start()
    try:
        i = 0
        while time.monotonic() < stop:
            stats[f"k{i % 5}"] = {"by": "me", "i": i}
            if i % 11 == 0:
                stats.pop(f"k{(i + 3) % 5}", None)  # deleted meanwhile by the other: None
            i += 1
    finally:
        thread.join(10)
    assert not thread.is_alive()

    def agrees() -> bool:
        stored = {key: other.get(channel, "stats", key) for key in other.keys(channel, "stats")}
        return stored == stats.copy()

    wait_until(agrees, 5, "the cache to agree with the daemon")


def test_containers_of_a_channel_share_one_feed_which_stops_with_the_last(
    daemon: DaemonProcess, channel: str
) -> None:
    first = MoobiusStorage(SERVICE, channel, entries(daemon.url))
    second = MoobiusStorage(SERVICE, channel, entries(daemon.url, "stats"))
    elsewhere = MoobiusStorage(SERVICE, channel + "-b", entries(daemon.url, "stats"))
    assert remote_feed.feeds_running() == 2  # one per channel, whatever the containers
    assert len(remote_clients.clients) == 1  # one keep-alive client per url, token and timeout
    first.close()
    assert remote_feed.feeds_running() == 2
    second.stats["x"] = 1
    elsewhere.close()
    second.close()
    assert remote_feed.feeds_running() == 0
    assert len(remote_clients.clients) == 0


# -- the daemon stopped and restarted under the storage --------------------------------------


def feed_events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    """The chanstore log events named ``event`` (a library's go to the logger "chanstore")."""
    found = [getattr(record, "chanstore", {}) for record in caplog.records]
    return [fields for fields in found if fields.get("event") == event]


def test_the_daemon_restarted_under_the_storage(
    start_daemon: Any, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="chanstore")
    daemon = start_daemon([json_entry("stats")])
    storage = MoobiusStorage(SERVICE, channel, entries(daemon.url, "stats", timeout=2),
                             strict_mode=True)  # fmt: skip
    stats = storage.stats
    try:
        stats.update({"hp": 1, "mp": 2})
        daemon.stop()

        # Down: strict writes raise (nothing is reported stored that was not), reads of
        # keys the cache does not hold raise: never a false "absent".
        with pytest.raises(WriteRefused) as refused:
            stats["hp"] = 99
        assert refused.value.kind == "unavailable"
        with pytest.raises(WriteRefused):
            del stats["mp"]
        assert stats.memory.peek("hp") != 99
        stats.forget()
        with pytest.raises(BackendError) as failed:
            _ = stats["hp"]
        assert failed.value.kind == "unavailable"
        with pytest.raises(BackendError):
            _ = "never" in stats
        with pytest.raises(BackendError):
            len(stats)

        daemon.start(same_port=True)  # a json root: the change history is gone with it
        assert stats["hp"] == 1
        assert stats["mp"] == 2
        with daemon.client() as other:
            other.set(channel, "stats", "hp", 50)
            other.delete(channel, "stats", "mp")
        # The feed finds its cursor expired, drops the cache and watches from now: the
        # reads are right again (the watch's reconnect waits grow up to 10 s). When it
        # reconnected before the reads above, the live feed brings both changes instead,
        # one event each: wait for the last, or "mp" may still be held for a moment.
        wait_until(lambda: stats.memory.peek("hp") != 1 and stats.memory.peek("mp") != 2, 30,
                   "the cache to be dropped or both changes heard")  # fmt: skip
        assert stats["hp"] == 50
        assert "mp" not in stats
        with daemon.client() as other:
            other.set(channel, "stats", "hp", 51)
        seen(lambda: stats.memory.peek("hp") == 51 or stats["hp"] == 51, "the live feed", 5)
        stats["hp"] = 52
        assert daemon.get(channel, "stats", "hp").json() == 52
    finally:
        storage.close()
    (lost,) = [fields for fields in feed_events(caplog, "change_feed_lost")
               if fields["reason"] == "cursor_expired"]  # fmt: skip
    assert lost["channel"] == channel and lost["caches_dropped"] == 1
    assert feed_events(caplog, "caches_dropped")[0]["reason"] == "new_stream"


def test_a_feed_not_ready_in_time_drops_the_cache_once_it_is(start_daemon: Any, channel: str,
                                                             caplog: pytest.LogCaptureFixture,
                                                             ) -> None:  # fmt: skip
    """The daemon takes one watcher: the second channel's storage is built without its
    feed (after its timeout), and its cache is dropped when the feed opens at last."""
    caplog.set_level(logging.INFO, logger="chanstore")
    daemon = start_daemon([json_entry("stats")], args=["--max-watchers", "1"])
    first = MoobiusStorage(SERVICE, channel, entries(daemon.url, "stats", timeout=1))
    started = time.monotonic()
    second = MoobiusStorage(SERVICE, channel + "-2", entries(daemon.url, "stats", timeout=1))
    try:
        assert 0.9 < time.monotonic() - started < 5  # it waited for the feed, boundedly
        assert feed_events(caplog, "change_feed_not_ready")
        assert second.stats.loaded
        with daemon.client() as other:
            other.set(channel + "-2", "stats", "hp", 7)  # unheard: no feed yet
        first.close()  # the daemon's one watcher is free
        wait_until(lambda: not second.stats.loaded, 30, "the cache to be dropped")
        assert second.stats["hp"] == 7
    finally:
        first.close()
        second.close()


# -- construction errors -----------------------------------------------------------------


def test_a_wrong_service_id_is_a_clear_error(daemon: DaemonProcess, channel: str) -> None:
    with pytest.raises(ConfigError) as raised:
        MoobiusStorage("another-service", channel, entries(daemon.url, "stats"))
    message = str(raised.value)
    assert "'e2e'" in message and "'another-service'" in message
    assert "--service-id another-service" in message


def test_an_unknown_container_is_a_clear_error(daemon: DaemonProcess, channel: str) -> None:
    with pytest.raises(ConfigError) as raised:
        MoobiusStorage(SERVICE, channel, entries(daemon.url, "stats", "nosuch"))
    message = str(raised.value)
    assert "no container 'nosuch'" in message
    assert "health_bars, mana_bars, stats" in message


def test_no_daemon_at_the_url_is_a_clear_error(channel: str) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendUnavailable) as raised:
        MoobiusStorage(SERVICE, channel, entries(url, "stats", timeout=1))
    assert raised.value.kind == "unavailable"
    assert url in str(raised.value)


def test_a_domain_that_is_not_a_containers_is_a_clear_error(daemon: DaemonProcess) -> None:
    with pytest.raises(ConfigError, match=r"service_<service id>\.channel_<channel id>"):
        ChanstoreDatabase("plain.domain", url=daemon.url)
    with pytest.raises(ConfigError, match="http:// or https://"):
        ChanstoreDatabase(f"service_{SERVICE}.channel_c.stats", url="127.0.0.1:8470")


def test_a_token_file_is_read_and_a_missing_token_is_a_permission_error(
    start_daemon: Any, channel: str, tmp_path: Path
) -> None:
    daemon = start_daemon([json_entry("stats")], token="s3cret")
    assert daemon.token_file is not None
    with pytest.raises(BackendError) as raised:
        MoobiusStorage(SERVICE, channel, entries(daemon.url, "stats"))
    assert raised.value.kind == "permission"
    assert "token_file" in str(raised.value)
    with_token = entries(daemon.url, "stats", token_file=str(daemon.token_file))
    storage = MoobiusStorage(SERVICE, channel, with_token)
    try:
        storage.stats["hp"] = 3
        assert daemon.get(channel, "stats", "hp").json() == 3
        with daemon.client() as other:
            other.set(channel, "stats", "hp", 4)
        seen(lambda: storage.stats.memory.peek("hp") == 4, "the feed, with the token")
    finally:
        storage.close()
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        MoobiusStorage(SERVICE, channel, entries(daemon.url, "stats", token_file=str(empty)))


def test_the_daemon_names_its_service_id(daemon: DaemonProcess) -> None:
    with daemon.client() as client:
        served = client.served()
        assert served["service_id"] == SERVICE
        assert [entry["name"] for entry in served["containers"]] == CONTAINERS
        assert client.containers() == served["containers"]


# -- names and config checks -------------------------------------------------------------


@pytest.mark.parametrize("name", ["chanstore", "daemon", "remote", "Chanstore", " REMOTE ",
                                  "ChanstoreDatabase"])  # fmt: skip
def test_the_aliases_resolve(name: str) -> None:
    assert get_engine(name) is ChanstoreDatabase


def test_check_config_accepts_a_chanstore_entry_and_rejects_a_bad_setting(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps([
        {"implementation": "chanstore", "name": "stats",
         "settings": {"url": "http://127.0.0.1:8470", "token_file": "/etc/chanstore/token",
                      "timeout": 2.5}},
        {"implementation": "daemon", "name": "mana"},
    ]))  # fmt: skip
    result = run_cli("check-config", str(good))
    assert result.returncode == 0, result.stderr
    assert "stats (chanstore)" in result.stdout

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([
        {"implementation": "chanstore", "name": "stats", "settings": {"timeout": "5"}},
        {"implementation": "remote", "name": "mana", "settings": {"urll": "http://x:1"}},
        {"implementation": "chanstore", "name": "hp", "settings": {"url": "localhost:8470",
                                                                    "timeout": 0}},
    ]))  # fmt: skip
    result = run_cli("check-config", str(bad))
    assert result.returncode != 0
    assert "entry 0" in result.stderr and "'timeout' must be int or float" in result.stderr
    assert "entry 1" in result.stderr and "'urll'" in result.stderr
    assert "entry 2" in result.stderr and "http:// or https://" in result.stderr
    assert "more than 0 seconds" in result.stderr


def test_a_cached_dict_built_by_hand_over_the_backend(daemon: DaemonProcess, other: Client,
                                                       channel: str) -> None:  # fmt: skip
    """Without MoobiusStorage: the backend on a container's domain, and a CachedDict."""
    backend = get_engine("daemon")(f"service_{SERVICE}.channel_{channel}.stats", url=daemon.url)
    box = CachedDict(backend, strict_mode=True, name="stats")
    try:
        box["k"] = (1, 2)
        other.set(channel, "stats", "k", [3])
        seen(lambda: box.memory.peek("k") == [3], "the write")
    finally:
        box.close()


def test_the_readmes_library_example_runs_on_the_daemon(start_daemon: Any, tmp_path: Path) -> None:
    """README "The library, in-process", run as it is written, its db_config pointed at a daemon."""
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The library, in-process", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    daemon = start_daemon([json_entry("health_bars"), json_entry("profiles")],
                          args=["--service-id", "my_service"])  # fmt: skip
    service = tmp_path / "service"
    (service / "config").mkdir(parents=True)
    (service / "config" / "db.json").write_text(json.dumps(
        entries(daemon.url, "health_bars", "profiles")))  # fmt: skip
    ran = subprocess.run([sys.executable, "-c", example], cwd=service, capture_output=True,
                         text=True, timeout=60, check=False)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert not (service / "data").exists(), "the service stored nothing of its own"
    with daemon.client() as client:
        assert client.get("channel-1", "health_bars", "alice") == 100
        assert client.get("channel-1", "profiles", "alice") == {
            "name": "Alicia", "titles": {"first", "brave"}}  # fmt: skip
        board = client.get_document("channel-1", "profiles", "board")
    assert board == {"_moobius_type": "__main__.Board",
                     "_moobius_val": {"cells": ["x", "", "o"], "turn": 3}}  # fmt: skip
