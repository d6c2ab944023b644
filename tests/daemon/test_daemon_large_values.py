"""Large values over HTTP: stored as sent, read back byte for byte, with the ETag of their bytes.

A real ``chanstore serve`` with the json container ``stats`` (fsync on: files
of 64 KiB and more skip the journal, smaller ones go through it) and the
Redis-backed ``mana``. Values of 30 KB, 100 KB and 900 KB, with text that is
not ASCII and numbers orjson alone would write otherwise, go in as PUT bodies;
GET answers the stored compact form, whose SHA-1 is the ETag, and the json file
is the original SDK's indented form of the same value. Bodies come compact (the
stored form, kept as sent: proven in C, or parsed where it holds integers beyond
64 bits) and as other clients spell them: indented, Python's ``json.dumps``,
JavaScript's ``JSON.stringify`` (re-spelt into the stored form in C, or parsed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from daemon_fixtures import for_the_module, json_and_redis_containers
from daemon_harness import DaemonProcess, RedisServer, key_path

from chanstore.keys import encode_domain_part
from chanstore.versions import etag_of

SERVICE_ID = "e2e"


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, module_redis: RedisServer
) -> Iterator[DaemonProcess]:
    yield from for_the_module(
        DaemonProcess(tmp_path_factory.mktemp("large"), json_and_redis_containers(module_redis))
    )


def large_value(size: int, kind: str) -> list[dict[str, Any]]:
    """About ``size`` bytes of chat messages, with non-ASCII text and odd numbers. "awkward"
    ones hold integers beyond 64 bits too, which the C proof of the stored form leaves to
    the parser; "plain" ones are proven, and kept as sent without being parsed."""
    records = []
    number = 0
    while len(json.dumps(records)) < size:
        records.append({"id": number, "user": f"user_{number % 97}", "text": "héllo 世界 🎉 " * 20,
                        "ts": 1.7e9 + number / 7, "tiny": 1.5e-07 * number,
                        "tags": ["a", "b"][: number % 3], "seen": None})  # fmt: skip
        if kind == "awkward":
            records[-1]["big"] = 2**70 + number
        number += 1
    return records


@pytest.mark.parametrize("kind", ["plain", "awkward"])
@pytest.mark.parametrize("form", ["indented", "compact", "python", "javascript"])
@pytest.mark.parametrize("size", [30_000, 100_000, 900_000], ids=["30KB", "100KB", "900KB"])
@pytest.mark.parametrize("container", ["stats", "mana"])
def test_a_large_value_reads_back_byte_identical_with_the_same_etag(
    daemon: DaemonProcess,
    module_redis: RedisServer,
    channel: str,
    container: str,
    size: int,
    form: str,
    kind: str,
) -> None:
    value = large_value(size, kind)
    stored = json.dumps(value, separators=(",", ":")).encode("ascii")
    # Compact: the stored form itself, which is kept as sent; its integers beyond 64 bits
    # must still not pass through a float. The others: whitespace the stored form has not,
    # and (javascript) its non-ASCII text as UTF-8 rather than \u escapes.
    body = {
        "indented": json.dumps(value, indent=1).encode(),
        "compact": stored,
        "python": json.dumps(value).encode(),
        "javascript": json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode(),
    }[form]
    assert len(body) <= 1024 * 1024
    put = daemon.http.put(key_path(channel, container, "log"), content=body)
    assert put.status_code == 200, put.text
    etag = put.json()["etag"]
    assert etag == hashlib.sha1(stored).hexdigest() == etag_of(value)
    assert put.headers["etag"] == f'"{etag}"'

    got = daemon.get(channel, container, "log")
    assert got.status_code == 200
    assert got.content == stored
    assert got.headers["etag"] == f'"{etag}"'

    if container == "stats":
        path = (daemon.data_dir / f"service_{SERVICE_ID}" / f"channel_{encode_domain_part(channel)}"
                / "stats" / "log.json")  # fmt: skip
        assert path.read_bytes() == json.dumps(value, indent=2).encode("ascii")
    else:
        hash_name = f"chanstore:service_{SERVICE_ID}.channel_{encode_domain_part(channel)}.mana"
        with module_redis.client() as client:
            assert client.hget(hash_name, "log") == stored

    # Written again, conditionally on that ETag: accepted, same bytes, same ETag.
    again = daemon.http.put(key_path(channel, container, "log"), content=stored,
                            headers={"If-Match": f'"{etag}"'})  # fmt: skip
    assert again.status_code == 200, again.text
    assert again.json()["etag"] == etag


@pytest.mark.parametrize("container", ["stats", "mana"])
@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "is not valid JSON"),
        (b'{"x": NaN}', "NaN is not JSON"),
        (b"[1, Infinity]", "Infinity is not JSON"),
        (b"1e999", "out of range"),
    ],
)
def test_a_bad_body_is_the_same_clear_400(
    daemon: DaemonProcess, channel: str, container: str, body: bytes, words: str
) -> None:
    answer = daemon.http.put(key_path(channel, container, "bad"), content=body)
    assert answer.status_code == 400
    assert answer.json()["code"] == "bad_request"
    assert words in answer.json()["error"]
    assert daemon.get(channel, container, "bad").status_code == 404


def test_large_puts_wake_the_garbage_collector_rarely(daemon: DaemonProcess, channel: str) -> None:
    """A parsed body is a tree of thousands of dicts and lists: with CPython's default
    thresholds the youngest generation would be collected every 700 of them, a dozen times
    per PUT and half-built documents promoted into full collections (a third of a large
    PUT's CPU). The daemon collects it every 10,000 (chanstore.server.collector)."""
    value = [{"n": number, "tags": [number]} for number in range(5_000)]  # 10,000 containers
    body = json.dumps(value, separators=(",", ":")).encode()
    before = daemon.metric("python_gc_collections_total", generation="0")
    puts = 10
    for number in range(puts):
        answer = daemon.http.put(key_path(channel, "mana", f"tree-{number}"), content=body)
        assert answer.status_code == 200, answer.text
    after = daemon.metric("python_gc_collections_total", generation="0")
    assert before is not None and after is not None, "python_gc_collections_total is not exported"
    # 100,000 new containers: at least 142 collections at the default threshold of 700,
    # about 10 at 10,000 (and a few more for the requests' own objects).
    assert after - before < 3 * puts, f"{after - before:g} young collections for {puts} PUTs"
