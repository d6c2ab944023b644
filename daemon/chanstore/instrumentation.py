"""The one decorator that measures and logs every backend operation.

:class:`~chanstore.backends.base.DatabaseInterface` applies :func:`instrument`
to the operations of every subclass as the subclass is defined, so a
third-party backend is measured and logged without a line of metrics code.
The wrapper records ``chanstore_backend_operation_duration_seconds`` for each
call and ``chanstore_backend_operation_errors_total`` for each failure (an
absent key is an answer, not a failure), logs every failure as a structlog
event, and turns what a backend raised into the contract's answers:

* ``get_value``, ``set_value`` and ``delete_key`` never raise: a failure comes
  back as ``(False, Failure)``, where :class:`Failure` is the message string
  carrying a ``kind`` (``not_found`` for an absent key);
* ``all_keys`` and the bulk operations raise a
  :class:`~chanstore.errors.BackendError`;
* ``set_many_together`` and ``set_many_together_async`` (:data:`TOGETHER`:
  one call storing the items of several backend instances) answer each
  part's error, or None; each part is recorded as its backend's
  ``set_many``, with the call's elapsed time.

So a backend may be written either way: returning the tuples, as the original
SDK's were, or raising (``KeyError`` for an absent key).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from chanstore import logs
from chanstore.errors import (
    BackendError,
    ChanstoreError,
    CorruptValue,
    PreconditionFailed,
    error_kind,
)
from chanstore.metrics import DeferredDurations, Metrics, default_metrics

__all__ = [
    "OPERATIONS",
    "TOGETHER",
    "Failure",
    "Probe",
    "attach",
    "call_unmeasured",
    "instrument",
    "instrument_together",
    "probe_of",
]

NOT_FOUND = "not_found"
_FOLD_AT = DeferredDurations.FOLD_AT

# Backend method name -> (operation label, how the method answers).
OPERATIONS: dict[str, tuple[str, str]] = {
    "get_value": ("get", "read"),
    "set_value": ("set", "write"),
    "delete_key": ("delete", "write"),
    "all_keys": ("all_keys", "keys"),
    "get_many": ("get_many", "bulk_read"),
    "load_all": ("load_all", "bulk_read"),
    "set_many": ("set_many", "bulk_write"),
    "delete_many": ("delete_many", "bulk_write"),
    "apply_if": ("apply_if", "bulk_write"),
}

# Class methods that store the items of several backend instances in one call
# -> the backend method each instance's share is recorded as.
TOGETHER: dict[str, str] = {
    "set_many_together": "set_many",
    "set_many_together_async": "set_many",
    "apply_if_together": "apply_if",
    "apply_if_together_async": "apply_if",
}
_OPERATION_LABELS = tuple(label for label, _style in OPERATIONS.values())


class Failure(str):
    """The message of a ``(False, message)`` answer, with the failure's ``kind``.

    It is a ``str``, so code written against the original contract sees the
    message it always saw; chanstore reads ``kind`` to tell an absent key
    (``not_found``) from a backend that failed.
    """

    kind: str
    exception: BaseException | None

    def __new__(cls, message: str, kind: str, exception: BaseException | None = None) -> Failure:
        failure = super().__new__(cls, message)
        failure.kind = kind
        failure.exception = exception
        return failure


def failure_kind(answer: Any, *, default: str) -> str:
    """The kind of the message in a ``(False, message)`` answer."""
    return getattr(answer, "kind", default)


class Probe:
    """Where the backends of one container report: metric children bound to its labels.

    Binding the label values once, when a container is built, keeps a
    measured call to an append of its duration to a
    :class:`~chanstore.metrics.DeferredDurations`, folded into the histogram
    at scrape time. The daemon builds a backend for every channel in memory,
    so one probe serves every backend of a container (:func:`attach`), and
    what differs per backend, its domain, is read from the backend when a
    failure or a debug event is logged (:meth:`at`).
    """

    __slots__ = ("_errors", "backend", "container", "durations")

    def __init__(self, metrics: Metrics, backend: str, container: str) -> None:
        self.backend = backend
        self.container = container
        self._errors = metrics.backend_errors
        self.durations = metrics.backend_timings(backend, container, _OPERATION_LABELS)

    def at(self, backend: Any) -> _Located:
        """This probe, reporting for the backend instance ``backend`` (its domain in logs)."""
        return _Located(self, str(getattr(backend, "domain", "")))


class _Located:
    """A probe and the domain of one backend instance: made only to log or count a failure."""

    __slots__ = ("domain", "probe")

    def __init__(self, probe: Probe, domain: str) -> None:
        self.probe = probe
        self.domain = domain

    @property
    def backend(self) -> str:
        return self.probe.backend

    @property
    def log(self) -> Any:
        """A logger naming this backend, container and domain in every event."""
        probe = self.probe
        return logs.get_logger(backend=probe.backend, container=probe.container, domain=self.domain)

    def failed(self, operation: str, exc: BaseException, kind: str, **fields: Any) -> None:
        """Count and log one failed operation."""
        probe = self.probe
        probe._errors.labels(probe.backend, probe.container, operation, kind).inc()
        self.log.error(
            "backend_operation_failed", operation=operation, error=str(exc), error_kind=kind,
            **fields,
        )  # fmt: skip


#: Per Metrics, the probe of each (backend, container): one per container, not per channel.
_PROBES: weakref.WeakKeyDictionary[Metrics, dict[tuple[str, str], Probe]] = (
    weakref.WeakKeyDictionary()
)
_PROBES_LOCK = threading.Lock()


def _shared_probe(metrics: Metrics, backend: str, container: str) -> Probe:
    """The probe of ``backend`` as ``container`` on ``metrics``, made once.

    Made again when the metrics forgot the container (a reload removed it):
    its durations are then new ones.
    """
    with _PROBES_LOCK:
        probes = _PROBES.get(metrics)
        if probes is None:
            probes = _PROBES[metrics] = {}
        probe = probes.get((backend, container))
        if probe is None or probe.durations is not metrics.backend_timings(
            backend, container, _OPERATION_LABELS
        ):
            probe = probes[(backend, container)] = Probe(metrics, backend, container)
        return probe


def engine_label(backend_class: type) -> str:
    """The ``backend`` label of a backend class: its engine name."""
    return getattr(backend_class, "engine_name", None) or backend_class.__name__


def attach(
    backend: Any, *, container: str, metrics: Metrics | None = None, backend_label: str = ""
) -> Probe:
    """Make ``backend`` report as ``container`` to ``metrics`` (default: the process's)."""
    probe = _shared_probe(
        metrics if metrics is not None else default_metrics(),
        backend_label or engine_label(type(backend)),
        container,
    )
    backend._chanstore_probe = probe
    return probe


def probe_of(backend: Any) -> Probe:
    """The probe ``backend`` reports to; one for an unnamed container if none was attached."""
    probe = getattr(backend, "_chanstore_probe", None)
    return probe if probe is not None else attach(backend, container="unnamed")


def instrument(method: Callable[..., Any], name: str) -> Callable[..., Any]:
    """Wrap the backend ``method`` called ``name`` (a key of :data:`OPERATIONS`).

    The wrapper is on the path of every backend call, so it costs two clock
    reads, one ``deque.append`` of the duration (folded into the histogram at
    scrape time: :class:`~chanstore.metrics.DeferredDurations`) and a few
    attribute reads: the common success answers return without calling the
    finisher, and nesting is settled by looking at the class, not by keeping
    per-call state.
    """
    if getattr(method, "__chanstore_instrumented__", False):
        return method
    operation, style = OPERATIONS[name]
    finish = _FINISHERS[style]
    materialize = style == "keys"
    answers_tuples = style in ("read", "write")
    plain_success = style in ("keys", "bulk_write")
    clock = time.perf_counter
    debug_enabled = logs.debug_enabled

    @functools.wraps(method)
    def measured(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(type(self), name) is not measured:
            # A subclass's override called this one through super(): it is
            # measured once, by the override's wrapper, and sees what its
            # parent really did.
            return method(self, *args, **kwargs)
        probe = getattr(self, "_chanstore_probe", None) or probe_of(self)
        started = clock()
        try:
            result = method(self, *args, **kwargs)
            if materialize:
                # A lazy iterator would fail, and take its time, outside the measurement.
                result = list(result)
        except Exception as exc:  # noqa: BLE001 - the finisher turns it into the answer
            result = _Raised(exc)
        elapsed = clock() - started
        # DeferredDurations.observe, inlined: no lock, folded into the histogram at scrape time.
        durations = probe.durations[operation]
        durations.append(elapsed)
        if len(durations) >= _FOLD_AT:
            durations.fold()
        if debug_enabled():
            probe.at(self).log.debug(
                "backend_operation", operation=operation, key=_subject(args), duration=elapsed
            )
        if answers_tuples:
            if result.__class__ is tuple and result[0] is True:
                return result
        elif plain_success and result.__class__ is not _Raised:
            return result
        return finish(probe.at(self), operation, result, args)

    measured.__chanstore_instrumented__ = True  # type: ignore[attr-defined]
    return measured


def call_unmeasured(backend: Any, name: str, *args: Any) -> Any:
    """Call ``backend``'s operation ``name`` for its contract answer, without measuring it.

    For operations built from others (the base class's default bulk
    operations): the outer operation is what is measured, counted and
    logged, once. For a :data:`TOGETHER` class method, ``backend`` is the
    class and the answer is each part's error as the method itself gave it.
    """
    if name in TOGETHER:
        function = getattr(backend, name).__func__
        return getattr(function, "__wrapped__", function)(backend, *args)
    method = getattr(type(backend), name)
    raw = getattr(method, "__wrapped__", method)
    operation, style = OPERATIONS[name]
    try:
        result = raw(backend, *args)
        if style == "keys":
            result = list(result)
    except Exception as exc:  # noqa: BLE001 - the finisher turns it into the answer
        result = _Raised(exc)
    return _FINISHERS[style](_Unmeasured(engine_label(type(backend))), operation, result, args)


def instrument_together(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    """Wrap ``function``, the class method called ``name`` (a key of :data:`TOGETHER`).

    Returns the function to make the class method of; a coroutine function
    gets a coroutine wrapper. Each part is recorded as its backend's
    operation with the elapsed time of the whole call (the parts share one
    round trip or one flush, so that is the time each of them waited), and
    each failed part is counted and logged there, once.
    """
    if getattr(function, "__chanstore_instrumented__", False):
        return function
    operation = OPERATIONS[TOGETHER[name]][0]

    def nested(cls: type) -> bool:
        # A subclass's override called this one through super(): measured once, by it.
        return getattr(getattr(cls, name), "__func__", None) is not measured

    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def measured(cls: type, parts: Sequence[tuple[Any, Mapping[str, Any]]]) -> Any:
            if nested(cls):
                return await function(cls, parts)
            if not parts:
                return []
            started = time.perf_counter()
            try:
                errors = await function(cls, parts)
            except Exception as exc:  # noqa: BLE001 - the call failed for every part
                errors = [exc] * len(parts)
            return _record_parts(operation, parts, errors, time.perf_counter() - started)

    else:

        @functools.wraps(function)
        def measured(cls: type, parts: Sequence[tuple[Any, Mapping[str, Any]]]) -> Any:
            if nested(cls):
                return function(cls, parts)
            if not parts:
                return []
            started = time.perf_counter()
            try:
                errors = function(cls, parts)
            except Exception as exc:  # noqa: BLE001 - the call failed for every part
                errors = [exc] * len(parts)
            return _record_parts(operation, parts, errors, time.perf_counter() - started)

    measured.__chanstore_instrumented__ = True  # type: ignore[attr-defined]
    return measured


def _record_parts(
    operation: str,
    parts: Sequence[tuple[Any, Mapping[str, Any]]],
    errors: Sequence[BaseException | None],
    elapsed: float,
) -> list[BaseException | None]:
    """Each part measured as its backend's ``operation``; its error as that would raise it."""
    if len(errors) != len(parts):
        raise TypeError(f"{len(parts)} parts were stored, but {len(errors)} answers came back")
    debug = logs.debug_enabled()
    answers: list[BaseException | None] = []
    for (backend, items), error in zip(parts, errors, strict=True):
        probe = probe_of(backend)
        probe.durations[operation].observe(elapsed)
        if debug:
            probe.at(backend).log.debug("backend_operation", operation=operation,
                                        key=_subject((items,)), duration=elapsed)  # fmt: skip
        if error is None or not isinstance(error, Exception) or _an_answer(error):
            answers.append(error)
        else:
            answers.append(_raised_as_backend_error(probe.at(backend), operation, error))
    return answers


class _Unmeasured:
    """Stands in for a probe where a failure is the calling operation's to report."""

    __slots__ = ("backend",)

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def failed(self, operation: str, exc: BaseException, kind: str, **fields: Any) -> None:
        return None


class _Raised:
    """What a wrapped method raised, passed to the finisher in place of a result."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


def _subject(args: tuple[Any, ...]) -> Any:
    if not args:
        return None
    first = args[0]
    if isinstance(first, str):
        return first
    # Bulk operations take any iterable of keys; a generator has no length.
    return f"<{len(first)} keys>" if hasattr(first, "__len__") else "<keys>"


def _finish_read(probe: _Located, operation: str, result: Any, args: tuple[Any, ...]) -> Any:
    if isinstance(result, _Raised):
        exc = result.exc
        if isinstance(exc, KeyError):
            return False, Failure(f"key {args[0]!r} not found", NOT_FOUND, exc)
        return _tuple_failure(probe, operation, exc, args)
    ok, value = result
    if not ok and not isinstance(value, Failure):
        # (False, message) from a get is the contract's "absent", not a failure.
        return False, Failure(str(value), NOT_FOUND)
    if not ok and value.kind != NOT_FOUND:
        probe.failed(operation, value.exception or BackendError(value), value.kind, key=args[0])
    return result


def _finish_write(probe: _Located, operation: str, result: Any, args: tuple[Any, ...]) -> Any:
    if isinstance(result, _Raised):
        exc = result.exc
        if isinstance(exc, KeyError) and operation == "delete":
            return False, Failure(f"key {args[0]!r} not found", NOT_FOUND, exc)
        return _tuple_failure(probe, operation, exc, args)
    ok, message = result
    if not ok:
        kind = failure_kind(message, default="refused")
        if kind != NOT_FOUND:
            probe.failed(operation, BackendError(message), kind, key=args[0] if args else None)
        if not isinstance(message, Failure):
            return False, Failure(str(message), kind)
    return result


def _tuple_failure(
    probe: _Located, operation: str, exc: Exception, args: tuple[Any, ...]
) -> tuple[bool, Failure]:
    kind = error_kind(exc)
    key = args[0] if args else None
    probe.failed(operation, exc, kind, key=key)
    return False, Failure(f"{probe.backend} {operation} of key {key!r} failed: {exc}", kind, exc)


def _finish_keys(probe: _Located, operation: str, result: Any, args: tuple[Any, ...]) -> Any:
    if isinstance(result, _Raised):
        raise _raised_as_backend_error(probe, operation, result.exc)
    return result


def _finish_bulk_read(probe: _Located, operation: str, result: Any, args: tuple[Any, ...]) -> Any:
    if isinstance(result, _Raised):
        raise _raised_as_backend_error(probe, operation, result.exc)
    # One unreadable value must not fail a whole load: it comes back in place
    # of its value, and is counted and logged here, once.
    for key, value in result.items():
        if isinstance(value, CorruptValue):
            probe.failed(operation, value, value.kind, key=key)
    return result


def _finish_bulk_write(probe: _Located, operation: str, result: Any, args: tuple[Any, ...]) -> Any:
    if isinstance(result, _Raised):
        if _an_answer(result.exc):
            raise result.exc
        raise _raised_as_backend_error(probe, operation, result.exc)
    return result


def _an_answer(exc: BaseException) -> bool:
    """A conditional write's failed expectation: the backend answered, it did not fail."""
    return isinstance(exc, PreconditionFailed)


def _raised_as_backend_error(probe: _Located, operation: str, exc: Exception) -> Exception:
    kind = error_kind(exc)
    probe.failed(operation, exc, kind)
    if isinstance(exc, ChanstoreError):
        return exc
    error = BackendError(f"{probe.backend} {operation} failed: {exc}")
    error.kind = kind
    error.__cause__ = exc
    return error


_FINISHERS: dict[str, Callable[[Any, str, Any, tuple[Any, ...]], Any]] = {
    "read": _finish_read,
    "write": _finish_write,
    "keys": _finish_keys,
    "bulk_read": _finish_bulk_read,
    "bulk_write": _finish_bulk_write,
}
