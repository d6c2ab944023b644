"""The handlers of the API's routes: they check what a request names and ask the store.

A handler returns a :class:`~chanstore.http.messages.Response` when it can
answer at once, a :class:`~chanstore.http.api.Later` for a single-key write
(answered from the write lane's future), or a coroutine. Failures are raised
as exceptions and worded by the API in one place.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chanstore.codec import Document, to_json_shape
from chanstore.engine import ABSENT, NO_EXPECTATION, Feed, Store
from chanstore.engine.store import NoExpectation
from chanstore.errors import ChanstoreError, CorruptValue, PreconditionFailed
from chanstore.http.api import Later
from chanstore.http.beside import BESIDE_LOOP_BYTES, parse_value_beside
from chanstore.http.bodies import json_body, parse_json, parse_value
from chanstore.http.errors import HttpError
from chanstore.http.events import EventStream
from chanstore.http.messages import Request, Response
from chanstore.keys import check_channel_id, check_key
from chanstore.metrics import Metrics
from chanstore.versions import ANY, Expectation, etag_of

__all__ = ["DataHandlers", "OpsHandlers", "Verdict"]

#: Keys a bulk request may name at most.
MAX_BULK_KEYS = 10_000
#: Keys one page of a listing holds by default, and at most.
DEFAULT_PAGE = 1_000
MAX_PAGE = 10_000
_OK = Response(200, b'{"ok":true}')


class DataHandlers:
    """``/v1``: the keys of channels' containers."""

    def __init__(self, store: Store, feed: Feed, metrics: Metrics) -> None:
        self.store = store
        self.feed = feed
        self.metrics = metrics

    # -- one key --------------------------------------------------------------

    def get_key(self, request: Request) -> Any:
        channel, container, key = request.segments[2:5]
        found = self.store.cached_body(channel, container, key)
        if found is not None and found is not ABSENT:
            # No checks needed: only a valid channel, container and key reach memory.
            return _value_answer(request, key, found)
        self._check_address(channel, container, key)
        if found is ABSENT:
            raise _absent(request, key, container)
        return self._read(request, channel, container, key)

    async def _read(self, request: Request, channel: str, container: str, key: str) -> Response:
        found = await self.store.read_body(channel, container, key)
        if found is ABSENT:
            raise _absent(request, key, container)
        return _value_answer(request, key, found)

    def put_key(self, request: Request) -> Later | Awaitable[Response]:
        channel, container, key = request.segments[2:5]
        self._check_address(channel, container, key)
        expect = write_expectation(request)
        if len(request.body) >= BESIDE_LOOP_BYTES:
            return self._put_large(request, channel, container, key, expect)
        value = parse_value(request.body)
        pending = self.store.write(channel, container, key, value, expect=expect,
                                   request_id=request.request_id)  # fmt: skip
        return Later(pending.future, _stored_answer(pending.etag))

    async def _put_large(self, request: Request, channel: str, container: str, key: str,
                         expect: Expectation | NoExpectation) -> Response:  # fmt: skip
        """:meth:`put_key` of a large body, made ready beside the event loop (with the
        file form too, for a container that writes it)."""
        file_form = self.store.writes_file_form(container)
        value = await parse_value_beside(request.body, file_form=file_form)
        pending = self.store.write(channel, container, key, value, expect=expect,
                                   request_id=request.request_id)  # fmt: skip
        return _stored_answer(pending.etag)(await pending.future)

    def delete_key(self, request: Request) -> Later:
        channel, container, key = request.segments[2:5]
        self._check_address(channel, container, key)
        expect = write_expectation(request)
        pending = self.store.write(channel, container, key, None, delete=True, expect=expect,
                                   request_id=request.request_id)  # fmt: skip
        return Later(pending.future, _deleted_answer(key, container))

    # -- a channel --------------------------------------------------------------

    async def events(self, request: Request) -> EventStream:
        """The channel's change feed, from now or after the cursor a client resumes from."""
        channel = request.segments[2]
        _checked(check_channel_id, channel, "channel id")
        params = request.query_params()
        names = [name for name in params.get("containers", "").split(",") if name] or None
        cursor = params.get("since")
        if cursor is None and (last := request.header(b"last-event-id")) is not None:
            cursor = last.decode("ascii", "replace")
        try:
            watcher = await self.feed.open(channel, names, cursor or None)
        except ValueError as exc:
            if isinstance(exc, ChanstoreError):
                raise
            raise HttpError(400, str(exc)) from None
        return EventStream(watcher, self.metrics)

    # -- a container ------------------------------------------------------------

    async def list_keys(self, request: Request) -> Response:
        channel, container = self._channel_and_container(request)
        params = request.query_params()
        limit = _limit(params.get("limit"))
        after = params.get("after")
        if after is not None:
            _checked(check_key, after, "after")
        keys, following = await self.store.keys_page(channel, container, after, limit)
        return Response(200, json_body({"keys": keys, "next": following}))

    async def bulk_get(self, request: Request) -> Response:
        """``{"values": {...}, "missing": [...]}``, and ``"corrupt": [...]`` naming the keys
        whose stored value cannot be read: one damaged key does not fail the others."""
        channel, container = self._channel_and_container(request)
        keys = _key_list(_object_body(request, "-/get", ("keys",)), "keys")
        values = await self.store.get_many(channel, container, keys)
        missing = [key for key in keys if key not in values]
        shaped: dict[str, Any] = {}
        etags: dict[str, str] = {}
        corrupt: list[str] = []
        for key, value in values.items():
            if isinstance(value, CorruptValue):
                corrupt.append(key)
            else:
                shaped[key] = to_json_shape(value)
                etags[key] = etag_of(value)
        answer: dict[str, Any] = {"values": shaped, "missing": missing, "etags": etags}
        if corrupt:
            # Stored but unreadable: neither a value nor missing. Listed only when
            # there are some, so every other answer stays as it always was.
            answer["corrupt"] = corrupt
        return Response(200, json_body(answer))

    async def bulk_set(self, request: Request) -> Response:
        """Store every value; with ``"expect"``, all of them or none (412 naming the conflicts)."""
        channel, container = self._channel_and_container(request)
        body = _object_body(request, "-/set", ("values", "expect"))
        values = body.get("values")
        if not isinstance(values, dict):
            raise HttpError(400, 'expected {"values": {key: value, ...}}')
        _key_list({"keys": list(values)}, "keys")
        expect = _bulk_expectations(body.get("expect"))
        documents = {key: Document(value, parsed=True) for key, value in values.items()}
        etags = await self.store.put_many(channel, container, documents, request.request_id,
                                          expect=expect)  # fmt: skip
        return Response(200, json_body({"stored": list(values), "etags": etags}))

    async def bulk_delete(self, request: Request) -> Response:
        channel, container = self._channel_and_container(request)
        keys = _key_list(_object_body(request, "-/delete", ("keys",)), "keys")
        deleted = await self.store.delete_many(channel, container, keys, request.request_id)
        gone = set(deleted)
        missing = [key for key in keys if key not in gone]
        return Response(200, json_body({"deleted": deleted, "missing": missing}))

    # -- checks -------------------------------------------------------------------

    def _check_address(self, channel: str, container: str, key: str) -> None:
        _checked(check_channel_id, channel, "channel id")
        self.store.check_container(container)
        _checked(check_key, key, "key")

    def _channel_and_container(self, request: Request) -> tuple[str, str]:
        channel, container = request.segments[2:4]
        _checked(check_channel_id, channel, "channel id")
        self.store.check_container(container)
        return channel, container


class Verdict(Protocol):
    """A reload's outcome, as the server words it."""

    ok: bool

    def as_dict(self) -> dict[str, Any]: ...


class OpsHandlers:
    """Routes for operators and orchestrators: metrics, health, readiness, reload."""

    def __init__(self, metrics: Metrics, *, readiness: Callable[[], Awaitable[dict[str, str]]],
                 reload: Callable[[str], Awaitable[Verdict]],
                 containers: Callable[[], list[dict[str, Any]]],
                 service_id: str | None = None) -> None:  # fmt: skip
        self.metrics = metrics
        self._readiness = readiness
        self._reload = reload
        self._containers = containers
        self._service_id = service_id

    def metrics_page(self, request: Request) -> Response:
        self.metrics.fold()
        return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode())

    def healthz(self, request: Request) -> Response:
        return Response(200, json_body({"status": "serving", "pid": os.getpid()}))

    async def readyz(self, request: Request) -> Response:
        problems = await self._readiness()
        if problems:
            status = "draining" if problems.get("daemon") == "draining" else "not ready"
            return Response(503, json_body({"status": status, "problems": problems}))
        return Response(200, json_body({"status": "ready"}))

    async def reload(self, request: Request) -> Response:
        verdict = await self._reload("http")
        return Response(200 if verdict.ok else 400, json_body(verdict.as_dict()))

    def containers(self, request: Request) -> Response:
        """The running db_config's containers, and the service id the daemon serves: a
        client that stores a service's channels here (the chanstore backend) checks it."""
        answer: dict[str, Any] = {"containers": self._containers()}
        if self._service_id is not None:
            answer["service_id"] = self._service_id
        return Response(200, json_body(answer))


def _value_answer(request: Request, key: str, found: tuple[bytes, str]) -> Response:
    """200 with the value and its ETag; 304 when the client's copy is that version; 412
    when ``If-Match`` asks for another (RFC 9110 evaluates it first)."""
    body, etag = found
    if (wanted := request.header(b"if-match")) is not None:
        _check_read_precondition(wanted, key, etag)
    if (cached := request.header(b"if-none-match")) is not None and _names_etag(cached, etag):
        return Response(304, b"", etag=etag)
    return Response(200, body, etag=etag)


def _absent(request: Request, key: str, container: str) -> Exception:
    """What a read of an absent key answers: 404, or 412 when ``If-Match`` asked for a
    version of it (an absent key holds none, ``*`` included)."""
    if (wanted := request.header(b"if-match")) is not None:
        _if_match_tag(wanted)  # a malformed one is a 400 first, as on a write
        return PreconditionFailed({key: None})
    return _not_found(key, container)


def _check_read_precondition(wanted: bytes, key: str, etag: str) -> None:
    expected = _if_match_tag(wanted)
    if expected is not ANY and expected != etag:
        raise PreconditionFailed({key: etag})


def _names_etag(header: bytes, etag: str) -> bool:
    """Whether an If-None-Match list names ``etag`` (weakly compared, as RFC 9110 says)."""
    tags = [tag.strip().removeprefix(b"W/") for tag in header.split(b",")]
    return b"*" in tags or b'"%s"' % etag.encode() in tags


def write_expectation(request: Request) -> Expectation | NoExpectation:
    """What ``If-Match`` / ``If-None-Match`` require of the key a PUT or DELETE writes."""
    if_match = request.header(b"if-match")
    if_none_match = request.header(b"if-none-match")
    if if_match is not None and if_none_match is not None:
        raise HttpError(400, "send If-Match or If-None-Match, not both")
    if if_none_match is not None:
        if if_none_match.strip() != b"*":
            raise HttpError(400, "on a write, If-None-Match must be * (create only: the key "
                                 "must be absent)")  # fmt: skip
        return None
    if if_match is None:
        return NO_EXPECTATION
    return _if_match_tag(if_match)


def _if_match_tag(if_match: bytes) -> str:
    """The version ``If-Match`` names: an ETag, or :data:`~chanstore.versions.ANY` for
    ``*``; 400 for anything else."""
    tag = if_match.strip()
    if tag == b"*":
        return ANY
    if len(tag) < 2 or tag[:1] != b'"' or tag[-1:] != b'"' or b'"' in tag[1:-1]:
        raise HttpError(400, 'If-Match must be * or one strong ETag in quotes, as a GET '
                             'answered it: If-Match: "3f2a..."')  # fmt: skip
    return tag[1:-1].decode("ascii", "replace")


def _bulk_expectations(expect: Any) -> dict[str, Expectation] | None:
    """A bulk set's ``"expect"``: key -> ETag, "*" (must exist) or null (must be absent)."""
    if expect is None:
        return None
    if not isinstance(expect, dict):
        raise HttpError(400, 'expected "expect": {key: etag, "*" or null, ...}')
    _key_list({"keys": list(expect)}, "keys")
    for key, tag in expect.items():
        if tag is not None and not isinstance(tag, str):
            raise HttpError(400, f'"expect" of key {key[:200]!r} must be an ETag, "*" or null, '
                                 f"not {json_body(tag)[:60].decode()}")  # fmt: skip
    return {key: tag.strip('"') if isinstance(tag, str) else None for key, tag in expect.items()}


def _stored_answer(etag: str | None) -> Callable[[bool], Response]:
    body = b'{"ok":true,"etag":"%s"}' % (etag or "").encode()  # an ETag is hex: no escaping

    def answer(_stored: bool) -> Response:
        return Response(200, body, etag=etag)

    return answer


def _deleted_answer(key: str, container: str) -> Callable[[bool], Response]:
    def answer(existed: bool) -> Response:
        if not existed:
            raise _not_found(key, container)
        return _OK

    return answer


def _not_found(key: str, container: str) -> HttpError:
    return HttpError(404, f"key {key[:200]!r} is not in {container[:200]!r} of this channel",
                     code="not_found")  # fmt: skip


def _checked(check: Callable[..., Any], text: str, what: str) -> None:
    """400 with ``check``'s reason when ``text`` is not a valid ``what``."""
    try:
        check(text)
    except ValueError as exc:
        raise HttpError(400, f"invalid {what}: {exc}") from None


def _object_body(request: Request, operation: str, members: tuple[str, ...]) -> dict[str, Any]:
    """The body of a bulk ``operation``: a JSON object of no members but ``members``.

    A member the operation does not take is refused, not ignored: a misspelt ``"expect"``
    would make an all-or-nothing write unconditional."""
    body = parse_json(request.body)
    if not isinstance(body, dict):
        raise HttpError(400, "expected a JSON object as the body")
    for name in body:
        if name not in members:
            takes = " and ".join(f'"{member}"' for member in members)
            raise HttpError(400, f"unknown member {name[:60]!r} in the body; {operation} "
                                 f"takes {takes}")  # fmt: skip
    return body


def _key_list(body: dict[str, Any], field: str) -> list[str]:
    keys = body.get(field)
    if not isinstance(keys, list):
        raise HttpError(400, f'expected {{"{field}": ["key", ...]}}')
    if len(keys) > MAX_BULK_KEYS:
        raise HttpError(400, f"{len(keys)} keys in one request; the limit is {MAX_BULK_KEYS}")
    for key in keys:
        _checked(check_key, key, "key")
    return keys


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_PAGE
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        expected = f"a whole number from 1 to {MAX_PAGE}"
        raise HttpError(400, f"limit must be {expected}, not {text[:20]!r}")
    return int(text)
