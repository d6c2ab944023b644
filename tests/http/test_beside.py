"""Large value bodies made ready beside the event loop (chanstore.http.beside).

On the event loop of a test, not through the daemon (tests/daemon's
test_daemon_large_values does that): a large body comes back as the document
parse_value makes of it, with the SHA-1 of its stored form as its ETag,
whichever way it went (the extension's threads, the parse on the loop or on a
Python worker thread, without the extension at all), and a bad one is the
same clear 400.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
from typing import Any

import pytest

from chanstore import codec, stored_form
from chanstore.http import beside
from chanstore.http.beside import BESIDE_LOOP_BYTES, PARSE_BESIDE_BYTES, parse_value_beside
from chanstore.http.bodies import parse_value
from chanstore.http.errors import HttpError
from chanstore.versions import stored_with_etag

needs_beside = pytest.mark.skipif(
    stored_form.Beside is None, reason="no Beside: the extension is not in use, or not Linux"
)


def stored(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def messages(count: int) -> list[dict[str, Any]]:
    return [{"n": n, "text": "héllo " * 8, "ts": 1.7e9 + n / 7} for n in range(count)]


@pytest.fixture(params=["threads", "without the extension"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with the extension's threads, and as where it is not built."""
    if request.param == "threads" and stored_form.Beside is None:
        pytest.skip("no Beside: the extension is not in use, or not Linux")
    if request.param != "threads":
        monkeypatch.setattr(stored_form, "Beside", None)
    return request.param


@pytest.mark.parametrize("count", [600, 6_000], ids=["under PARSE_BESIDE", "over it"])
def test_a_large_stored_form_is_kept_as_sent_with_the_etag_of_its_bytes(way, count):
    body = stored(messages(count))
    assert len(body) >= BESIDE_LOOP_BYTES
    assert (len(body) >= PARSE_BESIDE_BYTES) == (count == 6_000)
    document = asyncio.run(parse_value_beside(body))
    assert document.stored is body
    assert document.etag == hashlib.sha1(body).hexdigest()
    assert stored_with_etag(document) == (body, document.etag)  # not hashed again
    assert document.doc == messages(count)


@pytest.mark.parametrize("count", [600, 6_000], ids=["under PARSE_BESIDE", "over it"])
def test_a_large_body_not_in_the_stored_form_is_made_into_it(way, count):
    value = messages(count)
    body = json.dumps(value, indent=1).encode()
    document = asyncio.run(parse_value_beside(body))
    assert document.stored == stored(value)
    assert document.doc == value
    assert stored_with_etag(document)[1] == hashlib.sha1(stored(value)).hexdigest()


@needs_beside
@pytest.mark.parametrize(
    "spell",
    [lambda value: json.dumps(value).encode(),
     lambda value: json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()],
    ids=["python json.dumps", "javascript JSON.stringify"],
)  # fmt: skip
def test_a_large_body_spelt_otherwise_is_re_spelt_by_the_threads_not_parsed(spell, monkeypatch):
    def no_parse(body: bytes, what: str) -> codec.Document:
        raise AssertionError("parsed")

    monkeypatch.setattr(beside, "parse_value", no_parse)
    monkeypatch.setattr(beside, "parsed_value", no_parse)
    value = messages(600)
    document = asyncio.run(parse_value_beside(spell(value), file_form=True))
    assert document.stored == stored(value)
    assert document.etag == hashlib.sha1(stored(value)).hexdigest()
    assert document.file_form == json.dumps(value, indent=2).encode("ascii")


@pytest.mark.parametrize("count", [600, 6_000], ids=["under PARSE_BESIDE", "over it"])
def test_a_body_for_a_container_that_writes_files_comes_with_its_file_form(way, count):
    value = messages(count)
    body = stored(value)
    file = json.dumps(value, indent=2).encode("ascii")
    document = asyncio.run(parse_value_beside(body, file_form=True))
    # Made by the threads that proved it; without them, by the write as before.
    assert document.file_form == (file if way == "threads" else None)
    assert codec.encode_bytes(document, indent=2) == file
    assert asyncio.run(parse_value_beside(body)).file_form is None  # not asked: not made
    # Spelt otherwise: re-spelt and proven by the threads, which indent it too.
    respelt = asyncio.run(parse_value_beside(json.dumps(value, indent=1).encode(), file_form=True))
    assert respelt.file_form == (file if way == "threads" else None)
    assert codec.encode_bytes(respelt, indent=2) == file
    # Not provable (a float not as repr writes it): the write indents what was parsed.
    odd = stored(value)[:-1] + b",1.50]"
    parsed = asyncio.run(parse_value_beside(odd, file_form=True))
    assert parsed.file_form is None
    assert codec.encode_bytes(parsed, indent=2) == json.dumps([*value, 1.5], indent=2).encode()


@pytest.mark.parametrize("size", [50_000, 600_000], ids=["under PARSE_BESIDE", "over it"])
def test_a_large_bad_body_is_the_same_clear_400_as_on_the_loop(way, size):
    body = stored(list(range(size // 7)))[:-1]  # a list that never closes
    assert len(body) >= BESIDE_LOOP_BYTES
    with pytest.raises(HttpError, match="is not valid JSON") as made_beside:
        asyncio.run(parse_value_beside(body))
    with pytest.raises(HttpError) as on_the_loop:
        parse_value(body)
    assert made_beside.value.message == on_the_loop.value.message


@needs_beside
def test_the_loop_serves_others_while_a_body_is_proven():
    body = stored(messages(60_000))  # about 5 MB: milliseconds of proof and hash

    async def main() -> int:
        turns = 0
        making = asyncio.ensure_future(parse_value_beside(body))
        while not making.done():
            await asyncio.sleep(0)
            turns += 1
            assert turns < 10_000_000, "the body was never made ready"
        assert (await making).etag == hashlib.sha1(body).hexdigest()
        return turns

    assert asyncio.run(asyncio.wait_for(main(), 60)) > 1


@needs_beside
def test_a_cancelled_request_drops_its_answer_and_the_next_is_answered():
    body = stored(messages(20_000))

    async def main() -> None:
        cancelled = asyncio.ensure_future(parse_value_beside(body))
        await asyncio.sleep(0)  # submitted
        cancelled.cancel()
        document = await asyncio.wait_for(parse_value_beside(body), 30)
        assert document.etag == hashlib.sha1(body).hexdigest()
        assert cancelled.cancelled()

    asyncio.run(main())


@needs_beside
def test_each_event_loop_has_its_own_provers_gone_with_it():
    body = stored(messages(600))

    async def provers() -> int:
        await parse_value_beside(body)
        return id(beside._PROVERS[asyncio.get_running_loop()])

    with asyncio.Runner() as runner:
        first = runner.run(provers())
        assert runner.run(provers()) == first
    with asyncio.Runner() as runner:
        runner.run(provers())
        assert len(beside._PROVERS) >= 1
    del runner
    gc.collect()
    assert len(beside._PROVERS) == 0


@needs_beside
def test_a_forked_child_makes_provers_of_its_own():
    body = stored(messages(600))

    async def main() -> None:
        await parse_value_beside(body)
        loop = asyncio.get_running_loop()
        inherited = beside._PROVERS[loop]
        inherited.pid = -1  # as the copy a forked child holds looks to it
        assert (await parse_value_beside(body)).etag == hashlib.sha1(body).hexdigest()
        assert beside._PROVERS[loop] is not inherited
        inherited.close()  # its reader was removed: the loop does not watch a closed fd

    asyncio.run(main())


@needs_beside
def test_at_exit_every_provers_threads_are_stopped():
    body = stored(messages(600))

    async def main() -> beside._Provers:
        await parse_value_beside(body)
        return beside._PROVERS[asyncio.get_running_loop()]

    with asyncio.Runner() as runner:
        provers = runner.run(main())
        beside._close_all()
        assert provers._beside.fd == -1


class TakeFails:
    """A Beside whose next take() runs out of memory, as building its answers can."""

    def __init__(self, real: Any) -> None:
        self.real, self.fd, self.failed = real, real.fd, False

    def submit(self, body: bytes, max_depth: int, indent: bool) -> int:
        return self.real.submit(body, max_depth, indent)

    def take(self) -> list[tuple[int, bytes | None, str | None, bytes | None]]:
        answers = self.real.take()
        if not self.failed and answers:
            self.failed = True
            raise MemoryError("building the answers")
        return answers

    def close(self) -> None:
        self.real.close()


@needs_beside
def test_answers_lost_to_memory_fail_their_requests_and_later_ones_are_answered():
    body = stored(messages(600))

    async def main() -> None:
        await parse_value_beside(body)
        provers = beside._PROVERS[asyncio.get_running_loop()]
        provers._beside = TakeFails(provers._beside)
        with pytest.raises(MemoryError):
            await asyncio.wait_for(parse_value_beside(body), 30)
        document = await asyncio.wait_for(parse_value_beside(body), 30)
        assert document.etag == hashlib.sha1(body).hexdigest()

    asyncio.run(main())
