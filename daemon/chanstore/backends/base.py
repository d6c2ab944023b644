"""The backend contract: :class:`DatabaseInterface`, kept from the original SDK.

A backend stores JSON-shaped values under string keys in one *domain* and
never sees another domain's keys. It implements four methods; everything else
has a correct default here, which a backend overrides when it can do better
(one Redis round trip for many keys, one folder fsync for many files).

Every optional operation is declared here, so callers never look for one
with ``getattr``: the bulk operations, the listing (``list_domains`` and
``scan_items``, for export, import and migrate), and ``set_many_together``
(sync and async) for callers whose batches span many domains (the daemon's
write lanes). A backend that can store several domains in one round trip or
one flush overrides those and says which instances may share a call with
:attr:`~DatabaseInterface.together_key`. The one operation the four cannot
give is ``list_domains`` (a domain is all a backend instance knows of): its
default raises :class:`~chanstore.errors.ListingUnsupported`, saying what to
implement.

Every subclass's operations are wrapped by
:func:`chanstore.instrumentation.instrument` when the class is defined; see
that module for how raising and returning ``(False, message)`` relate.
Backends never call metrics code themselves. The listing is not measured
(it is the long walk of a bulk job, not a request); it raises
:class:`~chanstore.errors.BackendError` itself.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from chanstore.coherence import Invalidations
from chanstore.errors import (
    BackendError,
    BulkWriteError,
    CorruptValue,
    IntegrityProblem,
    ListingUnsupported,
    PreconditionFailed,
)
from chanstore.history import ChangeHistory
from chanstore.instrumentation import (
    NOT_FOUND,
    OPERATIONS,
    TOGETHER,
    call_unmeasured,
    failure_kind,
    instrument,
    instrument_together,
)
from chanstore.versions import Change, conflicts, etags_of

if TYPE_CHECKING:
    from chanstore.cache_memory import CacheMemory

__all__ = ["COMPATIBLE_SETTING", "DatabaseInterface", "check_batch_size"]

#: A setting that a backend may be given without using it (only a warning):
#: the original SDK's example config gives redis entries a ``root_dir``.
COMPATIBLE_SETTING = "root_dir"


class DatabaseInterface(ABC):
    """Abstract base of every backend.

    Subclasses take ``domain`` and their own settings as keyword arguments and
    implement :meth:`get_value`, :meth:`set_value`, :meth:`delete_key` and
    :meth:`all_keys`.
    """

    #: The name metrics and logs call this backend by (``backend`` label).
    engine_name: ClassVar[str | None] = None
    #: Settings this backend understands, with the types each accepts.
    #: :mod:`chanstore.config` checks db_config entries against it: any other
    #: setting makes an entry invalid (see :meth:`check_settings`).
    SETTINGS: ClassVar[Mapping[str, tuple[type, ...]]] = {}
    #: The kinds of integrity problem this backend can meet (``corrupt_value``: a
    #: stored value that cannot be decoded, any backend), so that their counters
    #: exist at 0 from the start and a rate over them sees the first problem.
    INTEGRITY_KINDS: ClassVar[tuple[str, ...]] = ("corrupt_value",)
    #: Whether :meth:`set_many_together_async` stores on the running event loop
    #: (an asyncio client) rather than on a worker thread: a caller on a busy
    #: loop may then call it directly instead of handing the batch to a thread.
    stores_on_loop: ClassVar[bool] = False
    #: Whether :meth:`apply_if` checks and applies in one atomic step on the backend
    #: itself, so that a condition holds against every writer (Redis: one script).
    #: When False, conditions hold only if the caller orders every write to the
    #: domain itself, as the daemon's write lanes do for the json root it owns.
    checks_conditions: ClassVar[bool] = False
    #: Whether every write must reach the backend, even one that a later write of
    #: the same key replaces in the same write-lane batch (both are acknowledged
    #: together, once the later one is stored). True where each change is
    #: recorded or seen elsewhere: a change history, another daemon. False lets
    #: a lane store only the last of a key's unconditional sets in a batch.
    sees_every_write: ClassVar[bool] = True
    #: Whether :meth:`set_many_together_async` applies its parts in the order given, a
    #: part after every part before it, so that one call may take several parts of one
    #: domain, even with the same keys, and the last one's values are what stays (Redis:
    #: the commands of one round trip, run in order). A write lane then stores a batch
    #: in which keys repeat in one call, not one call per repeat.
    keeps_part_order: ClassVar[bool] = False
    #: Whether values are written in the original's file form, indented by 2 (json). A
    #: caller may then make that form ahead of the write, off the writing thread, and
    #: hand it over as the :attr:`~chanstore.codec.Document.file_form` of the value.
    writes_file_form: ClassVar[bool] = False
    #: Whether stored values are revived into Python objects (sets, tuples,
    #: registered dataclasses) or read as :class:`~chanstore.codec.Document`\ s
    #: of their stored JSON. The daemon, which carries values in their stored
    #: form, turns it off, so that what it answers is what is stored, byte for
    #: byte the same on every daemon.
    revive_values: bool = True
    #: How many recent changes per domain a backend that keeps a change history
    #: (see :meth:`change_history`) holds; the daemon sets it (``--event-history``).
    history_length: int = 1000

    def __init__(self, domain: str = "", **settings: Any) -> None:
        self.domain = domain

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _instrument_operations(cls)

    # -- the original four -------------------------------------------------

    @abstractmethod
    def get_value(self, key: str) -> tuple[bool, Any]:
        """``(True, value)``, or ``(False, message)`` when ``key`` is absent."""

    @abstractmethod
    def set_value(self, key: str, value: Any) -> tuple[bool, Any]:
        """Store ``value`` under ``key``: ``(True, key)`` or ``(False, error message)``."""

    @abstractmethod
    def delete_key(self, key: str) -> tuple[bool, Any]:
        """Remove ``key``: ``(True, key)`` or ``(False, error message)``."""

    @abstractmethod
    def all_keys(self) -> Iterable[str]:
        """Every key in this domain, and only this domain."""

    # -- bulk operations, correct by default --------------------------------

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those ``keys`` that exist.

        A value that exists but cannot be decoded maps to its
        :class:`~chanstore.errors.CorruptValue` instead of failing the call.
        """
        found: dict[str, Any] = {}
        for key in keys:
            ok, value = call_unmeasured(self, "get_value", key)
            if ok:
                found[key] = value
                continue
            kind = failure_kind(value, default=NOT_FOUND)
            if kind == "corrupt":
                found[key] = CorruptValue(str(value))
            elif kind != NOT_FOUND:
                error = BackendError(str(value))
                error.kind = kind
                raise error
        return found

    def load_all(self) -> dict[str, Any]:
        """Every key and value in this domain (see :meth:`get_many` for bad values)."""
        return call_unmeasured(self, "get_many", call_unmeasured(self, "all_keys"))

    def set_many(self, items: Mapping[str, Any]) -> None:
        """Store every item; :class:`BulkWriteError` names what was done if one fails."""
        done: list[str] = []
        for key, value in items.items():
            ok, message = call_unmeasured(self, "set_value", key, value)
            if not ok:
                raise BulkWriteError(str(message), done=done, cause=_cause_of(message))
            done.append(key)

    def delete_many(self, keys: Iterable[str]) -> list[str]:
        """Remove ``keys``; returns those that existed. Absent keys are skipped."""
        deleted: list[str] = []
        for key in keys:
            ok, message = call_unmeasured(self, "delete_key", key)
            if ok:
                deleted.append(key)
            elif failure_kind(message, default="refused") != NOT_FOUND:
                raise BulkWriteError(str(message), done=deleted, cause=_cause_of(message))
        return deleted

    # -- listing -------------------------------------------------------------

    @classmethod
    def list_domains(cls, prefix: str = "", **settings: Any) -> Iterator[str]:
        """Every domain of the store ``settings`` name whose name starts with ``prefix``
        and that holds at least one key; each once, in no set order, lazily.

        ``settings`` are those a backend of the store is built with (without
        ``domain``). For export, import and migrate: a walk of the whole
        store, never a request's work. Domains written or emptied during the
        walk may or may not be listed. A backend that fails raises
        :class:`~chanstore.errors.BackendError`; close the iterator (or
        exhaust it) to let go of what the walk holds.

        This default raises :class:`~chanstore.errors.ListingUnsupported` at
        once: a backend instance knows only its own domain, so the four
        methods cannot give this.
        """
        raise ListingUnsupported(cls.__name__)

    def scan_items(self, batch_size: int = 1000) -> Iterator[dict[str, Any]]:
        """This domain's keys and values, a batch (a dict of at most about
        ``batch_size`` items, never empty) at a time, so that memory stays flat
        however large the domain.

        Values as :meth:`get_many` answers them: a
        :class:`~chanstore.errors.CorruptValue` for a damaged one, a
        :class:`~chanstore.codec.Document` when :attr:`revive_values` is
        False. Each key once when nothing writes the domain meanwhile; a key
        written or deleted during the scan may or may not be in it (and a
        backend's docs say when one can come twice). A backend that fails
        raises :class:`~chanstore.errors.BackendError`.

        This default reads :meth:`all_keys` (the keys alone are held at once)
        and the values with one :meth:`get_many` per batch.
        """
        check_batch_size(batch_size)
        keys = iter(call_unmeasured(self, "all_keys"))
        while chunk := list(itertools.islice(keys, batch_size)):
            batch = call_unmeasured(self, "get_many", chunk)
            if batch:  # the chunk's keys may all have been deleted meanwhile
                yield batch

    # -- conditional changes -------------------------------------------------

    def apply_if(self, change: Change) -> list[str]:
        """Make every change of ``change`` if each key meets its expectation, else none.

        Returns the deleted keys that existed. Raises
        :class:`~chanstore.errors.PreconditionFailed` naming the keys that
        failed, with their current ETags, and changes nothing then.

        This default reads the expected keys' versions, then stores: it is
        atomic only if nothing else writes the domain meanwhile (see
        :attr:`checks_conditions`). A backend shared by several writers
        overrides it with one atomic step of its own.
        """
        if change.expect:
            current = etags_of(call_unmeasured(self, "get_many", list(change.expect)))
            failed = conflicts(change.expect, current)
            if failed:
                raise PreconditionFailed(failed)
        if change.sets:
            call_unmeasured(self, "set_many", change.sets)
        if change.deletes:
            return call_unmeasured(self, "delete_many", change.deletes)
        return []

    @classmethod
    def apply_if_together(
        cls, parts: Sequence[tuple[DatabaseInterface, Change]]
    ) -> list[list[str] | BaseException]:
        """:meth:`apply_if` of each ``(backend, change)`` part: each part's deleted keys
        that existed, or its error (a :class:`~chanstore.errors.PreconditionFailed`
        for a failed expectation). Parts are independent of each other."""
        answers: list[list[str] | BaseException] = []
        for backend, change in parts:
            try:
                answers.append(call_unmeasured(backend, "apply_if", change))
            except Exception as exc:  # noqa: BLE001 - that part's answer; the others go on
                answers.append(exc)
        return answers

    @classmethod
    async def apply_if_together_async(
        cls, parts: Sequence[tuple[DatabaseInterface, Change]]
    ) -> list[list[str] | BaseException]:
        """:meth:`apply_if_together` for a caller on an event loop (see :attr:`stores_on_loop`)."""
        return await asyncio.to_thread(call_unmeasured, cls, "apply_if_together", parts)

    # -- several domains at once ---------------------------------------------

    @property
    def together_key(self) -> Hashable:
        """Instances of one class with equal keys may be stored in one :meth:`set_many_together`.

        By default a value unique to this (live) instance: it is stored alone.
        """
        return id(self)

    @classmethod
    def set_many_together(
        cls, parts: Sequence[tuple[DatabaseInterface, Mapping[str, Any]]]
    ) -> list[BaseException | None]:
        """``set_many`` of each ``(backend, items)`` part; each part's error, or None.

        For callers whose batches span many domains (the daemon's write
        lanes). Parts are independent: one that fails leaves the others
        stored, and a :class:`BulkWriteError` says what of its own part was.
        This default stores one part after another; a backend that can store
        several domains in one round trip overrides it, and
        :attr:`together_key` says which instances one call may take.
        """
        errors: list[BaseException | None] = []
        for backend, items in parts:
            try:
                call_unmeasured(backend, "set_many", items)
            except Exception as exc:  # noqa: BLE001 - that part's answer; the others go on
                errors.append(exc)
            else:
                errors.append(None)
        return errors

    @classmethod
    async def set_many_together_async(
        cls, parts: Sequence[tuple[DatabaseInterface, Mapping[str, Any]]]
    ) -> list[BaseException | None]:
        """:meth:`set_many_together` for a caller on an event loop; the same answers.

        By default it runs on a worker thread (``asyncio.to_thread``); a
        backend with an asyncio client stores on the loop instead and sets
        :attr:`stores_on_loop`.
        """
        return await asyncio.to_thread(call_unmeasured, cls, "set_many_together", parts)

    # -- history -------------------------------------------------------------

    def change_history(self) -> ChangeHistory | None:
        """This domain's change history, when the backend keeps one itself, or None.

        A backend shared by several processes records each change in the same
        atomic step as the value (see :mod:`chanstore.history`), so that the
        daemon's change feed works across daemons and restarts. None (this
        default) means the caller keeps a history itself, if it wants one.
        """
        return None

    def invalidations(self) -> Invalidations | None:
        """The link that tells of writes other processes make to this backend, or None.

        A backend that several processes write (Redis, shared by several
        daemons) answers the link of its server (see :mod:`chanstore.coherence`),
        so that a cache of it stays current. None (this default) means that
        only this process writes it.
        """
        return None

    def keep_current(self, memory: CacheMemory) -> None:
        """Keep ``memory``, a CachedDict's of this domain, current with the writes other
        clients make, when this backend can hear of them.

        :class:`~chanstore.cache.CachedDict` calls it once, as it is made and
        before anything is read. A backend that hears of other clients'
        writes (the chanstore daemon's change feed) tells ``memory`` of each
        (:meth:`~chanstore.cache_memory.CacheMemory.heard`), drops it when it
        may have missed some, and lets it go at :meth:`close`. This default
        does nothing: only this process writes the domain, or nobody tells it.
        """
        return None

    # -- life cycle ----------------------------------------------------------

    def integrity_problems(self) -> list[IntegrityProblem]:
        """Damage this backend found by itself since it was last asked, each told once.

        For what no operation's answer can carry: a journal replay that had to
        skip records, a Redis that came back without its data. Readiness
        checks ask (so a problem is logged and counted within seconds); a
        backend that finds nothing of the kind keeps this default.
        """
        return []

    def check_available(self) -> None:
        """Raise :class:`~chanstore.errors.BackendError` unless the backend can serve now.

        Readiness checks call it. A backend with nothing to reach is always available.
        """
        return None

    def close(self) -> None:
        """Release connections and files. The backend is not used afterwards."""
        return None

    # -- serving -------------------------------------------------------------

    @classmethod
    def mark_served(cls, settings: Mapping[str, Any]) -> Callable[[], None]:
        """Mark the store ``settings`` name as served by this process (a daemon's, for as
        long as it keeps the store's channels in memory); the function it gives takes
        the mark back. Raises ``OSError`` when the mark cannot be taken.

        For a store that tells a daemon of no write another process makes (a json
        root): :meth:`served_elsewhere` then says so to a process about to write
        there. This default marks nothing: a shared store tells every daemon of
        every write.
        """
        return _unmarked

    @classmethod
    def served_elsewhere(cls, settings: Mapping[str, Any]) -> str | None:
        """What serves the store ``settings`` name without hearing of this process's
        writes there, said as a clause ("a running chanstore daemon serves its json root
        /srv/data from memory"), or None."""
        return None

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """``(problems, warnings)`` about ``settings`` for this backend.

        A setting the backend does not know is a problem: a typo such as
        ``"prot": 6380`` would otherwise fall back to the default silently and
        send the data elsewhere. So is a known setting of the wrong type. The
        one exception is ``root_dir`` on a backend that does not use it, only
        a warning: the original SDK's own example config gave a redis entry one.
        """
        problems: list[str] = []
        warnings: list[str] = []
        known = cls.known_settings()
        shown = ", ".join(sorted(known or ())) or "none"
        for name, value in settings.items():
            if known is not None and name not in known:
                if name == COMPATIBLE_SETTING:
                    warnings.append(f"setting {name!r} is not used by {cls.__name__} "
                                    f"(known: {shown})")  # fmt: skip
                else:
                    problems.append(f"setting {name!r} is not a setting of {cls.__name__} "
                                    f"(known: {shown})")  # fmt: skip
                continue
            accepted = cls.SETTINGS.get(name)
            if accepted is None:
                continue
            a_bool_for_a_number = isinstance(value, bool) and bool not in accepted
            if not isinstance(value, accepted) or a_bool_for_a_number:
                expected = " or ".join(t.__name__ for t in accepted)
                problems.append(
                    f"setting {name!r} must be {expected}, not {type(value).__name__} ({value!r})"
                )
        return problems, warnings

    @classmethod
    def known_settings(cls) -> frozenset[str] | None:
        """The names of this backend's settings; None when they cannot be known.

        :attr:`SETTINGS` when a backend declares it (even empty); otherwise the
        named parameters of its constructor, unless that takes ``**kwargs``.
        """
        for klass in cls.__mro__:
            if klass is DatabaseInterface:
                break
            if "SETTINGS" in vars(klass):
                return frozenset(cls.SETTINGS)
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]  # not self
        if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
            return None
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return frozenset(p.name for p in parameters if p.kind in named) - {"domain"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(domain={self.domain!r})"


def _unmarked() -> None:
    """The mark of a store that needs none, taken back."""


def check_batch_size(batch_size: Any) -> int:
    """``batch_size`` when it is a whole number of items, 1 or more; else ValueError."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number, 1 or more, not {batch_size!r}")
    return batch_size


def _cause_of(failure: Any) -> BaseException:
    """The error behind a ``(False, failure)`` answer, keeping the failure's kind."""
    cause = getattr(failure, "exception", None)
    if cause is not None:
        return cause
    error = BackendError(str(failure))
    error.kind = failure_kind(failure, default="refused")
    return error


def _instrument_operations(cls: type) -> None:
    """Wrap the operations ``cls`` defines itself (inherited ones are wrapped already)."""
    for name in OPERATIONS:
        method = cls.__dict__.get(name)
        if callable(method) and not getattr(method, "__isabstractmethod__", False):
            setattr(cls, name, instrument(method, name))
    for name in TOGETHER:
        method = cls.__dict__.get(name)
        if method is None:
            continue
        if not isinstance(method, classmethod):
            raise TypeError(f"{cls.__name__}.{name} must be a classmethod, as declared")
        setattr(cls, name, classmethod(instrument_together(method.__func__, name)))


_instrument_operations(DatabaseInterface)
