"""Clients for a running chanstore daemon: :class:`Client` (sync) and :class:`AsyncClient`.

Both keep connections alive between calls and speak the HTTP API of
:mod:`chanstore.http.api`. Import them, and every other name, from here
(``from chanstore.client import Client``); each concept has its module:

- :mod:`~chanstore.client.sync_client`: :class:`Client`, and the
  :class:`ChannelView` and :class:`ContainerView` through which a container
  behaves like a dict;
- :mod:`~chanstore.client.async_client`: :class:`AsyncClient`, the same calls
  as coroutines;
- :mod:`~chanstore.client.errors`: :class:`ClientError` and its subclasses,
  and how a daemon's answer maps to them (an absent key is a KeyError);
- :mod:`~chanstore.client.versions`: ETags and conditional writes (``expect=``
  takes an ETag, :data:`ANY` or :data:`ABSENT`), :class:`Versioned`, and how
  ``update`` tries again after a conflict;
- :mod:`~chanstore.client.bodies`: values sent in their stored form
  (:mod:`chanstore.codec`'s type-marked JSON), answers read and revived;
- :mod:`~chanstore.client.listing`: listing a container a page of keys at a time;
- :mod:`~chanstore.client.watch`: the change feed, :class:`WatchEvent`,
  :class:`Watch` and :class:`AsyncWatch`, resumed after a dropped connection;
- :mod:`~chanstore.client.sse`: the Server-Sent Events decoder the feed is read with;
- :mod:`~chanstore.client.api`: the daemon's URL, the API's paths and the
  headers requests carry.
"""

from __future__ import annotations

# ``name as name``: a name outside __all__ that chanstore.client had before it was a
# package, kept importable from here.
from chanstore.client.api import DEFAULT_URL
from chanstore.client.api import key_path as key_path
from chanstore.client.api import page_path as page_path
from chanstore.client.api import segment as segment
from chanstore.client.async_client import AsyncClient
from chanstore.client.errors import (
    BackendUnavailableError,
    ClientError,
    CursorExpired,
    DaemonUnreachable,
    DamagedValueError,
    PreconditionFailed,
    UnauthorizedError,
)
from chanstore.client.listing import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from chanstore.client.sse import WATCH_MAX_EVENT_BYTES as WATCH_MAX_EVENT_BYTES
from chanstore.client.sse import SSEDecoder as _SSEDecoder  # noqa: F401 - tests use it
from chanstore.client.sync_client import ChannelView as ChannelView
from chanstore.client.sync_client import Client, ContainerView
from chanstore.client.versions import ABSENT, ANY, DEFAULT_UPDATE_ATTEMPTS, Versioned
from chanstore.client.versions import UPDATE_FIRST_DELAY as UPDATE_FIRST_DELAY
from chanstore.client.versions import UPDATE_MAX_DELAY as UPDATE_MAX_DELAY
from chanstore.client.versions import Expectation as Expectation
from chanstore.client.watch import WATCH_FIRST_DELAY as WATCH_FIRST_DELAY
from chanstore.client.watch import WATCH_IDLE_TIMEOUT, AsyncWatch, Watch, WatchEvent
from chanstore.client.watch import WATCH_MAX_DELAY as WATCH_MAX_DELAY

__all__ = [
    "ABSENT",
    "ANY",
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_UPDATE_ATTEMPTS",
    "DEFAULT_URL",
    "MAX_PAGE_SIZE",
    "WATCH_IDLE_TIMEOUT",
    "AsyncClient",
    "AsyncWatch",
    "BackendUnavailableError",
    "Client",
    "ClientError",
    "ContainerView",
    "CursorExpired",
    "DaemonUnreachable",
    "DamagedValueError",
    "PreconditionFailed",
    "UnauthorizedError",
    "Versioned",
    "Watch",
    "WatchEvent",
]
