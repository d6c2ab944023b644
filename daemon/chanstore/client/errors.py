"""The clients' exceptions, and how a daemon's answer becomes one.

An absent key is a :class:`KeyError`; every other failure is a
:class:`ClientError` (or a subclass) carrying the status and the daemon's
message. :func:`raise_for` reads an answer's status and its body's ``code``
to choose which.
"""

from __future__ import annotations

from typing import Any

import httpx

from chanstore.client.versions import etag_header

__all__ = [
    "BackendUnavailableError",
    "ClientError",
    "CursorExpired",
    "DaemonUnreachable",
    "DamagedValueError",
    "PreconditionFailed",
    "UnauthorizedError",
    "gave_up",
    "raise_for",
    "unreachable",
]


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


def raise_for(response: httpx.Response, *, key: str | None = None) -> None:
    """Raise what an error answer means (KeyError for an absent ``key``); nothing below 400."""
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
    etag = etag_header(response)
    found = body.get("conflicts") if isinstance(body, dict) else None
    if isinstance(found, dict):
        conflicts = {str(k): tag if isinstance(tag, str) else None for k, tag in found.items()}
    else:
        conflicts = {key: etag} if key is not None else {}
    return PreconditionFailed(f"412: {message}", response.status_code, conflicts=conflicts,
                              etag=etag)  # fmt: skip


def unreachable(url: str, exc: Exception) -> DaemonUnreachable:
    """What a request that reached no daemon at ``url`` raises, ``exc`` the transport's error."""
    return DaemonUnreachable(f"no chanstore daemon answers at {url}: {exc}")


def gave_up(key: str, attempts: int, last: PreconditionFailed) -> PreconditionFailed:
    """What ``update`` raises after ``attempts`` conflicts in a row, ``last`` the last one."""
    message = (f"update of {key!r:.100} conflicted with other writes {attempts} times in a "
               f"row; nothing was stored (last answer: {last})")  # fmt: skip
    return PreconditionFailed(message, last.status, conflicts=last.conflicts, etag=last.etag)
