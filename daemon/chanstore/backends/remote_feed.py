"""Following a channel's change feed, so that in-process caches over the daemon stay current.

The chanstore backend (:mod:`chanstore.backends.remote`) reads and writes
through a running daemon, and other clients write through it too. Each
CachedDict over the backend gives its memory to
:meth:`~chanstore.backends.remote.ChanstoreDatabase.keep_current`, which
makes it a :class:`~chanstore.backends.remote_follower.Follower` of its
channel's :class:`ChannelFeed`:

* one feed per daemon client and channel in the process, shared by every
  container of the channel (reference-counted through its followers): one
  daemon thread reading ``client.watch(channel)``, which hands each ``set``
  and ``delete`` to the followers of the event's container;
* the client's watch resumes a dropped stream by itself (``Last-Event-ID``),
  and the changes made meanwhile follow the ``ready`` of the new stream.
  When the daemon no longer holds them (:class:`CursorExpired`: it
  restarted over a json root), or a stream opens afresh after memories may
  have missed changes, every memory of the channel is dropped: the next
  reads ask the daemon;
* a follower made while no stream is ready waits for one (at most the
  backend's ``timeout``), so that the load that follows misses no change;
  past that, its memory is dropped once the stream is ready.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import threading
import time
from collections.abc import Hashable, Iterable
from typing import Any

from chanstore import logs
from chanstore.backends.remote_follower import LIVE, STALE, WAITING, Follower
from chanstore.client import Client, ClientError, CursorExpired, DaemonUnreachable, WatchEvent

__all__ = ["ChannelFeed", "feeds_running", "follow", "unfollow"]

#: Seconds a feed that stops waits for its thread (which a closed watch wakes at once).
STOP_WAIT = 5.0
#: Seconds, in all, that the feeds still running when the process exits are waited for.
EXIT_WAIT = 2.0
#: The first and the longest wait before a feed that could not open a stream tries again.
RETRY_FIRST = 0.5
RETRY_MAX = 10.0

log = logs.get_logger(backend="chanstore")


class ChannelFeed:
    """One channel's change feed for every follower in the process; one thread."""

    def __init__(self, client: Client, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._log = log.bind(channel=channel, url=client.url)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a follower's state changed
        self._followers: dict[str, list[Follower]] = {}
        self._live = False  # the current stream's ready arrived, and it was not lost since
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"chanstore-feed-{channel[:40]}")  # fmt: skip
        self._started = False

    # -- followers ------------------------------------------------------------------

    def add(self, follower: Follower) -> None:
        """Start telling ``follower`` of its container's changes (see :meth:`wait_ready`)."""
        with self._lock:
            follower.state = LIVE if self._live else WAITING
            self._followers.setdefault(follower.container, []).append(follower)
            if not self._started:
                self._started = True
                self._thread.start()

    def wait_ready(self, follower: Follower, wait: float) -> None:
        """Wait (at most ``wait`` seconds) until the stream is ready, unless it is: then a
        load that follows misses no change. Past that, ``follower``'s memory is
        dropped once the stream is ready."""
        with self._lock:
            if self._changed.wait_for(lambda: follower.state != WAITING or self._stop.is_set(),
                                      timeout=wait):  # fmt: skip
                return
            follower.state = STALE
        self._log.warning("change_feed_not_ready", container=follower.container, waited=wait,
                          message="the daemon's change feed did not open in time: the cache "
                          "is dropped once it does")  # fmt: skip

    def remove(self, follower: Follower) -> bool:
        """Stop telling ``follower``; whether no follower is left."""
        with self._lock:
            followers = self._followers.get(follower.container, [])
            with contextlib.suppress(ValueError):
                followers.remove(follower)
            if not followers:
                self._followers.pop(follower.container, None)
            return not self._followers

    def stop(self) -> None:
        """End the thread (every wait in it is bounded, and closing the watch wakes it)."""
        self.signal_stop()
        self.join(STOP_WAIT)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._log.warning("change_feed_did_not_stop", waited=STOP_WAIT)

    def signal_stop(self) -> None:
        """Tell the thread to end, and wake it; returns at once."""
        self._stop.set()
        with self._lock:
            watch = self._watch
            self._changed.notify_all()
        if watch is not None:
            watch.close()

    def join(self, timeout: float) -> None:
        """Wait at most ``timeout`` seconds for the thread to end (not from the thread)."""
        if self._started and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        since: str | None = None  # where the next watch resumes; None: from now
        failures = 0
        while not self._stop.is_set():
            watch = self.client.watch(self.channel, since=since)
            with self._lock:
                if self._stop.is_set():
                    return
                self._watch = watch
            resumed = since is not None  # this watch's first stream resumes a cursor
            try:
                for event in watch:
                    if event.kind == "ready":
                        self._ready(resumed)
                        failures = 0
                    else:
                        self._change(event)
                    # A reopened stream resumes exactly when there was a cursor to send.
                    resumed = watch.cursor is not None
                if self._stop.is_set():
                    return  # the watch ended because it was closed
                since = watch.cursor  # it should not end otherwise; resume, to be sure
                self._lost("ended", "the watch ended by itself", drop=False)
            except CursorExpired as exc:
                # The daemon no longer holds the changes after our cursor: start again
                # from now, and trust nothing read before.
                self._lost("cursor_expired", str(exc), drop=True)
                since = None
                continue
            except DaemonUnreachable as exc:
                since = watch.cursor  # resume there once the daemon answers again
                self._lost("unreachable", str(exc), drop=False)
            except ClientError as exc:  # refused (401, 404), or a change that cannot be read
                since = None
                self._lost("refused", str(exc), drop=True)
            except Exception as exc:  # noqa: BLE001 - a follower's bug must not end the feed
                self._log.exception("change_feed_crashed")
                since = None
                self._lost("internal", str(exc), drop=True)
            finally:
                watch.close()
            failures += 1
            delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (failures - 1)) * random.uniform(0.5, 1)
            if self._stop.wait(delay):
                return

    def _followers_now(self) -> list[Follower]:
        return [follower for followers in self._followers.values() for follower in followers]

    def _ready(self, resumed: bool) -> None:
        """A stream opened. Resumed, the changes since our cursor follow: memories are
        current. Otherwise every memory that may have missed a change is dropped."""
        with self._lock:
            was_live, self._live = self._live, True
            dropped = 0
            for follower in self._followers_now():
                if not resumed and follower.state != WAITING:
                    follower.drop("a new stream")
                    dropped += 1
                follower.state = LIVE
            self._changed.notify_all()
        if resumed:
            self._log.info("change_feed_resumed")
        elif dropped:
            self._log.warning("caches_dropped", reason="new_stream", caches=dropped,
                              message="the change feed opened afresh: changes made meanwhile "
                              "may have been missed, so the next reads ask the daemon")  # fmt: skip
        elif not was_live:
            self._log.debug("change_feed_ready")

    def _change(self, event: WatchEvent) -> None:
        if event.container is None or event.key is None:
            return
        with self._lock:
            followers = list(self._followers.get(event.container, ()))
        for follower in followers:
            follower.change(event.kind, event.key, event.document, event.etag)

    def _lost(self, reason: str, error: str, *, drop: bool) -> None:
        with self._lock:
            self._live = False
            followers = self._followers_now() if drop else []
            for follower in followers:
                follower.drop(reason)
        self._log.warning("change_feed_lost", reason=reason, error=error[:500],
                          caches_dropped=len(followers))  # fmt: skip


# -- the feeds of the process ----------------------------------------------------------

_feeds: dict[tuple[Hashable, str], ChannelFeed] = {}
_feeds_lock = threading.Lock()


def follow(client_key: Hashable, client: Client, channel: str, follower: Follower, *,
           wait: float) -> None:  # fmt: skip
    """Add ``follower`` to the feed of ``channel`` through ``client`` (made if needed), and
    wait (at most ``wait`` seconds) for its stream to be ready."""
    with _feeds_lock:
        feed = _feeds.get((client_key, channel))
        if feed is None:
            feed = _feeds[client_key, channel] = ChannelFeed(client, channel)
        feed.add(follower)  # under the lock: a feed that lost its last follower is gone
    feed.wait_ready(follower, wait)


def unfollow(client_key: Hashable, channel: str, followers: Iterable[Follower]) -> None:
    """Remove ``followers``; the feed stops with its last one."""
    followers = list(followers)
    if not followers:
        return
    with _feeds_lock:
        feed = _feeds.get((client_key, channel))
        if feed is None:
            return
        empty = False
        for follower in followers:
            empty = feed.remove(follower)
        if empty:
            del _feeds[client_key, channel]
    if empty:
        feed.stop()


def feeds_running() -> int:
    """How many channel feeds run in this process (for tests and diagnostics)."""
    with _feeds_lock:
        return len(_feeds)


@atexit.register
def _stop_all() -> None:
    """At exit, end every feed at once, waiting at most EXIT_WAIT in all."""
    with _feeds_lock:
        feeds = list(_feeds.values())
        _feeds.clear()
    for feed in feeds:
        feed.signal_stop()
    deadline = time.monotonic() + EXIT_WAIT
    for feed in feeds:
        feed.join(max(0.0, deadline - time.monotonic()))
