"""Large value bodies made ready beside the event loop.

A value's body is proven its stored form (:mod:`chanstore.stored_form`) and
hashed for its ETag before it is stored; at 100 KB the two cost the event
loop more than the rest of the PUT, and every other connection waits
meanwhile. From :data:`BESIDE_LOOP_BYTES` on, :func:`parse_value_beside`
hands both to threads of the C extension (``stored_form.Beside``) and the
loop goes on serving: those threads never take the GIL, so the loop does not
wait for them to hand it back (a Python worker thread did that at every turn
of the loop, and cost more than it freed below 512 KB). Each event loop has
one ``Beside``, whose eventfd the loop watches for answers.

For a container that writes the original's file form (json), the threads
also indent a body they prove (``stored_form.indented``), which the write then
takes as it is (:attr:`~chanstore.codec.Document.file_form`): at 100 KB the
write lane's thread indented each file itself, between one batch's flushes
and the next, where the writes of every channel of its lane waited for it.

A body spelt otherwise (Python's ``json.dumps`` layout, JavaScript's
non-ASCII text, any indentation) is re-spelt by the threads
(``stored_form.compacted``) and proven so. A body the threads do not prove
(a number not as ``repr`` writes it, a float only CPython's own ``repr`` can
decide, an invalid body) is parsed as :func:`parse_value` does: on
the loop, or from :data:`PARSE_BESIDE_BYTES` on a Python worker thread,
where the parser lets go of the GIL for longer. Without the extension
(``CHANSTORE_PURE_PYTHON=1``, or not Linux) every large body goes that way.

What waits here is bounded by what the daemon holds already: each connection
has one request being answered, and its body is that request's (with, for a
json container, its file form: about 1.2 times the body, until the write; and
for a body re-spelt, the stored form it was re-spelt into: 3 times its text
where every character is beyond ASCII, at most 6 for raw DEL characters, as
the parse would make it).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from chanstore import codec, stored_form
from chanstore.codec import Document
from chanstore.http.bodies import MAX_JSON_DEPTH, parse_value, parsed_value
from chanstore.versions import etag_of_stored

__all__ = ["BESIDE_LOOP_BYTES", "PARSE_BESIDE_BYTES", "parse_value_beside"]

#: Value bodies of at least this many bytes are proven and hashed beside the event loop.
#: ``python3 bench/beside.py --rounds 5``: the loop gave a body of 4 KB 14 µs on it and 20
#: µs beside it (the hand-off), 8 KB 22 and 19 µs, 16 KB 26 and 16 µs, 100 KB 121 and 10.
BESIDE_LOOP_BYTES = 16 * 1024
#: Bodies not proven, of at least this many bytes, are parsed on a Python worker thread.
#: Through the daemon (8 writers), doing so served 1.08x the PUTs of 900 KB to json and
#: 1.22x to redis, no more at 300 KB, and 0.86x at 100 KB to json.
PARSE_BESIDE_BYTES = 512 * 1024
#: The extension's threads for each event loop: the loop keeps a core of its own.
PROVING_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))
#: A prover's answer: the stored form proven (the body, or the body re-spelt; None: not
#: proven), its SHA-1 (None: not hashed), its file form (None: not made).
Answer = tuple[bytes | None, str | None, bytes | None]
#: Python threads that parse large bodies: the work is CPU-bound, so no more than the cores.
_PARSING = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="chanstore-bodies")


async def parse_value_beside(body: bytes, what: str = "the body", *,
                             file_form: bool = False) -> Document:  # fmt: skip
    """:func:`~chanstore.http.bodies.parse_value` of a large body, made beside the event
    loop, with the ETag of its stored form found there too
    (:func:`chanstore.versions.stored_with_etag` then takes it); with ``file_form``,
    the document's file form too when the body was proven its stored form."""
    loop = asyncio.get_running_loop()
    provers = _provers_of(loop)
    parse: Callable[[bytes, str], Document] = parse_value
    if provers is not None:
        stored, sha1, indented = await provers.prove(body, file_form)
        if stored is not None:
            document = codec.stored_document(stored)
            document.etag = sha1 if sha1 is not None else etag_of_stored(stored)
            document.file_form = indented
            return document
        parse = parsed_value  # proven not to be the stored form: no need to try again
    if len(body) >= PARSE_BESIDE_BYTES:
        return await loop.run_in_executor(_PARSING, _ready_to_store, body, what, parse)
    return _ready_to_store(body, what, parse)


def _ready_to_store(body: bytes, what: str, parse: Callable[[bytes, str], Document]) -> Document:
    document = parse(body, what)
    if document.stored is not None:
        document.etag = etag_of_stored(document.stored)
    return document


class _Provers:
    """One event loop's ``stored_form.Beside``: what it was given, and the futures that
    wait for its answers."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._beside = stored_form.Beside(PROVING_THREADS)
        self._waiting: dict[int, asyncio.Future[Answer]] = {}
        self.pid = os.getpid()  # a forked child has the object, not the threads
        loop.add_reader(self._beside.fd, self._take)

    def prove(self, body: bytes, indent: bool = False) -> asyncio.Future[Answer]:
        """The stored form proven of ``body`` (itself, or re-spelt; None: not proven), its
        SHA-1 (None: not hashed), and with ``indent`` its file form once proven (else
        None)."""
        token = self._beside.submit(body, MAX_JSON_DEPTH, indent)
        future = self._waiting[token] = asyncio.get_running_loop().create_future()
        return future

    def _take(self) -> None:
        try:
            answers = self._beside.take()
        except MemoryError as exc:
            # The answers taken are lost: every body waiting fails (a 500 its client can
            # retry), rather than one of them waiting for ever. Later answers are dropped.
            waiting, self._waiting = self._waiting, {}
            for future in waiting.values():
                if not future.done():
                    future.set_exception(exc)
            return
        for token, stored, sha1, indented in answers:
            future = self._waiting.pop(token, None)
            if future is not None and not future.done():  # else it was cancelled, or failed
                future.set_result((stored, sha1, indented))

    def forget(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop watching the eventfd: a forked child's copy, which it shares with the parent
        (reading it would take the parent's wake-ups)."""
        loop.remove_reader(self._beside.fd)

    def close(self) -> None:
        """Stop and join the threads: a body being read is read to its end first."""
        self._beside.close()


#: Each event loop's provers, made at its first large body, gone with the loop.
_PROVERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Provers] = (
    weakref.WeakKeyDictionary()
)


def _provers_of(loop: asyncio.AbstractEventLoop) -> _Provers | None:
    if stored_form.Beside is None:
        return None
    provers = _PROVERS.get(loop)
    if provers is not None and provers.pid != os.getpid():
        provers.forget(loop)
        provers = None
    if provers is None:
        provers = _PROVERS[loop] = _Provers(loop)
    return provers


@atexit.register
def _close_all() -> None:
    # Before the interpreter is taken down: a thread still reading a body (of a request
    # its client gave up on) would otherwise read it while its memory is freed.
    for provers in list(_PROVERS.values()):
        provers.close()
