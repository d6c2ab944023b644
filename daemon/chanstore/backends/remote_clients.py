"""The daemon clients of the chanstore backend: shared by its instances, and their errors
in the backend contract's words.

Backends with the same ``url``, token and ``timeout`` share one keep-alive
:class:`~chanstore.client.Client` (:data:`clients`, reference-counted: the
last backend to let go closes it). :func:`translated` turns what a client
raised into the error the contract expects, whose ``kind`` is what a
CachedDict acts on: ``timeout`` and ``unavailable`` mean a write may or may not
have landed; ``invalid_value``, ``permission`` and ``refused`` that it did
not; a stored value that cannot be read is a
:class:`~chanstore.errors.CorruptValue` (the backend checks for it first).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx

from chanstore.client import (
    BackendUnavailableError,
    Client,
    ClientError,
    DaemonUnreachable,
    UnauthorizedError,
)
from chanstore.errors import BackendError, BackendUnavailable, ChanstoreError, ConfigError

__all__ = ["ClientKey", "SharedClients", "clients", "read_token", "translated"]


def translated(exc: ClientError, url: str, timeout: float,
                container: str | None = None) -> ChanstoreError:  # fmt: skip
    """The backend contract's error for what the client raised: its kind is what the
    CachedDict acts on (``timeout`` and ``unavailable``: whether a write landed is not known)."""
    status = exc.status
    where = f"the chanstore daemon at {url}"
    error: ChanstoreError
    if isinstance(exc, DaemonUnreachable):
        cause = exc.__cause__
        # A connection that was never made is not a request whose outcome is unknown.
        timed_out = isinstance(cause, httpx.TimeoutException)
        if timed_out and not isinstance(cause, httpx.ConnectTimeout):
            error = BackendUnavailable(f"{where} did not answer within {timeout:g} s")
            error.kind = "timeout"
        else:
            error = BackendUnavailable(f"no chanstore daemon answers at {url}: {cause or exc}")
    elif isinstance(exc, UnauthorizedError):
        error = BackendError(f"{where} refused the token (401): give the container's settings "
                             f'a "token_file" holding the token of the daemon\'s --token-file '
                             f"({exc})")  # fmt: skip
        error.kind = "permission"
    elif isinstance(exc, BackendUnavailableError) or (status is not None and status >= 500):
        error = BackendUnavailable(f"{where} could not do it: {exc}")
    elif status in (400, 413, 422):
        error = BackendError(f"{where} refused the value or key: {exc}")
        error.kind = "invalid_value"
    elif status == 403:
        error = BackendError(f"{where} refused the request: {exc}")
        error.kind = "permission"
    elif status == 404 and container is not None:
        error = BackendError(f"{where} does not serve container {container!r} (any more: was "
                             f"its db_config changed?): {exc}")  # fmt: skip
        error.kind = "refused"
    elif status is not None:
        error = BackendError(f"{where} refused the request: {exc}")
        error.kind = "refused"
    else:  # an answer that is not what the API answers
        error = BackendError(f"{where} answered what the chanstore backend cannot read: {exc}")
        error.kind = "internal"
    error.status = status  # type: ignore[attr-defined] - a 413 is split and sent again
    return error


def read_token(token_file: str | None) -> str | None:
    """The bearer token in ``token_file`` (stripped); ConfigError when it cannot be read."""
    if token_file is None:
        return None
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"ChanstoreDatabase: setting 'token_file': cannot read "
                          f"{token_file!r}: {exc}") from exc  # fmt: skip
    if not token:
        raise ConfigError(f"ChanstoreDatabase: setting 'token_file': {token_file!r} is empty "
                          "(it must hold the daemon's bearer token)")  # fmt: skip
    return token


#: What identifies a shared client: the daemon's url, the token, the timeout.
ClientKey = tuple[str, str | None, float]


class SharedClients:
    """One keep-alive Client per (url, token, timeout) in the process, reference-counted."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[ClientKey, list[Any]] = {}  # key -> [client, users]

    def acquire(self, key: ClientKey) -> Client:
        """The client of ``key``, made by the first to ask; :meth:`release` it once."""
        with self._lock:
            held = self._held.get(key)
            if held is None:
                url, token, timeout = key
                held = self._held[key] = [Client(url, token=token, timeout=timeout), 0]
            held[1] += 1
            return held[0]

    def release(self, key: ClientKey) -> None:
        """One user of ``key``'s client is done with it; the last one closes it."""
        with self._lock:
            held = self._held.get(key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del self._held[key]
        held[0].close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


#: The clients of every chanstore backend in the process.
clients = SharedClients()
