"""The asyncio client, :class:`AsyncClient`: the calls of :class:`Client`, as coroutines.

It keeps connections alive between calls, as the sync client does::

    async with AsyncClient() as client:
        await client.set("c1", "stats", "HP", 5)
        await client.get("c1", "stats", "HP")
        async for key in client.iter_keys("c1", "stats"):
            ...
"""

from __future__ import annotations

import asyncio
import copy
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

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
from chanstore.client.watch import WATCH_IDLE_TIMEOUT, AsyncWatch

__all__ = ["AsyncClient"]


class AsyncClient:
    """The asyncio client: the same calls as :class:`Client`, as coroutines."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 timeout: float = 15.0) -> None:  # fmt: skip
        self.url = daemon_url(url)
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=auth_headers(token), timeout=timeout
        )

    async def _request(self, method: str, path: str, *, key: str | None = None,
                       content: bytes | None = None,
                       headers: Mapping[str, str] | None = None) -> httpx.Response:  # fmt: skip
        sent = JSON_HEADERS if content is not None else None
        if headers:
            sent = {**(sent or {}), **headers}
        try:
            response = await self._http.request(method, path, content=content, headers=sent)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from exc
        raise_for(response, key=key)
        return response

    async def get(self, channel: str, container: str, key: str) -> Any:
        """The value of ``key``, its type marks revived; KeyError when absent."""
        return value_of(await self._request("GET", key_path(channel, container, key), key=key))

    async def get_versioned(self, channel: str, container: str, key: str) -> Versioned:
        """``(value, etag)`` of ``key``; KeyError when absent (see :meth:`Client.get_versioned`)."""
        return versioned_of(await self._request("GET", key_path(channel, container, key), key=key))

    async def get_document(self, channel: str, container: str, key: str) -> Any:
        """The stored form of ``key``'s value: the JSON document the daemon holds, as it is."""
        return document_of(await self._request("GET", key_path(channel, container, key), key=key))

    async def set(self, channel: str, container: str, key: str, value: Any, *,
                  expect: Condition = UNCONDITIONAL) -> str | None:  # fmt: skip
        """Store ``value`` (type-marked where JSON has no type for it), on condition
        ``expect`` if given; its new ETag. See :meth:`Client.set`."""
        path = key_path(channel, container, key)
        response = await self._request("PUT", path, key=key, content=value_body(value),
                                       headers=precondition(expect))  # fmt: skip
        return stored_etag(response)

    async def set_document(self, channel: str, container: str, key: str, document: Any, *,
                           expect: Condition = UNCONDITIONAL) -> str | None:  # fmt: skip
        """Store the JSON ``document`` as the value's stored form, type marks and all;
        its new ETag."""
        return await self.set(channel, container, key, codec.Document(document), expect=expect)

    async def delete(self, channel: str, container: str, key: str, *,
                     expect: Condition = UNCONDITIONAL) -> None:  # fmt: skip
        """Delete ``key``, on condition ``expect`` if given; KeyError when absent."""
        path = key_path(channel, container, key)
        await self._request("DELETE", path, key=key, headers=precondition(expect))

    async def update(self, channel: str, container: str, key: str, fn: Callable[[Any], Any],
                     *, default: Any = None,
                     attempts: int = DEFAULT_UPDATE_ATTEMPTS) -> Any:  # fmt: skip
        """Replace the value of ``key`` by ``fn(value)`` without losing a concurrent write.

        As :meth:`Client.update`: read with the ETag, apply ``fn`` (to a deep
        copy of ``default`` when the key is absent), write on condition that
        nothing changed meanwhile, and on conflict wait a little (jittered,
        5 ms doubling to 200 ms) and start again, at most ``attempts`` times;
        then :class:`PreconditionFailed`. ``fn`` may also be a coroutine
        function. Returns the value stored.
        """
        check_attempts(attempts)
        for attempt in range(attempts):
            try:
                current, expect = await self.get_versioned(channel, container, key)
            except KeyError:
                current, expect = copy.deepcopy(default), ABSENT
            new = fn(current)
            if inspect.isawaitable(new):
                new = await new
            try:
                await self.set(channel, container, key, new, expect=expect)
            except PreconditionFailed as exc:
                if attempt + 1 == attempts:
                    raise gave_up(key, attempts, exc) from exc
                await asyncio.sleep(update_delay(attempt))
            else:
                return new
        raise AssertionError("unreachable")

    def key_pages(self, channel: str, container: str,
                  page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[list[str]]:  # fmt: skip
        """The container's keys in key order, one list per request; see :meth:`Client.key_pages`."""
        check_page_size(page_size)
        return self._pages(channel, container, page_size)

    async def _pages(self, channel: str, container: str,
                     page_size: int) -> AsyncIterator[list[str]]:  # fmt: skip
        after: str | None = None
        while True:
            path = page_path(channel, container, page_size, after)
            keys, after = page_keys(document_of(await self._request("GET", path)), after)
            if keys:
                yield keys
            if after is None:
                return

    def iter_keys(self, channel: str, container: str,
                  page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[str]:  # fmt: skip
        """The container's keys in key order, fetched ``page_size`` at a time as they are used."""
        return self._keys_of(self.key_pages(channel, container, page_size))

    @staticmethod
    async def _keys_of(pages: AsyncIterator[list[str]]) -> AsyncIterator[str]:
        async for page in pages:
            for key in page:
                yield key

    async def keys(self, channel: str, container: str,
                   page_size: int = DEFAULT_PAGE_SIZE) -> list[str]:  # fmt: skip
        """Every key of the container, in key order (as many requests as it takes)."""
        return [key async for key in self.iter_keys(channel, container, page_size)]

    async def get_many(self, channel: str, container: str, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist, in one request."""
        requested = list(keys)
        path = key_path(channel, container) + "/-/get"
        response = await self._request("POST", path, content=json_bytes({"keys": requested}))
        return bulk_values(response, requested)

    async def get_many_documents(self, channel: str, container: str,
                                 keys: Iterable[str]) -> dict[str, Any]:  # fmt: skip
        """The stored form of the values of those ``keys`` that exist, in one request."""
        path = key_path(channel, container) + "/-/get"
        response = await self._request("POST", path, content=json_bytes({"keys": list(keys)}))
        return bulk_documents(response)

    async def get_many_versioned(self, channel: str, container: str,
                                 keys: Iterable[str]) -> dict[str, Versioned]:  # fmt: skip
        """``{key: (value, etag)}`` for those ``keys`` that exist, in one request."""
        requested = list(keys)
        path = key_path(channel, container) + "/-/get"
        response = await self._request("POST", path, content=json_bytes({"keys": requested}))
        return bulk_versioned(response, requested)

    async def set_many(self, channel: str, container: str, values: Mapping[str, Any],
                       *, expect: Mapping[str, Expectation] | None = None,
                       ) -> dict[str, str]:  # fmt: skip
        """Store every item, all or none under ``expect``; the new ETag of each key.
        See :meth:`Client.set_many`."""
        path = key_path(channel, container) + "/-/set"
        response = await self._request("POST", path, content=values_body(values, expect))
        answer = document_of(response)
        has_etags = isinstance(answer, dict) and "etags" in answer
        return bulk_etags(answer, response.status_code) if has_etags else {}

    async def delete_many(self, channel: str, container: str, keys: Iterable[str]) -> list[str]:
        """Delete ``keys`` in one request; those that existed."""
        path = key_path(channel, container) + "/-/delete"
        response = await self._request("POST", path, content=json_bytes({"keys": list(keys)}))
        return document_of(response)["deleted"]

    async def containers(self) -> list[dict[str, Any]]:
        """The containers of the daemon's running db_config."""
        return (await self.served())["containers"]

    async def served(self) -> dict[str, Any]:
        """What the daemon serves: ``{"service_id": ..., "containers": [...]}``."""
        return document_of(await self._request("GET", "/v1/containers"))

    async def reload(self) -> dict[str, Any]:
        """Ask the daemon to reload db_config; the verdict (``ok``, ``problems``, ``changes``)."""
        try:
            response = await self._http.post("/-/reload")
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from exc
        if response.status_code not in (200, 400):
            raise_for(response)
        return document_of(response)

    def watch(self, channel: str, containers: Iterable[str] | str | None = None,
              since: str | None = None, *, idle_timeout: float = WATCH_IDLE_TIMEOUT,
              max_event_bytes: int = WATCH_MAX_EVENT_BYTES) -> AsyncWatch:  # fmt: skip
        """The changes of ``channel`` as an async iterator of :class:`WatchEvent`.

        As :meth:`Client.watch`::

            async with client.watch("c1") as events:
                async for event in events:
                    ...
        """
        return AsyncWatch(self, channel, containers, since, idle_timeout=idle_timeout,
                          max_event_bytes=max_event_bytes)  # fmt: skip

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
