"""The one decorator: every backend's operations measured, logged and made answers."""

from __future__ import annotations

import ast
import asyncio
import errno
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

from chanstore import codec, logs
from chanstore.backends.base import DatabaseInterface
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.errors import (
    BackendError,
    BackendUnavailable,
    BulkWriteError,
    CorruptValue,
    InvalidKey,
    UnstorableValue,
    error_kind,
)
from chanstore.instrumentation import OPERATIONS, TOGETHER, Failure, attach, instrument
from chanstore.metrics import BACKEND_BUCKETS
from chanstore.versions import Change
from support import DictDatabase


def sample(metrics, name, **labels):
    return metrics.registry.get_sample_value(name, labels)


def duration_count(metrics, backend, operation, container="c"):
    return sample(
        metrics,
        "chanstore_backend_operation_duration_seconds_count",
        backend=backend, container=container, operation=operation,
    ) or 0.0  # fmt: skip


def error_samples(metrics):
    return {
        (s.labels["operation"], s.labels["error"]): s.value
        for family in metrics.registry.collect()
        if family.name == "chanstore_backend_operation_errors"
        for s in family.samples
        if s.name.endswith("_total")
    }


class Exploding(DatabaseInterface):
    """Raises what it is told to, from every operation."""

    engine_name = "exploding"

    def __init__(self, domain="", exc=None):
        super().__init__(domain)
        self.exc = exc

    def get_value(self, key):
        raise self.exc

    def set_value(self, key, value):
        raise self.exc

    def delete_key(self, key):
        raise self.exc

    def all_keys(self):
        yield "first"
        raise self.exc


# -- applied once, to every backend --------------------------------------------------


def test_a_third_party_backend_is_instrumented_without_a_line_of_metrics_code():
    for name in OPERATIONS:
        assert getattr(getattr(DictDatabase, name), "__chanstore_instrumented__", False), name


def test_instrument_is_idempotent():
    wrapped = DictDatabase.get_value
    assert instrument(wrapped, "get_value") is wrapped


def test_every_operation_is_measured(metrics):
    backend = DictDatabase("m")
    attach(backend, container="c", metrics=metrics)
    backend.set_value("a", 1)
    backend.get_value("a")
    backend.get_value("missing")
    list(backend.all_keys())
    backend.set_many({"b": 2})
    backend.get_many(["a", "b"])
    backend.load_all()
    backend.delete_many(["b"])
    backend.delete_key("a")
    backend.apply_if(Change(sets={"c": 3}, expect={"c": None}))
    counts = {op: duration_count(metrics, "dictdb", op) for op, _ in OPERATIONS.values()}
    assert counts == {
        "get": 2, "set": 1, "delete": 1, "all_keys": 1,
        "get_many": 1, "load_all": 1, "set_many": 1, "delete_many": 1, "apply_if": 1,
    }  # fmt: skip
    assert error_samples(metrics) == {}


def test_buckets_run_from_tens_of_microseconds_to_seconds(metrics):
    assert BACKEND_BUCKETS[0] <= 0.00001
    assert BACKEND_BUCKETS[-1] >= 1.0
    backend = DictDatabase("b")
    attach(backend, container="c", metrics=metrics)
    backend.set_value("k", 1)
    labels = {"backend": "dictdb", "container": "c", "operation": "set"}
    smallest = sample(
        metrics, "chanstore_backend_operation_duration_seconds_bucket", **labels, le="1e-05"
    )
    everything = sample(
        metrics, "chanstore_backend_operation_duration_seconds_bucket", **labels, le="+Inf"
    )
    assert smallest is not None
    assert everything == 1


def test_metrics_go_to_the_registry_given(metrics):
    from chanstore.metrics import Metrics  # noqa: PLC0415

    other = Metrics()
    backend = DictDatabase("r")
    attach(backend, container="c", metrics=metrics)
    backend.set_value("k", 1)
    assert duration_count(metrics, "dictdb", "set") == 1
    assert (
        other.registry.get_sample_value(
            "chanstore_backend_operation_duration_seconds_count",
            {"backend": "dictdb", "container": "c", "operation": "set"},
        )
        is None
    )


def test_a_super_call_is_one_operation(tmp_path, metrics):
    class Logged(JSONDatabase):
        engine_name = "logged-json"
        seen: list[str] = []

        def get_value(self, key):
            self.seen.append(key)
            return super().get_value(key)

    backend = Logged(domain="d", root_dir=str(tmp_path))
    attach(backend, container="c", metrics=metrics)
    backend.set_value("k", 1)
    assert backend.get_value("k") == (True, 1)
    assert backend.seen == ["k"]
    assert duration_count(metrics, "logged-json", "get") == 1


def test_default_bulk_operations_are_measured_once(metrics):
    backend = DictDatabase("bulk")
    attach(backend, container="c", metrics=metrics)
    backend.set_many({"a": 1, "b": 2, "c": 3})
    backend.load_all()
    assert duration_count(metrics, "dictdb", "set_many") == 1
    assert duration_count(metrics, "dictdb", "load_all") == 1
    # The default set_many and load_all are built from set_value and get_value.
    assert duration_count(metrics, "dictdb", "set") == 0
    assert duration_count(metrics, "dictdb", "get") == 0
    assert duration_count(metrics, "dictdb", "get_many") == 0


# -- raising becomes answering ---------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (RuntimeError("bug"), "internal"),
        (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
        (OSError(errno.EROFS, "Read-only file system"), "read_only"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission"),
        (OSError(errno.EIO, "I/O error"), "io"),
        (TimeoutError("slow"), "timeout"),
        (ConnectionRefusedError("refused"), "unavailable"),
        (BackendUnavailable("down"), "unavailable"),
        (InvalidKey("bad key"), "invalid_key"),
        (UnstorableValue("bad value"), "invalid_value"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_raising_operations_answer_with_a_failure_of_a_kind(metrics, exc, kind):
    backend = Exploding("boom", exc)
    attach(backend, container="c", metrics=metrics)
    with capture_logs() as events:
        answers = {
            "get": backend.get_value("k"),
            "set": backend.set_value("k", 1),
            "delete": backend.delete_key("k"),
        }
    for operation, (ok, failure) in answers.items():
        assert ok is False
        assert isinstance(failure, Failure)
        assert isinstance(failure, str)
        assert failure.kind == kind
        assert failure.exception is exc
        assert str(exc) in failure
        assert f"exploding {operation} of key 'k' failed" in failure
    assert error_samples(metrics) == {("get", kind): 1, ("set", kind): 1, ("delete", kind): 1}
    assert [
        (e["event"], e["log_level"], e["backend"], e["container"], e["domain"], e["key"],
         e["operation"], e["error_kind"])
        for e in events
    ] == [
        ("backend_operation_failed", "error", "exploding", "c", "boom", "k", op, kind)
        for op in ("get", "set", "delete")
    ]  # fmt: skip
    assert all(str(exc) in e["error"] for e in events)


def test_keys_and_bulk_operations_raise_backend_errors(metrics):
    cause = OSError(errno.EIO, "I/O error")
    backend = Exploding("boom", cause)
    attach(backend, container="c", metrics=metrics)
    # all_keys is a generator that fails part-way: it fails inside the call.
    with pytest.raises(BackendError) as raised:
        backend.all_keys()
    assert raised.value.kind == "io"
    assert raised.value.__cause__ is cause
    for call in (
        lambda: backend.get_many(["k"]),
        backend.load_all,
        lambda: backend.set_many({"k": 1}),
        lambda: backend.delete_many(["k"]),
    ):
        with pytest.raises(BackendError) as raised:
            call()
        assert raised.value.kind == "io"
    counted = error_samples(metrics)
    assert counted == {
        ("all_keys", "io"): 1, ("get_many", "io"): 1, ("load_all", "io"): 1,
        ("set_many", "io"): 1, ("delete_many", "io"): 1,
    }  # fmt: skip


def test_an_absent_key_is_an_answer_not_an_error(metrics):
    backend = DictDatabase("absent")
    attach(backend, container="c", metrics=metrics)
    with capture_logs() as events:
        ok, failure = backend.get_value("missing")
        assert (ok, failure.kind) == (False, "not_found")
        assert failure == "'missing' is not stored"  # the backend's own message
        ok, failure = backend.delete_key("missing")  # raises KeyError inside
        assert (ok, failure.kind) == (False, "not_found")
        assert backend.get_many(["missing"]) == {}
        assert backend.delete_many(["missing"]) == []
    assert error_samples(metrics) == {}
    assert events == []


def test_a_tuple_failure_is_a_refusal(metrics):
    class Full(DictDatabase):
        engine_name = "full"

        def set_value(self, key, value):
            return False, "quota exceeded"

    backend = Full("full")
    attach(backend, container="c", metrics=metrics)
    ok, failure = backend.set_value("k", 1)
    assert (ok, failure, failure.kind) == (False, "quota exceeded", "refused")
    assert error_samples(metrics) == {("set", "refused"): 1}


def test_a_corrupt_value_in_a_default_bulk_read_is_counted_once(metrics):
    class Garbled(DictDatabase):
        engine_name = "garbled"

        def get_value(self, key):
            try:
                return super().get_value(key)
            except ValueError as exc:
                raise CorruptValue(f"{key!r} holds no JSON: {exc}") from exc

    backend = Garbled("g")
    attach(backend, container="c", metrics=metrics)
    backend.set_many({"good": 1, "bad": 2})
    backend.data["bad"] = "{torn"
    with capture_logs() as events:
        loaded = backend.load_all()
    assert loaded["good"] == 1
    assert isinstance(loaded["bad"], CorruptValue)
    assert "holds no JSON" in str(loaded["bad"])
    # load_all is built from get_many, which is built from get_value: one failure, once.
    assert error_samples(metrics) == {("load_all", "corrupt"): 1}
    assert [(e["operation"], e["key"]) for e in events] == [("load_all", "bad")]
    ok, failure = backend.get_value("bad")
    assert (ok, failure.kind) == (False, "corrupt")


def test_a_failed_write_inside_a_default_bulk_write_keeps_its_kind(metrics):
    backend = DictDatabase("kind")
    attach(backend, container="c", metrics=metrics)
    with pytest.raises(BackendError) as raised:
        backend.set_many({"a": 1, "b": object()})
    assert raised.value.kind == "invalid_value"
    assert raised.value.done == ["a"]
    assert error_samples(metrics) == {("set_many", "invalid_value"): 1}


# -- debug events ----------------------------------------------------------------


def test_a_debug_event_per_operation_when_debug_is_on(metrics, monkeypatch):
    monkeypatch.setattr(logs, "_debug", True)
    backend = DictDatabase("dbg")
    attach(backend, container="c", metrics=metrics)
    with capture_logs() as events:
        backend.set_value("k", 1)
        backend.get_many(key for key in ["k"])  # a generator has no len()
        backend.set_many({"a": 1, "b": 2})
        list(backend.all_keys())
    assert [(e["event"], e["operation"], e["key"]) for e in events] == [
        ("backend_operation", "set", "k"),
        ("backend_operation", "get_many", "<keys>"),
        ("backend_operation", "set_many", "<2 keys>"),
        ("backend_operation", "all_keys", None),
    ]
    assert all(e["log_level"] == "debug" and e["duration"] >= 0 for e in events)


def test_no_debug_events_when_debug_is_off(metrics):
    backend = DictDatabase("quiet")
    attach(backend, container="c", metrics=metrics)
    with capture_logs() as events:
        backend.set_value("k", 1)
        backend.get_value("k")
    assert events == []


# -- error kinds ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (redis.TimeoutError("t"), "timeout"),
        (redis.ConnectionError("c"), "unavailable"),
        (redis.AuthenticationError("a"), "permission"),
        (redis.BusyLoadingError("b"), "unavailable"),
        (TimeoutError("s"), "timeout"),
        (OSError(errno.EDQUOT, "quota"), "disk_full"),
        (OSError(errno.ENAMETOOLONG, "long"), "invalid_key"),
        (KeyError("k"), "internal"),
        (ValueError("v"), "internal"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_error_kinds_are_a_small_closed_set(exc, kind):
    assert error_kind(exc) == kind


# -- several backends in one call: set_many_together ----------------------------------


def set_many_count(metrics, container, backend="dictdb"):
    return duration_count(metrics, backend, "set_many", container)


def store_together(cls, parts, flavour):
    if flavour == "async":
        return asyncio.run(cls.set_many_together_async(parts))
    return cls.set_many_together(parts)


def test_the_batch_operations_are_declared_with_defaults():
    """A third-party backend has them without writing them, and they are wrapped once."""
    first, second = DictDatabase("one"), DictDatabase("two")
    assert first.together_key != second.together_key  # by default, each instance alone
    assert first.together_key == first.together_key
    assert DictDatabase.stores_on_loop is False
    for name in TOGETHER:
        method = getattr(DictDatabase, name).__func__
        assert getattr(method, "__chanstore_instrumented__", False), name
        assert method is getattr(DatabaseInterface, name).__func__


def test_a_batch_operation_must_be_a_classmethod():
    with pytest.raises(TypeError, match="must be a classmethod"):

        class Wrong(DictDatabase):
            def set_many_together(self, parts):
                return []


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_default_set_many_together_stores_each_part_measured_once(metrics, flavour):
    """Each part is its backend's set_many, once: not again inside, per key or per part."""
    store: dict[str, dict[str, str]] = {}
    first, second = DictDatabase("one", store), DictDatabase("two", store)
    attach(first, container="c1", metrics=metrics)
    attach(second, container="c2", metrics=metrics)
    errors = store_together(DictDatabase, [(first, {"a": 1}), (second, {"b": 2, "c": 3})], flavour)
    assert errors == [None, None]
    assert DictDatabase("one", store).load_all() == {"a": 1}
    assert DictDatabase("two", store).load_all() == {"b": 2, "c": 3}
    assert (set_many_count(metrics, "c1"), set_many_count(metrics, "c2")) == (1, 1)
    assert duration_count(metrics, "dictdb", "set", "c2") == 0
    assert error_samples(metrics) == {}
    assert store_together(DictDatabase, [], flavour) == []


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_failed_part_is_its_own_counted_error(metrics, flavour):
    """One error counter and one error log per failed part; the others are stored."""
    store: dict[str, dict[str, str]] = {}
    good, bad = DictDatabase("good", store), DictDatabase("bad", store)
    attach(good, container="c", metrics=metrics)
    attach(bad, container="c", metrics=metrics)
    with capture_logs() as events:
        errors = store_together(
            DictDatabase, [(good, {"a": 1}), (bad, {"x": 1, "y": object()})], flavour
        )
    assert errors[0] is None
    assert isinstance(errors[1], BulkWriteError)
    assert errors[1].kind == "invalid_value"
    assert errors[1].done == ["x"]  # a BulkWriteError still says what of its part was stored
    assert DictDatabase("good", store).load_all() == {"a": 1}
    assert set_many_count(metrics, "c") == 2
    assert error_samples(metrics) == {("set_many", "invalid_value"): 1}
    failed = [e for e in events if e["event"] == "backend_operation_failed"]
    assert [(e["operation"], e["domain"], e["error_kind"]) for e in failed] == [
        ("set_many", "bad", "invalid_value")
    ]


class Batched(DictDatabase):
    """A backend with its own set_many_together (no metrics code), raising or answering."""

    engine_name = "batched"
    calls: list[int] = []
    fail_with: Exception | None = None

    @property
    def together_key(self):
        return "all"

    @classmethod
    def set_many_together(cls, parts):
        cls.calls.append(len(parts))
        if cls.fail_with is not None:
            raise cls.fail_with
        for backend, items in parts:
            backend.data.update({key: codec.encode(value) for key, value in items.items()})
        return [None if items else OSError(errno.EIO, "empty part") for _b, items in parts]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_an_overriding_backend_is_measured_by_the_one_wrapper(metrics, flavour, monkeypatch):
    monkeypatch.setattr(Batched, "calls", [])
    parts = [(Batched(f"b{n}"), {"k": n} if n else {}) for n in range(3)]
    for backend, _items in parts:
        attach(backend, container="c", metrics=metrics)
    errors = store_together(Batched, parts, flavour)
    assert Batched.calls == [3]  # one call for every part, also through the async default
    assert errors[1:] == [None, None]
    assert isinstance(errors[0], BackendError)  # made a BackendError by the wrapper
    assert errors[0].kind == "io"
    assert isinstance(errors[0].__cause__, OSError)
    assert set_many_count(metrics, "c", "batched") == 3
    assert error_samples(metrics) == {("set_many", "io"): 1}


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_batch_that_raises_fails_every_part(metrics, flavour, monkeypatch):
    monkeypatch.setattr(Batched, "fail_with", ConnectionRefusedError("down"))
    parts = [(Batched(f"b{n}"), {"k": n}) for n in range(2)]
    for backend, _items in parts:
        attach(backend, container="c", metrics=metrics)
    errors = store_together(Batched, parts, flavour)
    assert [error.kind for error in errors] == ["unavailable", "unavailable"]
    assert error_samples(metrics) == {("set_many", "unavailable"): 2}


def test_a_super_call_of_set_many_together_is_measured_once(metrics):
    class Wrapping(Batched):
        engine_name = "wrapping"

        @classmethod
        def set_many_together(cls, parts):
            return super().set_many_together(parts)

    backend = Wrapping("w")
    attach(backend, container="c", metrics=metrics)
    assert Wrapping.set_many_together([(backend, {"k": 1})]) == [None]
    assert set_many_count(metrics, "c", "wrapping") == 1


def test_a_debug_event_per_part_when_debug_is_on(metrics, monkeypatch):
    monkeypatch.setattr(logs, "_debug", True)
    first, second = DictDatabase("one"), DictDatabase("two")
    attach(first, container="c", metrics=metrics)
    attach(second, container="c", metrics=metrics)
    with capture_logs() as events:
        DictDatabase.set_many_together([(first, {"a": 1}), (second, {"b": 2, "c": 3})])
    assert [(e["operation"], e["domain"], e["key"]) for e in events] == [
        ("set_many", "one", "<1 keys>"),
        ("set_many", "two", "<2 keys>"),
    ]


def test_backends_never_call_metrics_code():
    """Only the base class (which applies the one wrapper) imports instrumentation."""
    import chanstore.backends as package  # noqa: PLC0415

    folder = Path(package.__file__).parent
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        allowed = {"chanstore.instrumentation"} if path.name == "base.py" else set()
        assert imported & {"chanstore.instrumentation", "chanstore.metrics"} <= allowed, path
