"""The API's handlers and middleware, in-process: requests in, responses out, no sockets.

The API is built over a real engine (json containers in a temporary folder);
the operations routes get plain functions for readiness and reload.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from chanstore.config import load_db_config
from chanstore.engine import Engine, EngineSettings
from chanstore.engine.watchers import encode_cursor
from chanstore.http import BearerToken, build_api
from chanstore.http.api import Api
from chanstore.http.messages import Request, Response
from chanstore.metrics import Metrics
from chanstore.versions import etag_of

KEY_ROUTE = "/v1/channels/{channel}/{container}/{key}"


class Verdict:
    ok = True

    def as_dict(self) -> dict[str, Any]:
        return {"ok": True}


class Harness:
    """An API over a fresh engine; ``call`` answers one request."""

    def __init__(self, root: Path, metrics: Metrics, token: str | None = None,
                 more: Sequence[dict[str, Any]] = ()) -> None:  # fmt: skip
        entries = [{"implementation": "json", "name": "stats",
                    "settings": {"root_dir": str(root), "fsync": False}}, *more]  # fmt: skip
        self.engine = Engine(EngineSettings(), load_db_config(entries), metrics)
        self.api: Api = build_api(
            self.engine.store, self.engine.feed, BearerToken(token), metrics,
            readiness=self.engine.readiness.check, reload=self._reload,
            containers=lambda: [{"name": "stats"}],
        )  # fmt: skip
        self.answered_at_once = False
        self.last_request: Request | None = None

    async def _reload(self, source: str) -> Verdict:
        return Verdict()

    async def call(self, method: str, path: str, body: bytes = b"",
                   headers: list[tuple[bytes, bytes]] | None = None) -> Response:  # fmt: skip
        raw_path, _, query = path.encode().partition(b"?")
        request = Request(method, raw_path, query, headers or [], body)
        answered: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.api.handle(request, lambda _request, response: answered.set_result(response))
        self.answered_at_once = answered.done()
        self.last_request = request
        return await asyncio.wait_for(answered, 10)


def run(test: Callable[[Harness], Any], root: Path, metrics: Metrics, **options: Any) -> None:
    async def main() -> None:
        harness = Harness(root, metrics, **options)
        try:
            await test(harness)
        finally:
            await harness.engine.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def body_of(response: Response) -> Any:
    return json.loads(response.body)


def test_a_put_then_a_get_answered_from_memory_at_once(tmp_path: Path, metrics: Metrics) -> None:
    """The cached GET is answered while the request is handed in: no task, no await."""

    async def test(h: Harness) -> None:
        put = await h.call("PUT", "/v1/channels/c/stats/hp", b'{"hp": 5}')
        assert (put.status, body_of(put)) == (200, {"ok": True, "etag": etag_of({"hp": 5})})
        got = await h.call("GET", "/v1/channels/c/stats/hp")
        assert (got.status, got.body) == (200, b'{"hp":5}')
        assert h.answered_at_once
        head = await h.call("HEAD", "/v1/channels/c/stats/hp")
        assert (head.status, head.body) == (200, b'{"hp":5}')  # the connection drops the body

    run(test, tmp_path, metrics)
    metrics.fold()  # what /metrics does before each exposition
    for method in ("GET", "HEAD", "PUT"):
        labels = {"method": method, "route": KEY_ROUTE, "status": "200"}
        assert metrics.registry.get_sample_value("chanstore_http_requests_total", labels) == 1.0


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/v1/channels/c/stats/absent", b"", 404, "not_found"),
        ("GET", "/v1/channels/c/nope/k", b"", 404, "unknown_container"),
        ("GET", "/v1/channels/c/stats/" + "k" * 1100, b"", 400, "bad_request"),
        ("GET", "/v1/channels/" + "c" * 300 + "/stats/k", b"", 400, "bad_request"),
        ("PUT", "/v1/channels/c/stats/k", b"{not json", 400, "bad_request"),
        ("PUT", "/v1/channels/c/stats/k", b"NaN", 400, "bad_request"),
        ("PUT", "/v1/channels/c/stats/k", b"", 400, "bad_request"),
        ("POST", "/v1/channels/c/stats/k", b"1", 405, "method_not_allowed"),
        ("GET", "/v1/channels/c/stats?limit=0", b"", 400, "bad_request"),
        ("GET", "/v1/channels/c/stats?limit=10001", b"", 400, "bad_request"),
        ("GET", "/v1/channels/c/stats?limit=ten", b"", 400, "bad_request"),
        ("POST", "/v1/channels/c/stats/-/get", b"[]", 400, "bad_request"),
        ("POST", "/v1/channels/c/stats/-/nope", b"{}", 404, "no_route"),
        ("GET", "/v1/elsewhere", b"", 404, "no_route"),
        ("DELETE", "/v1/channels/c/stats/absent", b"", 404, "not_found"),
        ("GET", "/v1/channels/c/stats/%FF", b"", 400, "bad_request"),
    ],
)
def test_bad_requests_get_a_json_error_with_a_code(
    tmp_path: Path, metrics: Metrics, method: str, path: str, body: bytes, status: int, code: str
) -> None:
    async def test(h: Harness) -> None:
        response = await h.call(method, path, body)
        assert response.status == status, response.body
        error = body_of(response)
        assert error["code"] == code and error["error"]

    run(test, tmp_path, metrics)
    if method == "GET":
        assert not (tmp_path / "service_chanstore").exists(), "a read created folders"


@pytest.mark.parametrize(
    ("method", "path", "body", "error"),
    [
        ("POST", "/v1/channels/c/stats/-/set", b'{"values": {"k": 1}, "expct": {"k": null}}',
         "unknown member 'expct' in the body; -/set takes \"values\" and \"expect\""),
        ("POST", "/v1/channels/c/stats/-/get", b'{"keys": ["k"], "etags": true}',
         "unknown member 'etags' in the body; -/get takes \"keys\""),
        ("POST", "/v1/channels/c/stats/-/delete", b'{"keys": ["k"], "expect": {}}',
         "unknown member 'expect' in the body; -/delete takes \"keys\""),
        ("GET", "/v1/channels/c/stats?limit=5&afer=k", b"",
         "unknown query parameter 'afer' on /v1/channels/{channel}/{container}; "
         "it takes limit, after"),
        ("GET", "/v1/channels/c/-/events?sinse=x", b"",
         "unknown query parameter 'sinse' on /v1/channels/{channel}/-/events; "
         "it takes containers, since"),
        ("PUT", "/v1/channels/c/stats/k?_=1", b"1",
         "unknown query parameter '_' on /v1/channels/{channel}/{container}/{key}; "
         "it takes none"),
        ("GET", "/v1/containers?verbose", b"",
         "unknown query parameter 'verbose' on /v1/containers; it takes none"),
    ],
)  # fmt: skip
def test_what_a_route_does_not_take_is_refused_by_name(
    tmp_path: Path, metrics: Metrics, method: str, path: str, body: bytes, error: str
) -> None:
    async def test(h: Harness) -> None:
        refused = await h.call(method, path, body)
        assert refused.status == 400, refused.body
        assert body_of(refused) == {"error": error, "code": "bad_request"}
        assert (await h.call("GET", "/v1/channels/c/stats/k")).status == 404, "something changed"
        # Known names still work, and the routes outside /v1 take what scrapers add.
        assert (await h.call("GET", "/v1/channels/c/stats?limit=5&after=a")).status == 200
        assert (await h.call("GET", "/healthz?probe=kubelet")).status == 200

    run(test, tmp_path, metrics)


def test_a_cursor_of_other_containers_is_expired_and_says_what_to_do_once(
    tmp_path: Path, metrics: Metrics
) -> None:
    async def test(h: Harness) -> None:
        cursor = encode_cursor({"other": "0.1"})
        refused = await h.call("GET", f"/v1/channels/c/-/events?since={cursor}")
        assert refused.status == 410, refused.body
        assert body_of(refused) == {
            "error": "the cursor does not cover container 'stats': "
            "re-read what you need, then watch without a cursor",
            "code": "cursor_expired",
        }

    run(test, tmp_path, metrics)


def test_a_wrong_method_names_the_allowed_ones(tmp_path: Path, metrics: Metrics) -> None:
    async def test(h: Harness) -> None:
        response = await h.call("PATCH", "/v1/channels/c/stats/k")
        assert response.status == 405
        assert dict(response.headers or [])[b"allow"] == b"GET, PUT, DELETE, HEAD"

    run(test, tmp_path, metrics)
    metrics.fold()
    assert (
        metrics.registry.get_sample_value(
            "chanstore_http_requests_total",
            {"method": "other", "route": KEY_ROUTE, "status": "405"},
        )
        == 1.0
    )


def test_data_and_control_routes_need_the_token_and_nothing_else_does(
    tmp_path: Path, metrics: Metrics
) -> None:
    async def test(h: Harness) -> None:
        assert (await h.call("GET", "/v1/channels/c/stats/k")).status == 401
        assert (await h.call("GET", "/v1/no-such-route")).status == 401  # not even a 404
        assert (await h.call("POST", "/-/reload")).status == 401
        wrong = [(b"authorization", b"Bearer nope")]
        assert (await h.call("GET", "/v1/channels/c/stats/k", headers=wrong)).status == 401
        right = [(b"authorization", b"Bearer s3cret")]
        assert (await h.call("GET", "/v1/channels/c/stats/k", headers=right)).status == 404
        assert (await h.call("GET", "/healthz")).status == 200
        assert (await h.call("GET", "/readyz")).status == 200
        assert (await h.call("GET", "/metrics")).status == 200

    run(test, tmp_path, metrics, token="s3cret")


def test_the_token_can_change_while_the_api_runs(tmp_path: Path, metrics: Metrics) -> None:
    async def test(h: Harness) -> None:
        h.api.token.set("new")
        answer = await h.call("GET", "/v1/containers", headers=[(b"authorization", b"Bearer new")])
        assert answer.status == 200

    run(test, tmp_path, metrics, token="old")


def test_a_sane_request_id_is_kept_and_any_other_replaced(tmp_path: Path, metrics: Metrics) -> None:
    async def test(h: Harness) -> None:
        await h.call("GET", "/healthz", headers=[(b"x-request-id", b"abc-123")])
        assert h.last_request is not None and h.last_request.request_id == "abc-123"
        await h.call("GET", "/healthz", headers=[(b"x-request-id", b"a b\x00")])
        assert h.last_request.request_id not in ("", "a b\x00")

    run(test, tmp_path, metrics)


def test_listing_pages_follow_next_and_bulk_routes_answer_for_each_key(
    tmp_path: Path, metrics: Metrics
) -> None:
    async def test(h: Harness) -> None:
        values = {f"k{n:02d}": {"n": n} for n in range(12)}
        stored = await h.call("POST", "/v1/channels/c/stats/-/set",
                              json.dumps({"values": values}).encode())  # fmt: skip
        assert body_of(stored) == {
            "stored": list(values), "etags": {key: etag_of(value) for key, value in values.items()},
        }  # fmt: skip
        keys: list[str] = []
        query = "limit=5"
        for _ in range(10):
            page = body_of(await h.call("GET", f"/v1/channels/c/stats?{query}"))
            keys.extend(page["keys"])
            if page["next"] is None:
                break
            query = f"limit=5&after={page['next']}"
        assert keys == sorted(values)
        got = body_of(await h.call("POST", "/v1/channels/c/stats/-/get",
                                   b'{"keys": ["k01", "zz"]}'))  # fmt: skip
        assert got == {"values": {"k01": {"n": 1}}, "missing": ["zz"],
                       "etags": {"k01": etag_of({"n": 1})}}  # fmt: skip
        deleted = body_of(await h.call("POST", "/v1/channels/c/stats/-/delete",
                                       b'{"keys": ["k01", "zz"]}'))  # fmt: skip
        assert deleted == {"deleted": ["k01"], "missing": ["zz"]}

    run(test, tmp_path, metrics)


# -- a stored value that cannot be decoded, and the null backend ----------------------------


def test_a_damaged_value_answers_500_corrupt_stays_listed_and_can_be_deleted(
    tmp_path: Path, metrics: Metrics
) -> None:
    folder = tmp_path / "service_chanstore" / "channel_c" / "stats"
    folder.mkdir(parents=True)
    (folder / "good.json").write_text('{"hp": 1}')
    (folder / "bad.json").write_text('{"hp": ')  # a torn write

    async def test(h: Harness) -> None:
        for _ in range(2):
            got = await h.call("GET", "/v1/channels/c/stats/bad")
            assert got.status == 500, got.body  # it used to be a 404
            error = body_of(got)
            assert error["code"] == "corrupt"
            assert "'bad'" in error["error"] and "'stats'" in error["error"]
            assert str(tmp_path) not in error["error"] and ".json" not in error["error"]
        listing = body_of(await h.call("GET", "/v1/channels/c/stats"))
        assert listing == {"keys": ["bad", "good"], "next": None}  # it used to lack "bad"
        bulk = await h.call("POST", "/v1/channels/c/stats/-/get",
                            b'{"keys": ["good", "bad", "none"]}')  # fmt: skip
        assert (bulk.status, body_of(bulk)) == (200, {
            "values": {"good": {"hp": 1}}, "missing": ["none"], "corrupt": ["bad"],
            "etags": {"good": etag_of({"hp": 1})},
        })  # fmt: skip
        deleted = await h.call("DELETE", "/v1/channels/c/stats/bad")
        assert deleted.status == 200, deleted.body  # it used to be a 404 that left the file
        assert not (folder / "bad.json").exists()
        assert (await h.call("GET", "/v1/channels/c/stats/bad")).status == 404
        (folder / "torn.json").write_text("{")
        h.engine.channels.evict_all()
        assert (await h.call("GET", "/v1/channels/c/stats/torn")).status == 500
        put = await h.call("PUT", "/v1/channels/c/stats/torn", b'{"fixed": true}')
        assert put.status == 200
        got = await h.call("GET", "/v1/channels/c/stats/torn")
        assert (got.status, got.body) == (200, b'{"fixed":true}')

    run(test, tmp_path, metrics)
    assert metrics.registry.get_sample_value(
        "chanstore_integrity_problems_total", {"container": "stats", "kind": "corrupt_value"}
    ) == 2  # fmt: skip


def test_a_null_container_answers_null_for_every_key_and_lists_nothing(
    tmp_path: Path, metrics: Metrics
) -> None:
    null = [{"implementation": "null", "name": "scratch", "load": True}]

    async def test(h: Harness) -> None:
        # Unknown keys used to be 404 (a loaded cache), written ones read back from memory.
        got = await h.call("GET", "/v1/channels/c/scratch/never")
        assert (got.status, got.body) == (200, b"null")
        assert (await h.call("PUT", "/v1/channels/c/scratch/hp", b'{"hp": 1}')).status == 200
        got = await h.call("GET", "/v1/channels/c/scratch/hp")
        assert (got.status, got.body) == (200, b"null")
        listing = body_of(await h.call("GET", "/v1/channels/c/scratch"))
        assert listing == {"keys": [], "next": None}
        bulk = body_of(await h.call("POST", "/v1/channels/c/scratch/-/get", b'{"keys": ["a"]}'))
        assert bulk == {"values": {"a": None}, "missing": [], "etags": {"a": etag_of(None)}}
        assert (await h.call("DELETE", "/v1/channels/c/scratch/hp")).status == 200

    run(test, tmp_path, metrics, more=null)
