"""The HTTP API, defined once: routing, authorization, request ids, errors, metrics, logs.

Routes (``{channel}``, ``{container}`` and ``{key}`` percent-encoded)::

    GET    /v1/channels/{channel}/{container}/{key}       the value; 404 when absent
    PUT    /v1/channels/{channel}/{container}/{key}       store the JSON body
    DELETE /v1/channels/{channel}/{container}/{key}       200, or 404 when absent
    GET    /v1/channels/{channel}/{container}?limit=N&after=KEY   one page of keys
    POST   /v1/channels/{channel}/{container}/-/get|set|delete    bulk operations
    GET    /v1/channels/{channel}/-/events                the change feed (Server-Sent Events)
    GET    /v1/containers                                 the running db_config's containers
    GET    /metrics  /healthz  /readyz                    for Prometheus and orchestrators
    POST   /-/reload                                      reload db_config, answer the verdict

:meth:`Api.handle` is the middleware every request goes through, whichever
way it is answered: a handler returns a :class:`~chanstore.http.messages.Response`
at once (a cached read, an error), a :class:`Later` (a write: the answer
follows from a lane's future, with no task), or a coroutine (anything else,
run as a task). Each request is counted and timed under its route's template
(never the raw path), carries a request id (``X-Request-Id``, the client's
when it sends a sane one) that its log events name, and is logged at debug.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import re
import time
from collections.abc import Callable
from typing import Any

from chanstore import logs
from chanstore.http.auth import BearerToken
from chanstore.http.errors import HttpError, error_for
from chanstore.http.messages import Request, Response
from chanstore.metrics import DeferredRequests, Metrics

__all__ = ["ROUTE_UNMATCHED", "Api", "Handler", "Later", "Respond", "Routes"]

log = logs.get_logger()

ROUTE_UNMATCHED = "unmatched"
#: Methods counted by name; any other is counted as "other", so labels stay bounded.
METHODS = frozenset({"GET", "PUT", "DELETE", "POST", "HEAD"})
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_REQUEST_ID_PREFIX = os.urandom(4).hex()
#: First path segments of the data and control routes, which need the token.
_GUARDED = frozenset({"v1", "-"})


class Later:
    """An answer that follows from ``future``: ``then(result)`` words it."""

    __slots__ = ("future", "then")

    def __init__(self, future: asyncio.Future[Any], then: Callable[[Any], Response]) -> None:
        self.future = future
        self.then = then


Handler = Callable[[Request], Any]  # -> Response | Later | Coroutine[Any, Any, Response]
#: Called once per request with its answer; the connection writes it.
Respond = Callable[[Request, Response], None]
#: A route's handlers by method.
Methods = dict[str, Handler]


class Routes:
    """Route templates and their handlers by method."""

    KEY = "/v1/channels/{channel}/{container}/{key}"
    CONTAINER = "/v1/channels/{channel}/{container}"
    BULK = "/v1/channels/{channel}/{container}/-/{operation}"
    CHANNEL = "/v1/channels/{channel}/-/{operation}"
    EVENTS = "/v1/channels/{channel}/-/events"
    #: The query parameters of the /v1 routes that take any; every other /v1 route takes
    #: none. A name not taken is refused, not ignored: ``?sinse=`` would start a feed from
    #: now, and ``?afer=`` would answer the first page again and again.
    QUERY = {CONTAINER: ("limit", "after"), EVENTS: ("containers", "since")}

    def __init__(self, key: Methods, container: Methods, bulk: dict[str, Handler],
                 channel: dict[str, Methods], fixed: dict[str, Methods]) -> None:  # fmt: skip
        self._key = (self.KEY, key)
        self._container = (self.CONTAINER, container)
        self._bulk = {op: (f"{self.CONTAINER}/-/{op}", {"POST": handler})
                      for op, handler in bulk.items()}  # fmt: skip
        # A container is named like an identifier, so "-" in its place is never one.
        self._channel = {op: (f"/v1/channels/{{channel}}/-/{op}", methods)
                         for op, methods in channel.items()}  # fmt: skip
        self._fixed = {path: (path, methods) for path, methods in fixed.items()}
        every = [self._key, self._container, *self._bulk.values(), *self._channel.values(),
                 *self._fixed.values()]  # fmt: skip
        # Routes outside /v1 (metrics, probes, reload) take what scrapers and orchestrators add.
        self._query = {template: self.QUERY.get(template, ())
                       for template, _methods in every if template.startswith("/v1/")}  # fmt: skip

    def match(self, segments: list[str]) -> tuple[str, Methods]:
        """The template and handlers of the route ``segments`` name; 404 if none."""
        if len(segments) >= 2 and segments[0] == "v1" and segments[1] == "channels":
            count = len(segments)
            if count == 5 and segments[3] == "-" and segments[4] in self._channel:
                return self._channel[segments[4]]
            if count == 5:
                return self._key
            if count == 4:
                return self._container
            if count == 6 and segments[4] == "-" and segments[5] in self._bulk:
                return self._bulk[segments[5]]
            raise HttpError(
                404,
                f"no such route: channel routes are {self.CONTAINER}, "
                f"{self.KEY}, {self.CONTAINER}/-/{{get|set|delete}} and {self.EVENTS}",
            )
        found = self._fixed.get("/" + "/".join(segments))
        if found is None:
            raise HttpError(404, f"no route for {'/' + '/'.join(segments)[:200]!r}")
        return found

    def check_query(self, route: str, request: Request) -> None:
        """400 naming the first query parameter of ``request`` that ``route`` does not take."""
        taken = self._query.get(route)
        if taken is None:
            return
        for name in request.query_params():
            if name not in taken:
                takes = f"it takes {', '.join(taken)}" if taken else "it takes none"
                raise HttpError(400, f"unknown query parameter {name[:60]!r} on {route}; {takes}")


class Api:
    """Answers requests: the one door every request of every connection goes through."""

    def __init__(self, routes: Routes, token: BearerToken, metrics: Metrics) -> None:
        self.routes = routes
        self.token = token
        self.metrics = metrics
        #: (method, route, status) -> its request counter and duration histogram, as
        #: plain numbers folded into the metrics before each scrape (binding labels
        #: and a locked observe() on every request cost more than a cached read).
        self._measures: dict[tuple[str, str, int], DeferredRequests] = {}
        self._request_numbers = itertools.count(1)
        #: Who answers a request in place of this process's own handler, when it names
        #: what another process serves (set by the server for a group of workers):
        #: ``divert(route, request)`` returns that handler, or None to answer here.
        self.divert: Callable[[str, Request], Handler | None] | None = None

    # -- the middleware -------------------------------------------------------

    def handle(self, request: Request, respond: Respond) -> None:
        """Answer ``request`` through ``respond``, now or once its handler is done."""
        request.request_id = self.request_id(request)
        route = ROUTE_UNMATCHED
        try:
            segments = request.segments
            if segments[0] in _GUARDED:
                self._authorize(request)  # not even a 404 without the token
            route, methods = self.routes.match(segments)
            handler = _handler_of(methods, request.method, route)
            if request.query:
                self.routes.check_query(route, request)
            if self.divert is not None:
                handler = self.divert(route, request) or handler
            answer = handler(request)
        except Exception as exc:  # noqa: BLE001 - worded by _error_response
            answer = self._error_response(exc, request, route)
        kind = answer.__class__
        if kind is Response:
            self._finish(request, route, answer, respond)
            return
        if kind is Later:
            future, then = answer.future, answer.then
        else:
            token = logs.bind_request_id(request.request_id)  # the task's events name it
            future, then = asyncio.ensure_future(answer), None
            logs.unbind_request_id(token)
        future.add_done_callback(functools.partial(self._settle, request, route, then, respond))

    def precheck(self, request: Request) -> HttpError | None:
        """The error that will answer ``request`` whatever its body (no token, no such
        route or method), or None: asked before a client is told to send its body."""
        try:
            segments = request.segments
            if segments[0] in _GUARDED:
                self._authorize(request)
            route, methods = self.routes.match(segments)
            _handler_of(methods, request.method, route)
            if request.query:
                self.routes.check_query(route, request)
        except HttpError as error:
            return error
        return None

    def refuse(self, request: Request, error: HttpError, respond: Respond, *,
               parsed: bool = True) -> None:  # fmt: skip
        """Answer a request the connection refused itself (a size limit, a timeout, a
        parse error) like any other: counted under its route when its head was
        ``parsed`` and names one, else as unmatched."""
        if not request.request_id:
            request.request_id = self.request_id(request)
        route = ROUTE_UNMATCHED
        if parsed:
            with contextlib.suppress(HttpError):  # a path that names no route: unmatched
                route = self.routes.match(request.segments)[0]
        self._finish(request, route, Response.of_error(error), respond)

    def _settle(self, request: Request, route: str, then: Callable[[Any], Response] | None,
                respond: Respond, future: asyncio.Future[Any]) -> None:  # fmt: skip
        try:
            result = future.result()
            response = then(result) if then is not None else result
        except Exception as exc:  # noqa: BLE001 - worded by _error_response
            response = self._error_response(exc, request, route)
        self._finish(request, route, response, respond)

    def _finish(self, request: Request, route: str, response: Response, respond: Respond) -> None:
        elapsed = self.observe(request.method, route, response.status, request.started)
        if logs.debug_enabled():
            log.debug("http_request", method=request.method, path=request.path.decode("latin-1"),
                      route=route, status=response.status, duration=elapsed,
                      request_id=request.request_id)  # fmt: skip
        respond(request, response)

    def _error_response(self, exc: BaseException, request: Request, route: str) -> Response:
        try:
            error = error_for(exc)
        except Exception:
            log.exception("request_crashed", method=request.method, route=route,
                          request_id=request.request_id)  # fmt: skip
            error = HttpError(500, f"internal error: {type(exc).__name__}")
        if error.code == "corrupt":
            # Found, logged at error and counted once where it was read; each later
            # read of the same damaged key is only worth a warning.
            log.warning("request_failed", method=request.method, route=route,
                        status=error.status, error=error.message, code=error.code,
                        request_id=request.request_id)  # fmt: skip
        elif error.status >= 500:
            log.error("request_failed", method=request.method, route=route, status=error.status,
                      error=error.message, code=error.code,
                      request_id=request.request_id)  # fmt: skip
        return Response.of_error(error)

    # -- parts ----------------------------------------------------------------

    def observe(self, method: str, route: str, status: int, started: float) -> float:
        """Count and time one answered request; the seconds it took."""
        if method not in METHODS:
            method = "other"
        measure = self._measures.get((method, route, status))
        if measure is None:
            measure = self._measures[(method, route, status)] = self.metrics.deferred_requests(
                method, route, str(status)
            )
        elapsed = time.perf_counter() - started if started else 0.0
        measure.observe(elapsed)
        return elapsed

    def request_id(self, request: Request) -> str:
        """The client's X-Request-Id when it is sane, a new unique one otherwise."""
        given = request.given_id
        if given is not None and _SANE_REQUEST_ID.fullmatch(given):
            return given.decode()
        # A random prefix per process and a counter: unique, and no system call.
        return f"{_REQUEST_ID_PREFIX}{next(self._request_numbers) & 0xFFFFFFFF:08x}"

    def _authorize(self, request: Request) -> None:
        if self.token.required and not self.token.allows(request.header(b"authorization")):
            raise HttpError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                            [(b"www-authenticate", b'Bearer realm="chanstore"')])  # fmt: skip


def _handler_of(methods: Methods, method: str, route: str) -> Handler:
    """The handler of ``method``; HEAD is answered wherever GET is (the connection
    drops the body); 405 names the allowed methods."""
    handler = methods.get(method)
    if handler is None and method == "HEAD":
        handler = methods.get("GET")
    if handler is None:
        allowed = ", ".join([*methods, "HEAD"] if "GET" in methods else methods)
        raise HttpError(405, f"{method[:20]} is not allowed on {route}; use {allowed}",
                        [(b"allow", allowed.encode())])  # fmt: skip
    return handler
