"""chanstore.client's sync and async clients: against a real daemon, and against a stand-in.

The end-to-end tests run a real ``chanstore serve``. The stand-in
(:class:`ContractDouble`, a stdlib ``http.server`` in a thread) answers the two
contracts of DESIGN.md section 2 the clients depend on, listing pages
(``?limit=N&after=KEY`` -> ``{"keys": [...], "next": KEY or null}``) and
values in their stored form (a PUT body is stored as the document it is, a GET
answers it), so the clients' side of them is tested without a daemon process,
and the requests they send can be read exactly as they arrived.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

import pytest
from daemon_harness import DaemonProcess, free_port, key_path

from chanstore import codec
from chanstore.client import (
    AsyncClient,
    Client,
    ClientError,
    ContainerView,
    DaemonUnreachable,
    page_path,
)
from chanstore.errors import UnstorableValue

#: Keys that a query string or a path would mangle if they were not percent-encoded whole.
AWKWARD_KEYS = [
    "a&b", "a=b", "a/b", "100%", "50%25", "plus+sign", "space key", "q?x", "#hash", "semi;colon",
    ".", "..", "%2E", "é", "日本語", "🎉", "~tilde", "-", "a\\b", "after=x&limit=1",
]  # fmt: skip


@dataclass
class Profile:
    """A dataclass an application registers with the codec."""

    name: str
    level: int
    titles: tuple[str, ...] = ()


@pytest.fixture
def profile_type() -> Iterator[str]:
    """:class:`Profile` registered for reviving; its type mark's name."""
    codec.register_type(Profile)
    yield codec.mark_name(Profile)
    codec.unregister_type(Profile)


def test_sync_client_containers_behave_like_dicts(daemon: DaemonProcess, channel: str) -> None:
    with Client(daemon.url) as client:
        stats = client.channel(channel).stats
        stats["HP"] = 5
        assert stats["HP"] == 5
        assert client.channel(channel)["stats"]["HP"] == 5
        stats["HP"] += 1
        assert stats["HP"] == 6
        with pytest.raises(KeyError):
            stats["absent"]
        assert stats.get("absent", "default") == "default"
        assert "HP" in stats
        assert "absent" not in stats

        stats.update({"MP": 3, "odd/key": [1, 2]}, name="Ann")
        assert len(stats) == 4
        assert sorted(stats) == ["HP", "MP", "name", "odd/key"]
        assert dict(stats.items()) == {"HP": 6, "MP": 3, "name": "Ann", "odd/key": [1, 2]}
        assert stats.get_many(["HP", "odd/key", "nope"]) == {"HP": 6, "odd/key": [1, 2]}

        del stats["HP"]
        with pytest.raises(KeyError):
            del stats["HP"]
        assert stats.pop("MP") == 3
        assert stats.setdefault("level", 1) == 1
        assert sorted(stats) == ["level", "name", "odd/key"]

        # What the dict shows is what another client reads.
        assert client.get_many(channel, "stats", ["name", "level"]) == {"name": "Ann", "level": 1}
        assert client.delete_many(channel, "stats", ["name", "absent"]) == ["name"]
        assert sorted(client.keys(channel, "stats")) == ["level", "odd/key"]
        assert [c["name"] for c in client.containers()] == ["stats", "profiles"]


def test_sync_client_errors_say_what_went_wrong(daemon: DaemonProcess, channel: str) -> None:
    with Client(daemon.url) as client:
        with pytest.raises(ClientError) as unknown:
            client.channel(channel).nosuch["HP"] = 1
        assert not isinstance(unknown.value, KeyError)
        assert unknown.value.status == 404
        assert "nosuch" in str(unknown.value)
        assert "stats" in str(unknown.value)  # it lists the containers there are

        # An unknown container is not an absent key: no KeyError to mistake for one.
        with pytest.raises(ClientError) as reading:
            client.channel(channel).nosuch["HP"]
        assert not isinstance(reading.value, KeyError)
        assert reading.value.status == 404
    with Client(daemon.url) as client, pytest.raises(ClientError) as too_long:
        client.set(channel, "stats", "k" * 1025, 1)
    assert too_long.value.status == 400
    assert "1024" in str(too_long.value)

    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as nobody:
        with pytest.raises(DaemonUnreachable) as unreachable:
            nobody.get(channel, "stats", "HP")
        assert unreachable.value.status is None


def test_async_client(daemon: DaemonProcess, channel: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(daemon.url) as client:
            await client.set(channel, "profiles", "name", "Ann")
            assert await client.get(channel, "profiles", "name") == "Ann"
            with pytest.raises(KeyError):
                await client.get(channel, "profiles", "absent")

            # Many requests at once, over the client's pool of keep-alive connections.
            await asyncio.gather(*(client.set(channel, "profiles", f"k{n}", n) for n in range(100)))
            values = await client.get_many(channel, "profiles", [f"k{n}" for n in range(100)])
            assert values == {f"k{n}": n for n in range(100)}
            results = await asyncio.gather(
                *(client.get(channel, "profiles", f"k{n}") for n in range(100))
            )
            assert results == list(range(100))

            await client.set_many(channel, "profiles", {"a/b": 1, "..": 2})
            assert sorted(await client.keys(channel, "profiles")) == sorted(
                ["name", "a/b", "..", *(f"k{n}" for n in range(100))]
            )
            assert await client.delete_many(channel, "profiles", ["a/b", "absent"]) == ["a/b"]
            await client.delete(channel, "profiles", "name")
            with pytest.raises(KeyError):
                await client.delete(channel, "profiles", "name")
            with pytest.raises(ClientError) as unknown:
                await client.set(channel, "nosuch", "k", 1)
            assert unknown.value.status == 404

            verdict = await client.reload()
            assert verdict["ok"] is True

    asyncio.run(scenario())
    assert daemon.get(channel, "profiles", "..").json() == 2


def test_async_client_unreachable(channel: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(f"http://127.0.0.1:{free_port()}", timeout=2) as client:
            await client.get(channel, "stats", "HP")

    with pytest.raises(DaemonUnreachable):
        asyncio.run(scenario())


# -- values in their stored form, through the daemon ----------------------------------


def test_values_keep_their_types_through_the_daemon(
    daemon: DaemonProcess, channel: str, profile_type: str
) -> None:
    shaped_like_a_mark = {"_moobius_type": "builtins.set", "_moobius_val": ["a"]}
    values: dict[str, Any] = {
        "tags": {"a"},
        "pair": (1, "x"),
        "frozen": frozenset({1, 2}),
        "profile": Profile("Ann", 3, ("Dame",)),
        "mark-shaped": shaped_like_a_mark,
        "nested": {"sets": [{"b"}, set()], "tuple": ((1, 2), [3]), "none": None},
        "json": {"big": 2**70, "float": 0.1, "text": "é🎉\u2028", "empty": [[], {}]},
    }
    with Client(daemon.url) as client:
        stats = client.channel(channel).stats
        stats["tags"] = {"a"}  # as DESIGN.md section 2 has it
        assert stats["tags"] == {"a"}
        assert type(stats["tags"]) is set
        for key, value in values.items():
            stats[key] = value
        for key, value in values.items():
            read = stats[key]
            assert read == value, key
            assert type(read) is type(value), key
        assert type(stats["nested"]["tuple"][0]) is tuple
        assert type(stats["profile"].titles) is tuple

        # The daemon holds (and answers) the stored form, as the library writes it.
        assert daemon.get(channel, "stats", "tags").json() == {
            "_moobius_type": "builtins.set", "_moobius_val": ["a"]
        }  # fmt: skip
        assert daemon.get(channel, "stats", "pair").json() == {
            "_moobius_type": "builtins.tuple", "_moobius_val": [1, "x"]
        }  # fmt: skip
        assert daemon.get(channel, "stats", "profile").json() == {
            "_moobius_type": profile_type,
            "_moobius_val": {
                "name": "Ann",
                "level": 3,
                "titles": {"_moobius_type": "builtins.tuple", "_moobius_val": ["Dame"]},
            },
        }
        assert daemon.get(channel, "stats", "mark-shaped").json() == {
            "_moobius_type": "builtins.dict",
            "_moobius_val": [["_moobius_type", "builtins.set"], ["_moobius_val", ["a"]]],
        }
        assert client.get_document(channel, "stats", "json") == values["json"]

        # Bulk reads revive the same way; bulk writes send the stored form.
        assert client.get_many(channel, "stats", list(values)) == values
        client.set_many(channel, "stats", {"t2": (2,), "s2": {"x", "y"}})
        assert client.get_many(channel, "stats", ["t2", "s2", "absent"]) == {
            "t2": (2,), "s2": {"x", "y"}
        }  # fmt: skip
        assert type(stats["t2"]) is tuple
        assert stats.get_many(["s2"]) == {"s2": {"x", "y"}}

        # A stored form set as it is reads back as the value it stands for.
        client.set_document(channel, "stats", "doc", {"_moobius_type": "builtins.set",
                                                      "_moobius_val": [1, 2]})  # fmt: skip
        assert client.get(channel, "stats", "doc") == {1, 2}

        # A mark nothing here knows is kept as the dict it is, and written back unchanged.
        foreign = {"_moobius_type": "other.app.Thing", "_moobius_val": {"a": [1, 2]}}
        client.set_document(channel, "stats", "foreign", foreign)
        stats["foreign-copy"] = stats["foreign"]
        assert daemon.get(channel, "stats", "foreign-copy").json() == foreign


def test_bulk_get_of_the_keys_named_like_a_type_mark(daemon: DaemonProcess, channel: str) -> None:
    """The answer's ``values`` object then has the two keys of a mark; it is not one."""
    with Client(daemon.url) as client:
        client.set_many(channel, "stats", {"_moobius_type": "builtins.set", "_moobius_val": [1]})
        assert client.get_many(channel, "stats", ["_moobius_type", "_moobius_val"]) == {
            "_moobius_type": "builtins.set", "_moobius_val": [1]
        }  # fmt: skip
        assert client.get(channel, "stats", "_moobius_type") == "builtins.set"


def test_async_client_values_keep_their_types(
    daemon: DaemonProcess, channel: str, profile_type: str
) -> None:
    async def scenario() -> None:
        async with AsyncClient(daemon.url) as client:
            await client.set(channel, "profiles", "tags", {"a", "b"})
            await client.set(channel, "profiles", "ann", Profile("Ann", 1))
            assert await client.get(channel, "profiles", "tags") == {"a", "b"}
            assert await client.get(channel, "profiles", "ann") == Profile("Ann", 1)
            document = await client.get_document(channel, "profiles", "ann")
            assert document["_moobius_type"] == profile_type

            await client.set_many(channel, "profiles", {"pair": (1, 2), "list": [1, 2]})
            got = await client.get_many(channel, "profiles", ["pair", "list", "tags"])
            assert got == {"pair": (1, 2), "list": [1, 2], "tags": {"a", "b"}}
            assert type(got["pair"]) is tuple
            assert type(got["list"]) is list

            empty_tuple = {"_moobius_type": "builtins.tuple", "_moobius_val": []}
            await client.set_document(channel, "profiles", "doc", empty_tuple)
            assert await client.get(channel, "profiles", "doc") == ()

    asyncio.run(scenario())
    assert daemon.get(channel, "profiles", "tags").json()["_moobius_type"] == "builtins.set"


# -- listing pages, through the daemon -------------------------------------------------


def test_listing_pages_through_the_daemon(daemon: DaemonProcess, channel: str) -> None:
    with Client(daemon.url) as client:
        client.set_many(channel, "stats", {key: number for number, key in
                                           enumerate(AWKWARD_KEYS)})  # fmt: skip
        ordered = sorted(AWKWARD_KEYS)

        # The daemon's side, as the client reads it: one page, and where the next starts.
        first = daemon.http.get(page_path(channel, "stats", 3))
        assert first.status_code == 200, first.text
        assert first.json() == {"keys": ordered[:3], "next": ordered[2]}
        following = daemon.http.get(page_path(channel, "stats", 3, ordered[2])).json()
        assert following == {"keys": ordered[3:6], "next": ordered[5]}
        last = daemon.http.get(page_path(channel, "stats", 100)).json()
        assert last == {"keys": ordered, "next": None}

        # One key per page: every awkward key is sent back as a cursor and read as itself.
        assert client.keys(channel, "stats", page_size=1) == ordered
        assert client.keys(channel, "stats") == ordered
        assert list(client.iter_keys(channel, "stats", page_size=7)) == ordered
        assert [len(page) for page in client.key_pages(channel, "stats", 7)] == [7, 7, 6]

        view = ContainerView(client, channel, "stats", page_size=4)
        assert list(view) == ordered
        assert len(view) == len(ordered)
        assert dict(view.items()) == {key: number for number, key in enumerate(AWKWARD_KEYS)}
        assert client.keys(channel, "profiles") == []
        assert len(client.channel(channel).profiles) == 0


def test_a_container_larger_than_a_page(daemon: DaemonProcess, channel: str) -> None:
    """2,500 keys: the default page (1,000) takes three requests, and every key comes once."""
    keys = [f"k{number:05d}" for number in range(2500)]
    with Client(daemon.url) as client:
        for start in range(0, len(keys), 250):  # the module's daemon takes 4 KiB bodies
            client.set_many(channel, "profiles", dict.fromkeys(keys[start : start + 250], 0))
        pages = list(client.key_pages(channel, "profiles"))
        assert [len(page) for page in pages] == [1000, 1000, 500]
        assert client.keys(channel, "profiles") == keys
        assert len(client.channel(channel).profiles) == 2500
        assert daemon.http.get(key_path(channel, "profiles")).json() == {
            "keys": keys[:1000], "next": keys[999]
        }  # fmt: skip


def test_async_client_pages(daemon: DaemonProcess, channel: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(daemon.url) as client:
            await client.set_many(channel, "stats", dict.fromkeys(AWKWARD_KEYS, 1))
            ordered = sorted(AWKWARD_KEYS)
            assert await client.keys(channel, "stats", page_size=1) == ordered
            assert await client.keys(channel, "stats") == ordered
            assert [key async for key in client.iter_keys(channel, "stats", 3)] == ordered
            sizes = [len(page) async for page in client.key_pages(channel, "stats", 8)]
            assert sizes == [8, 8, 4]

    asyncio.run(scenario())


# -- the clients' side of the contracts, against a stand-in ----------------------------


class ContractDouble:
    """A stand-in daemon: a stdlib HTTP server in a thread that answers the contracts.

    It serves ``/v1/channels/{channel}/{container}[/{key}]`` and the bulk
    ``-/get`` and ``-/set`` the way DESIGN.md section 2 says the daemon does:
    listing pages in key order (``limit`` default 1,000, ``after`` exclusive,
    ``next`` the last key of a page that is not the last), and values stored as
    the JSON documents they were sent as. ``targets`` records each request's
    method and target exactly as it arrived.

    ``stuck`` makes it ignore ``after`` (every page is the first), as a daemon
    that does not page would; ``hold_after`` makes listing requests after that
    many pages wait for :attr:`release` (``holding`` is set once one waits;
    ``hold_timed_out`` once one gave up waiting, after 20 seconds).
    """

    def __init__(self, keys: Any = ()) -> None:
        self.stored: dict[tuple[str, str], dict[str, bytes]] = {}
        self.targets: list[tuple[str, str]] = []
        self.stuck = False
        self.hold_after: int | None = None
        self.release = threading.Event()
        self.holding = threading.Event()
        self.hold_timed_out = False
        self.pages_served = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _DoubleHandler)
        self._server.daemon_threads = True
        self._server.double = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        for key in keys:
            self.put("c", "stats", key, b"1")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> ContractDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def put(self, channel: str, container: str, key: str, body: bytes) -> None:
        with self._lock:
            self.stored.setdefault((channel, container), {})[key] = body

    def document(self, channel: str, container: str, key: str) -> Any:
        """What a PUT stored, as JSON."""
        return json.loads(self.stored[(channel, container)][key])

    def listings(self) -> list[dict[str, list[str]]]:
        """The query of every listing request, percent-decoded."""
        return [parse_qs(target.partition("?")[2]) for method, target in self.targets
                if method == "GET" and "?" in target]  # fmt: skip

    def answer(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        with self._lock:
            self.targets.append((method, target))
        path, _, query = target.partition("?")
        parts = [unquote(part, errors="strict") for part in path.split("/")[1:]]
        if len(parts) < 4 or parts[:2] != ["v1", "channels"]:
            return 404, b'{"error": "no such route", "code": "no_route"}'
        channel, container, rest = parts[2], parts[3], parts[4:]
        with self._lock:
            values = self.stored.setdefault((channel, container), {})
        if not rest and method == "GET":
            return 200, self._page(values, query)
        if len(rest) == 2 and rest[0] == "-" and method == "POST":
            request = json.loads(body)
            if rest[1] == "get":
                found = {key: json.loads(values[key]) for key in request["keys"] if key in values}
                missing = [key for key in request["keys"] if key not in values]
                return 200, json.dumps({"values": found, "missing": missing}).encode()
            for key, document in request["values"].items():
                self.put(channel, container, key, json.dumps(document).encode())
            return 200, json.dumps({"stored": list(request["values"])}).encode()
        key = rest[0]
        if method == "PUT":
            json.loads(body)  # a body that is not JSON is a test failure (a 500 here)
            self.put(channel, container, key, body)
            return 200, b'{"ok": true}'
        if key not in values:
            return 404, b'{"error": "no such key", "code": "not_found"}'
        return 200, values[key]

    def _page(self, values: dict[str, bytes], query: str) -> bytes:
        params = parse_qs(query, strict_parsing=bool(query), errors="strict")
        limit = int(params.get("limit", ["1000"])[0])
        after = None if self.stuck else params.get("after", [None])[0]
        with self._lock:
            keys = sorted(values)
            self.pages_served += 1
            served = self.pages_served
        if self.hold_after is not None and served > self.hold_after:
            self.holding.set()
            if not self.release.wait(timeout=20):
                self.hold_timed_out = True
        start = 0 if after is None else bisect.bisect_right(keys, after)
        page = keys[start : start + limit]
        following = page[-1] if start + limit < len(keys) else None
        return json.dumps({"keys": page, "next": following}).encode()


class _DoubleHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        double: ContractDouble = self.server.double  # type: ignore[attr-defined]
        status, answer = double.answer(self.command, self.path, body)
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_PUT = do_POST = do_DELETE = _serve  # noqa: N815 - http.server's names

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def double() -> Iterator[ContractDouble]:
    """A started :class:`ContractDouble` holding :data:`AWKWARD_KEYS` in ``c``/``stats``."""
    with ContractDouble(AWKWARD_KEYS) as stand_in:
        yield stand_in


def test_keys_follow_next_through_every_page(double: ContractDouble) -> None:
    ordered = sorted(AWKWARD_KEYS)
    with Client(double.url) as client:
        assert client.keys("c", "stats", page_size=3) == ordered
    listings = double.listings()
    assert len(listings) == 7  # 20 keys, 3 a page
    assert listings[0] == {"limit": ["3"]}
    # Each cursor is the last key of the page before, and arrives as itself.
    assert [query["after"] for query in listings[1:]] == [[key] for key in ordered[2:20:3]]
    for method, target in double.targets:
        assert method == "GET"
        query = target.partition("?")[2]
        assert query.startswith("limit=3")
        after = query.partition("&after=")[2]
        # Whole-encoded: no '&', '=', '+', '/', '?', '#' or non-ASCII left raw.
        assert all(char.isalnum() or char in "%-._~" for char in after), target


def test_keys_and_iter_keys_with_the_default_page_size() -> None:
    keys = [f"k{number:04d}" for number in range(2500)]
    with ContractDouble(keys) as double, Client(double.url) as client:
        assert client.keys("c", "stats") == keys
        assert [query["limit"] for query in double.listings()] == [["1000"]] * 3
        assert len(client.channel("c").stats) == 2500
        assert list(client.channel("c")["stats"]) == keys


def test_iter_keys_asks_for_a_page_only_when_it_is_needed(double: ContractDouble) -> None:
    ordered = sorted(AWKWARD_KEYS)
    with Client(double.url) as client:
        keys = client.iter_keys("c", "stats", page_size=5)
        assert double.targets == []  # nothing is asked before the first key is wanted
        assert [next(keys) for _ in range(5)] == ordered[:5]
        assert len(double.targets) == 1
        assert next(keys) == ordered[5]
        assert len(double.targets) == 2
        assert list(keys) == ordered[6:]
        assert len(double.targets) == 4

        view = ContainerView(client, "c", "stats", page_size=6)
        assert len(view) == 20
        assert len(double.targets) == 4 + 4
        assert list(iter(view)) == ordered  # list(view) would ask len(view) first
        assert len(double.targets) == 4 + 4 + 4


def test_a_listing_that_does_not_advance_is_an_error(double: ContractDouble) -> None:
    double.stuck = True  # every answer is the first page, whatever ``after`` says
    with Client(double.url) as client, pytest.raises(ClientError, match="did not advance"):
        client.keys("c", "stats", page_size=4)
    assert len(double.targets) == 2


def test_page_size_is_checked_when_asked(double: ContractDouble) -> None:
    async_client = AsyncClient(double.url)
    with Client(double.url) as client:
        for wrong in (0, -1, 10_001):
            with pytest.raises(ValueError, match="page_size"):
                client.iter_keys("c", "stats", page_size=wrong)
            with pytest.raises(ValueError, match="page_size"):
                async_client.iter_keys("c", "stats", page_size=wrong)
        with pytest.raises(TypeError, match="page_size"):
            client.key_pages("c", "stats", page_size=2.5)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="page_size"):
            ContainerView(client, "c", "stats", page_size=0)
        assert client.keys("c", "stats", page_size=10_000) == sorted(AWKWARD_KEYS)
    asyncio.run(async_client.aclose())
    assert double.listings() == [{"limit": ["10000"]}]


def test_async_keys_follow_next(double: ContractDouble) -> None:
    ordered = sorted(AWKWARD_KEYS)

    async def scenario() -> None:
        async with AsyncClient(double.url) as client:
            assert await client.keys("c", "stats", page_size=6) == ordered
            assert len(double.listings()) == 4
            keys = client.iter_keys("c", "stats", page_size=6)
            assert [await anext(keys) for _ in range(6)] == ordered[:6]
            assert len(double.listings()) == 5
            assert [key async for key in keys] == ordered[6:]
            assert len(double.listings()) == 8
            double.stuck = True
            with pytest.raises(ClientError, match="did not advance"):
                await client.keys("c", "stats", page_size=6)

    asyncio.run(scenario())
    assert [query.get("after") for query in double.listings()[:4]] == [
        None, [ordered[5]], [ordered[11]], [ordered[17]]
    ]  # fmt: skip


def test_values_are_sent_in_their_stored_form_and_revived(
    double: ContractDouble, profile_type: str
) -> None:
    with Client(double.url) as client:
        stats = client.channel("c").stats
        stats["tags"] = {"a"}
        assert double.document("c", "stats", "tags") == {
            "_moobius_type": "builtins.set", "_moobius_val": ["a"]
        }  # fmt: skip
        assert stats["tags"] == {"a"}
        stats["profile"] = Profile("Ann", 2, ("Dame",))
        assert double.document("c", "stats", "profile")["_moobius_type"] == profile_type
        assert stats["profile"] == Profile("Ann", 2, ("Dame",))
        stats["shaped"] = {"_moobius_type": "builtins.set", "_moobius_val": []}
        assert double.document("c", "stats", "shaped")["_moobius_type"] == "builtins.dict"
        assert stats["shaped"] == {"_moobius_type": "builtins.set", "_moobius_val": []}
        assert client.get_document("c", "stats", "tags") == double.document("c", "stats", "tags")

        client.set_many("c", "stats", {"pair": (1, 2), "_moobius_type": "builtins.tuple",
                                       "_moobius_val": [1]})  # fmt: skip
        assert double.document("c", "stats", "pair") == {
            "_moobius_type": "builtins.tuple", "_moobius_val": [1, 2]
        }  # fmt: skip
        assert client.get_many("c", "stats", ["pair", "tags", "nope"]) == {
            "pair": (1, 2), "tags": {"a"}
        }  # fmt: skip
        # Keys named like the two halves of a type mark: the answer's "values" is not a mark.
        assert client.get_many("c", "stats", ["_moobius_type", "_moobius_val", "pair"]) == {
            "_moobius_type": "builtins.tuple", "_moobius_val": [1], "pair": (1, 2)
        }  # fmt: skip

        # A document is sent as it is: its mark-shaped dicts are marks.
        document = {"_moobius_type": "builtins.tuple", "_moobius_val": [{"a": 1}]}
        client.set_document("c", "stats", "doc", document)
        assert double.document("c", "stats", "doc") == document
        stats["doc2"] = codec.Document(document)
        assert double.document("c", "stats", "doc2") == document
        assert stats["doc2"] == ({"a": 1},)

        # A value with no stored form is refused before anything is sent.
        sent = len(double.targets)
        with pytest.raises(UnstorableValue):
            stats["bad"] = object()
        with pytest.raises(UnstorableValue):
            client.set_many("c", "stats", {"bad": {1: "non-str key"}})
        with pytest.raises(UnstorableValue):
            client.set_document("c", "stats", "bad", [float("nan")])
        with pytest.raises(UnstorableValue):
            client.set_document("c", "stats", "bad", {"a": {1, 2}})
        with pytest.raises(UnstorableValue):
            client.set_many("c", "stats", {"bad": codec.Document(object())})
        assert len(double.targets) == sent


def test_async_values_are_sent_in_their_stored_form_and_revived(double: ContractDouble) -> None:
    async def scenario() -> None:
        async with AsyncClient(double.url) as client:
            await client.set("c", "stats", "pair", ("a", {"b"}))
            assert await client.get("c", "stats", "pair") == ("a", {"b"})
            await client.set_many("c", "stats", {"s": frozenset({1})})
            assert await client.get_many("c", "stats", ["s", "pair"]) == {
                "s": frozenset({1}), "pair": ("a", {"b"})
            }  # fmt: skip
            document = await client.get_document("c", "stats", "s")
            assert document == {"_moobius_type": "builtins.frozenset", "_moobius_val": [1]}

    asyncio.run(scenario())
    assert double.document("c", "stats", "pair") == {
        "_moobius_type": "builtins.tuple",
        "_moobius_val": ["a", {"_moobius_type": "builtins.set", "_moobius_val": ["b"]}],
    }


@pytest.mark.parametrize("client_class", [Client, AsyncClient])
@pytest.mark.parametrize("url", ["127.0.0.1:8470", "localhost", "ftp://127.0.0.1:8470", "http://"])
def test_a_url_that_is_not_the_daemons_address_is_refused_when_the_client_is_made(
    client_class: type, url: str
) -> None:
    """A bare HOST:PORT (what --listen takes) is not a URL: the client says so when it is
    made, rather than "no chanstore daemon answers" at its first call."""
    with pytest.raises(ValueError, match="must be its http:// or https:// address") as refused:
        client_class(url)
    assert repr(url) in str(refused.value)
