"""The blocking client, :class:`Client`, and the views through which containers act as dicts.

It keeps connections alive between calls and speaks the HTTP API of
:mod:`chanstore.http.api`. Its containers behave like dicts::

    from chanstore.client import Client

    with Client("http://127.0.0.1:8470") as client:
        stats = client.channel("c1").stats
        stats["HP"] = 5
        stats["HP"]          # 5
        stats["tags"] = {"a"}
        stats["tags"]        # {"a"}: a set, as it was stored
        del stats["HP"]
        stats["HP"]          # KeyError
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, overload

import httpx

from chanstore import codec
from chanstore.client.api import (
    DEFAULT_URL,
    JSON_HEADERS,
    auth_headers,
    daemon_url,
    key_path,
    page_path,
)
from chanstore.client.bodies import (
    bulk_documents,
    bulk_etags,
    bulk_values,
    bulk_versioned,
    document_of,
    json_bytes,
    stored_etag,
    value_body,
    value_of,
    values_body,
    versioned_of,
)
from chanstore.client.errors import PreconditionFailed, gave_up, raise_for, unreachable
from chanstore.client.listing import DEFAULT_PAGE_SIZE, check_page_size, page_keys
from chanstore.client.sse import WATCH_MAX_EVENT_BYTES
from chanstore.client.versions import (
    ABSENT,
    DEFAULT_UPDATE_ATTEMPTS,
    UNCONDITIONAL,
    Condition,
    Expectation,
    Versioned,
    check_attempts,
    precondition,
    update_delay,
)
from chanstore.client.watch import WATCH_IDLE_TIMEOUT, Watch

__all__ = ["ChannelView", "Client", "ContainerView"]


class Client:
    """A blocking client with a keep-alive connection pool."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 timeout: float = 15.0) -> None:  # fmt: skip
        self.url = daemon_url(url)
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, headers=auth_headers(token), timeout=timeout)

    def _request(self, method: str, path: str, *, key: str | None = None,
                 content: bytes | None = None,
                 headers: Mapping[str, str] | None = None) -> httpx.Response:  # fmt: skip
        sent = JSON_HEADERS if content is not None else None
        if headers:
            sent = {**(sent or {}), **headers}
        try:
            response = self._http.request(method, path, content=content, headers=sent)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from exc
        raise_for(response, key=key)
        return response

    def get(self, channel: str, container: str, key: str) -> Any:
        """The value of ``key``, its type marks revived; KeyError when absent."""
        return value_of(self._request("GET", key_path(channel, container, key), key=key))

    def get_versioned(self, channel: str, container: str, key: str) -> Versioned:
        """``(value, etag)``: the value of ``key``, revived, and the ETag of that version.

        KeyError when absent. Give the ETag back as ``expect=`` to write only
        if the key still holds that version.
        """
        return versioned_of(self._request("GET", key_path(channel, container, key), key=key))

    def get_document(self, channel: str, container: str, key: str) -> Any:
        """The stored form of ``key``'s value: the JSON document the daemon holds, as it is."""
        return document_of(self._request("GET", key_path(channel, container, key), key=key))

    def set(self, channel: str, container: str, key: str, value: Any, *,
            expect: Condition = UNCONDITIONAL) -> str | None:  # fmt: skip
        """Store ``value``; returns its new ETag once the daemon's backend holds it.

        ``value`` is JSON-shaped, or holds sets, tuples and dataclasses (sent
        type-marked), or is a :class:`chanstore.codec.Document` (sent as the
        document it holds); anything else is an
        :class:`~chanstore.errors.UnstorableValue`, raised before anything is sent.

        With ``expect=``, the value is stored only if the key holds that version
        (an ETag), exists (:data:`ANY`) or is absent (:data:`ABSENT`); otherwise
        :class:`PreconditionFailed` is raised and nothing changed. The ETag
        returned is None only from a daemon that predates versions.
        """
        path = key_path(channel, container, key)
        response = self._request("PUT", path, key=key, content=value_body(value),
                                 headers=precondition(expect))  # fmt: skip
        return stored_etag(response)

    def set_document(self, channel: str, container: str, key: str, document: Any, *,
                     expect: Condition = UNCONDITIONAL) -> str | None:  # fmt: skip
        """Store the JSON ``document`` as the value's stored form, type marks and all.

        The same as ``set(..., chanstore.codec.Document(document), expect=...)``:
        a dict in it shaped like a type mark is that mark, so it reads back as
        the value it stands for. Returns the new ETag.
        """
        return self.set(channel, container, key, codec.Document(document), expect=expect)

    def delete(self, channel: str, container: str, key: str, *,
               expect: Condition = UNCONDITIONAL) -> None:  # fmt: skip
        """Delete ``key``; KeyError when absent.

        With ``expect=`` (an ETag, or :data:`ANY`), only if the key holds that
        version; otherwise :class:`PreconditionFailed`, and the key is kept.
        """
        path = key_path(channel, container, key)
        self._request("DELETE", path, key=key, headers=precondition(expect))

    def update(self, channel: str, container: str, key: str, fn: Callable[[Any], Any], *,
               default: Any = None, attempts: int = DEFAULT_UPDATE_ATTEMPTS) -> Any:  # fmt: skip
        """Replace the value of ``key`` by ``fn(value)`` without losing a concurrent write.

        Reads the value and its ETag, calls ``fn`` with the value (with a deep
        copy of ``default`` when the key is absent) and stores what it returns
        on condition that the key still holds what was read (``If-Match``, or
        ``If-None-Match: *`` when it was absent). When another write came
        first (412), it waits a little (5 ms, doubling up to 200 ms, jittered),
        reads again and calls ``fn`` again: ``fn`` may run several times and
        should do nothing but compute the new value. After ``attempts``
        conflicts in a row it raises :class:`PreconditionFailed` and nothing of
        its own was stored. Returns the value stored.
        """
        check_attempts(attempts)
        for attempt in range(attempts):
            try:
                current, expect = self.get_versioned(channel, container, key)
            except KeyError:
                current, expect = copy.deepcopy(default), ABSENT
            new = fn(current)
            try:
                self.set(channel, container, key, new, expect=expect)
            except PreconditionFailed as exc:
                if attempt + 1 == attempts:
                    raise gave_up(key, attempts, exc) from exc
                time.sleep(update_delay(attempt))
            else:
                return new
        raise AssertionError("unreachable")

    def key_pages(self, channel: str, container: str,
                  page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[list[str]]:  # fmt: skip
        """The container's keys in key order, one list per request of ``page_size`` keys.

        Each page is asked for when the one before it has been consumed; keys
        written or deleted meanwhile may or may not be seen, and none is seen twice.
        """
        check_page_size(page_size)
        return self._pages(channel, container, page_size)

    def _pages(self, channel: str, container: str, page_size: int) -> Iterator[list[str]]:
        after: str | None = None
        while True:
            path = page_path(channel, container, page_size, after)
            keys, after = page_keys(document_of(self._request("GET", path)), after)
            if keys:
                yield keys
            if after is None:
                return

    def iter_keys(self, channel: str, container: str,
                  page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[str]:  # fmt: skip
        """The container's keys in key order, fetched ``page_size`` at a time as they are used."""
        pages = self.key_pages(channel, container, page_size)
        return (key for page in pages for key in page)

    def keys(self, channel: str, container: str, page_size: int = DEFAULT_PAGE_SIZE) -> list[str]:
        """Every key of the container, in key order (as many requests as it takes)."""
        return list(self.iter_keys(channel, container, page_size))

    def get_many(self, channel: str, container: str, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist, in one request."""
        requested = list(keys)
        path = key_path(channel, container) + "/-/get"
        response = self._request("POST", path, content=json_bytes({"keys": requested}))
        return bulk_values(response, requested)

    def get_many_documents(self, channel: str, container: str,
                           keys: Iterable[str]) -> dict[str, Any]:  # fmt: skip
        """The stored form of the values of those ``keys`` that exist, in one request: the
        JSON documents the daemon holds, type marks and all (see :meth:`get_document`).

        :class:`DamagedValueError` names the keys whose stored value cannot be
        read; its ``values`` holds the documents of the others.
        """
        path = key_path(channel, container) + "/-/get"
        response = self._request("POST", path, content=json_bytes({"keys": list(keys)}))
        return bulk_documents(response)

    def get_many_versioned(self, channel: str, container: str,
                           keys: Iterable[str]) -> dict[str, Versioned]:  # fmt: skip
        """``{key: (value, etag)}`` for those ``keys`` that exist, in one request."""
        requested = list(keys)
        path = key_path(channel, container) + "/-/get"
        response = self._request("POST", path, content=json_bytes({"keys": requested}))
        return bulk_versioned(response, requested)

    def set_many(self, channel: str, container: str, values: Mapping[str, Any], *,
                 expect: Mapping[str, Expectation] | None = None) -> dict[str, str]:  # fmt: skip
        """Store every item, in one request; the new ETag of each key.

        ``expect`` maps keys (of ``values`` or not) to an ETag, :data:`ANY` or
        :data:`ABSENT`: when any of them fails, nothing is stored and
        :class:`PreconditionFailed` names the failed keys in ``conflicts``.
        The ETags are empty only from a daemon that predates versions.
        """
        path = key_path(channel, container) + "/-/set"
        response = self._request("POST", path, content=values_body(values, expect))
        answer = document_of(response)
        has_etags = isinstance(answer, dict) and "etags" in answer
        return bulk_etags(answer, response.status_code) if has_etags else {}

    def delete_many(self, channel: str, container: str, keys: Iterable[str]) -> list[str]:
        """Delete ``keys`` in one request; those that existed."""
        path = key_path(channel, container) + "/-/delete"
        response = self._request("POST", path, content=json_bytes({"keys": list(keys)}))
        return document_of(response)["deleted"]

    def containers(self) -> list[dict[str, Any]]:
        """The containers of the daemon's running db_config (``name``, ``implementation``, ...)."""
        return self.served()["containers"]

    def served(self) -> dict[str, Any]:
        """What the daemon serves: ``{"service_id": its --service-id, "containers": [...]}``
        (``service_id`` is missing from a daemon that predates it)."""
        return document_of(self._request("GET", "/v1/containers"))

    def reload(self) -> dict[str, Any]:
        """Ask the daemon to reload db_config; the verdict (``ok``, ``problems``, ``changes``)."""
        try:
            response = self._http.post("/-/reload")
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from exc
        if response.status_code not in (200, 400):
            raise_for(response)
        return document_of(response)

    def metrics_text(self) -> str:
        """The daemon's /metrics page, in Prometheus's text format."""
        return self._request("GET", "/metrics").text

    def readiness(self) -> dict[str, str]:
        """What keeps the daemon from being ready, by container (the kind of each
        failure): empty when /readyz answers 200."""
        try:
            response = self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from exc
        if response.status_code == 200:
            return {}
        if response.status_code != 503:
            raise_for(response)
        problems = response.json().get("problems")
        return dict(problems) if isinstance(problems, dict) else {"daemon": "not_ready"}

    def watch(self, channel: str, containers: Iterable[str] | str | None = None,
              since: str | None = None, *, idle_timeout: float = WATCH_IDLE_TIMEOUT,
              max_event_bytes: int = WATCH_MAX_EVENT_BYTES) -> Watch:  # fmt: skip
        """The changes of ``channel`` (of ``containers`` only, when given), as they happen.

        An iterator of :class:`WatchEvent`: ``ready`` first, then every ``set``
        and ``delete`` acknowledged after it, in acknowledgement order within a
        container. With ``since`` (an event's cursor) it starts after that
        event instead of now. It resumes by itself after a dropped connection
        and raises :class:`CursorExpired` when the daemon no longer holds the
        events it needs; see :class:`Watch`. Nothing is sent before the first
        ``next()``; ``close()`` it, or use it in a ``with`` block.
        """
        return Watch(self, channel, containers, since, idle_timeout=idle_timeout,
                     max_event_bytes=max_event_bytes)  # fmt: skip

    def channel(self, channel: str) -> ChannelView:
        """A channel whose containers are attributes (``client.channel("c1").stats``)."""
        return ChannelView(self, channel)

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ChannelView:
    """One channel seen through a :class:`Client`."""

    def __init__(self, client: Client, channel: str) -> None:
        self._client = client
        self._channel = channel

    def __getattr__(self, container: str) -> ContainerView:
        if container.startswith("_"):
            raise AttributeError(container)
        return ContainerView(self._client, self._channel, container)

    def __getitem__(self, container: str) -> ContainerView:
        return ContainerView(self._client, self._channel, container)


class ContainerView(MutableMapping[str, Any]):
    """A container of one channel, as a dict whose every operation asks the daemon.

    Iteration and ``len`` list the keys ``page_size`` at a time, never holding
    them all.
    """

    def __init__(self, client: Client, channel: str, container: str, *,
                 page_size: int = DEFAULT_PAGE_SIZE) -> None:  # fmt: skip
        self._client = client
        self.channel = channel
        self.container = container
        self.page_size = check_page_size(page_size)

    def __getitem__(self, key: str) -> Any:
        return self._client.get(self.channel, self.container, key)

    def __setitem__(self, key: str, value: Any) -> None:
        self._client.set(self.channel, self.container, key, value)

    def __delitem__(self, key: str) -> None:
        self._client.delete(self.channel, self.container, key)

    def __iter__(self) -> Iterator[str]:
        return self._client.iter_keys(self.channel, self.container, self.page_size)

    def __len__(self) -> int:
        pages = self._client.key_pages(self.channel, self.container, self.page_size)
        return sum(len(page) for page in pages)

    @overload
    def update(self, key: str, fn: Callable[[Any], Any], /, *, default: Any = None,
               attempts: int = DEFAULT_UPDATE_ATTEMPTS) -> Any: ...  # fmt: skip
    @overload
    def update(self, other: Any = (), /, **kwargs: Any) -> None: ...

    def update(self, *args: Any, **kwargs: Any) -> Any:
        """``update(key, fn)``: read-modify-write of one key; ``update(other, **kw)``: dict's.

        With a key and a function, the value of ``key`` becomes ``fn(value)``
        without losing a concurrent write (see :meth:`Client.update`; keywords
        ``default`` and ``attempts``), and the value stored is returned.

        Otherwise it is :meth:`dict.update`: every item of ``other`` (a mapping
        or pairs) and of ``kwargs`` is stored with one bulk request.
        """
        if len(args) == 2:
            key, fn = args
            if not isinstance(key, str) or not callable(fn):
                raise TypeError("update(key, fn): key must be a str and fn a callable")
            return self._client.update(self.channel, self.container, key, fn, **kwargs)
        if len(args) > 2:
            raise TypeError(f"update expected at most 2 positional arguments, got {len(args)}")
        other = args[0] if args else ()
        items = dict(other.items() if isinstance(other, Mapping) else other, **kwargs)
        if items:
            self._client.set_many(self.channel, self.container, items)
        return None

    def get_versioned(self, key: str) -> Versioned:
        """``(value, etag)`` of ``key``; KeyError when absent (see :meth:`Client.get_versioned`)."""
        return self._client.get_versioned(self.channel, self.container, key)

    def set(self, key: str, value: Any, *,
            expect: Condition = UNCONDITIONAL) -> str | None:  # fmt: skip
        """Store ``value``, on condition ``expect`` if given; its new ETag.

        See :meth:`Client.set`.
        """
        return self._client.set(self.channel, self.container, key, value, expect=expect)

    def delete(self, key: str, *,
               expect: Condition = UNCONDITIONAL) -> None:  # fmt: skip
        """Delete ``key``, on condition ``expect`` if given; KeyError when absent."""
        self._client.delete(self.channel, self.container, key, expect=expect)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist, in one request."""
        return self._client.get_many(self.channel, self.container, keys)

    def get_many_versioned(self, keys: Iterable[str]) -> dict[str, Versioned]:
        """``{key: (value, etag)}`` for those ``keys`` that exist, in one request."""
        return self._client.get_many_versioned(self.channel, self.container, keys)

    def set_many(self, values: Mapping[str, Any], *,
                 expect: Mapping[str, Expectation] | None = None) -> dict[str, str]:  # fmt: skip
        """Store every item, all or none under ``expect``; the new ETags (see
        :meth:`Client.set_many`)."""
        return self._client.set_many(self.channel, self.container, values, expect=expect)

    def __repr__(self) -> str:
        return f"ContainerView(channel={self.channel!r}, container={self.container!r})"
