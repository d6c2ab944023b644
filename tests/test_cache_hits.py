"""The cache's hit path (chanstore.cache_hits): compiled where a compiler is, the same
answers and counts in C and in Python, no reference leaked or cycle kept."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import tracemalloc
import weakref
from pathlib import Path

import pytest

from chanstore import CachedDict
from chanstore.cache_hits import COMPILED
from chanstore.cache_memory import CacheMemory
from chanstore.metrics import Metrics
from support import DictDatabase

ROOT = Path(__file__).resolve().parent.parent
# The suites that read through CachedDict, run again on the pure-Python hit path.
CACHE_SUITES = ["test_cache.py", "test_cache_memory.py", "test_cache_properties.py",
                "test_hot_path.py", "test_compat_original_sdk.py"]  # fmt: skip


def loaded(metrics: Metrics, values: dict) -> CachedDict:
    store: dict = {}
    DictDatabase("hits", store).set_many(values)
    box = CachedDict(DictDatabase("hits", store), name="hits", metrics=metrics)
    box.load()
    return box


def hits(box: CachedDict) -> int:
    return box.memory._counts.hits


@pytest.mark.slow
def test_the_cache_suites_pass_on_the_pure_python_hit_path():
    """Where the extension is in use, every CachedDict suite runs again without it."""
    if not COMPILED:
        pytest.skip("the pure-Python hit path is the one in use: this run tests it")
    env = {**os.environ, "CHANSTORE_PURE_PYTHON": "1"}
    which = subprocess.run(
        [sys.executable, "-c", "import chanstore.cache_hits as c; print(c.COMPILED)"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert which.stdout.strip() == "False"
    suites = [str(ROOT / "tests" / name) for name in CACHE_SUITES]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout


def test_get_takes_its_arguments_as_dict_get_does(metrics):
    box = loaded(metrics, {"a": 1})
    assert box.get("a") == 1
    assert box.get("a", 5) == 1
    assert box.get(key="a") == 1
    assert box.get("zz") is None
    assert box.get("zz", 7) == 7
    assert box.get("zz", default=7) == 7
    assert box.get(key="zz", default=8) == 8
    for call, says in [
        (box.get, "'key'"),
        (lambda: box.get("a", 1, 2), "positional arguments"),
        (lambda: box.get("a", fallback=1), "unexpected keyword argument 'fallback'"),
        (lambda: box.get("a", key="b"), "multiple values for argument 'key'"),
        (lambda: box.get("a", 1, default=2), "multiple values for argument 'default'"),
    ]:
        with pytest.raises(TypeError, match=says):
            call()


def test_an_unhashable_key_is_refused_as_dict_refuses_it(metrics):
    box = loaded(metrics, {"a": 1})
    before = hits(box)
    for read in (lambda: [] in box, lambda: box[[]], lambda: box.get([])):  # type: ignore[index]
        with pytest.raises(TypeError, match="unhashable"):
            read()
    assert hits(box) == before


def test_hits_hand_out_values_without_leaking_a_reference(metrics):
    value, fallback = ["held"], ["fallback"]
    box = loaded(metrics, {"a": 0})
    box.memory._values["a"] = value  # exactly this object, as a loaded value is held
    held, given = sys.getrefcount(value), sys.getrefcount(fallback)
    for _ in range(1000):
        assert box["a"] is value
        assert box.get("a") is value
        assert "a" in box
        assert box.get("absent", fallback) is fallback
        assert "absent" not in box
    assert (sys.getrefcount(value), sys.getrefcount(fallback)) == (held, given)
    assert hits(box) == 5000


def test_a_cycle_through_a_cached_dict_is_collected(metrics):
    """A value that refers back to its CachedDict: the collector sees through the hit
    path's fields, so neither is kept alive by the other."""

    class Value:
        pass

    box = loaded(metrics, {"a": 1})
    value = Value()
    value.box = box  # type: ignore[attr-defined]
    box.memory._values["a"] = value
    gone = weakref.ref(value)
    del box, value
    gc.collect()
    assert gone() is None


def test_hits_from_racing_threads_are_all_counted(metrics):
    """Compiled, a hit is counted under the GIL in C: threads that race lose none."""
    if not COMPILED:
        pytest.skip("in Python a racing `+= 1` may be lost (CacheCounts says so)")
    box = loaded(metrics, {"a": 1})
    threads_count, reads = 4, 20_000
    start = threading.Barrier(threads_count, timeout=30)

    def read() -> None:
        start.wait()
        for _ in range(reads):
            box["a"]
            box.get("a")
            "a" in box  # noqa: B015 - the read is what counts

    threads = [threading.Thread(target=read) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert hits(box) == threads_count * reads * 3


def test_memories_made_and_dropped_leave_nothing_behind(metrics):
    """Nothing a memory's construction allocates outlives it (a name looked up per memory
    once stayed in the type's attribute cache: strings scattered over the heap, which
    kept the daemon's memory up after its channels left)."""
    counts = metrics.cache_counts("left")
    entries = metrics.cache_entries.labels("left")
    CacheMemory(counts, entries)  # anything made once, on first use, is made now
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        memories = [CacheMemory(counts, entries) for _ in range(10_000)]
        made = tracemalloc.get_traced_memory()[0] - before
        del memories
        gc.collect()
        left = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert made > 1_000_000, made  # they were measured
    assert left < 2_000, f"{left} bytes outlived 10,000 memories"
