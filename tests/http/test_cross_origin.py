"""What a page may have a browser ask of the daemon; programs are served as before.

The rules (chanstore.http.cross_origin) are checked on their own first, then
on the wire against a real daemon with no token, the default a page could
reach: every write route, with the headers browsers send, from another site
(403 ``cross_origin``, nothing changed, counted) and from the daemon's own
origin or no browser at all (served); a page that reached the daemon by a
name, as DNS rebinding makes one (403 ``browser_by_name``, reads too), and
by an address (served). The browsers' header sets are the ones Chromium
sends for a page's ``fetch``, and an older browser's, without Sec-Fetch-*,
for a form post.
"""

from __future__ import annotations

import pytest
from daemon_harness import DaemonProcess, key_path
from door_support import TIMEOUT, Wire, assert_error, count, request, wait_for_count

from chanstore.http import cross_origin

REQUESTS = "chanstore_http_requests_total"
#: The Host a page by address names (the rules do not look at the port).
HOST = "127.0.0.1:8470"

# -- the rules -------------------------------------------------------------------------

REFUSED = [
    pytest.param("POST", [(b"sec-fetch-site", b"cross-site")], id="cross-site"),
    pytest.param("PUT", [(b"sec-fetch-site", b"same-site")], id="same-site"),
    pytest.param("DELETE", [(b"sec-fetch-site", b"Cross-Site")], id="any-case"),
    pytest.param(
        "POST",
        [(b"sec-fetch-site", b"none"), (b"sec-fetch-site", b"cross-site")],
        id="one-of-two-cross-site",
    ),
    pytest.param(
        "POST",
        [(b"sec-fetch-site", b"cross-site"), (b"origin", b"http://127.0.0.1:8470")],
        id="site-decides-over-a-matching-origin",
    ),
    pytest.param("POST", [(b"origin", b"http://evil.example")], id="old-browser-other-host"),
    pytest.param("POST", [(b"origin", b"http://127.0.0.1:8080")], id="old-browser-other-port"),
    pytest.param("POST", [(b"origin", b"null")], id="old-browser-opaque-origin"),
    pytest.param("POST", [(b"origin", b"127.0.0.1:8470")], id="origin-without-scheme"),
    pytest.param("PATCH", [(b"sec-fetch-site", b"cross-site")], id="any-unsafe-method"),
]
PASSED = [
    pytest.param("POST", [], id="a-program"),
    pytest.param("POST", [(b"content-length", b"2")], id="other-headers-only"),
    pytest.param("POST", [(b"sec-fetch-site", b"same-origin")], id="same-origin"),
    pytest.param("PUT", [(b"sec-fetch-site", b"none")], id="typed-by-the-user"),
    pytest.param("POST", [(b"origin", b"http://127.0.0.1:8470")], id="old-browser-same-host"),
    pytest.param("GET", [(b"sec-fetch-site", b"cross-site")], id="get-changes-nothing"),
    pytest.param("HEAD", [(b"origin", b"http://evil.example")], id="head-changes-nothing"),
    pytest.param("OPTIONS", [(b"sec-fetch-site", b"cross-site")], id="options"),
]


#: (Host, the browser's headers) of requests a page sent by a name: refused, reads too.
BY_NAME = [
    pytest.param(b"evil.example:8470", [(b"sec-fetch-site", b"same-origin")], id="rebound"),
    pytest.param(b"evil.example", [(b"sec-fetch-site", b"cross-site")], id="no-port"),
    pytest.param(
        b"chanstore.internal:8470",
        [(b"origin", b"http://chanstore.internal:8470")],
        id="old-browser",
    ),
    pytest.param(
        b"localhost.evil.example", [(b"sec-fetch-site", b"same-origin")], id="localhost-as-a-prefix"
    ),
    pytest.param(
        b"127.0.0.1.evil.example",
        [(b"sec-fetch-site", b"same-origin")],
        id="an-address-as-a-prefix",
    ),
    pytest.param(
        b"[evil.example]:8470", [(b"sec-fetch-site", b"same-origin")], id="brackets-around-a-name"
    ),
    pytest.param(b"", [(b"sec-fetch-site", b"same-origin")], id="empty"),
]
#: (Host, the browser's headers) of requests by an address, as localhost, or typed.
BY_ADDRESS = [
    pytest.param(b"127.0.0.1:8470", [(b"sec-fetch-site", b"same-origin")], id="ipv4"),
    pytest.param(b"10.1.2.3", [(b"sec-fetch-site", b"same-origin")], id="any-ipv4"),
    pytest.param(b"[::1]:8470", [(b"sec-fetch-site", b"same-origin")], id="ipv6"),
    pytest.param(b"localhost:8470", [(b"origin", b"http://localhost:8470")], id="localhost"),
    pytest.param(b"LocalHost:8470", [(b"origin", b"http://localhost:8470")], id="host-in-any-case"),
    pytest.param(
        b"Chat.LocalHost:8470", [(b"sec-fetch-site", b"same-origin")], id="under-localhost"
    ),
    pytest.param(b"chanstore.internal:8470", [(b"sec-fetch-site", b"none")], id="typed"),
    pytest.param(
        b"chanstore.internal:8470", [(b"user-agent", b"curl/7.88.1")], id="a-program-by-name"
    ),
]


@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize(("host", "headers"), BY_NAME)
def test_the_rules_refuse_a_page_that_reached_the_daemon_by_a_name(
    method: str, host: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    error = cross_origin.refusal(method, headers, host)
    assert error is not None
    assert (error.status, error.code) == (403, "browser_by_name")
    assert repr(host.decode()) in error.message and "DNS rebinding" in error.message


@pytest.mark.parametrize("method", ["GET", "PUT"])
@pytest.mark.parametrize(("host", "headers"), BY_ADDRESS)
def test_the_rules_pass_a_page_by_address_and_whatever_the_user_typed(
    method: str, host: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    assert cross_origin.refusal(method, headers, host) is None


@pytest.mark.parametrize(("method", "headers"), REFUSED)
def test_the_rules_refuse_a_write_from_another_origin(
    method: str, headers: list[tuple[bytes, bytes]]
) -> None:
    error = cross_origin.refusal(method, headers, HOST.encode())
    assert error is not None
    assert (error.status, error.code) == (403, "cross_origin")
    assert method in error.message and ("Sec-Fetch-Site" in error.message
                                        or "Origin" in error.message)  # fmt: skip


@pytest.mark.parametrize(("method", "headers"), PASSED)
def test_the_rules_pass_programs_own_pages_and_reads(
    method: str, headers: list[tuple[bytes, bytes]]
) -> None:
    assert cross_origin.refusal(method, headers, HOST.encode()) is None


# -- on the wire -----------------------------------------------------------------------

#: What Chromium sends with a page's ``fetch(url, {method: "POST", mode: "no-cors",
#: body: text})``, the write a page may send anywhere without asking first.
CHROMIUM_FETCH = (
    "Origin: http://evil.example",
    "Content-Type: text/plain;charset=UTF-8",
    "Sec-Fetch-Site: cross-site",
    "Sec-Fetch-Mode: no-cors",
    "Sec-Fetch-Dest: empty",
    "Referer: http://evil.example/",
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0.0.0 Safari/537.36",
)
#: What a browser older than Sec-Fetch-* sends with a page's form post.
OLD_BROWSER_FORM = (
    "Origin: http://evil.example",
    "Content-Type: text/plain",
    "Referer: http://evil.example/form.html",
)
#: What Chromium sends with a same-origin ``fetch(url)`` of a page, as a page that DNS
#: rebinding put on the daemon's origin sends it.
CHROMIUM_SAME_ORIGIN = (
    "Sec-Fetch-Site: same-origin",
    "Sec-Fetch-Mode: cors",
    "Sec-Fetch-Dest: empty",
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0.0.0 Safari/537.36",
)
#: The Host of every request on the wire that a page sends (by address, as pages must).
ADDRESS = "127.0.0.1:8470"
#: A page of the daemon's own origin, in a current browser and in an older one; a program.
OWN_ORIGIN = [
    pytest.param((*CHROMIUM_SAME_ORIGIN, f"Origin: http://{ADDRESS}"), id="same-origin"),
    pytest.param((f"Origin: http://{ADDRESS}",), id="old-browser-same-origin"),
    pytest.param((), id="a-program"),
]


def sent(method: str, path: str, body: bytes = b"", headers: tuple[str, ...] = (),
         host: str = ADDRESS) -> bytes:  # fmt: skip
    """A request's bytes, naming the daemon by ``host``."""
    return request(method, path, body, headers, host=host)


def writes(channel: str) -> list[tuple[str, str, bytes]]:
    """(method, path, body) of every write route, each writing into ``channel``'s ``stats``:
    ``kept`` holds 1 before each, so a write that landed shows."""
    base = key_path(channel, "stats")
    return [
        ("PUT", key_path(channel, "stats", "kept"), b'{"hp": 0}'),
        ("DELETE", key_path(channel, "stats", "kept"), b""),
        ("POST", base + "/-/set", b'{"values": {"kept": 2, "new": 3}}'),
        ("POST", base + "/-/delete", b'{"keys": ["kept"]}'),
    ]


def route_of(path: str, channel: str) -> str:
    """The route template a path of ``writes(channel)`` is counted under."""
    template = path.replace(key_path(channel, "stats"), "/v1/channels/{channel}/{container}")
    return template.replace("/kept", "/{key}")


def answer(daemon: DaemonProcess, data: bytes) -> tuple[int, str | None]:
    """The status and error code of ``data``'s answer; a 403 must be a JSON error naming
    what it was given, with no CORS header, and close the connection."""
    with Wire(daemon.port) as wire:
        wire.send(data)
        response = wire.read_response()
        if response.status == 403:
            message = assert_error(response, 403)["error"]
            assert "evil.example" in message or "cross-site" in message, message
            assert not any(name.startswith("access-control-") for name in response.headers)
            assert wire.closed_within(TIMEOUT), "the connection stayed open after the 403"
        return response.status, response.code


@pytest.mark.parametrize("browser", [CHROMIUM_FETCH, OLD_BROWSER_FORM], ids=["current", "old"])
def test_a_page_of_another_site_cannot_write(
    daemon: DaemonProcess, channel: str, browser: tuple[str, ...]
) -> None:
    """A page on another site has the browser send each write route: each is a 403
    ``cross_origin`` counted under its route, and nothing in the channel changes."""
    assert daemon.put(channel, "stats", "kept", 1).status_code == 200
    for method, path, body in writes(channel):
        labels = {"method": method, "route": route_of(path, channel), "status": "403"}
        before = count(daemon, REQUESTS, **labels)
        assert answer(daemon, sent(method, path, body, browser)) == (403, "cross_origin")
        wait_for_count(daemon, REQUESTS, before + 1, **labels)
        assert daemon.get(channel, "stats", "kept").json() == 1, (method, path)
    assert sorted(daemon.keys(channel, "stats")) == ["kept"]


def test_a_page_of_another_site_cannot_reload(daemon: DaemonProcess) -> None:
    labels = {"method": "POST", "route": "/-/reload", "status": "200"}
    reloads = count(daemon, REQUESTS, **labels)
    refused = sent("POST", "/-/reload", headers=CHROMIUM_FETCH)
    assert answer(daemon, refused) == (403, "cross_origin")
    assert answer(daemon, request("POST", "/-/reload")) == (200, None)
    wait_for_count(daemon, REQUESTS, reloads + 1, **labels)
    assert count(daemon, REQUESTS, **labels) == reloads + 1


@pytest.mark.parametrize("headers", OWN_ORIGIN)
def test_programs_and_pages_of_its_own_origin_write_as_before(
    daemon: DaemonProcess, channel: str, headers: tuple[str, ...]
) -> None:
    for method, path, body in writes(channel):
        assert daemon.put(channel, "stats", "kept", 1).status_code == 200
        assert answer(daemon, sent(method, path, body, headers))[0] == 200, (method, path)
    assert daemon.get(channel, "stats", "kept").status_code == 404  # the last write deleted it
    assert daemon.get(channel, "stats", "new").json() == 3


def test_reads_from_another_site_are_answered_without_cors_headers(
    daemon: DaemonProcess, channel: str
) -> None:
    """A read changes nothing and passes; its answer carries no CORS header, so the page
    that asked cannot read it."""
    assert daemon.put(channel, "stats", "kept", 1).status_code == 200
    read = sent("GET", key_path(channel, "stats", "kept"), headers=CHROMIUM_FETCH)
    with Wire(daemon.port) as wire:
        wire.send(read)
        response = wire.read_response()
    assert (response.status, response.body) == (200, b"1"), response.describe()
    assert not any(name.startswith("access-control-") for name in response.headers)


def test_a_refused_write_in_a_pipeline_answers_in_order_and_nothing_after_it_runs(
    daemon: DaemonProcess, channel: str
) -> None:
    """A client pipelines a write, a write from another site, and a write after it: the
    first is stored and answered, the second refused in its turn, and the connection
    closes without running the third."""
    path = key_path(channel, "stats", "kept")
    with Wire(daemon.port) as wire:
        wire.send(request("PUT", path, b"1")
                  + sent("PUT", path, b"2", CHROMIUM_FETCH)
                  + request("PUT", path, b"3"))  # fmt: skip
        assert wire.read_response().status == 200
        assert_error(wire.read_response(), 403, "cross_origin")
        assert wire.closed_within(TIMEOUT), "the connection stayed open after the 403"
    assert daemon.get(channel, "stats", "kept").json() == 1


def test_a_page_that_reached_the_daemon_by_a_name_can_neither_read_nor_write(
    daemon: DaemonProcess, channel: str
) -> None:
    """A site points its name at 127.0.0.1 after its page loaded: the page's requests are
    same-origin to its browser, and each is a 403 ``browser_by_name``; the same page by
    address, and a program by any name, are served."""
    assert daemon.put(channel, "stats", "kept", 1).status_code == 200
    rebound = f"evil.example:{daemon.port}"
    key = key_path(channel, "stats", "kept")
    page = (*CHROMIUM_SAME_ORIGIN, f"Origin: http://{rebound}")
    for method, path, body in [("GET", key, b""), ("GET", "/metrics", b""),
                               ("GET", key_path(channel, "-", "events"), b""),
                               *writes(channel)]:  # fmt: skip
        refused = sent(method, path, body, page if method != "GET" else CHROMIUM_SAME_ORIGIN,
                       host=rebound)  # fmt: skip
        assert answer(daemon, refused) == (403, "browser_by_name"), (method, path)
    assert daemon.get(channel, "stats", "kept").json() == 1
    by_address = sent("GET", key, headers=CHROMIUM_SAME_ORIGIN, host=f"127.0.0.1:{daemon.port}")
    assert answer(daemon, by_address) == (200, None)
    assert answer(daemon, sent("GET", key, host=rebound)) == (200, None)  # no browser: served
