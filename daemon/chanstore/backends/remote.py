"""The chanstore backend: an in-process MoobiusStorage that reads and writes through a daemon.

A service moves its storage into a running ``chanstore serve`` by editing its
db_config, not its code::

    {"implementation": "chanstore", "name": "health_bars", "load": true,
     "settings": {"url": "http://127.0.0.1:8470", "token_file": "/etc/chanstore/token"}}

The domain MoobiusStorage gives a container,
``service_<service id>.channel_<channel id>.<name>``, says what to ask the
daemon for: the channel and container of the HTTP API (the daemon keeps the
layout under its own backends). Values cross HTTP in their stored form, the
type-marked JSON of :mod:`chanstore.codec`, and are revived here, as the
json and redis backends revive what they read.

At construction the daemon is asked what it serves (``GET /v1/containers``):
its ``--service-id`` must be the storage's service id, and its db_config must
have the container. Backends with the same ``url``, token and ``timeout``
share one keep-alive :class:`~chanstore.client.Client`
(:mod:`chanstore.backends.remote_clients`). A CachedDict over the backend
follows the channel's change feed (:mod:`chanstore.backends.remote_feed`),
so that writes other clients make reach its memory within moments, each put
in its place among the backend's own writes
(:mod:`chanstore.backends.remote_follower`).

Failures keep the backend contract: an absent key is ``(False, message)`` of
kind ``not_found``; a daemon that cannot be reached is kind ``unavailable``
and one that did not answer in time kind ``timeout`` (whether the write landed
is then unknown, and a CachedDict forgets the key); a refusal is kind
``invalid_value``, ``permission`` or ``refused``; a stored value that cannot
be read is a :class:`~chanstore.errors.CorruptValue`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import httpx

from chanstore.backends.base import DatabaseInterface
from chanstore.backends.remote_clients import ClientKey, clients, read_token, translated
from chanstore.backends.remote_feed import follow, unfollow
from chanstore.backends.remote_follower import Follower, Writes, decode_document
from chanstore.cache_memory import ABSENT, CacheMemory
from chanstore.client import DEFAULT_URL, MAX_PAGE_SIZE, ClientError, DamagedValueError
from chanstore.client.api import daemon_url
from chanstore.errors import BackendError, BulkWriteError, ChanstoreError, ConfigError, CorruptValue
from chanstore.keys import check_key, decode_domain_part
from chanstore.logs import get_logger

__all__ = ["DEFAULT_TIMEOUT", "ChanstoreDatabase", "parse_domain"]

_NONE = type(None)
#: Seconds a request to the daemon may take, unless the ``timeout`` setting says.
DEFAULT_TIMEOUT = 5.0
#: Keys per bulk request (the daemon takes up to 10,000; answers stay moderate).
BULK_KEYS = 1_000
_SHAPE = "service_<service id>.channel_<channel id>.<container name>"


def parse_domain(domain: str) -> tuple[str, str, str]:
    """``(service id, channel id, container name)`` of a MoobiusStorage domain;
    ConfigError for a domain of another shape."""
    parts = domain.split(".")
    if len(parts) == 3:
        service, channel, name = parts
        if (service.startswith("service_") and channel.startswith("channel_")
                and len(service) > 8 and len(channel) > 8 and name):  # fmt: skip
            return (decode_domain_part(service[8:]), decode_domain_part(channel[8:]),
                    decode_domain_part(name))  # fmt: skip
    raise ConfigError(
        f"the chanstore backend holds MoobiusStorage containers, whose domains are "
        f"{_SHAPE!r}; {domain[:200]!r} is not one (build it through MoobiusStorage or a "
        f"db_config entry, or give it a domain of that shape)"
    )


class ChanstoreDatabase(DatabaseInterface):
    """Values in a running chanstore daemon, through its HTTP API.

    Settings: ``url`` (default ``http://127.0.0.1:8470``), ``token_file`` (the
    file holding the daemon's bearer token, when it runs with ``--token-file``)
    and ``timeout`` (seconds per request, default 5). Construction raises
    :class:`~chanstore.errors.ConfigError` for a domain that is not a
    MoobiusStorage container's, a token file that cannot be read, a daemon
    that serves another service id or has no such container (the storage and
    the daemon disagree: a configuration to fix, not a failure to retry),
    :class:`~chanstore.errors.BackendUnavailable` (kind ``unavailable``) when
    no daemon answers at ``url``, and :class:`~chanstore.errors.BackendError`
    of kind ``permission`` when the daemon refuses the token (or its absence).

    Each CachedDict over it follows the channel's change feed (see
    :meth:`keep_current`). Values are revived unless :attr:`revive_values`
    is turned off (then each is the :class:`~chanstore.codec.Document` the
    daemon holds).
    """

    engine_name = "chanstore"
    SETTINGS = {"url": (str,), "token_file": (str, _NONE), "timeout": (int, float)}

    def __init__(self, domain: str = "", url: str = DEFAULT_URL, token_file: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> None:  # fmt: skip
        problems = _setting_problems({"url": url, "timeout": timeout})
        if problems:
            raise ConfigError([f"ChanstoreDatabase: {problem}" for problem in problems])
        super().__init__(domain, **kwargs)
        self.service_id, self.channel, self.container = parse_domain(domain)
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self._client_key: ClientKey = (self.url, read_token(token_file), self.timeout)
        self.client = clients.acquire(self._client_key)
        #: The followers of this backend's CachedDicts: the first one's memory is the
        #: one this backend's writes are the own writes of.
        self._followers: list[Follower] = []
        self._finalizer = weakref.finalize(self, _let_go, self._client_key, self.channel,
                                           self._followers)  # fmt: skip
        try:
            self._check_daemon()
        except BaseException:
            self.close()
            raise

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """The base checks (names, types), then the values: an http(s) ``url``, a positive
        ``timeout``."""
        problems, warnings = super().check_settings(settings)
        typed = {name: value for name, value in settings.items()
                 if name in cls.SETTINGS and isinstance(value, cls.SETTINGS[name])
                 and not isinstance(value, bool)}  # fmt: skip
        problems.extend(_setting_problems(typed))
        return problems, warnings

    def _check_daemon(self) -> None:
        """The daemon serves this storage's service and has this container."""
        try:
            served = self.client.served()
        except ClientError as exc:
            raise translated(exc, self.url, self.timeout) from exc
        daemon_service = served.get("service_id") if isinstance(served, dict) else None
        if daemon_service is None:
            raise ConfigError(f"the chanstore daemon at {self.url} does not say which "
                              "service it serves (it predates the chanstore backend): "
                              "upgrade it")  # fmt: skip
        if str(daemon_service) != self.service_id:
            raise ConfigError(
                f"the chanstore daemon at {self.url} serves service id {daemon_service!r}, but "
                f"this storage's service id is {self.service_id!r}: start the daemon with "
                f"--service-id {self.service_id}, or point the container's url at the daemon "
                f"of service {self.service_id!r}"
            )
        names = [str(entry.get("name")) for entry in served.get("containers", ())]
        if self.container not in names:
            raise ConfigError(
                f"the chanstore daemon at {self.url} (service {self.service_id!r}) has no "
                f"container {self.container!r}; its db_config has: "
                f"{', '.join(names) or 'none'}. Add an entry named {self.container!r} to the "
                f"daemon's db_config (it reloads by itself), or rename this one"
            )

    # -- the four ------------------------------------------------------------------

    def get_value(self, key: str) -> tuple[bool, Any]:
        with self._failures():
            document = self.client.get_document(self.channel, self.container, check_key(key))
        return True, self._decode(key, document)

    def set_value(self, key: str, value: Any) -> tuple[bool, Any]:
        writes = self._begin([check_key(key)], delete=False)
        try:
            with self._failures():
                etag = self.client.set(self.channel, self.container, key, value)
        except BaseException:
            _withdraw(writes)
            raise
        if writes is not None:
            writes.acked(key, value, etag)
        return True, key

    def delete_key(self, key: str) -> tuple[bool, Any]:
        writes = self._begin([check_key(key)], delete=True)
        try:
            with self._failures():
                self.client.delete(self.channel, self.container, key)
        except KeyError:
            if writes is not None:  # absent: there is no change to hear of
                writes.acked(key, ABSENT, None, echo=False)
            raise
        except BaseException:
            _withdraw(writes)
            raise
        if writes is not None:
            writes.acked(key, ABSENT, None)
        return True, key

    def all_keys(self) -> list[str]:
        return self._all_keys()

    # -- bulk: a request per BULK_KEYS keys ----------------------------------------------

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        return self._get_many([check_key(key) for key in keys])

    def load_all(self) -> dict[str, Any]:
        return self._get_many(self._all_keys())

    def set_many(self, items: Mapping[str, Any]) -> None:
        done: list[str] = []
        pairs = [(check_key(key), value) for key, value in items.items()]
        for start in range(0, len(pairs), BULK_KEYS):
            self._set_part(dict(pairs[start : start + BULK_KEYS]), done)

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        keys = list(dict.fromkeys(check_key(key) for key in keys))
        deleted: list[str] = []
        for start in range(0, len(keys), BULK_KEYS):
            part = keys[start : start + BULK_KEYS]
            writes = self._begin(part, delete=True)
            try:
                with self._failures():
                    gone = set(self.client.delete_many(self.channel, self.container, part))
            except ChanstoreError as exc:
                _withdraw(writes)
                raise BulkWriteError(str(exc), done=deleted, cause=exc) from exc
            except BaseException:
                _withdraw(writes)
                raise
            if writes is not None:
                for key in part:
                    writes.acked(key, ABSENT, None, echo=key in gone)
            deleted.extend(key for key in part if key in gone)
        return deleted

    # -- other clients' writes -------------------------------------------------------------

    def keep_current(self, memory: CacheMemory) -> None:
        """Follow the channel's change feed for ``memory``: the writes other clients make
        reach it within moments. Waits (at most ``timeout``) for the feed's stream, so
        that a load that follows misses no change."""
        if self._finalizer.alive:
            follower = Follower(memory, self.container, self, owner=not self._followers)
            self._followers.append(follower)
            follow(self._client_key, self.client, self.channel, follower, wait=self.timeout)

    # -- life cycle --------------------------------------------------------------------------

    def check_available(self) -> None:
        """The daemon answers, and still has this container."""
        self._check_daemon()

    def close(self) -> None:
        """Stop following the feed (the last backend of the channel stops it) and let go
        of the shared client (the last backend closes it)."""
        self._finalizer()

    def __repr__(self) -> str:
        return (f"ChanstoreDatabase(url={self.url!r}, channel={self.channel!r}, "
                f"container={self.container!r})")  # fmt: skip

    # -- internals ------------------------------------------------------------------------

    def _all_keys(self) -> list[str]:
        with self._failures():
            pages = self.client.key_pages(self.channel, self.container, MAX_PAGE_SIZE)
            return [key for page in pages for key in page]

    def _get_many(self, keys: list[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for start in range(0, len(keys), BULK_KEYS):
            part = keys[start : start + BULK_KEYS]
            damaged: list[str] = []
            try:
                with self._failures(damaged_is_an_answer=True):
                    documents = self.client.get_many_documents(self.channel, self.container,
                                                               part)  # fmt: skip
            except _Damaged as exc:
                documents, damaged = exc.documents, exc.keys
            for key, document in documents.items():
                found[key] = self._decode_or_error(key, document)
            for key in damaged:
                found[key] = CorruptValue(self._damaged(key))
        return found

    def _set_part(self, items: dict[str, Any], done: list[str]) -> None:
        """Store ``items`` in one request; halves of it when the daemon finds it too large."""
        writes = self._begin(items, delete=False)
        try:
            with self._failures():
                etags = self.client.set_many(self.channel, self.container, items)
        except ChanstoreError as exc:
            _withdraw(writes)
            if getattr(exc, "status", None) == 413 and len(items) > 1:
                pairs = list(items.items())
                self._set_part(dict(pairs[: len(pairs) // 2]), done)
                self._set_part(dict(pairs[len(pairs) // 2 :]), done)
                return
            raise BulkWriteError(str(exc), done=done, cause=exc) from exc
        except BaseException:
            _withdraw(writes)
            raise
        if writes is not None:
            for key, value in items.items():
                writes.acked(key, value, etags.get(key))
        done.extend(items)

    @contextlib.contextmanager
    def _failures(self, *, damaged_is_an_answer: bool = False) -> Iterator[None]:
        """The client's errors as the backend contract's (KeyError stays: an absent key)."""
        try:
            yield
        except DamagedValueError as exc:
            if damaged_is_an_answer:
                raise _Damaged(exc.keys, exc.values) from exc
            raise CorruptValue(self._damaged(", ".join(map(repr, exc.keys)) or "?")) from exc
        except ClientError as exc:
            raise translated(exc, self.url, self.timeout, self.container) from exc
        except httpx.HTTPError as exc:  # neither a transport error nor an answer
            error = BackendError(f"the request to the chanstore daemon at {self.url} failed: "
                                 f"{exc}")  # fmt: skip
            error.kind = "internal"
            raise error from exc

    def _damaged(self, key: str) -> str:
        return (f"the stored value of key {key[:200]} in container {self.container!r} of the "
                f"chanstore daemon at {self.url} is damaged and cannot be read (the daemon's "
                "log says where)")  # fmt: skip

    def _decode(self, key: str, document: Any) -> Any:
        try:
            return decode_document(document, revive=self.revive_values)
        except ValueError as exc:
            raise CorruptValue(f"the value of key {key[:200]!r} in container "
                               f"{self.container!r} of the chanstore daemon at {self.url} "
                               f"does not fit its registered type: {exc}") from exc  # fmt: skip

    def _decode_or_error(self, key: str, document: Any) -> Any:
        try:
            return self._decode(key, document)
        except CorruptValue as exc:
            return exc

    def _begin(self, keys: Iterable[str], *, delete: bool) -> Writes | None:
        """Tell the first follower (whose memory this backend's writes are the own writes
        of) that writes of ``keys`` are about to be sent; None when nobody follows."""
        followers = self._followers
        return followers[0].begin(keys, delete=delete) if followers else None


def _withdraw(writes: Writes | None) -> None:
    """The writes begun failed (see :meth:`Writes.withdrawn`)."""
    if writes is not None:
        writes.withdrawn()


class _Damaged(Exception):
    """A bulk get's damaged keys, with the documents of the others (internal)."""

    def __init__(self, keys: list[str], documents: dict[str, Any]) -> None:
        super().__init__(f"{len(keys)} damaged values")
        self.keys = keys
        self.documents = documents


def _setting_problems(settings: Mapping[str, Any]) -> list[str]:
    """Why ``url`` or ``timeout`` (of the right types, when given) cannot be used."""
    problems: list[str] = []
    url = settings.get("url")
    if isinstance(url, str):
        try:
            daemon_url(url)
        except ValueError as exc:
            problems.append(f"setting 'url': {exc}")
    timeout = settings.get("timeout")
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and not timeout > 0:
        problems.append(f"setting 'timeout' must be more than 0 seconds, not {timeout!r}")
    return problems


def _let_go(client_key: ClientKey, channel: str, followers: list[Follower]) -> None:
    """What closing (or collecting) a backend does; no reference to the backend itself."""
    try:
        unfollow(client_key, channel, followers)
    except Exception:  # noqa: BLE001 - closing must go on to release the client
        get_logger(backend="chanstore").exception("change_feed_stop_failed", channel=channel)
    followers.clear()
    clients.release(client_key)
