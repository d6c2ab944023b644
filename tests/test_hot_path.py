"""The library's hot path: cache reads answered by one dict lookup and counted in plain
numbers, and backend durations appended and folded at scrape time, with the same
answers, counts and exposition as the slow way, from any number of threads."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from structlog.testing import capture_logs

from chanstore import CachedDict
from chanstore.backends.null import NullDatabase
from chanstore.cache import UnreadableValue
from chanstore.errors import CorruptValue
from chanstore.instrumentation import attach
from chanstore.metrics import BACKEND_BUCKETS, DeferredDurations, Metrics
from support import DictDatabase

DURATION = "chanstore_backend_operation_duration_seconds"
# Below, on and between bucket bounds, and past the last finite one.
DURATIONS = [0.0, 1e-7, BACKEND_BUCKETS[0], BACKEND_BUCKETS[0] * 1.5, BACKEND_BUCKETS[4],
             BACKEND_BUCKETS[-1], BACKEND_BUCKETS[-1] * 3, 2e-5, 2e-5, 0.3]  # fmt: skip


class CountingDatabase(DictDatabase):
    """A DictDatabase that counts the reads that reach it."""

    def __init__(self, domain: str = "", store: dict | None = None) -> None:
        super().__init__(domain, store)
        self.reads = 0

    def get_value(self, key):
        self.reads += 1
        return super().get_value(key)

    def load_all(self):
        self.reads += 1
        return super().load_all()


def requests(metrics: Metrics, container: str) -> tuple[float, float]:
    """(hits, misses) of ``container`` as a scrape sees them."""

    def value(result: str) -> float:
        labels = {"container": container, "result": result}
        return metrics.registry.get_sample_value("chanstore_cache_requests_total", labels) or 0.0

    return value("hit"), value("miss")


def seeded(metrics: Metrics, *, load: bool, name: str = "box") -> CachedDict:
    store: dict = {}
    DictDatabase("hot", store).set_many({"a": 1, "b": [2], "c": None})
    box = CachedDict(CountingDatabase("hot", store), name=name, metrics=metrics)
    if load:
        box.load()
    return box


# -- cache reads ------------------------------------------------------------------------


def test_a_partial_cache_asks_the_backend_for_keys_it_does_not_hold(metrics):
    """Before a load, ``in``, ``get`` and ``[]`` of a key memory does not hold ask the
    backend (and agree with it); once held, they are hits that never reach it."""
    box = seeded(metrics, load=False)
    backend = box.database
    assert "a" in box and backend.reads == 1  # a miss, then held
    assert box["a"] == 1 and box.get("a") == 1 and "a" in box
    assert backend.reads == 1
    assert box.get("b") == [2] and backend.reads == 2
    assert "nothing" not in box and backend.reads == 3
    assert box.get("nothing", "default") == "default" and backend.reads == 4
    with pytest.raises(KeyError):
        box["nothing"]
    assert backend.reads == 5
    assert requests(metrics, "box") == (3.0, 5.0)
    # Stored behind the cache's back: an unheld key still finds it.
    DictDatabase("hot", {"hot": backend.data}).set_value("late", 9)
    assert "late" in box and box.get("late") == 9


def test_a_complete_cache_answers_every_path_from_memory(metrics):
    """After load, present and absent keys, len, items and values never reach the backend;
    each read counts one hit."""
    box = seeded(metrics, load=True)
    backend = box.database
    reads = backend.reads
    assert box["a"] == 1
    assert box.get("b") == [2]
    assert box.get("absent", 7) == 7
    assert "c" in box and "absent" not in box
    assert len(box) == 3
    assert dict(box.items()) == {"a": 1, "b": [2], "c": None}
    assert sorted(map(str, box.values())) == ["1", "None", "[2]"]
    assert sorted(box) == ["a", "b", "c"]
    assert backend.reads == reads
    assert requests(metrics, "box") == (5.0 + 3 + 3, 0.0)
    with pytest.raises(KeyError):
        box["absent"]
    with pytest.raises(TypeError):
        _ = ["unhashable"] in box  # as a dict answers
    assert 5 not in box and box.get(5) is None  # a key no backend could hold


def test_views_are_live_and_follow_writes(metrics):
    """items() and values() are views: a write after they were made shows in the next
    iteration, as a dict's views do."""
    box = seeded(metrics, load=True)
    items, values = box.items(), box.values()
    box["d"] = 4
    del box["a"]
    assert dict(items) == {"b": [2], "c": None, "d": 4}
    assert 4 in list(values) and 1 not in list(values)
    assert ("d", 4) in items and len(items) == 3


def test_a_damaged_value_is_in_the_mapping_and_raises_where_it_is_read(metrics):
    """A damaged value is ``in`` the mapping, and ``[]``, ``get``, items() and values()
    raise for it; the readable keys still read."""
    box = seeded(metrics, load=True)
    box.memory._put("torn", UnreadableValue("box", "torn"))
    assert "torn" in box
    for read in (lambda: box["torn"], lambda: box.get("torn"), lambda: dict(box.items()),
                 lambda: list(box.values())):  # fmt: skip
        with pytest.raises(CorruptValue):
            read()
    assert box["a"] == 1
    first = next(iter(box.items()))  # raises at the damaged value, not before
    assert first == ("a", 1)


def test_the_null_backend_reads_every_key_as_none(metrics):
    """Over the null backend every key is ``in`` the mapping and reads as None."""
    box = CachedDict(NullDatabase("hot"), name="null", metrics=metrics)
    box["k"] = 1
    assert "anything" in box and "k" in box
    assert box["anything"] is None and box.get("k", 5) is None
    assert list(box.items()) == [] and len(box) == 0


# -- backend durations ---------------------------------------------------------------------


def clocked_backend(monkeypatch: pytest.MonkeyPatch, durations: list[float]) -> type:
    """A backend class whose wrapper's clock makes each call take the next of ``durations``."""
    ticks = iter([tick for seconds in durations for tick in (0.0, seconds)])
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))

    class Clocked(DictDatabase):
        engine_name = "clocked"

        def get_value(self, key):  # defined here, so wrapped now, with this clock
            return super().get_value(key)

    monkeypatch.undo()  # the wrappers keep the clock they were made with
    return Clocked


def family_text(text: str, name: str) -> list[str]:
    """The lines of the exposition ``text`` of metric family ``name``, creation times left out."""
    return [
        line
        for line in text.splitlines()
        if name in line and "_created" not in line and not line.startswith(f"{name}_sum")
    ]


def test_folded_durations_expose_what_observe_would(monkeypatch):
    """The exposition of chanstore_backend_operation_duration_seconds (help, type, labels,
    buckets, count and sum) is what one observe() per call made of the same durations."""
    metrics = Metrics(CollectorRegistry())
    backend = clocked_backend(monkeypatch, DURATIONS)("hot")
    attach(backend, container="box", metrics=metrics)
    for index in range(len(DURATIONS)):
        backend.get_value(f"k{index}")

    before = CollectorRegistry()
    observed = Histogram(DURATION, "Time a backend operation took, failures included.",
                         ["backend", "container", "operation"], buckets=BACKEND_BUCKETS,
                         registry=before)  # fmt: skip
    for label in ("get", "set", "delete", "all_keys", "get_many", "load_all", "set_many",
                  "delete_many", "apply_if"):  # fmt: skip
        observed.labels("clocked", "box", label)  # every operation's series exists at zero
    for seconds in DURATIONS:
        observed.labels("clocked", "box", "get").observe(seconds)

    expected = generate_latest(before).decode()
    for _ in range(2):  # a second scrape adds nothing twice
        text = generate_latest(metrics.registry).decode()
        assert family_text(text, DURATION) == family_text(expected, DURATION)
        labels = {"backend": "clocked", "container": "box", "operation": "get"}
        total = metrics.registry.get_sample_value(f"{DURATION}_sum", labels)
        assert total == pytest.approx(sum(DURATIONS))
    # Still the first family of the exposition, as it always was.
    assert next(iter(metrics.registry.collect())).name == DURATION


def test_threads_lose_no_duration_while_scrapes_fold(metrics):
    """Many threads calling one container's backend while another scrapes: every call is
    in the histogram once, exactly."""
    threads_count, calls = 6, 3000
    backend = DictDatabase("hot")
    attach(backend, container="box", metrics=metrics)
    backend.set_value("k", 1)
    done = threading.Event()

    def call() -> None:
        for _ in range(calls):
            backend.get_value("k")

    def scrape() -> None:
        while not done.is_set():
            generate_latest(metrics.registry)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    workers = [threading.Thread(target=call) for _ in range(threads_count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    scraper.join()
    labels = {"backend": "dictdb", "container": "box", "operation": "get"}
    count = metrics.registry.get_sample_value(f"{DURATION}_count", labels)
    infinite = metrics.registry.get_sample_value(f"{DURATION}_bucket", {**labels, "le": "+Inf"})
    assert count == infinite == threads_count * calls


def test_an_unscraped_process_holds_a_bounded_backlog(metrics):
    """Nobody scrapes a library user's registry: pending durations fold themselves."""
    backend = DictDatabase("hot")
    probe = attach(backend, container="box", metrics=metrics)
    for _ in range(DeferredDurations.FOLD_AT * 3 + 5):
        backend.get_value("k")
    assert len(probe.durations["get"]) < DeferredDurations.FOLD_AT
    labels = {"backend": "dictdb", "container": "box", "operation": "get"}
    count = metrics.registry.get_sample_value(f"{DURATION}_count", labels)
    assert count == DeferredDurations.FOLD_AT * 3 + 5


def test_a_container_removed_and_added_again_is_measured_afresh(metrics):
    """forget_container drops the container's series and pending durations; a container
    of that name made later reports to new series."""
    labels = {"backend": "dictdb", "container": "box", "operation": "get"}
    first = DictDatabase("hot")
    attach(first, container="box", metrics=metrics)
    first.get_value("k")
    metrics.forget_container("box")
    assert metrics.registry.get_sample_value(f"{DURATION}_count", labels) is None
    second = DictDatabase("hot")
    attach(second, container="box", metrics=metrics)
    second.get_value("k")
    second.get_value("k")
    assert metrics.registry.get_sample_value(f"{DURATION}_count", labels) == 2


def test_the_backends_of_one_container_share_a_probe_and_log_their_own_domain(metrics):
    """One probe per container (a channel in memory costs no probe of its own), while a
    failure still names the domain of the backend that failed."""

    class Failing(DictDatabase):
        def set_value(self, key, value):
            raise OSError(28, "No space left on device")

    first, second = Failing("service_s.channel_1.box"), Failing("service_s.channel_2.box")
    assert attach(first, container="box", metrics=metrics) is attach(
        second, container="box", metrics=metrics
    )
    with capture_logs() as events:
        assert first.set_value("k", 1)[0] is False
        assert second.set_value("k", 1)[0] is False
    failed = [event for event in events if event["event"] == "backend_operation_failed"]
    assert [event["domain"] for event in failed] == [first.domain, second.domain]
    labels = {"backend": "dictdb", "container": "box", "operation": "set", "error": "disk_full"}
    assert (
        metrics.registry.get_sample_value("chanstore_backend_operation_errors_total", labels) == 2
    )
