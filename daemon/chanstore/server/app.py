"""The HTTP API, as one ASGI application.

Routes (``{channel}``, ``{container}`` and ``{key}`` percent-encoded)::

    GET    /v1/channels/{channel}/{container}/{key}       the value; 404 when absent
    PUT    /v1/channels/{channel}/{container}/{key}       store the JSON body
    DELETE /v1/channels/{channel}/{container}/{key}       200, or 404 when absent
    GET    /v1/channels/{channel}/{container}             {"keys": [...]}
    POST   /v1/channels/{channel}/{container}/-/get       {"keys": [...]}
                                      -> {"values": {...}, "missing": [...]}
    POST   /v1/channels/{channel}/{container}/-/set       {"values": {...}} -> {"stored": [...]}
    POST   /v1/channels/{channel}/{container}/-/delete    {"keys": [...]}
                                      -> {"deleted": [...], "missing": [...]}
    GET    /v1/containers                                 the running db_config's containers
    GET    /metrics  /healthz  /readyz                    for Prometheus and orchestrators
    POST   /-/reload                                      reload db_config, answer with the verdict

Every request is measured (``chanstore_http_*``, labelled with the route's
template, never the raw path), carries a request id (``X-Request-Id``, taken
from the client when it sends a sane one) that is bound to every log event
it causes, and is logged at debug. Errors are JSON: ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chanstore import logs
from chanstore.cache import ABSENT
from chanstore.codec import to_json_shape
from chanstore.errors import BackendError, ChanstoreError, InvalidKey
from chanstore.keys import check_channel_id, check_key
from chanstore.server.channels import UnknownContainer
from chanstore.server.http import (
    ClientGone,
    HttpError,
    Receive,
    Request,
    Scope,
    Send,
    json_body,
    parse_json,
    read_body,
    send_response,
    split_path,
)
from chanstore.server.shortcuts import Shortcuts

if TYPE_CHECKING:
    from chanstore.server.daemon import Daemon

__all__ = ["App"]

log = logs.get_logger()

ROUTE_KEY = "/v1/channels/{channel}/{container}/{key}"
ROUTE_CONTAINER = "/v1/channels/{channel}/{container}"
ROUTE_BULK = "/v1/channels/{channel}/{container}/-/{operation}"
ROUTE_CONTAINERS = "/v1/containers"
ROUTE_UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "PUT", "DELETE", "POST", "HEAD"})
BULK_OPERATIONS = ("get", "set", "delete")
#: Keys a bulk request may name at most.
MAX_BULK_KEYS = 10_000
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_REQUEST_ID_PREFIX = os.urandom(4).hex()
_request_numbers = itertools.count(1)
_JSON_OK = b'{"ok":true}'

Handler = Callable[[Request], Awaitable[tuple[int, bytes]]]


class App:
    """The ASGI application of one :class:`~chanstore.server.daemon.Daemon`."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.registry = daemon.registry
        self.metrics = daemon.metrics
        self.max_body = daemon.settings.max_body_bytes
        self._token = daemon.token.encode() if daemon.token else None
        #: (method, route, status) -> the request counter and duration histogram
        #: children for those labels, bound once (binding labels is not free).
        self._measures: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._fixed: dict[str, tuple[str, dict[str, Handler]]] = {
            "/metrics": ("/metrics", {"GET": self.metrics_page}),
            "/healthz": ("/healthz", {"GET": self.healthz}),
            "/readyz": ("/readyz", {"GET": self.readyz}),
            "/-/reload": ("/-/reload", {"POST": self.reload}),
            "/v1/containers": (ROUTE_CONTAINERS, {"GET": self.containers}),
        }
        # The channel routes' handlers, bound once rather than on every request.
        self._key_route: tuple[str, dict[str, Handler]] = (
            ROUTE_KEY,
            {"GET": self.get_key, "PUT": self.put_key, "DELETE": self.delete_key},
        )
        self._container_route: tuple[str, dict[str, Handler]] = (
            ROUTE_CONTAINER,
            {"GET": self.list_keys},
        )
        #: What the protocol answers without ASGI (see shortcuts.py).
        self.shortcuts = Shortcuts(self, ROUTE_KEY)
        bulk = {"get": self.bulk_get, "set": self.bulk_set, "delete": self.bulk_delete}
        self._bulk_routes: dict[str, tuple[str, dict[str, Handler]]] = {
            operation: (f"{ROUTE_CONTAINER}/-/{operation}", {"POST": bulk[operation]})
            for operation in BULK_OPERATIONS
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.handle(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Route, answer, measure and log one request."""
        started = time.perf_counter()
        method = scope["method"] if scope["method"] in METHODS else "other"
        route = ROUTE_UNMATCHED
        status = 500
        request_id = self.request_id(scope["headers"])
        bound = logs.bind_request_id(request_id)
        headers = [(b"x-request-id", request_id.encode())]
        try:
            raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
            raw_path = raw_path.split(b"?", 1)[0]
            try:
                segments = split_path(raw_path)
                request = Request(scope, receive, segments)
                request.request_id = request_id
                route, handlers = self.route(request)
                status, body = await _handler_for(request, route, handlers)(request)
            except HttpError as error:
                status, body = error.status, error.body()
                headers.extend(error.headers)
                if status >= 500:
                    log.error("request_failed", method=method, route=route, status=status,
                              error=error.message)  # fmt: skip
            except ClientGone:
                status = 499  # nginx's word for it: nothing is sent
                return
            except Exception as exc:
                log.exception("request_crashed", method=method, route=route)
                error = HttpError(500, f"internal error: {type(exc).__name__}")
                status, body = 500, error.body()
            await send_response(send, status, body, headers=headers,
                                content_type=_content_type(route))  # fmt: skip
        finally:
            elapsed = time.perf_counter() - started
            self.observe(method, route, status, elapsed)
            if logs.debug_enabled():
                log.debug("http_request", method=scope["method"], path=scope["path"],
                          route=route, status=status, duration=elapsed)  # fmt: skip
            logs.unbind_request_id(bound)
            structlog.contextvars.clear_contextvars()

    def observe(self, method: str, route: str, status: int, elapsed: float) -> None:
        """Count and time one answered request."""
        measures = self._measures.get((method, route, status))
        if measures is None:
            measures = self._measures[(method, route, status)] = (
                self.metrics.http_requests.labels(method, route, str(status)),
                self.metrics.http_duration.labels(method, route),
            )
        counter, timer = measures
        counter.inc()
        timer.observe(elapsed)

    # -- routing ---------------------------------------------------------------

    def route(self, request: Request) -> tuple[str, dict[str, Handler]]:
        """The route template and its handlers by method; HttpError for 401 and 404."""
        segments = request.segments
        if segments[0] in ("v1", "-"):
            # Data and control routes answer nobody without the token, not even a 404.
            self._authorize(request)
        if len(segments) >= 2 and segments[0] == "v1" and segments[1] == "channels":
            route, handlers = self._channel_route(segments)
        else:
            fixed = self._fixed.get("/" + "/".join(segments))
            if fixed is None:
                raise HttpError(404, f"no route for {request.scope['path'][:200]!r}")
            route, handlers = fixed
        return route, handlers

    def _channel_route(self, segments: list[str]) -> tuple[str, dict[str, Handler]]:
        if len(segments) == 5:
            return self._key_route
        if len(segments) == 4:
            return self._container_route
        if len(segments) == 6 and segments[4] == "-" and segments[5] in BULK_OPERATIONS:
            return self._bulk_routes[segments[5]]
        raise HttpError(
            404,
            "no such route: channel routes are /v1/channels/{channel}/{container}[/{key}] and "
            "/v1/channels/{channel}/{container}/-/{get|set|delete}",
        )

    def authorized(self, authorization: bytes | None) -> bool:
        """Whether a request with this Authorization header may use /v1 and /-/ routes."""
        if self._token is None:
            return True
        scheme, _, token = (authorization or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)

    def _authorize(self, request: Request) -> None:
        if not self.authorized(request.header(b"authorization")):
            raise HttpError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            [(b"www-authenticate", b'Bearer realm="chanstore"')])  # fmt: skip

    # -- /v1 handlers ------------------------------------------------------------

    async def get_key(self, request: Request) -> tuple[int, bytes]:
        channel, container, key = self._address(request)
        body = self.registry.cached_body(channel, container, key)
        if body is None:
            body = await self._backend(self.registry.get_body(channel, container, key))
        if body is ABSENT:
            raise self.not_found(key, container)
        return 200, body

    async def put_key(self, request: Request) -> tuple[int, bytes]:
        channel, container, key = self._address(request)
        value = parse_json(await read_body(request, self.max_body))
        await self._backend(self.registry.put(channel, container, key, value))
        return 200, _JSON_OK

    async def delete_key(self, request: Request) -> tuple[int, bytes]:
        channel, container, key = self._address(request)
        existed = await self._backend(self.registry.delete(channel, container, key))
        if not existed:
            raise self.not_found(key, container)
        return 200, _JSON_OK

    async def list_keys(self, request: Request) -> tuple[int, bytes]:
        channel, container = self._channel_and_container(request)
        keys = await self._backend(self.registry.keys(channel, container))
        return 200, json_body({"keys": keys})

    async def bulk_get(self, request: Request) -> tuple[int, bytes]:
        channel, container = self._channel_and_container(request)
        keys = self._key_list(await self._bulk_body(request, container), "keys")
        values = await self._backend(self.registry.get_many(channel, container, keys))
        missing = [key for key in keys if key not in values]
        return 200, json_body({"values": _json_shaped(values), "missing": missing})

    async def bulk_set(self, request: Request) -> tuple[int, bytes]:
        channel, container = self._channel_and_container(request)
        body = await self._bulk_body(request, container)
        values = body.get("values")
        if not isinstance(values, dict):
            raise HttpError(400, 'expected {"values": {key: value, ...}}')
        self._key_list({"keys": list(values)}, "keys")
        await self._backend(self.registry.put_many(channel, container, values))
        return 200, json_body({"stored": list(values)})

    async def bulk_delete(self, request: Request) -> tuple[int, bytes]:
        channel, container = self._channel_and_container(request)
        keys = self._key_list(await self._bulk_body(request, container), "keys")
        deleted = await self._backend(self.registry.delete_many(channel, container, keys))
        gone = set(deleted)
        return 200, json_body({"deleted": deleted, "missing": [k for k in keys if k not in gone]})

    async def containers(self, request: Request) -> tuple[int, bytes]:
        entries = [
            {"name": spec.name, "implementation": spec.implementation, "load": spec.load}
            for spec in self.registry.config
        ]
        return 200, json_body({"containers": entries})

    # -- operations handlers -------------------------------------------------------

    async def metrics_page(self, request: Request) -> tuple[int, bytes]:
        self.metrics.fold()
        return 200, generate_latest(self.metrics.registry)

    async def healthz(self, request: Request) -> tuple[int, bytes]:
        return 200, json_body({"status": "serving", "pid": os.getpid()})

    async def readyz(self, request: Request) -> tuple[int, bytes]:
        problems = await self.daemon.readiness()
        if problems:
            return 503, json_body({"status": "not ready", "problems": problems})
        return 200, json_body({"status": "ready"})

    async def reload(self, request: Request) -> tuple[int, bytes]:
        result = await self.daemon.reloader.reload("http")
        return (200 if result.ok else 400), json_body(result.as_dict())

    # -- request parts -------------------------------------------------------------

    def _channel_and_container(self, request: Request) -> tuple[str, str]:
        channel, container = request.segments[2], request.segments[3]
        self.check_channel_and_container(channel, container)
        return channel, container

    def check_channel_and_container(self, channel: str, container: str) -> None:
        """HttpError 400 for an invalid channel id, 404 for a container not served."""
        try:
            check_channel_id(channel)
        except InvalidKey as exc:
            raise HttpError(400, str(exc)) from None
        self._container(container)

    @staticmethod
    def not_found(key: str, container: str) -> HttpError:
        return HttpError(404, f"key {key[:200]!r} is not in {container!r} of this channel",
                         code="not_found")  # fmt: skip

    def _address(self, request: Request) -> tuple[str, str, str]:
        channel, container = self._channel_and_container(request)
        try:
            key = check_key(request.segments[4])
        except InvalidKey as exc:
            raise HttpError(400, str(exc)) from None
        return channel, container, key

    def _container(self, name: str) -> None:
        try:
            self.registry.container(name)
        except UnknownContainer as exc:
            raise HttpError(404, str(exc), code="unknown_container") from None

    async def _bulk_body(self, request: Request, container: str) -> dict[str, Any]:
        body = parse_json(await read_body(request, self.max_body))
        if not isinstance(body, dict):
            raise HttpError(400, "expected a JSON object as the body")
        return body

    def _key_list(self, body: dict[str, Any], field: str) -> list[str]:
        keys = body.get(field)
        if not isinstance(keys, list):
            raise HttpError(400, f'expected {{"{field}": ["key", ...]}}')
        if len(keys) > MAX_BULK_KEYS:
            raise HttpError(400, f"{len(keys)} keys in one request; the limit is {MAX_BULK_KEYS}")
        try:
            return [check_key(key) for key in keys]
        except InvalidKey as exc:
            raise HttpError(400, str(exc)) from None

    async def _backend(self, operation: Awaitable[Any]) -> Any:
        """Await a storage operation, answering 503 (404 for a container) on failure."""
        try:
            return await operation
        except Exception as exc:  # noqa: BLE001 - mapped, or raised again, by _http_error_of
            raise _http_error_of(exc) from None

    @staticmethod
    def backend_outcome(future: asyncio.Future[Any]) -> Any:
        """A finished storage operation's result; its failure as :meth:`_backend` words it."""
        try:
            return future.result()
        except Exception as exc:  # noqa: BLE001 - mapped, or raised again, by _http_error_of
            raise _http_error_of(exc) from None

    @staticmethod
    def request_id(headers: list[tuple[bytes, bytes]]) -> str:
        """The client's X-Request-Id when it is sane, a new unique one otherwise."""
        return _request_id(headers)


def _http_error_of(exc: Exception) -> HttpError:
    """The answer to a failed storage operation: 503, 404 for a container, 400 for a value.

    Anything that is not a storage error is raised again: a crash, not an answer.
    """
    if isinstance(exc, UnknownContainer):
        return HttpError(404, str(exc), code="unknown_container")
    invalid_input = isinstance(exc, ValueError) and not isinstance(exc, BackendError)
    if isinstance(exc, ChanstoreError) and invalid_input:
        return HttpError(400, str(exc))
    if isinstance(exc, ChanstoreError):
        return HttpError(503, f"backend failure ({exc.kind}): {exc}")
    raise exc


def _handler_for(request: Request, route: str, handlers: dict[str, Handler]) -> Handler:
    """The handler of ``request``'s method; 405 (the route still known to metrics) if none.

    HEAD is answered wherever GET is, by the GET handler: uvicorn sends the
    headers (Content-Length included) and drops the body.
    """
    handler = handlers.get(request.method)
    if handler is None and request.method == "HEAD":
        handler = handlers.get("GET")
    if handler is None:
        allowed = ", ".join([*handlers, "HEAD"] if "GET" in handlers else handlers)
        raise HttpError(
            405,
            f"{request.method} is not allowed on {route}; use {allowed}",
            [(b"allow", allowed.encode())],
        )
    return handler


def _json_shaped(values: dict[str, Any]) -> dict[str, Any]:
    return {key: to_json_shape(value) for key, value in values.items()}


def _request_id(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id" and _SANE_REQUEST_ID.fullmatch(value):
            return value.decode()
    # A random prefix per process and a counter: unique, and no system call per
    # request (os.urandom was one of the larger costs of a cached GET).
    return f"{_REQUEST_ID_PREFIX}{next(_request_numbers) & 0xFFFFFFFF:08x}"


def _content_type(route: str) -> bytes:
    return CONTENT_TYPE_LATEST.encode() if route == "/metrics" else b"application/json"


async def _lifespan(receive: Receive, send: Send) -> None:
    # The daemon starts and stops its parts itself; the server's lifespan is a formality.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
