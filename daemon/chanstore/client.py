"""Clients for a running chanstore daemon: :class:`Client` (sync) and :class:`AsyncClient`.

Both keep connections alive between calls and speak the HTTP API of
:mod:`chanstore.http.api`. The sync client's containers behave like dicts::

    from chanstore.client import Client

    with Client("http://127.0.0.1:8470") as client:
        stats = client.channel("c1").stats
        stats["HP"] = 5
        stats["HP"]          # 5
        stats["tags"] = {"a"}
        stats["tags"]        # {"a"}: a set, as it was stored
        del stats["HP"]
        stats["HP"]          # KeyError

The async client's calls are coroutines::

    async with AsyncClient() as client:
        await client.set("c1", "stats", "HP", 5)
        await client.get("c1", "stats", "HP")
        async for key in client.iter_keys("c1", "stats"):
            ...

Values cross HTTP in their stored form, the library's type-marked JSON
(:mod:`chanstore.codec`): the clients write a value as
:func:`chanstore.codec.to_json_shape` makes it and revive what they read with
:func:`chanstore.codec.decode`, so sets, tuples and registered dataclasses keep
their types. :meth:`Client.get_document` and :meth:`Client.set_document` move
the stored JSON document itself, type marks and all (``set_document(..., doc)``
is ``set(..., codec.Document(doc))``).

Listing a container goes a page at a time (the daemon answers at most 10,000
keys per request): :meth:`Client.iter_keys` yields keys as their pages arrive,
:meth:`Client.keys` collects them all.

An absent key is a :class:`KeyError`; every other failure is a
:class:`ClientError` (or a subclass) carrying the status and the daemon's message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, MutableMapping
from typing import Any
from urllib.parse import quote

import httpx

from chanstore import codec

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_URL",
    "MAX_PAGE_SIZE",
    "AsyncClient",
    "BackendUnavailableError",
    "Client",
    "ClientError",
    "ContainerView",
    "DaemonUnreachable",
    "DamagedValueError",
    "UnauthorizedError",
]

DEFAULT_URL = "http://127.0.0.1:8470"
#: Keys per listing request unless told otherwise (the daemon's own default).
DEFAULT_PAGE_SIZE = 1000
#: The most keys the daemon answers in one listing request.
MAX_PAGE_SIZE = 10_000

_JSON_HEADERS = {"content-type": "application/json"}


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


class DamagedValueError(ClientError):
    """A stored value exists but cannot be read (``code: corrupt``): never an absent key.

    ``keys`` names the damaged keys (the daemon's log says which file or field);
    after a bulk get, ``values`` holds the values that could be read. Deleting
    the key, or storing a new value over it, clears it.
    """

    def __init__(self, message: str, status: int | None = None, *, keys: list[str] | None = None,
                 values: dict[str, Any] | None = None) -> None:  # fmt: skip
        super().__init__(message, status)
        self.keys = keys or []
        self.values = values or {}


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


def page_path(channel: str, container: str, limit: int, after: str | None = None) -> str:
    """The API path of one page of a container's keys: ``limit`` keys after ``after``.

    ``after`` is percent-encoded whole (``&``, ``=``, ``+``, ``/``, ``%`` and
    non-ASCII included), so any key reads back as itself on the daemon's side.
    """
    query = f"limit={limit}" if after is None else f"limit={limit}&after={quote(after, safe='')}"
    return f"{key_path(channel, container)}?{query}"


# -- bodies: values go out in their stored form and come back revived -------------


def _json_bytes(document: Any) -> bytes:
    """A request body that is JSON already (key lists); ASCII, NaN refused."""
    return json.dumps(document, separators=(",", ":"), allow_nan=False).encode("ascii")


def _value_body(value: Any) -> bytes:
    """``value`` as its stored form; :class:`~chanstore.errors.UnstorableValue` if it has none.

    A :class:`chanstore.codec.Document` is sent as the document it holds.
    """
    return codec.encode(value).encode("ascii")


def _values_body(values: Mapping[str, Any]) -> bytes:
    """A bulk set's body: each value in its stored form, the envelope left as it is."""
    # The mapping goes in as a Document: keys named like a type mark's two halves
    # are keys, not a mark to escape.
    shaped = {key: codec.to_json_shape(value) for key, value in values.items()}
    return _value_body({"values": codec.Document(shaped)})


def _revive(document: Any) -> Any:
    """A parsed JSON document with its type marks revived, innermost first as a decoder does."""
    if isinstance(document, dict):
        return codec.revive({key: _revive(item) for key, item in document.items()})
    if isinstance(document, list):
        return [_revive(item) for item in document]
    return document


def _document(response: httpx.Response) -> Any:
    """The JSON document of a successful answer, as it is."""
    try:
        return json.loads(response.content)
    except ValueError as exc:
        raise ClientError(f"the daemon's answer is not JSON: {exc}", response.status_code) from exc


def _value(response: httpx.Response) -> Any:
    """The value a successful GET answered: its document with type marks revived."""
    try:
        return codec.decode(response.content)
    except ValueError as exc:  # not JSON, or a registered type's mark that does not fit it
        message = f"the daemon's answer is not a value: {exc}"
        raise ClientError(message, response.status_code) from exc


def _bulk_values(response: httpx.Response, requested: list[str]) -> dict[str, Any]:
    """The revived ``values`` of a bulk get's answer; DamagedValueError when some
    requested keys hold values that cannot be read."""
    if codec.TYPE_KEY not in requested or codec.VALUE_KEY not in requested:
        answer = _value(response)
        values = dict(answer["values"])
    else:
        # The answer's "values" object may hold exactly the two keys of a type mark:
        # decoding the whole answer would take it for one. Revive each value alone.
        answer = _document(response)
        try:
            values = {key: _revive(document) for key, document in answer["values"].items()}
        except ValueError as exc:
            message = f"the daemon's answer holds a value that is not one: {exc}"
            raise ClientError(message, response.status_code) from exc
    damaged = answer.get("corrupt")
    if damaged:
        message = f"the stored values of {damaged!r:.300} cannot be read"
        raise DamagedValueError(message, response.status_code, keys=list(damaged), values=values)
    return values


def _page(answer: Any, after: str | None) -> tuple[list[str], str | None]:
    """The keys of one listing page and the cursor of the next (None after the last)."""
    keys = answer.get("keys") if isinstance(answer, dict) else None
    following = answer.get("next") if isinstance(answer, dict) else None
    if not isinstance(keys, list) or not (following is None or isinstance(following, str)):
        raise ClientError(f'expected {{"keys": [...], "next": KEY or null}}, got {answer!r:.200}')
    if following is not None and following == after:
        # A daemon that ignores ``after`` would have this loop forever.
        raise ClientError(f"the daemon's listing did not advance past {after!r:.200}")
    return keys, following


def _check_page_size(page_size: int) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise TypeError(f"page_size must be an int, not {type(page_size).__name__}")
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, not {page_size}")
    return page_size


# -- errors -----------------------------------------------------------------------


def _raise_for(response: httpx.Response, *, key: str | None = None) -> None:
    status = response.status_code
    if status < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message, code = str(body.get("error", response.text)), body.get("code")
    else:
        message, code = response.text or response.reason_phrase, None
    if status == 404 and key is not None and code == "not_found":
        raise KeyError(key)
    if code == "corrupt":
        raise DamagedValueError(message, status, keys=[key] if key is not None else [])
    if status == 401:
        raise UnauthorizedError(message, status)
    if status == 503:
        raise BackendUnavailableError(message, status)
    raise ClientError(f"{status}: {message}", status)


def _unreachable(url: str, exc: Exception) -> DaemonUnreachable:
    return DaemonUnreachable(f"no chanstore daemon answers at {url}: {exc}")


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


class Client:
    """A blocking client with a keep-alive connection pool."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 timeout: float = 15.0) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=_headers(token), timeout=timeout)

    def _request(self, method: str, path: str, *, key: str | None = None,
                 content: bytes | None = None) -> httpx.Response:  # fmt: skip
        headers = _JSON_HEADERS if content is not None else None
        try:
            response = self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        _raise_for(response, key=key)
        return response

    def get(self, channel: str, container: str, key: str) -> Any:
        """The value of ``key``, its type marks revived; KeyError when absent."""
        return _value(self._request("GET", key_path(channel, container, key), key=key))

    def get_document(self, channel: str, container: str, key: str) -> Any:
        """The stored form of ``key``'s value: the JSON document the daemon holds, as it is."""
        return _document(self._request("GET", key_path(channel, container, key), key=key))

    def set(self, channel: str, container: str, key: str, value: Any) -> None:
        """Store ``value``; returns once the daemon's backend holds it.

        ``value`` is JSON-shaped, or holds sets, tuples and dataclasses (sent
        type-marked), or is a :class:`chanstore.codec.Document` (sent as the
        document it holds); anything else is an
        :class:`~chanstore.errors.UnstorableValue`, raised before anything is sent.
        """
        self._request("PUT", key_path(channel, container, key), content=_value_body(value))

    def set_document(self, channel: str, container: str, key: str, document: Any) -> None:
        """Store the JSON ``document`` as the value's stored form, type marks and all.

        The same as ``set(..., chanstore.codec.Document(document))``: a dict in it
        shaped like a type mark is that mark, so it reads back as the value it stands for.
        """
        path = key_path(channel, container, key)
        self._request("PUT", path, content=_value_body(codec.Document(document)))

    def delete(self, channel: str, container: str, key: str) -> None:
        """Delete ``key``; KeyError when absent."""
        self._request("DELETE", key_path(channel, container, key), key=key)

    def key_pages(self, channel: str, container: str,
                  page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[list[str]]:  # fmt: skip
        """The container's keys in key order, one list per request of ``page_size`` keys.

        Each page is asked for when the one before it has been consumed; keys
        written or deleted meanwhile may or may not be seen, and none is seen twice.
        """
        _check_page_size(page_size)
        return self._pages(channel, container, page_size)

    def _pages(self, channel: str, container: str, page_size: int) -> Iterator[list[str]]:
        after: str | None = None
        while True:
            path = page_path(channel, container, page_size, after)
            keys, after = _page(_document(self._request("GET", path)), after)
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
        response = self._request("POST", path, content=_json_bytes({"keys": requested}))
        return _bulk_values(response, requested)

    def set_many(self, channel: str, container: str, values: Mapping[str, Any]) -> None:
        """Store every item, in one request."""
        path = key_path(channel, container) + "/-/set"
        self._request("POST", path, content=_values_body(values))

    def delete_many(self, channel: str, container: str, keys: Iterable[str]) -> list[str]:
        """Delete ``keys`` in one request; those that existed."""
        path = key_path(channel, container) + "/-/delete"
        response = self._request("POST", path, content=_json_bytes({"keys": list(keys)}))
        return _document(response)["deleted"]

    def containers(self) -> list[dict[str, Any]]:
        """The containers of the daemon's running db_config (``name``, ``implementation``, ...)."""
        return _document(self._request("GET", "/v1/containers"))["containers"]

    def reload(self) -> dict[str, Any]:
        """Ask the daemon to reload db_config; the verdict (``ok``, ``problems``, ``changes``)."""
        try:
            response = self._http.post("/-/reload")
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        if response.status_code not in (200, 400):
            _raise_for(response)
        return _document(response)

    def metrics_text(self) -> str:
        """The daemon's /metrics page, in Prometheus's text format."""
        return self._request("GET", "/metrics").text

    def readiness(self) -> dict[str, str]:
        """What keeps the daemon from being ready, by container (the kind of each
        failure): empty when /readyz answers 200."""
        try:
            response = self._http.get("/readyz")
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        if response.status_code == 200:
            return {}
        if response.status_code != 503:
            _raise_for(response)
        problems = response.json().get("problems")
        return dict(problems) if isinstance(problems, dict) else {"daemon": "not_ready"}

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
        self.page_size = _check_page_size(page_size)

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

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Store every item with one bulk request."""
        items = dict(other.items() if isinstance(other, Mapping) else other, **kwargs)
        if items:
            self._client.set_many(self.channel, self.container, items)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist, in one request."""
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
                       content: bytes | None = None) -> httpx.Response:  # fmt: skip
        headers = _JSON_HEADERS if content is not None else None
        try:
            response = await self._http.request(method, path, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        _raise_for(response, key=key)
        return response

    async def get(self, channel: str, container: str, key: str) -> Any:
        """The value of ``key``, its type marks revived; KeyError when absent."""
        return _value(await self._request("GET", key_path(channel, container, key), key=key))

    async def get_document(self, channel: str, container: str, key: str) -> Any:
        """The stored form of ``key``'s value: the JSON document the daemon holds, as it is."""
        return _document(await self._request("GET", key_path(channel, container, key), key=key))

    async def set(self, channel: str, container: str, key: str, value: Any) -> None:
        """Store ``value`` (type-marked where JSON has no type for it); see :meth:`Client.set`."""
        await self._request("PUT", key_path(channel, container, key), content=_value_body(value))

    async def set_document(self, channel: str, container: str, key: str, document: Any) -> None:
        """Store the JSON ``document`` as the value's stored form, type marks and all."""
        path = key_path(channel, container, key)
        await self._request("PUT", path, content=_value_body(codec.Document(document)))

    async def delete(self, channel: str, container: str, key: str) -> None:
        """Delete ``key``; KeyError when absent."""
        await self._request("DELETE", key_path(channel, container, key), key=key)

    def key_pages(self, channel: str, container: str,
                  page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[list[str]]:  # fmt: skip
        """The container's keys in key order, one list per request; see :meth:`Client.key_pages`."""
        _check_page_size(page_size)
        return self._pages(channel, container, page_size)

    async def _pages(self, channel: str, container: str,
                     page_size: int) -> AsyncIterator[list[str]]:  # fmt: skip
        after: str | None = None
        while True:
            path = page_path(channel, container, page_size, after)
            keys, after = _page(_document(await self._request("GET", path)), after)
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
        response = await self._request("POST", path, content=_json_bytes({"keys": requested}))
        return _bulk_values(response, requested)

    async def set_many(self, channel: str, container: str, values: Mapping[str, Any]) -> None:
        """Store every item, in one request."""
        path = key_path(channel, container) + "/-/set"
        await self._request("POST", path, content=_values_body(values))

    async def delete_many(self, channel: str, container: str, keys: Iterable[str]) -> list[str]:
        """Delete ``keys`` in one request; those that existed."""
        path = key_path(channel, container) + "/-/delete"
        response = await self._request("POST", path, content=_json_bytes({"keys": list(keys)}))
        return _document(response)["deleted"]

    async def containers(self) -> list[dict[str, Any]]:
        """The containers of the daemon's running db_config."""
        return _document(await self._request("GET", "/v1/containers"))["containers"]

    async def reload(self) -> dict[str, Any]:
        """Ask the daemon to reload db_config; the verdict (``ok``, ``problems``, ``changes``)."""
        try:
            response = await self._http.post("/-/reload")
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        if response.status_code not in (200, 400):
            _raise_for(response)
        return _document(response)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
