"""Listing a store's domains and scanning a domain in batches, backend by backend.

What the contract suite (test_backend_contract.py) cannot say for every
backend: the json walk against planted links, a journal left by a crash,
temp files and hashed folders; the redis ``SCAN`` against glob characters,
the backend's own streams and marker, thousands of domains, the round trips
of ``HSCAN``, and every primary of a real Redis Cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis.crc import key_slot
from structlog.testing import capture_logs

from chanstore import codec
from chanstore.backends.files import TEMP_PREFIX, PlantedLink
from chanstore.backends.journal_records import JOURNAL_NAME, encode_record
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.backends.redis_listing import SCAN_COUNT
from chanstore.backends.redisdb import RedisDatabase
from chanstore.errors import CorruptValue
from redis_topologies import ClusterSetup, require_redis

# -- json ------------------------------------------------------------------------------


def write(root: Path, domain: str, items: dict) -> JSONDatabase:
    backend = JSONDatabase(domain=domain, root_dir=str(root))
    backend.set_many(items)
    backend.close()
    return backend


def listed(root: Path, prefix: str = "") -> list[str]:
    domains = list(JSONDatabase.list_domains(prefix, root_dir=str(root)))
    assert len(domains) == len(set(domains)), "a domain came twice"
    return sorted(domains)


def problems_of(root: Path) -> list:
    backend = JSONDatabase(domain="any", root_dir=str(root))
    try:
        return backend.integrity_problems()
    finally:
        backend.close()


def test_a_planted_folder_link_is_not_followed_nor_listed(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (outside / "stats").mkdir(parents=True)
    (outside / "stats" / "k.json").write_text('"outside"')
    write(root, "service_a.channel_1.stats", {"k": 1})
    channel_link = root / "service_a" / "channel_x"
    channel_link.symlink_to(outside, target_is_directory=True)
    service_link = root / "service_l"
    service_link.symlink_to(outside / "stats", target_is_directory=True)

    with capture_logs() as events:
        assert listed(root) == ["service_a.channel_1.stats"]
    paths = sorted(e["path"] for e in events if e["event"] == "json_planted_link")
    assert paths == sorted([str(channel_link), str(service_link)])
    problems = problems_of(root)
    assert sorted(p.kind for p in problems) == ["planted_link", "planted_link"]
    assert str(channel_link) in " ".join(p.message for p in problems)

    # A prefix whose folder is the link: nothing listed, nothing read through it.
    assert listed(root, "service_l.") == []
    assert listed(root, "service_a.channel_x.") == []
    assert (outside / "stats" / "k.json").read_text() == '"outside"'


def test_a_planted_key_link_counts_as_a_key_and_scans_as_its_error(tmp_path):
    root = tmp_path / "root"
    write(root, "svc.a.box", {"good": 1})
    (root / "svc" / "b" / "box").mkdir(parents=True)
    link = root / "svc" / "b" / "box" / "k.json"
    link.symlink_to(tmp_path / "elsewhere.json")
    with capture_logs() as events:
        # Listed as all_keys lists it: reading it is the error, never a value.
        assert listed(root, "svc.") == ["svc.a.box", "svc.b.box"]
    assert [e["path"] for e in events if e["event"] == "json_planted_link"] == [str(link)]
    backend = JSONDatabase(domain="svc.b.box", root_dir=str(root))
    (batch,) = backend.scan_items()
    assert list(batch) == ["k"]
    assert isinstance(batch["k"], PlantedLink)
    backend.close()


def test_a_journal_a_crash_left_is_replayed_before_the_listing(tmp_path):
    root = tmp_path / "root"
    write(root, "svc.kept.box", {"k": 0})
    # Acknowledged, journaled, and lost from the folders by a crash: only the journal has it.
    path = os.path.join("svc", "gone", "box", "k.json")
    (root / JOURNAL_NAME).write_bytes(encode_record(7, 0, path, b"[1, 2]") + bytes(512))
    assert not (root / "svc" / "gone").exists()

    assert listed(root, "svc.") == ["svc.gone.box", "svc.kept.box"]
    backend = JSONDatabase(domain="svc.gone.box", root_dir=str(root))
    assert list(backend.scan_items()) == [{"k": [1, 2]}]
    backend.close()


def test_temp_files_and_the_journals_own_files_are_never_keys_nor_domains(tmp_path):
    root = tmp_path / "root"
    write(root, "svc.a.box", {"k": 1, ".chanstore-tmp-looks-like-one": 2})
    (root / "svc" / "a" / "box" / f"{TEMP_PREFIX}0123abcd").write_text("half a write")
    (root / "svc" / "t" / "box").mkdir(parents=True)
    (root / "svc" / "t" / "box" / f"{TEMP_PREFIX}0123abcd").write_text("half a write")
    (root / f"{JOURNAL_NAME}.damaged-20250101T000000Z").write_bytes(b"old records")
    (root / "svc" / "not.a.part").mkdir()
    (root / "svc" / "not.a.part" / "k.json").write_text("1")
    (root / "svc" / "a" / "box" / "readme.txt").write_text("not a key")
    assert (root / JOURNAL_NAME).exists()  # the batch above went through it

    assert listed(root) == ["svc.a.box"]
    backend = JSONDatabase(domain="svc.a.box", root_dir=str(root))
    merged = {key: value for batch in backend.scan_items(1) for key, value in batch.items()}
    assert merged == {"k": 1, ".chanstore-tmp-looks-like-one": 2}
    backend.close()


def test_a_prefix_may_end_in_the_middle_of_a_part(tmp_path):
    root = tmp_path / "root"
    domains = ["service_a.channel_1.stats", "service_a.chan.box", "service_a.channel_2",
               "service_a.other.box", "service_ab.channel_1.stats", "service_a"]  # fmt: skip
    for domain in domains:
        write(root, domain, {"k": 1})
    write(root, "", {"in the root": 1})  # the root's own domain ""
    assert listed(root, "service_a.chan") == [
        "service_a.chan.box", "service_a.channel_1.stats", "service_a.channel_2"]  # fmt: skip
    assert listed(root, "service_a") == sorted(domains)
    assert listed(root, "serv") == sorted(domains)
    assert listed(root) == sorted(["", *domains])
    assert listed(root, "service_a.channel_1.stats") == ["service_a.channel_1.stats"]
    assert listed(root, "service_a.channel_1.stats.") == []
    for impossible in (".", "a..b", "svc/x.", "%H" + "0" * 64 + "."):
        assert listed(root, impossible) == []
    assert listed(tmp_path / "never-made") == []
    assert not (tmp_path / "never-made").exists()


def test_a_domain_below_a_hashed_folder_is_reported_not_listed(tmp_path):
    root = tmp_path / "root"
    long_part = "c" * 300  # too long for a folder name: stored as %H<sha256>
    write(root, f"svc.{long_part}.box", {"k": 1})
    write(root, "svc.short.box", {"k": 1})
    with capture_logs() as events:
        assert listed(root) == ["svc.short.box"]
    (event,) = [e for e in events if e["event"] == "json_unlistable_domain"]
    assert os.path.basename(os.path.dirname(event["path"])).startswith("%H")
    (problem,) = problems_of(root)
    assert problem.kind == "unlistable_domain" and event["path"] in problem.message
    # A prefix that names the long part whole reaches it: then its domains are known.
    assert listed(root, f"svc.{long_part}.") == [f"svc.{long_part}.box"]


def test_scan_items_reports_a_hashed_file_without_a_readable_key(tmp_path):
    root = tmp_path / "root"
    backend = write(root, "svc.a.box", {"k": 1, "long " + "x" * 300: 2})
    foreign = backend.path / ("%H" + "0" * 64 + ".json")
    foreign.write_text("not even json")
    (backend.path / "torn.json").write_text('{"a": ')
    reader = JSONDatabase(domain="svc.a.box", root_dir=str(root))
    with capture_logs() as events:
        merged = {key: value for batch in reader.scan_items(2) for key, value in batch.items()}
    assert sorted(merged) == sorted(["k", "long " + "x" * 300, "torn"])
    assert isinstance(merged["torn"], CorruptValue)
    assert [e["path"] for e in events if e["event"] == "json_keyless_file"] == [str(foreign)]
    (problem,) = reader.integrity_problems()
    assert problem.kind == "corrupt_value" and str(foreign) in problem.message
    reader.close()


def test_scan_items_holds_one_batch_of_keys_at_a_time(tmp_path, monkeypatch):
    """The folder is read as it is listed: all_keys (every key at once) is never asked."""
    root = tmp_path / "root"
    write(root, "svc.a.box", {f"k{n}": n for n in range(250)})
    reader = JSONDatabase(domain="svc.a.box", root_dir=str(root))
    monkeypatch.setattr(JSONDatabase, "all_keys", lambda self: pytest.fail("all keys listed"))
    sizes = [len(batch) for batch in reader.scan_items(100)]
    assert sizes == [100, 100, 50]
    reader.close()


# -- redis -----------------------------------------------------------------------------


def redis_listed(settings: dict, prefix: str = "", **more) -> list[str]:
    domains = list(RedisDatabase.list_domains(prefix, **settings, **more))
    assert len(domains) == len(set(domains)), "a domain came twice"
    return sorted(domains)


def command_calls(client, command: str) -> int:
    return client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_glob_characters_in_the_key_prefix_and_the_prefix_are_literal(redis_settings):
    key_prefix = "g*[ab]?\\:"
    domains = ["a*b", "a?c", "a[1]", "a\\d", "axb", "a1", "aa"]
    backends = [RedisDatabase(domain=d, key_prefix=key_prefix, **redis_settings) for d in domains]
    # Another prefix that the unescaped pattern g*[ab]?\:* would match.
    backends.append(RedisDatabase(domain="a*b-foreign", key_prefix="gXa-:", **redis_settings))
    for backend in backends:
        backend.set_value("k", 1)
    assert redis_listed(redis_settings, key_prefix=key_prefix) == sorted(domains)
    assert redis_listed(redis_settings, "a*", key_prefix=key_prefix) == ["a*b"]
    assert redis_listed(redis_settings, "a?", key_prefix=key_prefix) == ["a?c"]
    assert redis_listed(redis_settings, "a[", key_prefix=key_prefix) == ["a[1]"]
    assert redis_listed(redis_settings, "a\\", key_prefix=key_prefix) == ["a\\d"]
    assert redis_listed(redis_settings, "a[1", key_prefix=key_prefix) == ["a[1]"]
    # With no key prefix, every hash is a domain: the foreign one too, found by its name.
    assert redis_listed(redis_settings, "gXa-:a*", key_prefix="") == ["gXa-:a*b-foreign"]
    for backend in backends:
        backend.close()


def test_the_histories_and_the_marker_are_not_domains(redis_server, redis_settings):
    domains = ["svc.a.box", "svc.b.box"]
    backends = [RedisDatabase(domain=d, **redis_settings) for d in domains]
    for backend in backends:
        backend.set_value("k", 1)
        backend.delete_key("k")
        backend.set_value("j", 2)
    assert backends[0].integrity_problems() == []  # writes the marker
    client = redis_server.client()
    assert client.type("chanstore:-marker") == b"string"
    assert client.type("chanstore:-events:svc.a.box") == b"stream"
    assert redis_listed(redis_settings) == domains
    assert redis_listed(redis_settings, "-") == []
    backends[1].delete_key("j")  # emptied: Redis drops the hash, the history stays
    assert redis_listed(redis_settings) == ["svc.a.box"]
    assert command_calls(client, "keys") == 0
    client.close()
    for backend in backends:
        backend.close()


def test_five_thousand_domains_are_listed_each_once_without_keys(redis_server, redis_settings):
    client = redis_server.client()
    domains = [f"service_s.channel_{n}.stats" for n in range(5000)]
    pipe = client.pipeline(transaction=False)
    for domain in domains:
        pipe.hset(f"chanstore:{domain}", "k", codec.encode(1))
    pipe.hset("chanstore:service_t.channel_1.stats", "k", codec.encode(1))
    pipe.execute()
    client.config_resetstat()
    assert redis_listed(redis_settings, "service_s.") == sorted(domains)
    scans = command_calls(client, "scan")
    # About SCAN_COUNT names a round trip: 5,001 keys take a handful, never one each.
    assert 5001 // SCAN_COUNT <= scans <= 3 * (5001 // SCAN_COUNT) + 2, scans
    assert command_calls(client, "keys") == 0
    client.close()


def test_a_domain_of_ten_thousand_keys_is_read_one_hscan_a_batch(redis_server, redis_settings):
    client = redis_server.client()
    backend = RedisDatabase(domain="svc.big.box", **redis_settings)
    items = {f"key-{n}": {"n": n} for n in range(10_000)}
    pipe = client.pipeline(transaction=False)
    for key, value in items.items():
        pipe.hset(backend.hash_name, key, codec.encode(value))
    pipe.hset(backend.hash_name, "bad", b'{"torn": ')
    pipe.execute()

    client.config_resetstat()
    batches = list(backend.scan_items(1000))
    hscans = command_calls(client, "hscan")
    merged = {key: value for batch in batches for key, value in batch.items()}
    assert sum(len(batch) for batch in batches) == len(merged) == 10_001
    assert isinstance(merged.pop("bad"), CorruptValue)
    assert merged == items
    assert all(0 < len(batch) <= 1000 for batch in batches)
    # One round trip a batch (COUNT is a hint: about 1,000 fields each), nothing else.
    assert 5 <= hscans <= 25, hscans
    assert len(batches) >= hscans - 1
    assert sum(command_calls(client, c) for c in ("hgetall", "hkeys", "hmget", "hget")) == 0

    client.config_resetstat()
    assert sum(len(batch) for batch in backend.scan_items(100)) == 10_001
    assert command_calls(client, "hscan") >= 5 * hscans  # ten times smaller batches
    client.close()
    backend.close()


# -- a real Redis Cluster --------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_redis()
    setup = ClusterSetup(tmp_path_factory.mktemp("cluster"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.mark.slow
def test_a_cluster_lists_the_domains_of_every_primary(cluster):
    settings = cluster.settings()
    domains = [f"service_s.channel_{n}.stats" for n in range(60)]
    backends = [RedisDatabase(domain=domain, **settings) for domain in domains]
    for backend in backends:
        backend.set_value("k", {"domain": backend.domain})
    other = RedisDatabase(domain="service_t.channel_1.stats", **settings)
    other.set_value("k", 1)
    assert backends[0].integrity_problems() == []  # a marker on every primary
    # The domains are spread over every shard: a listing of one node would miss some.
    holders = {cluster.primary_of_slot(key_slot(b.hash_name)) for b in backends}
    assert holders == set(cluster.primary_ports()) and len(holders) == 3

    # Naming one node is enough: the others are found, and each is asked.
    one_node = cluster.settings(how_many=1)
    assert redis_listed(one_node, "service_s.") == sorted(domains)
    assert redis_listed(one_node) == sorted([*domains, "service_t.channel_1.stats"])
    assert redis_listed(one_node, "service_s.channel_1") == sorted(
        d for d in domains if d.startswith("service_s.channel_1"))  # fmt: skip

    big = backends[0]
    big.set_many({f"f{n}": n for n in range(3000)})
    merged = {key: value for batch in big.scan_items(500) for key, value in batch.items()}
    assert merged == {"k": {"domain": big.domain}, **{f"f{n}": n for n in range(3000)}}
    for backend in [*backends, other]:
        backend.delete_many(list(backend.all_keys()))
        backend.close()
    assert redis_listed(one_node) == []
