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

Versions (DESIGN.md section 5): every stored key has an ETag, a strong
validator that changes whenever the value does. :meth:`Client.get_versioned`
reads a value with it; ``set``, ``set_document`` and ``delete`` take
``expect=``, which makes the write conditional (``expect=etag``: the key must
hold exactly that version, sent as ``If-Match``; ``expect=ANY``: it must exist;
``expect=ABSENT``: it must be absent, sent as ``If-None-Match: *``), and
``set_many(..., expect={key: ...})`` stores every value or none. A failed
expectation is a :class:`PreconditionFailed`, and nothing was changed.
``update(key, fn)`` is the read-modify-write loop built on them::

    stats = client.channel("c1").stats
    stats.update("HP", lambda hp: hp + 1, default=0)   # never loses an increment

The change feed (DESIGN.md section 6): :meth:`Client.watch` and
:meth:`AsyncClient.watch` yield a channel's changes as :class:`WatchEvent` s,
resuming by themselves after a dropped connection::

    with client.watch("c1", containers=["stats"]) as events:
        for event in events:        # ready, then set and delete as they happen
            print(event.kind, event.key, event.value)

An absent key is a :class:`KeyError`; every other failure is a
:class:`ClientError` (or a subclass) carrying the status and the daemon's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import inspect
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, overload
from urllib.parse import quote

import httpx

from chanstore import codec

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

DEFAULT_URL = "http://127.0.0.1:8470"
#: Keys per listing request unless told otherwise (the daemon's own default).
DEFAULT_PAGE_SIZE = 1000
#: The most keys the daemon answers in one listing request.
MAX_PAGE_SIZE = 10_000

#: ``expect=ANY``: the key must exist, whatever its version (``If-Match: *``).
ANY = "*"
#: ``expect=ABSENT``: the key must be absent, a create-only write (``If-None-Match: *``).
ABSENT = None

#: Attempts :meth:`Client.update` makes before it gives up with PreconditionFailed.
DEFAULT_UPDATE_ATTEMPTS = 10
#: The delay after the first conflict of an update; it doubles after each, up to the cap.
UPDATE_FIRST_DELAY = 0.005
UPDATE_MAX_DELAY = 0.2

#: Seconds a change-feed stream may stay silent before it is taken for dead and
#: reopened: three times the daemon's heartbeat (a comment line at least every 15 s).
WATCH_IDLE_TIMEOUT = 45.0
#: The wait before reopening a stream, until the daemon sends its own (``retry:``).
WATCH_FIRST_DELAY = 1.0
#: The longest wait between two attempts to reopen a stream.
WATCH_MAX_DELAY = 10.0
#: The largest event a watch accepts (a value is at most the daemon's body limit).
WATCH_MAX_EVENT_BYTES = 64 * 1024 * 1024

_JSON_HEADERS = {"content-type": "application/json"}
_log = logging.getLogger("chanstore.client")


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


class PreconditionFailed(ClientError):
    """412: a conditional write found a key not as expected, and changed nothing.

    ``conflicts`` maps each key whose expectation failed to its current ETag,
    or to None when it is absent; ``etag`` is the current ETag of the one key
    of a PUT or DELETE (the answer's ``ETag`` header), None when the key is
    absent or the write was a bulk one.
    """

    def __init__(self, message: str, status: int | None = 412, *,
                 conflicts: dict[str, str | None] | None = None,
                 etag: str | None = None) -> None:  # fmt: skip
        super().__init__(message, status)
        self.conflicts = conflicts or {}
        self.etag = etag


class CursorExpired(ClientError):
    """410: the events after the cursor are no longer held by the daemon.

    Nothing can be resumed from ``cursor``: read the current state again, then
    watch without a cursor (from the ``ready`` event on, no change is missed).
    """

    def __init__(self, message: str, status: int | None = 410, *,
                 cursor: str | None = None) -> None:  # fmt: skip
        super().__init__(message, status)
        self.cursor = cursor


class Versioned(NamedTuple):
    """A value and its ETag, as :meth:`Client.get_versioned` reads them."""

    value: Any
    etag: str


class _Unconditional(enum.Enum):
    """The default of ``expect=``: the write is made whatever the key holds."""

    UNCONDITIONAL = "unconditional"

    def __repr__(self) -> str:
        return "UNCONDITIONAL"


_UNCONDITIONAL = _Unconditional.UNCONDITIONAL
#: What ``expect=`` takes: an ETag, :data:`ANY`, or :data:`ABSENT` (None).
Expectation = str | None
#: ``expect=`` of a single write: an Expectation, or none at all (the default).
_Condition = Expectation | _Unconditional


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


def _values_body(values: Mapping[str, Any],
                 expect: Mapping[str, Expectation] | None = None) -> bytes:  # fmt: skip
    """A bulk set's body: each value in its stored form, the envelope left as it is,
    and the expectations, when there are any, as ``"expect": {key: etag, "*" or null}``."""
    # The mappings go in as Documents: keys named like a type mark's two halves
    # are keys, not a mark to escape.
    shaped = {key: codec.to_json_shape(value) for key, value in values.items()}
    envelope: dict[str, Any] = {"values": codec.Document(shaped)}
    if expect:
        envelope["expect"] = codec.Document({key: _bare_expectation(expected, key)
                                             for key, expected in expect.items()})  # fmt: skip
    return _value_body(envelope)


# -- ETags and expectations ---------------------------------------------------------


def _bare(etag: str) -> str:
    """An ETag as the daemon's JSON bodies carry it: without the quotes of its header form."""
    if not isinstance(etag, str):
        raise TypeError(f"an ETag is a str, not {type(etag).__name__}")
    if len(etag) >= 2 and etag.startswith('"') and etag.endswith('"'):
        etag = etag[1:-1]
    if not etag or any(char == '"' or not " " < char < "\x7f" for char in etag):
        raise ValueError(f"{etag!r:.80} is not an ETag")
    return etag


def _bare_expectation(expected: Expectation, key: str) -> Expectation:
    """One expectation of a bulk set: an ETag (unquoted), ``"*"``, or None."""
    if expected is None or expected == ANY:
        return expected
    try:
        return _bare(expected)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"expect[{key!r:.100}]: {exc}") from None


def _precondition(expect: _Condition) -> dict[str, str] | None:
    """The request headers that make a PUT or DELETE conditional on ``expect``."""
    if expect is _UNCONDITIONAL:
        return None
    if expect is None:
        return {"if-none-match": "*"}
    if expect == ANY:
        return {"if-match": "*"}
    return {"if-match": f'"{_bare(expect)}"'}


def _etag_header(response: httpx.Response) -> str | None:
    """The answer's ``ETag`` header without its quotes; None when there is none."""
    header = response.headers.get("etag")
    if header is None:
        return None
    header = header.strip()
    if len(header) >= 2 and header.startswith('"') and header.endswith('"'):
        return header[1:-1]
    return header


def _stored_etag(response: httpx.Response) -> str | None:
    """The ETag of the value a PUT stored: its header, else its body's ``etag``."""
    etag = _etag_header(response)
    if etag is not None:
        return etag
    try:
        answer = json.loads(response.content)
    except ValueError:
        return None
    found = answer.get("etag") if isinstance(answer, dict) else None
    return found if isinstance(found, str) else None


def _versioned(response: httpx.Response) -> Versioned:
    """The value and ETag a successful GET answered."""
    etag = _etag_header(response)
    if etag is None:
        raise ClientError("the daemon answered no ETag: it predates versions", response.status_code)
    return Versioned(_value(response), etag)


def _bulk_etags(answer: Any, status: int) -> dict[str, str]:
    """The ``etags`` of a bulk answer, checked to be ``{key: str}``."""
    etags = answer.get("etags") if isinstance(answer, dict) else None
    if not isinstance(etags, dict) or not all(isinstance(tag, str) for tag in etags.values()):
        raise ClientError(f'expected "etags": {{key: etag}} in {answer!r:.200}', status)
    return dict(etags)


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
    return _bulk_answer(response, requested)[0]


def _bulk_versioned(response: httpx.Response, requested: list[str]) -> dict[str, Versioned]:
    """The values of a bulk get's answer with their ETags (its ``etags``)."""
    values, answer = _bulk_answer(response, requested)
    etags = _bulk_etags(answer, response.status_code)
    missing = [key for key in values if key not in etags]
    if missing:
        message = f"the daemon answered no ETag for {missing!r:.200}: it predates versions"
        raise ClientError(message, response.status_code)
    return {key: Versioned(value, etags[key]) for key, value in values.items()}


def _bulk_answer(response: httpx.Response, requested: list[str]) -> tuple[dict[str, Any], Any]:
    """The revived ``values`` of a bulk get's answer, and the answer itself."""
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
    return values, answer


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
    if status == 412 or code == "precondition_failed":
        raise _precondition_failed(response, body, message, key)
    if status == 410 or code == "cursor_expired":
        raise CursorExpired(f"{status}: {message}", status)
    if code == "corrupt":
        raise DamagedValueError(message, status, keys=[key] if key is not None else [])
    if status == 401:
        raise UnauthorizedError(message, status)
    if status == 503:
        raise BackendUnavailableError(message, status)
    raise ClientError(f"{status}: {message}", status)


def _precondition_failed(response: httpx.Response, body: Any, message: str,
                         key: str | None) -> PreconditionFailed:  # fmt: skip
    """The PreconditionFailed of a 412: the failed keys and their current ETags."""
    etag = _etag_header(response)
    found = body.get("conflicts") if isinstance(body, dict) else None
    if isinstance(found, dict):
        conflicts = {str(k): tag if isinstance(tag, str) else None for k, tag in found.items()}
    else:
        conflicts = {key: etag} if key is not None else {}
    return PreconditionFailed(f"412: {message}", response.status_code, conflicts=conflicts,
                              etag=etag)  # fmt: skip


def _unreachable(url: str, exc: Exception) -> DaemonUnreachable:
    return DaemonUnreachable(f"no chanstore daemon answers at {url}: {exc}")


# -- update(): read, apply, write if unchanged, again on conflict ----------------------


def _check_attempts(attempts: int) -> None:
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise TypeError(f"attempts must be an int, not {type(attempts).__name__}")
    if attempts < 1:
        raise ValueError(f"attempts must be 1 or more, not {attempts}")


def _update_delay(conflicts: int) -> float:
    """Seconds to wait after the ``conflicts + 1``-th conflict in a row: 5 ms doubling
    to 200 ms, each drawn from its upper half, so that writers that collided part."""
    ceiling = min(UPDATE_MAX_DELAY, UPDATE_FIRST_DELAY * 2**conflicts)
    return ceiling * random.uniform(0.5, 1.0)


def _gave_up(key: str, attempts: int, last: PreconditionFailed) -> PreconditionFailed:
    message = (f"update of {key!r:.100} conflicted with other writes {attempts} times in a "
               f"row; nothing was stored (last answer: {last})")  # fmt: skip
    return PreconditionFailed(message, last.status, conflicts=last.conflicts, etag=last.etag)


def _headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


# -- the change feed: Server-Sent Events, resumed from the last cursor ----------------


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One event of a channel's change feed (:meth:`Client.watch`).

    ``kind`` is ``"ready"`` (the stream is open and every change after
    ``cursor`` follows; a watch yields one after each connection it opens,
    the first and every automatic resume), ``"set"`` (``key`` of
    ``container`` now holds ``value``, revived like :meth:`Client.get`'s,
    whose ETag is ``etag``) or ``"delete"`` (``key`` of ``container`` is
    gone). ``cursor`` is the event's id: ``watch(..., since=cursor)`` resumes
    after it. ``document`` is the value in its stored form, type marks and
    all, as the daemon sent it (None for ready and delete, as are ``value``
    and ``etag``; ``container`` and ``key`` are None for ready).
    """

    kind: Literal["ready", "set", "delete"]
    channel: str
    container: str | None
    key: str | None
    value: Any
    etag: str | None
    cursor: str
    document: Any = field(default=None, repr=False, compare=False)


class _RawEvent(NamedTuple):
    """A dispatched Server-Sent Event: its type, its data lines joined, the last id seen."""

    type: str
    data: str
    id: str


_EOL = re.compile(rb"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"


class _SSEDecoder:
    """Parses an event stream from bytes as they arrive, by the WHATWG rules.

    Lines end with CRLF, LF or CR (a CRLF split between two chunks is one
    end of line); a leading BOM is dropped; a line starting with ``:`` is a
    comment; ``field: value`` loses one space after the colon; ``data`` lines
    are joined with LF; ``id`` sets the last event id (kept across events,
    and ignored when it holds NUL); ``retry`` (digits only) sets the delay
    before reconnecting; an empty line dispatches an event that has data.
    An event or line past ``max_event_bytes`` is a ClientError.
    """

    def __init__(self, last_id: str = "", max_event_bytes: int = WATCH_MAX_EVENT_BYTES) -> None:
        self.last_id = last_id
        #: Seconds to wait before reconnecting, once the stream said (``retry:``).
        self.retry: float | None = None
        self._max = max_event_bytes
        self._buffer = bytearray()
        self._skip_lf = False
        self._at_start = True
        self._type = ""
        self._data: list[str] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[_RawEvent]:
        """The events that ``chunk`` completes, in order."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        searched = len(self._buffer)  # what is already buffered holds no end of line
        self._buffer += chunk
        if self._at_start:
            if len(self._buffer) < len(_BOM) and _BOM.startswith(self._buffer):
                return []  # perhaps a BOM, not all here yet
            self._at_start = False
            if self._buffer.startswith(_BOM):
                del self._buffer[: len(_BOM)]
                searched = 0
        events: list[_RawEvent] = []
        start = 0
        for match in _EOL.finditer(self._buffer, searched):
            self._line(self._buffer[start : match.start()].decode("utf-8", "replace"), events)
            start = match.end()
            if start == len(self._buffer) and match.group() == b"\r":
                self._skip_lf = True  # the LF of this CRLF may open the next chunk
        del self._buffer[:start]
        if len(self._buffer) + self._size > self._max:
            raise ClientError(f"an event of the change feed is larger than {self._max} bytes")
        return events

    def _line(self, line: str, events: list[_RawEvent]) -> None:
        if not line:
            if self._data:
                events.append(_RawEvent(self._type or "message", "\n".join(self._data),
                                        self.last_id))  # fmt: skip
            self._type, self._data, self._size = "", [], 0
            return
        if line.startswith(":"):
            return  # a comment: the daemon's heartbeat
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
            self._size += len(value) + 1
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value) / 1000


class _End(NamedTuple):
    """The daemon's ``end`` event: it closes the stream now, for ``reason``."""

    reason: str


def _feed_path(channel: str, containers: Iterable[str] | str | None) -> str:
    """The API path of ``channel``'s change feed, narrowed to ``containers`` when given."""
    path = f"/v1/channels/{segment(channel)}/-/events"
    if containers is None:
        return path
    names = [containers] if isinstance(containers, str) else list(containers)
    if not names:
        raise ValueError("containers: name at least one, or give None for every container")
    for name in names:
        if not isinstance(name, str) or not name or "," in name:
            raise ValueError(f"containers: {name!r:.100} is not a container name")
    return f"{path}?containers={','.join(quote(name, safe='') for name in names)}"


def _checked_cursor(cursor: str | None) -> str | None:
    """``since``, which is sent as a header: printable ASCII, no spaces around it."""
    if cursor is None:
        return None
    if not isinstance(cursor, str):
        raise TypeError(f"since must be a str (an event's cursor), not {type(cursor).__name__}")
    if not cursor or not all(" " < char < "\x7f" for char in cursor):
        raise ValueError(f"since={cursor!r:.100} is not a cursor (printable ASCII)")
    return cursor


def _check_watch_limits(idle_timeout: float, max_event_bytes: int) -> None:
    if not idle_timeout > 0:
        raise ValueError(f"idle_timeout must be positive, not {idle_timeout!r}")
    if not max_event_bytes > 0:
        raise ValueError(f"max_event_bytes must be positive, not {max_event_bytes!r}")


class _Feed:
    """What a watch knows between its connections: where to resume, and when.

    It does no I/O; :class:`Watch` and :class:`AsyncWatch` open the
    connections and hand it what they read.
    """

    def __init__(self, url: str, channel: str, containers: Iterable[str] | str | None,
                 since: str | None, max_event_bytes: int) -> None:  # fmt: skip
        self.url = url
        self.channel = channel
        self.path = _feed_path(channel, containers)
        #: The id of the last event handed over (or ``since``): where a resume starts.
        self.cursor = _checked_cursor(since)
        self.max_event_bytes = max_event_bytes
        self.base_delay = WATCH_FIRST_DELAY
        self.failures = 0  # connections in a row that failed before their ready
        self.opened = False  # a stream was opened once: from then on, failures are retried
        self.resumed = False  # the current connection asked for the events after a cursor
        self.ready = False  # the current connection's ready arrived
        self.why = "the stream ended"

    def headers(self) -> dict[str, str]:
        """The headers of the next connection (``Last-Event-ID`` once there is a cursor)."""
        self.resumed = self.cursor is not None
        self.ready = False
        headers = {"accept": "text/event-stream", "cache-control": "no-cache"}
        if self.cursor is not None:
            headers["last-event-id"] = self.cursor
        return headers

    def decoder(self) -> _SSEDecoder:
        return _SSEDecoder(self.cursor or "", self.max_event_bytes)

    def opens(self, response: httpx.Response) -> bool:
        """Whether ``response`` (its body read unless 200) opens a stream: False when it
        is to be asked again later (503 and the like); raises for every other answer."""
        status = response.status_code
        if status == 200:
            kind = response.headers.get("content-type", "")
            if not kind.startswith("text/event-stream"):
                raise ClientError(f"the daemon answered {kind!r:.100} to a watch, "
                                  "not text/event-stream", status)  # fmt: skip
            self.opened = True
            return True
        if status in (502, 503, 504):
            self.failures += 1
            self.why = f"{status}: {response.text[:200]}"
            return False
        try:
            _raise_for(response)
        except CursorExpired as exc:
            exc.cursor = self.cursor
            raise
        raise ClientError(f"{status}: a watch was answered with no stream", status)

    def lost(self, exc: httpx.TransportError) -> None:
        """The connection failed or broke: DaemonUnreachable before any stream opened,
        else it will be opened again."""
        if not self.opened:
            raise _unreachable(self.url, exc) from exc
        if not self.ready:
            self.failures += 1
        self.why = f"connection lost ({type(exc).__name__}: {exc})"

    def interpret(self, raw: _RawEvent, decoder: _SSEDecoder) -> WatchEvent | _End | None:
        """The event to hand over for ``raw``, an :class:`_End`, or None (nothing to hand)."""
        if decoder.retry is not None:
            self.base_delay = min(max(decoder.retry, 0.05), WATCH_MAX_DELAY)
        if raw.type == "ready":
            self.ready = True
            self.failures = 0
            # Resumed, the events after our cursor may follow this ready: keep the cursor.
            if raw.id and not self.resumed:
                self.cursor = raw.id
            return WatchEvent("ready", self.channel, None, None, None, None, raw.id)
        if raw.type in ("set", "delete"):
            try:
                return self._change(raw)
            finally:
                # Even past an event that cannot be read, so that since=cursor skips it.
                if raw.id:
                    self.cursor = raw.id
        if raw.type == "end":
            try:
                reason = json.loads(raw.data).get("reason")
            except (ValueError, AttributeError):
                reason = None
            return _End(str(reason or "unknown"))
        if raw.id:  # an event this client does not know: passed over, never asked again
            self.cursor = raw.id
        return None

    def _change(self, raw: _RawEvent) -> WatchEvent:
        try:
            data = json.loads(raw.data)
            container, key = data["container"], data["key"]
            if not isinstance(container, str) or not isinstance(key, str):
                raise TypeError("container and key must be strings")
            if raw.type == "delete":
                return WatchEvent("delete", self.channel, container, key, None, None, raw.id)
            etag, document = data["etag"], data["value"]
            if not isinstance(etag, str):
                raise TypeError("etag must be a string")
            value = _revive(document)
        except (ValueError, KeyError, TypeError) as exc:
            what = f"a {raw.type} event of the change feed cannot be read"
            message = f"{what} ({exc}): {raw.data:.200}"
            raise ClientError(message) from exc
        return WatchEvent("set", self.channel, container, key, value, etag, raw.id, document)

    def ended(self, end: _End | None) -> None:
        """The stream ended: with the daemon's ``end`` event, or without a word."""
        if end is not None:
            self.why = f"the daemon ended the stream ({end.reason})"
        else:
            self.why = "the stream ended without an end event"
            if not self.ready:
                self.failures += 1

    def delay(self) -> float:
        """Seconds to wait before the next connection: the daemon's ``retry`` (1 s until
        it says), doubled for each failure in a row past the first, at most
        WATCH_MAX_DELAY, each drawn from its upper half."""
        ceiling = min(WATCH_MAX_DELAY, self.base_delay * 2 ** max(0, self.failures - 1))
        delay = ceiling * random.uniform(0.5, 1.0)
        level = logging.INFO if self.failures == 0 else logging.WARNING
        _log.log(level, "watch of channel %r: %s; resuming after cursor %s in %.2f s",
                 self.channel, self.why, self.cursor, delay)  # fmt: skip
        return delay


def _socket_of(response: httpx.Response) -> Any:
    """The socket under a streaming response, when the transport says (httpcore does):
    a socket.socket, or asyncio's TransportSocket, which has ``shutdown`` too."""
    stream = response.extensions.get("network_stream")
    try:
        sock = stream.get_extra_info("socket") if stream is not None else None
    except Exception:  # noqa: BLE001 - a transport without it: closing from elsewhere then waits
        return None
    return sock if callable(getattr(sock, "shutdown", None)) else None


def _shut(sock: Any) -> None:
    """Wake whoever reads ``sock`` (in another thread or task): it reads the end of the stream."""
    if sock is not None:
        with contextlib.suppress(OSError):  # closed already
            sock.shutdown(socket.SHUT_RDWR)


class Watch(Iterator[WatchEvent]):
    """A channel's change feed as an iterator of :class:`WatchEvent` (:meth:`Client.watch`).

    The first ``next()`` opens the stream. When the connection drops, goes
    silent for ``idle_timeout`` seconds (the daemon's heartbeat comes at least
    every 15 s), or the daemon ends the stream (shutdown, reload, a reader too
    slow), it opens it again, with ``Last-Event-ID`` set to :attr:`cursor`,
    after a jittered delay that doubles with each failure in a row (from the
    daemon's ``retry``, at most WATCH_MAX_DELAY); a ``ready`` event follows
    each connection. It raises DaemonUnreachable when the first connection
    fails, :class:`CursorExpired` when the daemon no longer holds the events
    after the cursor (read again, then watch without ``since``), and
    ClientError for other refusals (401, 404 unknown container, 400 malformed
    cursor); a 503 (too many watchers) is asked again later.

    :meth:`close` (also on leaving a ``with`` block) closes the connection; it
    may be called from another thread, and the thread waiting in ``next()``
    then gets StopIteration.
    """

    def __init__(self, client: Client, channel: str, containers: Iterable[str] | str | None,
                 since: str | None, *, idle_timeout: float = WATCH_IDLE_TIMEOUT,
                 max_event_bytes: int = WATCH_MAX_EVENT_BYTES) -> None:  # fmt: skip
        _check_watch_limits(idle_timeout, max_event_bytes)
        self._client = client
        self._feed = _Feed(client.url, channel, containers, since, max_event_bytes)
        self._timeout = httpx.Timeout(client.timeout, read=idle_timeout)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._socket: Any = None  # the stream's socket, while one is open
        self._events = self._run()

    @property
    def channel(self) -> str:
        return self._feed.channel

    @property
    def cursor(self) -> str | None:
        """The cursor of the last event handed over (or ``since``): where a resume starts."""
        return self._feed.cursor

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> WatchEvent:
        return next(self._events)

    def close(self) -> None:
        """Close the stream and end the iteration; from any thread, any number of times."""
        self._stop.set()
        with self._lock:
            _shut(self._socket)
        # ValueError: another thread is inside next(); its stream was shut, so it returns.
        with contextlib.suppress(ValueError):
            self._events.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _hold(self, response: httpx.Response | None) -> None:
        with self._lock:
            self._socket = _socket_of(response) if response is not None else None
            if self._stop.is_set():
                _shut(self._socket)

    def _run(self) -> Generator[WatchEvent, None, None]:
        feed, http = self._feed, self._client._http  # the client's own pool
        while not self._stop.is_set():
            try:
                with http.stream("GET", feed.path, headers=feed.headers(),
                                 timeout=self._timeout) as response:  # fmt: skip
                    if response.status_code != 200:
                        response.read()
                    if feed.opens(response):
                        self._hold(response)
                        try:
                            yield from self._read(response)
                        finally:
                            self._hold(None)
            except httpx.TransportError as exc:
                if self._stop.is_set():
                    return
                feed.lost(exc)
            if self._stop.is_set() or self._stop.wait(feed.delay()):
                return

    def _read(self, response: httpx.Response) -> Generator[WatchEvent, None, None]:
        feed = self._feed
        decoder = feed.decoder()
        for chunk in response.iter_bytes():
            for raw in decoder.feed(chunk):
                outcome = feed.interpret(raw, decoder)
                if isinstance(outcome, _End):
                    feed.ended(outcome)
                    return
                if outcome is not None:
                    yield outcome
        feed.ended(None)


class AsyncWatch(AsyncIterator[WatchEvent]):
    """A channel's change feed as an async iterator (:meth:`AsyncClient.watch`).

    It behaves as :class:`Watch` does. :meth:`aclose` (also on leaving an
    ``async with`` block) closes the connection; called from another task
    while one waits in ``anext()``, it shuts the stream and that task gets
    StopAsyncIteration. Cancelling the task that iterates works too.
    """

    def __init__(self, client: AsyncClient, channel: str,
                 containers: Iterable[str] | str | None, since: str | None, *,
                 idle_timeout: float = WATCH_IDLE_TIMEOUT,
                 max_event_bytes: int = WATCH_MAX_EVENT_BYTES) -> None:  # fmt: skip
        _check_watch_limits(idle_timeout, max_event_bytes)
        self._client = client
        self._feed = _Feed(client.url, channel, containers, since, max_event_bytes)
        self._timeout = httpx.Timeout(client.timeout, read=idle_timeout)
        self._stopped = False
        self._wake: asyncio.Event | None = None
        self._socket: Any = None  # the stream's socket, while one is open
        self._events = self._run()

    @property
    def channel(self) -> str:
        return self._feed.channel

    @property
    def cursor(self) -> str | None:
        """The cursor of the last event handed over (or ``since``): where a resume starts."""
        return self._feed.cursor

    def __aiter__(self) -> AsyncWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Close the stream and end the iteration, any number of times."""
        self._stopped = True
        if self._wake is not None:
            self._wake.set()
        _shut(self._socket)
        # RuntimeError: another task is inside anext(); its stream was shut, so it returns.
        with contextlib.suppress(RuntimeError):
            await self._events.aclose()

    async def __aenter__(self) -> AsyncWatch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _hold(self, response: httpx.Response | None) -> None:
        self._socket = _socket_of(response) if response is not None else None
        if self._stopped:
            _shut(self._socket)

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if the watch is closed meanwhile; whether it was."""
        if self._wake is None:
            self._wake = asyncio.Event()
        if not self._stopped:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), seconds)
        return self._stopped

    async def _run(self) -> AsyncGenerator[WatchEvent, None]:
        feed, http = self._feed, self._client._http  # the client's own pool
        while not self._stopped:
            try:
                async with http.stream("GET", feed.path, headers=feed.headers(),
                                       timeout=self._timeout) as response:  # fmt: skip
                    if response.status_code != 200:
                        await response.aread()
                    if feed.opens(response):
                        self._hold(response)
                        try:
                            decoder, end = feed.decoder(), None
                            async for chunk in response.aiter_bytes():
                                for raw in decoder.feed(chunk):
                                    outcome = feed.interpret(raw, decoder)
                                    if isinstance(outcome, _End):
                                        end = outcome
                                        break
                                    if outcome is not None:
                                        yield outcome
                                if end is not None:
                                    break
                            feed.ended(end)
                        finally:
                            self._hold(None)
            except httpx.TransportError as exc:
                if self._stopped:
                    return
                feed.lost(exc)
            if self._stopped or await self._pause(feed.delay()):
                return


class Client:
    """A blocking client with a keep-alive connection pool."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 timeout: float = 15.0) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.url, headers=_headers(token), timeout=timeout)

    def _request(self, method: str, path: str, *, key: str | None = None,
                 content: bytes | None = None,
                 headers: Mapping[str, str] | None = None) -> httpx.Response:  # fmt: skip
        sent = _JSON_HEADERS if content is not None else None
        if headers:
            sent = {**(sent or {}), **headers}
        try:
            response = self._http.request(method, path, content=content, headers=sent)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        _raise_for(response, key=key)
        return response

    def get(self, channel: str, container: str, key: str) -> Any:
        """The value of ``key``, its type marks revived; KeyError when absent."""
        return _value(self._request("GET", key_path(channel, container, key), key=key))

    def get_versioned(self, channel: str, container: str, key: str) -> Versioned:
        """``(value, etag)``: the value of ``key``, revived, and the ETag of that version.

        KeyError when absent. Give the ETag back as ``expect=`` to write only
        if the key still holds that version.
        """
        return _versioned(self._request("GET", key_path(channel, container, key), key=key))

    def get_document(self, channel: str, container: str, key: str) -> Any:
        """The stored form of ``key``'s value: the JSON document the daemon holds, as it is."""
        return _document(self._request("GET", key_path(channel, container, key), key=key))

    def set(self, channel: str, container: str, key: str, value: Any, *,
            expect: _Condition = _UNCONDITIONAL) -> str | None:  # fmt: skip
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
        response = self._request("PUT", path, key=key, content=_value_body(value),
                                 headers=_precondition(expect))  # fmt: skip
        return _stored_etag(response)

    def set_document(self, channel: str, container: str, key: str, document: Any, *,
                     expect: _Condition = _UNCONDITIONAL) -> str | None:  # fmt: skip
        """Store the JSON ``document`` as the value's stored form, type marks and all.

        The same as ``set(..., chanstore.codec.Document(document), expect=...)``:
        a dict in it shaped like a type mark is that mark, so it reads back as
        the value it stands for. Returns the new ETag.
        """
        return self.set(channel, container, key, codec.Document(document), expect=expect)

    def delete(self, channel: str, container: str, key: str, *,
               expect: _Condition = _UNCONDITIONAL) -> None:  # fmt: skip
        """Delete ``key``; KeyError when absent.

        With ``expect=`` (an ETag, or :data:`ANY`), only if the key holds that
        version; otherwise :class:`PreconditionFailed`, and the key is kept.
        """
        path = key_path(channel, container, key)
        self._request("DELETE", path, key=key, headers=_precondition(expect))

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
        _check_attempts(attempts)
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
                    raise _gave_up(key, attempts, exc) from exc
                time.sleep(_update_delay(attempt))
            else:
                return new
        raise AssertionError("unreachable")

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

    def get_many_versioned(self, channel: str, container: str,
                           keys: Iterable[str]) -> dict[str, Versioned]:  # fmt: skip
        """``{key: (value, etag)}`` for those ``keys`` that exist, in one request."""
        requested = list(keys)
        path = key_path(channel, container) + "/-/get"
        response = self._request("POST", path, content=_json_bytes({"keys": requested}))
        return _bulk_versioned(response, requested)

    def set_many(self, channel: str, container: str, values: Mapping[str, Any], *,
                 expect: Mapping[str, Expectation] | None = None) -> dict[str, str]:  # fmt: skip
        """Store every item, in one request; the new ETag of each key.

        ``expect`` maps keys (of ``values`` or not) to an ETag, :data:`ANY` or
        :data:`ABSENT`: when any of them fails, nothing is stored and
        :class:`PreconditionFailed` names the failed keys in ``conflicts``.
        The ETags are empty only from a daemon that predates versions.
        """
        path = key_path(channel, container) + "/-/set"
        response = self._request("POST", path, content=_values_body(values, expect))
        answer = _document(response)
        has_etags = isinstance(answer, dict) and "etags" in answer
        return _bulk_etags(answer, response.status_code) if has_etags else {}

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
            expect: _Condition = _UNCONDITIONAL) -> str | None:  # fmt: skip
        """Store ``value``, on condition ``expect`` if given; its new ETag.

        See :meth:`Client.set`.
        """
        return self._client.set(self.channel, self.container, key, value, expect=expect)

    def delete(self, key: str, *,
               expect: _Condition = _UNCONDITIONAL) -> None:  # fmt: skip
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


class AsyncClient:
    """The asyncio client: the same calls as :class:`Client`, as coroutines."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None,
                 timeout: float = 15.0) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = httpx.AsyncClient(base_url=self.url, headers=_headers(token), timeout=timeout)

    async def _request(self, method: str, path: str, *, key: str | None = None,
                       content: bytes | None = None,
                       headers: Mapping[str, str] | None = None) -> httpx.Response:  # fmt: skip
        sent = _JSON_HEADERS if content is not None else None
        if headers:
            sent = {**(sent or {}), **headers}
        try:
            response = await self._http.request(method, path, content=content, headers=sent)
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from exc
        _raise_for(response, key=key)
        return response

    async def get(self, channel: str, container: str, key: str) -> Any:
        """The value of ``key``, its type marks revived; KeyError when absent."""
        return _value(await self._request("GET", key_path(channel, container, key), key=key))

    async def get_versioned(self, channel: str, container: str, key: str) -> Versioned:
        """``(value, etag)`` of ``key``; KeyError when absent (see :meth:`Client.get_versioned`)."""
        return _versioned(await self._request("GET", key_path(channel, container, key), key=key))

    async def get_document(self, channel: str, container: str, key: str) -> Any:
        """The stored form of ``key``'s value: the JSON document the daemon holds, as it is."""
        return _document(await self._request("GET", key_path(channel, container, key), key=key))

    async def set(self, channel: str, container: str, key: str, value: Any, *,
                  expect: _Condition = _UNCONDITIONAL) -> str | None:  # fmt: skip
        """Store ``value`` (type-marked where JSON has no type for it), on condition
        ``expect`` if given; its new ETag. See :meth:`Client.set`."""
        path = key_path(channel, container, key)
        response = await self._request("PUT", path, key=key, content=_value_body(value),
                                       headers=_precondition(expect))  # fmt: skip
        return _stored_etag(response)

    async def set_document(self, channel: str, container: str, key: str, document: Any, *,
                           expect: _Condition = _UNCONDITIONAL) -> str | None:  # fmt: skip
        """Store the JSON ``document`` as the value's stored form, type marks and all;
        its new ETag."""
        return await self.set(channel, container, key, codec.Document(document), expect=expect)

    async def delete(self, channel: str, container: str, key: str, *,
                     expect: _Condition = _UNCONDITIONAL) -> None:  # fmt: skip
        """Delete ``key``, on condition ``expect`` if given; KeyError when absent."""
        path = key_path(channel, container, key)
        await self._request("DELETE", path, key=key, headers=_precondition(expect))

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
        _check_attempts(attempts)
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
                    raise _gave_up(key, attempts, exc) from exc
                await asyncio.sleep(_update_delay(attempt))
            else:
                return new
        raise AssertionError("unreachable")

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

    async def get_many_versioned(self, channel: str, container: str,
                                 keys: Iterable[str]) -> dict[str, Versioned]:  # fmt: skip
        """``{key: (value, etag)}`` for those ``keys`` that exist, in one request."""
        requested = list(keys)
        path = key_path(channel, container) + "/-/get"
        response = await self._request("POST", path, content=_json_bytes({"keys": requested}))
        return _bulk_versioned(response, requested)

    async def set_many(self, channel: str, container: str, values: Mapping[str, Any],
                       *, expect: Mapping[str, Expectation] | None = None,
                       ) -> dict[str, str]:  # fmt: skip
        """Store every item, all or none under ``expect``; the new ETag of each key.
        See :meth:`Client.set_many`."""
        path = key_path(channel, container) + "/-/set"
        response = await self._request("POST", path, content=_values_body(values, expect))
        answer = _document(response)
        has_etags = isinstance(answer, dict) and "etags" in answer
        return _bulk_etags(answer, response.status_code) if has_etags else {}

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
