"""Clients for a running chanstore daemon: :class:`Client` (sync) and :class:`AsyncClient`.

Both keep connections alive between calls and speak the HTTP API of
:mod:`chanstore.server.app`. The sync client's containers behave like dicts::

    from chanstore.client import Client

    with Client("http://127.0.0.1:8470") as client:
        stats = client.channel("c1").stats
        stats["HP"] = 5
        stats["HP"]          # 5
        del stats["HP"]
        stats["HP"]          # KeyError

The async client's calls are coroutines::

    async with AsyncClient() as client:
        await client.set("c1", "stats", "HP", 5)
        await client.get("c1", "stats", "HP")

An absent key is a :class:`KeyError`; every other failure is a
:class:`ClientError` (or a subclass) carrying the status and the daemon's message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any
from urllib.parse import quote

import httpx

__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "BackendUnavailableError",
    "Client",
    "ClientError",
    "ContainerView",
    "DaemonUnreachable",
    "UnauthorizedError",
]

DEFAULT_URL = "http://127.0.0.1:8470"


class ClientError(Exception):
    """The daemon answered with an error, or could not be asked."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class UnauthorizedError(ClientError):
    """401: the token is missing or wrong."""


class BackendUnavailableError(ClientError):
    """503: a backend behind the daemon failed; the write was not acknowledged."""


class DaemonUnreachable(ClientError):
    """No daemon answered at the client's URL."""


def segment(text: str) -> str:
    """``text`` as one percent-encoded path segment; ``.`` and ``..`` encoded too."""
    encoded = quote(str(text), safe="")
    if encoded in (".", ".."):
        encoded = encoded.replace(".", "%2E")
    return encoded


def key_path(channel: str, container: str, key: str | None = None) -> str:
    """The API path of a container, or of one key in it."""
    path = f"/v1/channels/{segment(channel)}/{segment(container)}"
    return path if key is None else f"{path}/{segment(key)}"


def _raise_for(response: httpx.Response, *, key: str | None = None) -> None:
    status = response.status_code
    if status < 400:
        return
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text or response.reason_phrase
    if status == 404 and key is not None and response.json().get("code") == "not_found":
        raise KeyError(key)
    if status == 401:
        raise UnauthorizedError(message, status)
    if status == 503:
        raise BackendUnavailableError(message, status)
    raise ClientError(f"{status}: {message}", status)


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


class Client:
    """A blocking client with a keep-alive connection pool."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 timeout: float = 15.0) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=_headers(token), timeout=timeout)

    def _request(self, method: str, path: str, *, key: str | None = None, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"no chanstore daemon answers at {self.url}: {exc}") from exc
        _raise_for(response, key=key)
        return response.json()

    def get(self, channel: str, container: str, key: str) -> Any:
        """The value of ``key``; KeyError when absent."""
        return self._request("GET", key_path(channel, container, key), key=key)

    def set(self, channel: str, container: str, key: str, value: Any) -> None:
        """Store ``value``; returns once the daemon's backend holds it."""
        self._request("PUT", key_path(channel, container, key), json=value)

    def delete(self, channel: str, container: str, key: str) -> None:
        """Delete ``key``; KeyError when absent."""
        self._request("DELETE", key_path(channel, container, key), key=key)

    def keys(self, channel: str, container: str) -> list[str]:
        return self._request("GET", key_path(channel, container))["keys"]

    def get_many(self, channel: str, container: str, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist, in one request."""
        path = key_path(channel, container) + "/-/get"
        return self._request("POST", path, json={"keys": list(keys)})["values"]

    def set_many(self, channel: str, container: str, values: Mapping[str, Any]) -> None:
        """Store every item, in one request."""
        path = key_path(channel, container) + "/-/set"
        self._request("POST", path, json={"values": dict(values)})

    def delete_many(self, channel: str, container: str, keys: Iterable[str]) -> list[str]:
        """Delete ``keys`` in one request; those that existed."""
        path = key_path(channel, container) + "/-/delete"
        return self._request("POST", path, json={"keys": list(keys)})["deleted"]

    def containers(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/containers")["containers"]

    def reload(self) -> dict[str, Any]:
        """Ask the daemon to reload db_config; the verdict (``ok``, ``problems``, ``changes``)."""
        try:
            response = self._http.post("/-/reload")
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"no chanstore daemon answers at {self.url}: {exc}") from exc
        if response.status_code in (200, 400):
            return response.json()
        _raise_for(response)
        return response.json()

    def metrics_text(self) -> str:
        """The daemon's /metrics page, in Prometheus's text format."""
        try:
            response = self._http.get("/metrics")
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"no chanstore daemon answers at {self.url}: {exc}") from exc
        _raise_for(response)
        return response.text

    def channel(self, channel: str) -> ChannelView:
        """A channel whose containers are attributes (``client.channel("c1").stats``)."""
        return ChannelView(self, channel)

    def close(self) -> None:
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
    """A container of one channel, as a dict whose every operation asks the daemon."""

    def __init__(self, client: Client, channel: str, container: str) -> None:
        self._client = client
        self.channel = channel
        self.container = container

    def __getitem__(self, key: str) -> Any:
        return self._client.get(self.channel, self.container, key)

    def __setitem__(self, key: str, value: Any) -> None:
        self._client.set(self.channel, self.container, key, value)

    def __delitem__(self, key: str) -> None:
        self._client.delete(self.channel, self.container, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._client.keys(self.channel, self.container))

    def __len__(self) -> int:
        return len(self._client.keys(self.channel, self.container))

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Store every item with one bulk request."""
        items = dict(other.items() if isinstance(other, Mapping) else other, **kwargs)
        if items:
            self._client.set_many(self.channel, self.container, items)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        return self._client.get_many(self.channel, self.container, keys)

    def __repr__(self) -> str:
        return f"ContainerView(channel={self.channel!r}, container={self.container!r})"


class AsyncClient:
    """The asyncio client: the same calls as :class:`Client`, as coroutines."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 timeout: float = 15.0) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, headers=_headers(token), timeout=timeout)

    async def _request(self, method: str, path: str, *, key: str | None = None,
                       **kwargs: Any) -> Any:  # fmt: skip
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"no chanstore daemon answers at {self.url}: {exc}") from exc
        _raise_for(response, key=key)
        return response.json()

    async def get(self, channel: str, container: str, key: str) -> Any:
        return await self._request("GET", key_path(channel, container, key), key=key)

    async def set(self, channel: str, container: str, key: str, value: Any) -> None:
        await self._request("PUT", key_path(channel, container, key), json=value)

    async def delete(self, channel: str, container: str, key: str) -> None:
        await self._request("DELETE", key_path(channel, container, key), key=key)

    async def keys(self, channel: str, container: str) -> list[str]:
        return (await self._request("GET", key_path(channel, container)))["keys"]

    async def get_many(self, channel: str, container: str, keys: Iterable[str]) -> dict[str, Any]:
        path = key_path(channel, container) + "/-/get"
        return (await self._request("POST", path, json={"keys": list(keys)}))["values"]

    async def set_many(self, channel: str, container: str, values: Mapping[str, Any]) -> None:
        path = key_path(channel, container) + "/-/set"
        await self._request("POST", path, json={"values": dict(values)})

    async def delete_many(self, channel: str, container: str, keys: Iterable[str]) -> list[str]:
        path = key_path(channel, container) + "/-/delete"
        return (await self._request("POST", path, json={"keys": list(keys)}))["deleted"]

    async def reload(self) -> dict[str, Any]:
        try:
            response = await self._http.post("/-/reload")
        except httpx.TransportError as exc:
            raise DaemonUnreachable(f"no chanstore daemon answers at {self.url}: {exc}") from exc
        if response.status_code not in (200, 400):
            _raise_for(response)
        return response.json()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
