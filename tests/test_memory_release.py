"""When and how the daemon gives the memory of channels that left back to the system.

The end-to-end measurement is tests/reliability/test_memory.py.
"""

from __future__ import annotations

import pytest

from chanstore.server import memory
from chanstore.server.memory import RELEASE_AFTER_CHANNELS, RELEASE_INTERVAL, ReleaseSchedule


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(memory.time, "monotonic", clock)
    return clock


def test_memory_is_given_back_once_channels_stop_leaving(clock: Clock) -> None:
    schedule = ReleaseSchedule()
    clock.now += RELEASE_INTERVAL
    assert not schedule.swept(0)  # nothing left
    assert not schedule.swept(10)  # still leaving, and few
    assert schedule.swept(0)
    assert not schedule.swept(0)  # given back already


def test_memory_is_given_back_while_many_channels_keep_leaving(clock: Clock) -> None:
    schedule = ReleaseSchedule()
    clock.now += RELEASE_INTERVAL
    assert not schedule.swept(RELEASE_AFTER_CHANNELS - 1)
    assert schedule.swept(1)
    clock.now += RELEASE_INTERVAL
    assert schedule.swept(RELEASE_AFTER_CHANNELS)


def test_memory_is_not_given_back_twice_within_the_interval(clock: Clock) -> None:
    schedule = ReleaseSchedule()
    clock.now += RELEASE_INTERVAL
    assert schedule.swept(RELEASE_AFTER_CHANNELS)
    clock.now += RELEASE_INTERVAL / 2
    assert not schedule.swept(RELEASE_AFTER_CHANNELS)
    assert not schedule.swept(0)
    clock.now += RELEASE_INTERVAL / 2
    assert schedule.swept(0)  # the return that was due, at a later sweep


def test_release_gives_memory_back_on_glibc() -> None:
    assert memory.release_free_memory() is (memory._malloc_trim() is not None)


def test_no_restart_when_the_allocator_was_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    def execve(*args: object) -> None:
        raise AssertionError(f"restarted: {args}")

    monkeypatch.setattr(memory.os, "execve", execve)
    monkeypatch.setenv("PYTHONMALLOC", "pymalloc")
    memory.exec_with_malloc()
