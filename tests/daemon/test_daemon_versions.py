"""ETags and conditional writes (DESIGN.md section 5), as a user sends them over HTTP.

Against real ``chanstore serve`` processes and a real redis-server: a daemon this
module shares serves the json container ``stats`` and the Redis-backed ``mana``,
and every behaviour that must be the same on both is run on both. Requests are
plain httpx calls with the headers RFC 9110 names (``ETag``, ``If-Match``,
``If-None-Match``); what a failed precondition left behind is read back through
the daemon *and* behind its back (the key's file under the json root, the Redis
hash through a redis client of the test's own).

Every wait is bounded: HTTP calls have timeouts, retry loops have a deadline,
and no test asserts how long anything took.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon_fixtures import for_the_module, json_and_redis_containers
from daemon_harness import DaemonProcess, RedisServer, key_path

from chanstore import codec
from chanstore.keys import encode_domain_part
from chanstore.storage import container_domain
from chanstore.versions import etag_of

#: The service id every daemon of the harness runs with (``--service-id e2e``).
SERVICE_ID = "e2e"
#: Seconds a read-modify-write loop may run in all before the test gives up.
LOOP_DEADLINE = 60.0

CONTAINERS = pytest.mark.parametrize("container", ["stats", "mana"])


@pytest.fixture(scope="module")
def module_both(
    tmp_path_factory: pytest.TempPathFactory, module_redis: RedisServer
) -> Iterator[DaemonProcess]:
    yield from for_the_module(
        DaemonProcess(tmp_path_factory.mktemp("versions"), json_and_redis_containers(module_redis))
    )


@pytest.fixture
def both(module_both: DaemonProcess) -> Iterator[DaemonProcess]:
    """The module's daemon; the test fails if it logs a crash meanwhile."""
    mark = module_both.log_size()
    yield module_both
    crashes = module_both.crashes(since=mark)
    if crashes:
        pytest.fail("the daemon logged a crash:\n" + "\n".join(crashes))


class Behind:
    """What a container's backend holds for one channel, read without the daemon."""

    def __init__(
        self, daemon: DaemonProcess, redis: RedisServer, channel: str, container: str
    ) -> None:
        self.daemon = daemon
        self.redis = redis
        self.channel = channel
        self.container = container

    def snapshot(self) -> Any:
        """Every value file of the json root, or every field of the Redis hash."""
        if self.container == "stats":
            return self.daemon.data_files()
        with self.redis.client() as client:
            return client.hgetall(self.hash_name)

    def stored(self, key: str) -> Any:
        """The key's value as the backend holds it (None when absent)."""
        if self.container == "stats":
            path = self.file_of(key)
            return json.loads(path.read_bytes()) if path.exists() else None
        with self.redis.client() as client:
            data = client.hget(self.hash_name, key)
        return None if data is None else json.loads(data)

    def file_of(self, key: str) -> Path:
        """The json file of a plain key (letters and digits only)."""
        channel = "channel_" + encode_domain_part(self.channel)
        return self.daemon.data_dir / f"service_{SERVICE_ID}" / channel / "stats" / f"{key}.json"

    @property
    def hash_name(self) -> str:
        return "chanstore:" + container_domain(SERVICE_ID, self.channel, self.container)


@pytest.fixture
def behind(both: DaemonProcess, module_redis: RedisServer, channel: str, container: str) -> Behind:
    return Behind(both, module_redis, channel, container)


def quoted(etag: str) -> str:
    return f'"{etag}"'


def put(
    daemon: DaemonProcess, channel: str, container: str, key: str, value: Any, **headers: str
) -> httpx.Response:
    # Serialized here: httpx sends no body at all for json=None, and null is a value.
    return daemon.http.put(
        key_path(channel, container, key),
        content=json.dumps(value),
        headers={"content-type": "application/json", **_headers(headers)},
    )


def delete(
    daemon: DaemonProcess, channel: str, container: str, key: str, **headers: str
) -> httpx.Response:
    return daemon.http.delete(key_path(channel, container, key), headers=_headers(headers))


def _headers(given: dict[str, str]) -> dict[str, str]:
    """``if_match="..."`` -> ``If-Match: ...``."""
    return {name.replace("_", "-"): value for name, value in given.items()}


def stored_etag(response: httpx.Response) -> str:
    """The ETag a PUT answered, checked to be the same in its header and its body."""
    assert response.status_code == 200, response.text
    etag = response.json()["etag"]
    assert response.headers["etag"] == quoted(etag)
    return etag


def assert_precondition_failed(response: httpx.Response, conflicts: dict[str, str | None]) -> None:
    """412 precondition_failed naming ``conflicts``; for one key that exists, its ETag header."""
    assert response.status_code == 412, response.text
    body = response.json()
    assert body["code"] == "precondition_failed"
    assert body["error"]
    assert body["conflicts"] == conflicts
    if len(conflicts) == 1 and None not in conflicts.values():
        (current,) = conflicts.values()
        assert response.headers["etag"] == quoted(current)
    else:
        assert "etag" not in response.headers


def assert_unchanged(
    daemon: DaemonProcess, behind: Behind, before: Any, key: str, value: Any
) -> None:
    """``key`` still holds ``value`` (None: absent), through the daemon and behind its back."""
    answer = daemon.get(behind.channel, behind.container, key)
    if value is None:
        assert answer.status_code == 404, answer.text
        assert answer.json()["code"] == "not_found"
    else:
        assert answer.status_code == 200, answer.text
        assert answer.json() == value
        assert answer.headers["etag"] == quoted(etag_of(value))
    assert behind.stored(key) == value
    assert behind.snapshot() == before


# -- ETags ------------------------------------------------------------------------------


@CONTAINERS
def test_get_head_and_put_answer_the_etag_of_the_stored_value(
    both: DaemonProcess, behind: Behind, channel: str, container: str
) -> None:
    first = {"hp": 7, "tags": ["brave"], "where": {"x": 1.5, "y": None}}
    first_etag = stored_etag(put(both, channel, container, "hero", first))
    assert first_etag == etag_of(first)
    assert behind.stored("hero") == first

    got = both.get(channel, container, "hero")
    assert got.status_code == 200
    assert got.json() == first
    assert got.headers["etag"] == quoted(first_etag)
    head = both.http.head(key_path(channel, container, "hero"))
    assert head.status_code == 200
    assert head.headers["etag"] == quoted(first_etag)
    assert head.content == b""

    # The same value again: the same ETag. Another value: another one.
    assert stored_etag(put(both, channel, container, "hero", first)) == first_etag
    second = {"hp": 8, "tags": ["brave"], "where": {"x": 1.5, "y": None}}
    second_etag = stored_etag(put(both, channel, container, "hero", second))
    assert second_etag == etag_of(second) != first_etag
    assert both.get(channel, container, "hero").headers["etag"] == quoted(second_etag)
    # A -> B -> A: the value is A again, and so is its ETag (versions.py says so).
    assert stored_etag(put(both, channel, container, "hero", first)) == first_etag

    # A value in its stored, type-marked form: the ETag of the value it stands for.
    pair = (1, "a", None)
    typed_etag = stored_etag(put(both, channel, container, "pair", codec.to_json_shape(pair)))
    assert typed_etag == etag_of(pair)
    assert both.get(channel, container, "pair").headers["etag"] == quoted(typed_etag)

    # Every scalar kind, and the bulk read, agree.
    values = {"n": 42, "f": 3.25, "s": "héllo 🎉", "t": True, "z": None, "l": [1, [2]], "e": {}}
    for key, value in values.items():
        assert stored_etag(put(both, channel, container, key, value)) == etag_of(value), key
    bulk = both.http.post(
        key_path(channel, container) + "/-/get", json={"keys": [*values, "hero", "pair", "nobody"]}
    )
    assert bulk.status_code == 200, bulk.text
    answer = bulk.json()
    assert answer["missing"] == ["nobody"]
    assert answer["etags"] == {
        **{key: etag_of(value) for key, value in values.items()},
        "hero": first_etag,
        "pair": typed_etag,
    }


@CONTAINERS
def test_get_with_if_none_match_of_the_current_etag_is_304(
    both: DaemonProcess, channel: str, container: str
) -> None:
    etag = stored_etag(put(both, channel, container, "hp", {"hp": 100}))
    path = key_path(channel, container, "hp")

    for header in [quoted(etag), f'"0000", {quoted(etag)}', f"W/{quoted(etag)}", "*"]:
        cached = both.http.get(path, headers={"if-none-match": header})
        assert cached.status_code == 304, (header, cached.text)
        assert cached.content == b""
        assert cached.headers["etag"] == quoted(etag)

    other = both.http.get(path, headers={"if-none-match": quoted(etag_of({"hp": 99}))})
    assert other.status_code == 200
    assert other.json() == {"hp": 100}

    # Once the value changed, the old ETag gets the new value.
    new_etag = stored_etag(put(both, channel, container, "hp", {"hp": 99}))
    fresh = both.http.get(path, headers={"if-none-match": quoted(etag)})
    assert fresh.status_code == 200
    assert fresh.json() == {"hp": 99}
    assert fresh.headers["etag"] == quoted(new_etag)


@CONTAINERS
def test_get_with_if_match_answers_only_the_version_asked_for(
    both: DaemonProcess, channel: str, container: str
) -> None:
    """RFC 9110: If-Match holds on a GET too, and is evaluated before If-None-Match. A
    client that read a version and wants nothing else (to show what it will overwrite)
    gets 412 and the current ETag, not a newer value it did not ask for."""
    old = stored_etag(put(both, channel, container, "hp", {"hp": 1}))
    current = stored_etag(put(both, channel, container, "hp", {"hp": 2}))
    path = key_path(channel, container, "hp")
    for method in ("GET", "HEAD"):
        for header in [quoted(current), "*"]:
            held = both.http.request(method, path, headers={"if-match": header})
            assert held.status_code == 200, (method, header, held.text)
            assert held.headers["etag"] == quoted(current)
        stale = both.http.request(method, path, headers={"if-match": quoted(old)})
        assert stale.status_code == 412, (method, stale.text)
        assert stale.headers["etag"] == quoted(current)
    assert_precondition_failed(both.http.get(path, headers={"if-match": quoted(old)}),
                               {"hp": current})  # fmt: skip
    # Both headers: If-Match first, then If-None-Match's 304.
    both_held = both.http.get(path, headers={"if-match": quoted(current),
                                             "if-none-match": quoted(current)})  # fmt: skip
    assert both_held.status_code == 304
    refused = both.http.get(path, headers={"if-match": quoted(old),
                                           "if-none-match": quoted(current)})  # fmt: skip
    assert_precondition_failed(refused, {"hp": current})
    # An absent key holds no version: 412 rather than 404 (a malformed header: 400).
    for header in ["*", quoted(current)]:
        absent = both.http.get(key_path(channel, container, "nobody"), headers={"if-match": header})
        assert_precondition_failed(absent, {"nobody": None})
    for path_of in (path, key_path(channel, container, "nobody")):
        bad = both.http.get(path_of, headers={"if-match": current})  # no quotes
        assert bad.status_code == 400, bad.text
        assert "If-Match must be * or one strong ETag" in bad.json()["error"]
    assert both.get(channel, container, "nobody").status_code == 404


# -- preconditions on PUT and DELETE -------------------------------------------------


@CONTAINERS
def test_if_match_of_the_current_version_writes_and_deletes(
    both: DaemonProcess, behind: Behind, channel: str, container: str
) -> None:
    first = stored_etag(put(both, channel, container, "hp", 1))
    second = stored_etag(put(both, channel, container, "hp", 2, if_match=quoted(first)))
    assert second == etag_of(2)
    assert both.get(channel, container, "hp").json() == 2
    assert behind.stored("hp") == 2

    gone = delete(both, channel, container, "hp", if_match=quoted(second))
    assert gone.status_code == 200, gone.text
    assert both.get(channel, container, "hp").status_code == 404
    assert behind.stored("hp") is None


@CONTAINERS
def test_if_match_of_another_version_is_412_and_changes_nothing(
    both: DaemonProcess, behind: Behind, channel: str, container: str
) -> None:
    old = stored_etag(put(both, channel, container, "hp", {"hp": 1}))
    current = stored_etag(put(both, channel, container, "hp", {"hp": 2}))
    before = behind.snapshot()

    refused = put(both, channel, container, "hp", {"hp": 3}, if_match=quoted(old))
    assert_precondition_failed(refused, {"hp": current})
    assert_unchanged(both, behind, before, "hp", {"hp": 2})

    refused = delete(both, channel, container, "hp", if_match=quoted(old))
    assert_precondition_failed(refused, {"hp": current})
    assert_unchanged(both, behind, before, "hp", {"hp": 2})

    # An ETag of no version at all is no better.
    refused = put(both, channel, container, "hp", {"hp": 3}, if_match='"not-a-version"')
    assert_precondition_failed(refused, {"hp": current})
    assert_unchanged(both, behind, before, "hp", {"hp": 2})

    # The ETag the 412 carried is the one to retry with.
    retried = put(both, channel, container, "hp", {"hp": 3}, if_match=refused.headers["etag"])
    assert stored_etag(retried) == etag_of({"hp": 3})
    assert behind.stored("hp") == {"hp": 3}


@CONTAINERS
def test_if_match_any_requires_the_key_to_exist(
    both: DaemonProcess, behind: Behind, channel: str, container: str
) -> None:
    put(both, channel, container, "neighbour", "stays")
    before = behind.snapshot()

    refused = put(both, channel, container, "hp", 1, if_match="*")
    assert_precondition_failed(refused, {"hp": None})
    assert_unchanged(both, behind, before, "hp", None)
    refused = delete(both, channel, container, "hp", if_match="*")
    assert_precondition_failed(refused, {"hp": None})
    assert_unchanged(both, behind, before, "hp", None)
    # An ETag expected of an absent key fails alike.
    refused = put(both, channel, container, "hp", 1, if_match=quoted(etag_of(1)))
    assert_precondition_failed(refused, {"hp": None})
    assert_unchanged(both, behind, before, "hp", None)

    stored_etag(put(both, channel, container, "hp", 1))
    updated = put(both, channel, container, "hp", 2, if_match="*")
    assert stored_etag(updated) == etag_of(2)
    assert behind.stored("hp") == 2
    gone = delete(both, channel, container, "hp", if_match="*")
    assert gone.status_code == 200, gone.text
    assert behind.stored("hp") is None
    assert both.get(channel, container, "neighbour").json() == "stays"


@CONTAINERS
def test_if_none_match_any_creates_only(
    both: DaemonProcess, behind: Behind, channel: str, container: str
) -> None:
    created = put(both, channel, container, "owner", {"id": "alice"}, if_none_match="*")
    assert created.status_code == 200, created.text
    etag = stored_etag(created)
    assert etag == etag_of({"id": "alice"})
    assert behind.stored("owner") == {"id": "alice"}
    before = behind.snapshot()

    refused = put(both, channel, container, "owner", {"id": "bob"}, if_none_match="*")
    assert_precondition_failed(refused, {"owner": etag})
    assert_unchanged(both, behind, before, "owner", {"id": "alice"})

    # A conditional DELETE that must find the key absent does not delete it either.
    refused = delete(both, channel, container, "owner", if_none_match="*")
    assert_precondition_failed(refused, {"owner": etag})
    assert_unchanged(both, behind, before, "owner", {"id": "alice"})


@CONTAINERS
def test_only_one_of_many_concurrent_creates_wins(
    both: DaemonProcess, behind: Behind, channel: str, container: str
) -> None:
    contenders = 8
    answers: list[int] = []
    barrier = threading.Barrier(contenders)

    def claim(number: int) -> None:
        with httpx.Client(base_url=both.url, timeout=15) as http:
            barrier.wait(timeout=15)
            answer = http.put(
                key_path(channel, container, "lock"),
                json={"owner": number},
                headers={"if-none-match": "*"},
            )
            answers.append(answer.status_code)

    _run_threads([lambda number=number: claim(number) for number in range(contenders)])
    assert sorted(answers) == [200] + [412] * (contenders - 1)
    owner = both.get(channel, container, "lock").json()
    assert behind.stored("lock") == owner


@CONTAINERS
def test_malformed_preconditions_are_400_and_change_nothing(
    both: DaemonProcess, behind: Behind, channel: str, container: str
) -> None:
    etag = stored_etag(put(both, channel, container, "hp", 1))
    before = behind.snapshot()
    malformed = [
        {"if-match": etag},  # the current ETag, without its quotes
        {"if-match": f"{quoted(etag)}, {quoted(etag_of(2))}"},  # a list of tags
        {"if-match": f"{quoted(etag)}, *"},
        {"if-match": f"W/{quoted(etag)}"},  # a weak tag: If-Match compares strongly
        {"if-none-match": quoted(etag)},  # on a write, If-None-Match is * or nothing
        {"if-match": quoted(etag), "if-none-match": "*"},  # both
        {"if-match": "*", "if-none-match": "*"},
    ]
    path = key_path(channel, container, "hp")
    for headers in malformed:
        for answer in (
            both.http.put(path, json=2, headers=headers),
            both.http.delete(path, headers=headers),
        ):
            assert answer.status_code == 400, (headers, answer.request.method, answer.text)
            assert answer.json()["code"] == "bad_request"
            assert answer.json()["error"]
            assert_unchanged(both, behind, before, "hp", 1)


# -- all-or-nothing bulk writes -----------------------------------------------------------


@CONTAINERS
def test_bulk_set_stores_nothing_when_an_expectation_fails(
    both: DaemonProcess, behind: Behind, channel: str, container: str
) -> None:
    seeded = bulk_set(both, channel, container, {"a": 1, "b": 2, "guard": "g"})
    assert seeded.status_code == 200, seeded.text
    etags = seeded.json()["etags"]
    before = behind.snapshot()
    values = {"a": 10, "b": 20, "c": 30, "d": 40}

    # Every expectation holds but one.
    one = bulk_set(
        both,
        channel,
        container,
        values,
        expect={"a": etags["a"], "b": etag_of(999), "c": None, "d": None},
    )
    assert_precondition_failed(one, {"b": etags["b"]})
    # Several fail: each is named with its current ETag (null: absent).
    several = bulk_set(
        both,
        channel,
        container,
        values,
        expect={"a": etag_of(0), "b": etags["b"], "c": "*", "d": None, "guard": None},
    )
    assert_precondition_failed(several, {"a": etags["a"], "c": None, "guard": etags["guard"]})
    # A guard: an expectation on a key that is not written.
    guarded = bulk_set(both, channel, container, values, expect={"guard": etag_of("other")})
    assert_precondition_failed(guarded, {"guard": etags["guard"]})

    for key, value in {"a": 1, "b": 2, "c": None, "d": None, "guard": "g"}.items():
        assert_unchanged(both, behind, before, key, value)
    listed = both.keys(channel, container)
    assert listed == ["a", "b", "guard"]


@CONTAINERS
def test_bulk_set_stores_everything_when_every_expectation_holds(
    both: DaemonProcess, behind: Behind, channel: str, container: str
) -> None:
    seeded = bulk_set(both, channel, container, {"a": 1, "b": 2, "guard": "g"})
    etags = seeded.json()["etags"]
    assert etags == {"a": etag_of(1), "b": etag_of(2), "guard": etag_of("g")}
    values = {"a": {"v": 10}, "b": [20], "c": "thirty", "d": None}
    stored = bulk_set(
        both,
        channel,
        container,
        values,
        expect={"a": etags["a"], "b": quoted(etags["b"]), "c": None, "d": None, "guard": "*"},
    )
    assert stored.status_code == 200, stored.text
    assert sorted(stored.json()["stored"]) == sorted(values)
    assert stored.json()["etags"] == {key: etag_of(value) for key, value in values.items()}

    for key, value in values.items():
        got = both.get(channel, container, key)
        assert got.status_code == 200
        assert got.json() == value
        assert got.headers["etag"] == quoted(etag_of(value))
        assert behind.stored(key) == value
    assert behind.stored("guard") == "g"

    read = both.http.post(
        key_path(channel, container) + "/-/get",
        json={"keys": ["a", "b", "c", "d", "guard", "nobody"]},
    )
    assert read.status_code == 200, read.text
    assert read.json() == {
        "values": {**values, "guard": "g"},
        "missing": ["nobody"],
        "etags": {**{key: etag_of(value) for key, value in values.items()}, "guard": etag_of("g")},
    }


def bulk_set(
    daemon: DaemonProcess,
    channel: str,
    container: str,
    values: dict[str, Any],
    expect: dict[str, str | None] | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {"values": values}
    if expect is not None:
        body["expect"] = expect
    return daemon.http.post(key_path(channel, container) + "/-/set", json=body)


# -- read-modify-write from many clients at once -----------------------------------------


def _run_threads(targets: list[Callable[[], None]]) -> None:
    """Run each target on a thread of its own; fail with the first error any of them raised."""
    errors: list[BaseException] = []

    def run(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(LOOP_DEADLINE + 30)
    assert not any(thread.is_alive() for thread in threads), "a client thread is still running"
    if errors:
        raise errors[0]


class Tally:
    """What the clients' loops counted, shared between their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.written = 0
        self.conflicts = 0

    def add(self, written: int = 0, conflicts: int = 0) -> None:
        with self.lock:
            self.written += written
            self.conflicts += conflicts


@CONTAINERS
def test_concurrent_read_modify_write_loops_lose_no_increment(
    both: DaemonProcess, behind: Behind, channel: str, container: str
) -> None:
    """N clients each add 1, M times: GET, then PUT If-Match the ETag read; on 412, again."""
    clients, increments = 5, 12
    stored_etag(put(both, channel, container, "counter", 0))
    path = key_path(channel, container, "counter")
    tally = Tally()
    deadline = time.monotonic() + LOOP_DEADLINE

    def increment_many() -> None:
        with httpx.Client(base_url=both.url, timeout=15) as http:
            for _ in range(increments):
                while True:
                    assert time.monotonic() < deadline, "the loops made no progress"
                    read = http.get(path)
                    assert read.status_code == 200, read.text
                    written = http.put(
                        path, json=read.json() + 1, headers={"if-match": read.headers["etag"]}
                    )
                    if written.status_code == 200:
                        tally.add(written=1)
                        break
                    assert written.status_code == 412, written.text
                    tally.add(conflicts=1)

    _run_threads([increment_many] * clients)
    assert tally.written == clients * increments
    final = both.get(channel, container, "counter")
    assert final.json() == clients * increments
    assert final.headers["etag"] == quoted(etag_of(clients * increments))
    assert behind.stored("counter") == clients * increments


def test_conditional_writes_through_two_daemons_on_one_redis_lose_no_update(
    start_daemon, redis: RedisServer, channel: str
) -> None:
    """Two daemons share one Redis; clients of both increment one counter with If-Match.

    What matters here is the check made in Redis, not how soon a daemon's cache sees a
    write made through the other (that is DESIGN.md section 7's coherence), so a client
    learns the current version from a 412 itself: its ``ETag`` names exactly one counter
    value, which the client recognises.
    """
    config = [
        {
            "implementation": "redis",
            "name": "mana",
            "load": True,
            "settings": {**redis.settings, "socket_timeout": 5.0},
        }
    ]
    daemons = [start_daemon(config), start_daemon(config)]
    per_daemon, increments = 2, 15
    total = len(daemons) * per_daemon * increments
    value_of = {etag_of(number): number for number in range(total + 1)}
    path = key_path(channel, "mana", "counter")
    assert daemons[0].http.put(path, json=0).status_code == 200
    tally = Tally()
    deadline = time.monotonic() + LOOP_DEADLINE

    def increment_many(daemon: DaemonProcess) -> None:
        with httpx.Client(base_url=daemon.url, timeout=15) as http:
            read = http.get(path)
            assert read.status_code == 200, read.text
            value, etag = read.json(), read.headers["etag"]
            for _ in range(increments):
                while True:
                    assert time.monotonic() < deadline, "the loops made no progress"
                    written = http.put(path, json=value + 1, headers={"if-match": etag})
                    if written.status_code == 200:
                        value, etag = value + 1, written.headers["etag"]
                        tally.add(written=1)
                        break
                    assert written.status_code == 412, written.text
                    tally.add(conflicts=1)
                    etag = written.headers["etag"]
                    value = value_of[etag.strip('"')]

    _run_threads(
        [
            lambda daemon=daemon: increment_many(daemon)
            for daemon in daemons
            for _ in range(per_daemon)
        ]
    )
    assert tally.written == total
    assert tally.conflicts > 0  # they did contend
    with redis.client() as client:
        stored = client.hget(
            "chanstore:" + container_domain(SERVICE_ID, channel, "mana"), "counter"
        )
    assert stored == str(total).encode()
    # Either daemon's conditional write on the final version holds: that is what is stored.
    for number, daemon in enumerate(daemons):
        final = daemon.http.put(
            path, json=total + number + 1, headers={"if-match": quoted(etag_of(total + number))}
        )
        assert final.status_code == 200, final.text
