"""The HTTP API of a running daemon: CRUD, bulk calls, odd names, restarts, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from daemon_harness import (
    JSON_CONTAINERS,
    MODULE_MAX_BODY,
    DaemonProcess,
    json_entry,
    key_path,
    segment,
)

from chanstore.versions import etag_of

ODD_NAMES = [
    "a/b",
    ".",
    "..",
    "../../escape",
    "%",
    "100%25",
    "%2F",
    "with space",
    " lead and trail ",
    "Ünïcødé ✓ 频道",
    "a.b.c",
    "~user",
    "q?x=1#frag",
    "back\\slash",
    "line\nbreak\ttab\x7f",
    "🎲 \u202eright-to-left",
    "e\u0301",  # é, decomposed: another key than the composed "é"
    "é",
    "CON",
    ".hidden",
    "name.json",
    "-",
]


def test_put_get_delete_and_list_keys(daemon: DaemonProcess, channel: str) -> None:
    url = key_path(channel, "stats", "HP")
    assert daemon.http.get(url).status_code == 404

    assert daemon.http.put(url, json=5).status_code == 200
    assert daemon.http.get(url).json() == 5
    assert daemon.http.put(url, json={"now": [1, 2.5, "x", None, True]}).status_code == 200
    assert daemon.http.get(url).json() == {"now": [1, 2.5, "x", None, True]}
    assert daemon.put(channel, "stats", "MP", 7).status_code == 200
    assert sorted(daemon.keys(channel, "stats")) == ["HP", "MP"]
    # Containers of one channel, and channels, do not share keys.
    assert daemon.keys(channel, "profiles") == []
    assert daemon.keys(channel + "-other", "stats") == []

    deleted = daemon.http.delete(url)
    assert deleted.status_code == 200
    absent = daemon.http.get(url)
    assert absent.status_code == 404
    assert absent.json()["code"] == "not_found"
    assert daemon.http.delete(url).status_code == 404
    assert daemon.keys(channel, "stats") == ["MP"]


def test_bulk_set_get_and_delete(daemon: DaemonProcess, channel: str) -> None:
    base = key_path(channel, "stats")
    values = {"HP": 10, "MP": [1, 2], "name": "Ann", "odd/key": {"deep": {"x": None}}}

    stored = daemon.http.post(base + "/-/set", json={"values": values})
    assert stored.status_code == 200
    assert sorted(stored.json()["stored"]) == sorted(values)
    assert sorted(daemon.keys(channel, "stats")) == sorted(values)
    assert daemon.get(channel, "stats", "odd/key").json() == {"deep": {"x": None}}

    got = daemon.http.post(base + "/-/get", json={"keys": ["HP", "odd/key", "absent"]})
    assert got.status_code == 200
    assert got.json() == {
        "values": {"HP": 10, "odd/key": {"deep": {"x": None}}},
        "missing": ["absent"],
        "etags": {"HP": etag_of(10), "odd/key": etag_of({"deep": {"x": None}})},
    }

    gone = daemon.http.post(base + "/-/delete", json={"keys": ["HP", "name", "absent"]})
    assert gone.status_code == 200
    assert sorted(gone.json()["deleted"]) == ["HP", "name"]
    assert gone.json()["missing"] == ["absent"]
    assert sorted(daemon.keys(channel, "stats")) == ["MP", "odd/key"]
    assert daemon.get(channel, "stats", "HP").status_code == 404


def test_odd_keys_and_channel_ids_round_trip_percent_encoded(
    daemon: DaemonProcess, channel: str
) -> None:
    for index, odd in enumerate(ODD_NAMES):
        odd_channel = odd if odd in (".", "..") else f"{odd}{channel}"
        for key in (odd, f"{odd}-{index}"):
            response = daemon.put(odd_channel, "stats", key, {"key": key, "channel": odd_channel})
            assert response.status_code == 200, (odd_channel, key, response.text)
            got = daemon.get(odd_channel, "stats", key)
            assert got.status_code == 200, (odd_channel, key, got.text)
            assert got.json() == {"key": key, "channel": odd_channel}
        assert {odd, f"{odd}-{index}"} <= set(daemon.keys(odd_channel, "stats"))

    # Unicode is not normalized: composed and decomposed "é" are two keys.
    assert daemon.put(channel, "profiles", "é", "composed").status_code == 200
    assert daemon.put(channel, "profiles", "e\u0301", "decomposed").status_code == 200
    assert daemon.get(channel, "profiles", "é").json() == "composed"
    assert daemon.get(channel, "profiles", "e\u0301").json() == "decomposed"
    assert sorted(daemon.keys(channel, "profiles")) == sorted(["é", "e\u0301"])

    # A key of exactly 1024 bytes of UTF-8, and a channel id of exactly 256, are fine.
    long_key = "é" * 512
    long_channel = channel + "x" * (256 - len(channel))
    assert daemon.put(long_channel, "stats", long_key, 1).status_code == 200
    assert daemon.get(long_channel, "stats", long_key).json() == 1
    assert daemon.keys(long_channel, "stats") == [long_key]


def test_no_file_is_written_outside_the_data_root(daemon: DaemonProcess, channel: str) -> None:
    # The last climbs out of any folder to /tmp, under a name that says who wrote it.
    escapes = ["..", "../..", "../../../tmp", "/etc/passwd", "./..", "..\\..", "%2e%2e",
               "../" * 20 + f"tmp/{channel}"]  # fmt: skip
    for name in escapes:
        assert daemon.put(name, "stats", f"{channel}-{name}", 1).status_code == 200
        assert daemon.put(channel, "stats", name, 1).status_code == 200
        # Raw (not percent-encoded) dot segments are the client's business: httpx drops them,
        # and whatever path is left must still land inside the data root.
        raw = daemon.http.put(f"/v1/channels/{channel}/stats/{name}", json=1)
        assert raw.status_code in (200, 400, 404), raw.text

    data_root = daemon.data_dir.resolve()
    outside = [
        name
        for name in daemon.files()
        if name not in ("db.json", "daemon.log")
        and not (daemon.workdir / name).resolve().is_relative_to(data_root)
    ]
    assert outside == []
    assert list(Path("/tmp").glob(f"{channel}*")) == []
    assert list(daemon.workdir.parent.glob(f"{channel}*")) == []
    # Every file is a value in the json layout: data/service_e2e/<channel>/<container>/<key>.json,
    # or the name file of a channel folder named by its hash (an id too long for a file name).
    for name in daemon.data_files():
        parts = Path(name).parts
        if parts[-1] == "%name.txt":
            assert parts[:2] == ("data", "service_e2e") and parts[2].startswith("%H"), name
            assert len(parts) == 4, name
            continue
        assert len(parts) == 5, name
        assert parts[:2] == ("data", "service_e2e"), name
        assert parts[3] in ("stats", "profiles"), name
        assert parts[4].endswith(".json"), name
    assert (daemon.data_dir / "service_e2e" / f"channel_{channel}" / "stats").is_dir()
    assert set(escapes) <= set(daemon.keys(channel, "stats"))


def test_data_survives_a_restart(start_daemon, channel: str) -> None:
    # "lazy" is read key by key (load: false) rather than whole on first use.
    daemon = start_daemon([*JSON_CONTAINERS, json_entry("lazy", load=False)])
    client = daemon.client()
    client.set(channel, "stats", "HP", 42)
    profiles = {"name": "Ann", "a/b": [1, 2], "..": "dots", "long" * 256: "1024 bytes"}
    profiles.update({odd: index for index, odd in enumerate(ODD_NAMES) if odd not in profiles})
    client.set_many(channel, "profiles", profiles)
    client.set(channel, "stats", "gone", 1)
    client.delete(channel, "stats", "gone")
    client.set_many(channel, "lazy", {"x": 1, "y": {"z": [None]}})
    client.delete(channel, "lazy", "x")
    odd_channel = f"../{channel}/ü %2F."
    client.set(odd_channel, "stats", "..", "odd channel")
    client.set(odd_channel, "lazy", ".", "odd channel, lazy")
    client.close()

    daemon.restart()

    with daemon.client() as client:
        assert client.get(channel, "stats", "HP") == 42
        # Every key comes back from the files, odd ones included, under its own name.
        assert sorted(client.keys(channel, "profiles")) == sorted(profiles)
        assert client.get_many(channel, "profiles", list(profiles)) == profiles
        assert client.keys(channel, "stats") == ["HP"]
        with pytest.raises(KeyError):
            client.get(channel, "stats", "gone")
        assert client.keys(channel, "lazy") == ["y"]
        assert client.get(channel, "lazy", "y") == {"z": [None]}
        with pytest.raises(KeyError):
            client.get(channel, "lazy", "x")
        assert client.keys(odd_channel, "stats") == [".."]
        assert client.get(odd_channel, "stats", "..") == "odd channel"
        assert client.get(odd_channel, "lazy", ".") == "odd channel, lazy"
    # With --log-format json every line is one JSON event, the libraries' lines included.
    lines = daemon.log_lines()
    assert len(daemon.events()) == len(lines) > 0
    assert all({"event", "level", "timestamp"} <= set(event) for event in daemon.events())
    assert daemon.lifecycle("serving", "stopped") == ["serving", "stopped", "serving"]
    # A clean stop and start log nothing an operator would take for trouble.
    assert [e for e in daemon.events() if e["level"] in ("warning", "error", "critical")] == []


def test_a_backend_that_cannot_be_opened_fails_only_its_container(
    start_daemon, channel: str
) -> None:
    # Its root_dir lies under a file: no folder can be made there.
    daemon = start_daemon([json_entry("stats"), json_entry("broken", root_dir="db.json/data")])

    ready = daemon.http.get("/readyz")
    assert ready.status_code == 503
    assert list(ready.json()["problems"]) == ["broken"]
    requests = [("PUT", "broken/HP"), ("GET", "broken/HP"), ("GET", "broken"),
                ("POST", "broken/-/get")]  # fmt: skip
    for method, path in requests:
        body = {"keys": ["HP"]} if method == "POST" else 1
        response = daemon.http.request(method, f"/v1/channels/{channel}/{path}", json=body)
        assert response.status_code == 503, (method, path, response.text)
        assert response.json()["code"] == "backend_unavailable"
        assert "Not a directory" in response.json()["error"]
    assert daemon.put(channel, "stats", "HP", 1).status_code == 200
    assert daemon.get(channel, "stats", "HP").json() == 1
    assert daemon.crashes() == []


# -- bad input ----------------------------------------------------------------

OVER_LIMIT = json.dumps("x" * (MODULE_MAX_BODY + 10))


def _chunks(data: bytes):
    # An iterator body is sent with chunked transfer encoding: no Content-Length to trust.
    for start in range(0, len(data), 1000):
        yield data[start : start + 1000]


OVERFLOW_VALUES = b'{"values": {"n": 9e999}}'
LONG_KEY_VALUES = json.dumps({"values": {"ok": 1, "k" * 1025: 2}}).encode()
MISSPELT_EXPECT = b'{"values": {"HP": 6}, "expct": {"HP": null}}'
DELETE_EXPECTING = b'{"keys": ["HP"], "expect": {"HP": "0000"}}'

BAD_REQUESTS = [
    # (id, method, path under the channel (None: absolute), body, status, code)
    ("invalid-json", "PUT", "stats/HP", b'{"a": ', 400, "bad_request"),
    ("trailing-garbage", "PUT", "stats/HP", b"5 6", 400, "bad_request"),
    ("nan", "PUT", "stats/HP", b"NaN", 400, "bad_request"),
    ("infinity-inside", "PUT", "stats/HP", b'{"x": -Infinity}', 400, "bad_request"),
    ("number-overflow", "PUT", "stats/HP", b"1e999", 400, "bad_request"),
    ("number-overflow-inside", "PUT", "stats/HP", b'{"x": [-1e400]}', 400, "bad_request"),
    ("number-overflow-bulk", "POST", "stats/-/set", OVERFLOW_VALUES, 400, "bad_request"),
    ("empty-body", "PUT", "stats/HP", b"", 400, "bad_request"),
    ("blank-body", "PUT", "stats/HP", b"  \n", 400, "bad_request"),
    ("not-utf8-body", "PUT", "stats/HP", b'"\xff"', 400, "bad_request"),
    ("too-large", "PUT", "stats/HP", OVER_LIMIT.encode(), 413, "body_too_large"),
    ("too-large-chunked", "PUT", "stats/HP", "chunked", 413, "body_too_large"),
    ("nested-deep", "PUT", "stats/HP", b"[" * 100 + b"]" * 100, 400, "bad_request"),
    ("nested-very-deep", "PUT", "stats/HP", b"[" * 2000 + b"]" * 2000, 400, "bad_request"),
    ("unknown-container-put", "PUT", "nosuch/HP", b"5", 404, "unknown_container"),
    ("unknown-container-get", "GET", "nosuch/HP", None, 404, "unknown_container"),
    ("unknown-container-delete", "DELETE", "nosuch/HP", None, 404, "unknown_container"),
    ("unknown-container-keys", "GET", "nosuch", None, 404, "unknown_container"),
    ("unknown-container-bulk", "POST", "nosuch/-/set", b'{"a": 1}', 404, "unknown_container"),
    ("key-too-long", "PUT", "stats/" + "k" * 1025, b"5", 400, "bad_request"),
    ("key-too-long-utf8", "PUT", "stats/" + segment("é" * 513), b"5", 400, "bad_request"),
    ("key-nul", "PUT", "stats/a%00b", b"5", 400, "bad_request"),
    ("key-empty", "PUT", "stats/", b"5", 400, "bad_request"),
    ("key-invalid-utf8", "PUT", "stats/%FF", b"5", 400, "bad_request"),
    ("key-invalid-utf8-get", "GET", "stats/ab%C3", None, 400, "bad_request"),
    ("channel-too-long", "PUT", None, b"5", 400, "bad_request"),
    ("channel-invalid-utf8", "PUT", "/v1/channels/%FF%FE/stats/HP", b"5", 400, "bad_request"),
    ("bulk-set-not-object", "POST", "stats/-/set", b"[1, 2]", 400, "bad_request"),
    ("bulk-set-values-list", "POST", "stats/-/set", b'{"values": [1]}', 400, "bad_request"),
    ("bulk-set-key-too-long", "POST", "stats/-/set", LONG_KEY_VALUES, 400, "bad_request"),
    ("bulk-set-empty-key", "POST", "stats/-/set", b'{"values": {"": 1}}', 400, "bad_request"),
    ("bulk-get-keys-string", "POST", "stats/-/get", b'{"keys": "HP"}', 400, "bad_request"),
    ("bulk-get-key-number", "POST", "stats/-/get", b'{"keys": [1]}', 400, "bad_request"),
    ("bulk-delete-no-keys", "POST", "stats/-/delete", b"{}", 400, "bad_request"),
    # A member or query parameter an operation does not take is refused, not ignored: each
    # of these, ignored, would have changed HP.
    ("bulk-set-misspelt-expect", "POST", "stats/-/set", MISSPELT_EXPECT, 400, "bad_request"),
    ("bulk-delete-with-expect", "POST", "stats/-/delete", DELETE_EXPECTING, 400, "bad_request"),
    ("put-unknown-query", "PUT", "stats/HP?if-match=*", b"6", 400, "bad_request"),
    ("delete-unknown-query", "DELETE", "stats/HP?version=1", None, 400, "bad_request"),
    ("keys-misspelt-after", "GET", "stats?afer=HP", None, 400, "bad_request"),
    ("events-misspelt-since", "GET", "-/events?sinse=x", None, 400, "bad_request"),
    ("bulk-invalid-json", "POST", "stats/-/delete", b'{"keys": [', 400, "bad_request"),
    ("bulk-unknown-operation", "POST", "stats/-/rename", b"{}", 404, "no_route"),
    ("unknown-route", "GET", "/v2/channels/x/stats/HP", None, 404, "no_route"),
    ("unknown-route-short", "GET", "/v1/channels", None, 404, "no_route"),
    ("unknown-route-deep", "GET", "stats/HP/extra/parts", None, 404, "no_route"),
    ("unknown-route-root", "GET", "/", None, 404, "no_route"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_gets_a_json_error_and_changes_nothing(
    daemon: DaemonProcess, channel: str, method: str, path: str | None, body, status: int,
    code: str,
) -> None:  # fmt: skip
    daemon.put(channel, "stats", "HP", 5)
    daemon.put(channel, "stats", "a", {"b": 1})
    before = daemon.data_files()

    if path is None:  # an over-long channel id
        url = key_path("c" * 257, "stats", "HP")
    elif path.startswith("/"):
        url = path
    else:
        url = f"/v1/channels/{segment(channel)}/{path}"
    content = _chunks(OVER_LIMIT.encode()) if body == "chunked" else body
    response = daemon.http.request(method, url, content=content)

    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()
    assert error["code"] == code
    assert isinstance(error["error"], str)
    assert error["error"]
    assert daemon.data_files() == before
    assert daemon.get(channel, "stats", "HP").json() == 5
    assert sorted(daemon.keys(channel, "stats")) == ["HP", "a"]
    # A client's mistake is no trouble of the daemon's.
    assert daemon.http.get("/readyz").status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PATCH", "stats/HP", "GET, PUT, DELETE, HEAD"),
        ("POST", "stats/HP", "GET, PUT, DELETE, HEAD"),
        ("PUT", "stats", "GET, HEAD"),
        ("GET", "stats/-/set", "POST"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("PUT", "/metrics", "GET, HEAD"),
        ("GET", "/-/reload", "POST"),
    ],
)
def test_wrong_method_gets_405_with_allow(
    daemon: DaemonProcess, channel: str, method: str, path: str, allowed: str
) -> None:
    daemon.put(channel, "stats", "HP", 5)
    before = daemon.data_files()
    url = path if path.startswith("/") else f"/v1/channels/{channel}/{path}"

    response = daemon.http.request(method, url, content=b"1")

    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
    assert response.headers["allow"] == allowed
    assert daemon.data_files() == before
    assert daemon.get(channel, "stats", "HP").json() == 5


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "stats/HP", "stats"])
def test_head_answers_like_get_without_a_body(
    daemon: DaemonProcess, channel: str, path: str
) -> None:
    daemon.put(channel, "stats", "HP", {"hp": 5})
    url = path if path.startswith("/") else f"/v1/channels/{channel}/{path}"
    head = daemon.http.head(url)
    get = daemon.http.get(url)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/metrics":  # the metrics page changes between two requests
        assert head.headers["content-length"] == str(len(get.content))


def test_health_and_readiness(daemon: DaemonProcess) -> None:
    health = daemon.http.get("/healthz")
    assert health.status_code == 200
    assert health.json()["pid"] == daemon.process.pid
    ready = daemon.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    assert daemon.containers() == ["stats", "profiles"]


def test_request_id_is_echoed_or_made(daemon: DaemonProcess, channel: str) -> None:
    given = daemon.http.get(key_path(channel, "stats", "HP"), headers={"x-request-id": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = daemon.http.get(key_path(channel, "stats", "HP"), headers={"x-request-id": "bad id!"})
    assert made.headers["x-request-id"] not in ("", "bad id!")
