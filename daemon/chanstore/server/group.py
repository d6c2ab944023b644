"""A worker of ``chanstore serve --workers N``: who it is, what it serves, how it speaks for all.

The supervisor (:mod:`chanstore.server.workers`) starts each worker with its
:class:`WorkerRole` in the environment. A worker is the usual daemon, with
three differences, all here:

* **What it serves.** Containers whose backend is shared by every process
  (Redis: writes made anywhere reach every cache over the invalidation link)
  are served by every worker. Any other one (json: a root's journal has one
  owner; a ``clear`` container; the chanstore backend) is served by worker 0
  alone: the others never even open its backend (:func:`served_here`), and
  :meth:`Group.divert` sends its requests on to worker 0 (see
  :mod:`chanstore.server.forwarding`). A null container is served everywhere,
  but its change feed, kept in memory, by worker 0.
* **A private socket.** Each worker also serves the API, uncounted and
  without the token, on ``worker-<i>.sock`` in the group's 0700 folder: for
  the requests other workers relay, and for the gathering below.
* **Answers for the group.** ``GET /metrics`` merges every worker's exposition
  (:mod:`chanstore.server.metrics_merge`), ``GET /readyz`` is 200 only when
  every worker is ready, and ``POST /-/reload`` reloads every worker and is
  ``ok`` only when every one applied the file. ``/healthz`` names the
  supervisor's pid (the service's main pid) and the worker that answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from chanstore import logs
from chanstore.backends.base import DatabaseInterface
from chanstore.backends.null import NullDatabase
from chanstore.config import ContainerSpec, DbConfig
from chanstore.http.api import Api, Handler, Routes
from chanstore.http.bodies import json_body
from chanstore.http.connections import Connections, Limits
from chanstore.http.messages import Request, Response
from chanstore.http.protocol import HttpProtocol
from chanstore.metrics import Metrics
from chanstore.server.forwarding import Forwarder
from chanstore.server.metrics_merge import merge_expositions, parse_exposition, render
from chanstore.server.peers import PeerAnswer, PeerPool, PeerUnavailable, request_once

__all__ = ["ROLE_VARIABLE", "Group", "WorkerRole", "served_here", "shared_everywhere"]

log = logs.get_logger()

#: The environment variable that makes ``chanstore serve`` a worker (set by the supervisor).
ROLE_VARIABLE = "CHANSTORE_WORKER_ROLE"
#: Connections a worker keeps to worker 0 for relayed requests, at most.
FORWARD_CONNECTIONS = 64
_EVENTS_ROUTE = "/v1/channels/{channel}/-/events"
_BULK_ROUTES = tuple(f"{Routes.CONTAINER}/-/{op}" for op in ("get", "set", "delete"))
_CONTAINER_ROUTES = (Routes.KEY, Routes.CONTAINER, *_BULK_ROUTES)


@dataclasses.dataclass(frozen=True)
class WorkerRole:
    """Which worker this process is, of how many, where the group's sockets are."""

    index: int
    count: int
    folder: Path
    supervisor_pid: int
    #: The inherited listening socket's descriptor.
    listen_fd: int
    #: The group's key in the marks of the json roots it serves, one for all its workers
    #: (:func:`chanstore.backends.json_serving.serve_for`); None from a supervisor of an
    #: earlier release, which a worker of this one can be started by after an upgrade.
    daemon_key: int | None

    @classmethod
    def from_environment(cls) -> WorkerRole | None:
        text = os.environ.get(ROLE_VARIABLE)
        if not text:
            return None
        fields = json.loads(text)
        return cls(fields["index"], fields["count"], Path(fields["folder"]),
                   fields["supervisor_pid"], fields["listen_fd"],
                   fields.get("daemon_key"))  # fmt: skip

    def encode(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "folder": str(self.folder)})

    def socket_path(self, index: int) -> str:
        """Worker ``index``'s private socket."""
        return str(self.folder / f"worker-{index}.sock")

    @property
    def peers(self) -> list[int]:
        return [index for index in range(self.count) if index != self.index]


def shares_writes(spec: ContainerSpec) -> bool:
    """Whether every process may write ``spec``'s backend and keep a coherent cache of it
    (its backend has an invalidation link, as Redis does) and nothing is cleared at a
    channel's first use (which each worker would do again)."""
    engine = spec.engine
    return engine.invalidations is not DatabaseInterface.invalidations and not spec.clear


def shared_everywhere(spec: ContainerSpec) -> bool:
    """Whether every worker serves ``spec`` (else worker 0 alone does)."""
    return shares_writes(spec) or issubclass(spec.engine, NullDatabase)


def served_here(role: WorkerRole | None, config: DbConfig) -> DbConfig:
    """The part of ``config`` the worker of ``role`` opens backends for: all of it for
    worker 0 (and a daemon on its own), the containers served everywhere for the rest."""
    if role is None or role.index == 0:
        return config
    kept = tuple(spec for spec in config if shared_everywhere(spec))
    return dataclasses.replace(config, containers=kept)


@dataclasses.dataclass
class GroupVerdict:
    """A reload's verdict for the whole group."""

    ok: bool
    answer: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return self.answer


class Group:
    """This worker's part in the group: the private socket, relaying, answering for all."""

    def __init__(self, role: WorkerRole, metrics: Metrics, *, timeout: float,
                 readiness: Callable[[], Awaitable[dict[str, str]]],
                 reload: Callable[[str], Awaitable[Any]]) -> None:  # fmt: skip
        self.role = role
        self.metrics = metrics
        self.timeout = timeout
        self._local_readiness = readiness
        self._local_reload = reload
        self._local: frozenset[str] = frozenset()
        self._feed_local: frozenset[str] = frozenset()
        self._all: tuple[str, ...] = ()
        self._server: asyncio.AbstractServer | None = None
        self._connections: Connections | None = None
        self.forwarder: Forwarder | None = None
        routes: dict[str, Callable[[Request], Handler | None]] = {
            "/metrics": lambda _request: self.metrics_page,
            "/healthz": lambda _request: self.healthz,
        }
        if role.index != 0:
            pool = PeerPool(role.socket_path(0), FORWARD_CONNECTIONS)
            self.forwarder = Forwarder(pool, timeout)
            routes.update(dict.fromkeys(_CONTAINER_ROUTES, self._by_container))
            routes[_EVENTS_ROUTE] = self._by_feed
        self._routes = routes

    # -- what is served here ---------------------------------------------------------

    def serve(self, config: DbConfig) -> None:
        """``config`` (the whole db_config) is the one running now."""
        self._all = tuple(spec.name for spec in config)
        if self.role.index == 0:
            self._local = frozenset(self._all)
            self._feed_local = self._local
            return
        self._local = frozenset(spec.name for spec in config if shared_everywhere(spec))
        self._feed_local = frozenset(spec.name for spec in config if shares_writes(spec))

    def divert(self, route: str, request: Request) -> Handler | None:
        """The handler that answers ``request`` for the group, or None: this worker's own."""
        chooser = self._routes.get(route)
        return None if chooser is None else chooser(request)

    def _by_container(self, request: Request) -> Handler | None:
        if request.segments[3] in self._local:
            return None
        assert self.forwarder is not None
        return self.forwarder.forward  # another worker's, or unknown: worker 0 says which

    def _by_feed(self, request: Request) -> Handler | None:
        names = [name for name in request.query_params().get("containers", "").split(",")
                 if name] or self._all  # fmt: skip
        if all(name in self._feed_local for name in names):
            return None
        assert self.forwarder is not None
        return self.forwarder.stream

    # -- the private socket ------------------------------------------------------------

    async def start(self, api: Api, limits: Limits) -> None:
        """Serve ``api`` (this worker's own, uncounted) on the private socket."""
        path = self.role.socket_path(self.role.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this worker's previous life
        # Other workers relay at most their pools' connections and their feeds' streams.
        most = max(limits.max_connections, 1024) * max(self.role.count - 1, 1)
        private = dataclasses.replace(limits, max_connections=most, keep_alive_timeout=60.0,
                                      max_header_bytes=limits.max_header_bytes + 1024)  # fmt: skip
        self._connections = connections = Connections(private, Metrics(CollectorRegistry()))
        connections.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: HttpProtocol(api, connections),
                                                     path=path, backlog=1024)  # fmt: skip

    async def close(self, timeout: float) -> None:
        """Stop serving the private socket once what is in flight is answered."""
        if self._server is not None:
            self._server.close()
        if self.forwarder is not None:
            self.forwarder.pool.close()
        if self._connections is not None:
            await self._connections.shutdown(timeout)

    # -- answers for the group -----------------------------------------------------------

    def healthz(self, request: Request) -> Response:
        return Response(200, json_body({"status": "serving", "pid": self.role.supervisor_pid,
                                        "worker": self.role.index,
                                        "worker_pid": os.getpid()}))  # fmt: skip

    async def metrics_page(self, request: Request) -> Response:
        """Every worker's metrics in one exposition; 503 while a worker does not answer
        (a partial sum would read as counters going back)."""
        answers = await self._ask_peers("GET", "/metrics")
        self.metrics.fold()
        families = [list(self.metrics.registry.collect())]
        for index, answer in answers.items():
            if isinstance(answer, Exception) or answer.status != 200:
                message = f"the metrics of worker {index} are not available now; try again"
                return Response(503, json_body({"error": message, "code": "worker_unavailable"}))
            families.append(parse_exposition(answer.body.decode("utf-8")))
        return Response(200, render(merge_expositions(families)), CONTENT_TYPE_LATEST.encode())

    async def readiness(self) -> dict[str, str]:
        """Why some worker cannot serve every container now (empty when all can)."""
        local, answers = await asyncio.gather(self._local_readiness(),
                                              self._ask_peers("GET", "/readyz"))  # fmt: skip
        problems = dict(local)
        for index, answer in answers.items():
            if isinstance(answer, Exception):
                problems[f"worker_{index}"] = "unavailable"
                continue
            try:
                theirs = json.loads(answer.body).get("problems", {}) if answer.status != 200 else {}
            except ValueError:
                theirs = {f"worker_{index}": "unavailable"}
            for name, kind in theirs.items():
                problems.setdefault(name, kind)
        return problems

    async def reload(self, source: str) -> GroupVerdict:
        """Reload every worker; ``ok`` only when every one applied the file."""
        local, answers = await asyncio.gather(self._local_reload(source),
                                              self._ask_peers("POST", "/-/reload"))  # fmt: skip
        verdicts: dict[int, dict[str, Any]] = {self.role.index: local.as_dict()}
        for index, answer in answers.items():
            verdicts[index] = _verdict_of(index, answer, source)
        failed = [verdict for _, verdict in sorted(verdicts.items()) if not verdict.get("ok")]
        if failed:
            return GroupVerdict(False, failed[0])
        return GroupVerdict(True, verdicts[0])  # worker 0 applied the whole db_config

    async def _ask_peers(self, method: str, target: str) -> dict[int, PeerAnswer | Exception]:
        peers = self.role.peers
        answers = await asyncio.gather(
            *(request_once(self.role.socket_path(index), method, target, self.timeout)
              for index in peers), return_exceptions=True)  # fmt: skip
        found: dict[int, PeerAnswer | Exception] = {}
        for index, answer in zip(peers, answers, strict=True):
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer
            if isinstance(answer, Exception) and not isinstance(answer, PeerUnavailable):
                log.warning("worker_not_answering", worker=index, error=repr(answer))
            found[index] = answer
        return found


def _verdict_of(index: int, answer: PeerAnswer | Exception, source: str) -> dict[str, Any]:
    if not isinstance(answer, Exception):
        try:
            verdict = json.loads(answer.body)
            if isinstance(verdict, dict) and "ok" in verdict:
                return verdict
        except ValueError:
            pass
        answer = PeerUnavailable(f"answered {answer.status}")
    return {"ok": False, "sources": [source],
            "error": "the new db_config was not applied by every worker",
            "problems": [f"worker {index} did not answer: {answer}"]}  # fmt: skip
