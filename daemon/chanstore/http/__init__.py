"""The HTTP side: the API defined once, and the connection protocol that serves it.

:func:`build_api` puts the routes together; :class:`~chanstore.http.protocol.HttpProtocol`
serves them on each connection, within the :class:`~chanstore.http.connections.Limits`.
Nothing here knows how the daemon is started or reloaded: the server hands
in what the routes need.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from chanstore.engine import Feed, Store
from chanstore.http.api import Api, Routes
from chanstore.http.auth import BearerToken
from chanstore.http.handlers import DataHandlers, OpsHandlers, Verdict
from chanstore.metrics import Metrics

__all__ = ["Api", "BearerToken", "Verdict", "build_api"]


def build_api(store: Store, feed: Feed, token: BearerToken, metrics: Metrics, *,
              readiness: Callable[[], Awaitable[dict[str, str]]],
              reload: Callable[[str], Awaitable[Verdict]],
              containers: Callable[[], list[dict[str, Any]]],
              service_id: str | None = None, count_in: Metrics | None = None) -> Api:  # fmt: skip
    """The API over ``store`` and ``feed``, with the operations routes calling the given
    functions; ``GET /v1/containers`` also names ``service_id``. Requests are counted
    in ``count_in`` (default ``metrics``): another worker's requests, relayed, are
    counted where they arrived."""
    data = DataHandlers(store, feed, metrics)
    ops = OpsHandlers(metrics, readiness=readiness, reload=reload, containers=containers,
                      service_id=service_id)  # fmt: skip
    routes = Routes(
        key={"GET": data.get_key, "PUT": data.put_key, "DELETE": data.delete_key},
        container={"GET": data.list_keys},
        bulk={"get": data.bulk_get, "set": data.bulk_set, "delete": data.bulk_delete},
        channel={"events": {"GET": data.events}},
        fixed={
            "/metrics": {"GET": ops.metrics_page},
            "/healthz": {"GET": ops.healthz},
            "/readyz": {"GET": ops.readyz},
            "/-/reload": {"POST": ops.reload},
            "/v1/containers": {"GET": ops.containers},
        },
    )
    return Api(routes, token, count_in if count_in is not None else metrics)
