"""Listing a store's domains and scanning a domain in batches, backend by backend.

What the contract suite (test_backend_contract.py) cannot say for every
backend: the json walk against planted links, a journal left by a crash,
temp files, and hashed folders named back by their name files; the redis
``SCAN`` against glob characters, the backend's own streams and marker,
thousands of domains, the round trips of ``HSCAN``, and every primary of a
real Redis Cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis.crc import key_slot
from structlog.testing import capture_logs

from chanstore import CachedDict, MoobiusStorage, codec
from chanstore.backends.files import TEMP_PREFIX, PlantedLink
from chanstore.backends.journal_records import JOURNAL_NAME, encode_record
from chanstore.backends.json_layout import NAME_FILE
from chanstore.backends.jsonfiles import JSONDatabase
from chanstore.backends.redis_listing import SCAN_COUNT
from chanstore.backends.redisdb import RedisDatabase
from chanstore.config import DbConfig, load_db_config
from chanstore.errors import CorruptValue
from chanstore.keys import encode_domain_part
from chanstore.storage import container_domain
from chanstore.transfer.operations import migrate
from chanstore.transfer.places import channel_prefix, places

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


# -- hashed folders: named by their name file ------------------------------------------


def hashed_folder_of(root: Path, *names: str) -> Path:
    """The one hashed folder in ``root/names``."""
    (folder,) = [p for p in root.joinpath(*names).iterdir() if p.name.startswith("%H")]
    return folder


def one_problem(root: Path, kind: str = "unlistable_domain"):
    found = problems_of(root)
    assert [problem.kind for problem in found] == [kind], found
    return found[0]


def write_together(root: Path, domain: str, items: dict) -> None:
    """As the daemon's write lanes write: through set_many_together, with another domain."""
    backends = [JSONDatabase(domain=d, root_dir=str(root)) for d in (domain, "svc.other.box")]
    errors = JSONDatabase.set_many_together([(backends[0], items), (backends[1], {"o": 1})])
    assert errors == [None, None]
    for backend in backends:
        backend.close()


def write_one_by_one(root: Path, domain: str, items: dict) -> None:
    backend = JSONDatabase(domain=domain, root_dir=str(root), fsync=False)
    for key, value in items.items():
        backend.set_value(key, value)
    backend.close()


@pytest.mark.parametrize("writer", [write, write_together, write_one_by_one],
                         ids=["journal", "together", "one-by-one"])  # fmt: skip
@pytest.mark.parametrize(
    "channel",
    ["c" * 256, "d" * 248, "é" * 128, "x.y/" * 62 + "zz"],
    ids=["256-bytes", "248-bytes", "256-bytes-of-utf8", "encoded-to-more"],
)
def test_a_channel_id_too_long_for_a_folder_name_is_listed_exactly(tmp_path, writer, channel):
    root = tmp_path / "root"
    domain = container_domain("svc", channel, "stats")
    assert len(f"channel_{encode_domain_part(channel)}".encode()) > 255  # hashed
    writer(root, domain, {"k": 1, "j": [2]})
    folder = hashed_folder_of(root, "service_svc")
    assert (folder / NAME_FILE).read_text("utf-8") == f"channel_{encode_domain_part(channel)}"

    assert domain in listed(root)
    assert listed(root, channel_prefix("svc")) == [domain]
    config = load_db_config([{"implementation": "json", "name": "stats",
                              "settings": {"root_dir": str(root)}}])  # fmt: skip
    (place,) = places(list(config), "svc")
    assert (place.channel, place.container, place.domain) == (channel, "stats", domain)
    assert problems_of(root) == []


def test_a_long_service_and_channel_are_migrated_whole(tmp_path):
    """Every level hashed, through a migrate to a new root and a listing of that one."""
    service, channel = "s" * 256, "é" * 128
    old, new = tmp_path / "old", tmp_path / "new"
    storage = MoobiusStorage(service, channel, [{"implementation": "json", "name": "stats",
                                                 "settings": {"root_dir": str(old)}}])  # fmt: skip
    storage.stats.update({"k": 1, "long " + "k" * 300: {"v": 2}})
    storage.close()

    def config(root: Path) -> DbConfig:
        return load_db_config([{"implementation": "json", "name": "stats",
                                "settings": {"root_dir": str(root)}}])  # fmt: skip

    (tally,) = migrate(config(old), config(new), service, verify=True)
    assert (tally.channels, tally.keys, tally.copied) == (1, 2, 2)
    domain = container_domain(service, channel, "stats")
    assert listed(new) == [domain]
    reader = JSONDatabase(domain=domain, root_dir=str(new))
    assert {k: v for batch in reader.scan_items() for k, v in batch.items()} == {
        "k": 1, "long " + "k" * 300: {"v": 2}}  # fmt: skip
    reader.close()
    assert problems_of(new) == []


def test_the_name_file_is_never_a_key(tmp_path):
    """A hashed domain folder holds its name file beside its keys: never listed, scanned,
    deleted nor cleared as one, and the domain written again afterwards."""
    root = tmp_path / "root"
    domain = "svc." + "c" * 300
    backend = write(root, domain, {"k": 1, "%name": 2, "%name.txt": 3})
    name_file = backend.path / NAME_FILE
    assert name_file.read_text() == "c" * 300
    backend = JSONDatabase(domain=domain, root_dir=str(root))
    assert sorted(backend.all_keys()) == ["%name", "%name.txt", "k"]
    merged = {key: value for batch in backend.scan_items(1) for key, value in batch.items()}
    assert merged == {"k": 1, "%name": 2, "%name.txt": 3}
    assert backend.get_many(["%name", NAME_FILE]) == {"%name": 2, NAME_FILE: 3}
    assert backend.delete_key(NAME_FILE) == (True, NAME_FILE)  # the key of that name, only
    assert backend.delete_key(NAME_FILE)[0] is False  # gone: the name file is no key
    assert name_file.read_text() == "c" * 300
    assert sorted(backend.delete_many(["%name", NAME_FILE, "absent"])) == ["%name"]
    CachedDict(backend, name="box").clear()
    assert backend.all_keys() == [] and list(backend.scan_items()) == []
    assert name_file.read_text() == "c" * 300
    assert listed(root) == []  # no key: no domain, and nothing reported
    backend.set_value("again", 4)
    assert listed(root) == [domain]
    assert sorted(os.listdir(backend.path)) == sorted([NAME_FILE, "again.json"])
    backend.close()
    assert problems_of(root) == []


def test_reads_make_no_hashed_folder_nor_name_file(tmp_path):
    root = tmp_path / "root"
    write(root, "svc.short", {"k": 1})
    backend = JSONDatabase(domain="svc." + "c" * 300 + ".box", root_dir=str(root))
    assert backend.get_value("k")[0] is False
    assert backend.get_many(["k"]) == {} and backend.all_keys() == []
    assert list(backend.scan_items()) == [] and backend.delete_many(["k"]) == []
    backend.set_many({})
    backend.close()
    assert sorted(os.listdir(root / "svc")) == ["short"]


@pytest.mark.parametrize(
    "content",
    ["c" * 301, "d" * 300, "", "c" * 300 + "\n", "c" * 150 + "." + "c" * 149],
    ids=["another-part", "another-part-of-the-length", "empty", "newline", "two-parts"],
)
def test_a_name_file_that_does_not_name_its_folder_is_reported_not_listed(tmp_path, content):
    root = tmp_path / "root"
    write(root, "svc." + "c" * 300 + ".box", {"k": 1})
    write(root, "svc.short.box", {"k": 1})
    folder = hashed_folder_of(root, "svc")
    (folder / NAME_FILE).write_text(content, "utf-8")
    with capture_logs() as events:
        assert listed(root) == ["svc.short.box"]
    (event,) = [e for e in events if e["event"] == "json_unlistable_domain"]
    assert event["path"] == str(folder / "box")
    problem = one_problem(root)
    assert str(folder) in problem.message and "does not match" in problem.message
    assert "--channel" in problem.message
    # Not trusted, and not overwritten by a write either: it stays reported.
    write(root, "svc." + "c" * 300 + ".box", {"j": 2})
    assert (folder / NAME_FILE).read_text("utf-8") == content
    assert listed(root) == ["svc.short.box"]


def test_a_name_file_that_is_not_utf8_or_not_a_file_is_reported(tmp_path):
    root = tmp_path / "root"
    backend = write(root, "svc." + "c" * 300, {"k": 1})
    (backend.path / NAME_FILE).write_bytes(b"\xff" * 300)
    assert listed(root) == []
    assert "does not match" in one_problem(root).message
    (backend.path / NAME_FILE).unlink()
    (backend.path / NAME_FILE).mkdir()
    assert listed(root) == []
    assert "cannot be read" in one_problem(root).message


def test_a_hashed_folder_of_an_earlier_release_is_reported_with_its_fix(tmp_path):
    root = tmp_path / "root"
    long_part = "c" * 300  # too long for a folder name: stored as %H<sha256>
    write(root, f"svc.{long_part}.box", {"k": 1})
    write(root, f"svc.{long_part}.other", {"k": 1})
    write(root, "svc.short.box", {"k": 1})
    folder = hashed_folder_of(root, "svc")
    (folder / NAME_FILE).unlink()  # as releases before the name file left it
    with capture_logs() as events:
        assert listed(root) == ["svc.short.box"]
    paths = sorted(e["path"] for e in events if e["event"] == "json_unlistable_domain")
    assert paths == [str(folder / "box"), str(folder / "other")]
    problems = problems_of(root)
    assert [p.kind for p in problems] == ["unlistable_domain"] * 2
    for problem in problems:
        assert str(folder) in problem.message and NAME_FILE in problem.message
        assert "earlier releases" in problem.message and "--channel <id>" in problem.message
    # A prefix that names the long part whole reaches it: then its domains are known.
    assert listed(root, f"svc.{long_part}.") == [f"svc.{long_part}.box", f"svc.{long_part}.other"]
    # The fix the message gives: the channel named, its domain built with no listing.
    channel = "c" * 256
    write(root, container_domain("s", channel, "stats"), {"k": 1})
    (hashed_folder_of(root, "service_s") / NAME_FILE).unlink()
    config = load_db_config([{"implementation": "json", "name": "stats",
                              "settings": {"root_dir": str(root)}}])  # fmt: skip
    assert places(list(config), "s") == []
    assert [p.channel for p in places(list(config), "s", [channel])] == [channel]
    # And the next write to the domain names its folder.
    write(root, f"svc.{long_part}.box", {"j": 2})
    assert (folder / NAME_FILE).read_text() == long_part
    assert listed(root, "svc.") == [f"svc.{long_part}.box", f"svc.{long_part}.other",
                                    "svc.short.box"]  # fmt: skip


def test_a_planted_name_file_link_is_reported_and_not_followed(tmp_path):
    root = tmp_path / "root"
    write(root, "svc." + "c" * 300 + ".box", {"k": 1})
    folder = hashed_folder_of(root, "svc")
    outside = tmp_path / "outside.txt"
    outside.write_text("c" * 300)  # says the right part: never read all the same
    (folder / NAME_FILE).unlink()
    (folder / NAME_FILE).symlink_to(outside)
    with capture_logs() as events:
        assert listed(root) == []
    assert [e["path"] for e in events if e["event"] == "json_planted_link"] == [
        str(folder / NAME_FILE)]  # fmt: skip
    problems = problems_of(root)
    assert sorted(p.kind for p in problems) == ["planted_link", "unlistable_domain"]
    # A write leaves the link for a person to look at.
    write(root, "svc." + "c" * 300 + ".box", {"j": 2})
    assert (folder / NAME_FILE).is_symlink()


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
