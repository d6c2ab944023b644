"""``chanstore serve --workers 2``: two worker processes behind one port, seen as one daemon.

Every test runs real processes: the supervisor, its two workers, a
redis-server. A json container (``stats``) is served by worker 0 alone and
reached through the other worker by relaying; a redis container (``mana``)
is served by both. Which worker answers a connection is told by ``/healthz``
(``worker``), so each test picks connections to the worker it needs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest
from daemon_fixtures import json_and_redis_containers
from daemon_harness import (
    DaemonProcess,
    NotifyListener,
    key_path,
    metric,
    read_response,
    run_cli,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

import chanstore
from chanstore.server.group import FORWARD_CONNECTIONS, ROLE_VARIABLE, WorkerRole
from chanstore.server.metrics_merge import MERGE, MIN

WORKERS = ["--workers", "2"]


@pytest.fixture
def group(start_daemon, module_redis) -> DaemonProcess:
    """A daemon of two workers over json ``stats`` and redis ``mana``."""
    return start_daemon(json_and_redis_containers(module_redis),
                        args=[*WORKERS, "--backend-timeout", "2"])  # fmt: skip


def connection_to(daemon: DaemonProcess, worker: int, attempts: int = 200) -> httpx.Client:
    """A keep-alive client whose connection the given worker accepted."""
    for _ in range(attempts):
        client = httpx.Client(base_url=daemon.url, timeout=15)
        if client.get("/healthz").json()["worker"] == worker:
            return client
        client.close()
    raise AssertionError(f"no connection reached worker {worker} in {attempts} tries")


@pytest.fixture
def clients(group: DaemonProcess) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """A connection to worker 0 and one to worker 1."""
    zero, one = connection_to(group, 0), connection_to(group, 1)
    yield zero, one
    zero.close()
    one.close()


def worker_pids(daemon: DaemonProcess) -> dict[int, int]:
    """Each worker's pid, as its own /healthz says."""
    found: dict[int, int] = {}

    def both() -> bool:
        with httpx.Client(base_url=daemon.url, timeout=5) as client:
            answer = client.get("/healthz").json()
        found[answer["worker"]] = answer["worker_pid"]
        return len(found) == 2

    wait_until(both, 20, "both workers answering /healthz")
    return found


def test_a_role_from_a_supervisor_of_an_earlier_release_is_read(monkeypatch) -> None:
    """After an upgrade, a supervisor still running the earlier release starts a worker of
    this one (a worker that died is started again): its role has no daemon key, and the
    worker must start all the same, as a daemon of its own in the marks of json roots."""
    role = WorkerRole(1, 2, Path("/run/chanstore/g"), 4321, 5, daemon_key=77)
    monkeypatch.setenv(ROLE_VARIABLE, role.encode())
    assert WorkerRole.from_environment() == role
    earlier = {k: v for k, v in json.loads(role.encode()).items() if k != "daemon_key"}
    monkeypatch.setenv(ROLE_VARIABLE, json.dumps(earlier))
    assert WorkerRole.from_environment() == WorkerRole(1, 2, Path("/run/chanstore/g"), 4321, 5,
                                                       daemon_key=None)  # fmt: skip


def test_connections_reach_both_workers_and_healthz_names_the_service(group) -> None:
    seen: dict[int, set[int]] = {0: set(), 1: set()}
    for _ in range(40):
        with httpx.Client(base_url=group.url, timeout=5) as client:
            answer = client.get("/healthz").json()
        assert answer["status"] == "serving"
        assert answer["pid"] == group.process.pid  # the supervisor: systemd's main pid
        seen[answer["worker"]].add(answer["worker_pid"])
    assert seen[0] and seen[1], seen
    assert len(seen[0]) == len(seen[1]) == 1 and seen[0] != seen[1]
    served = [e for e in group.events() if e["event"] == "serving"]
    assert sorted(event["worker"] for event in served) == [0, 1]


def test_json_writes_through_either_worker_read_alike_everywhere(group, clients) -> None:
    zero, one = clients
    readers = [httpx.Client(base_url=group.url, timeout=15) for _ in range(12)]
    try:
        for round_ in range(6):
            writer = one if round_ % 2 else zero
            value = {"round": round_, "through": "one" if round_ % 2 else "zero"}
            put = writer.put(key_path("c1", "stats", "hp"), json=value)
            assert put.status_code == 200, put.text
            for reader in [zero, one, *readers]:
                got = reader.get(key_path("c1", "stats", "hp"))
                assert got.status_code == 200 and got.json() == value
                assert got.headers["etag"] == put.headers["etag"]
        listed = one.get(key_path("c1", "stats")).json()
        assert listed == {"keys": ["hp"], "next": None}
        bulk = one.post(key_path("c1", "stats") + "/-/get", json={"keys": ["hp", "nope"]}).json()
        assert bulk["missing"] == ["nope"] and bulk["values"]["hp"]["round"] == 5
        assert one.delete(key_path("c1", "stats", "hp")).status_code == 200
        assert zero.get(key_path("c1", "stats", "hp")).status_code == 404
        # redis: served by both workers, each from its own coherent cache
        assert zero.put(key_path("c1", "mana", "m"), json=7).status_code == 200
        wait_until(lambda: one.get(key_path("c1", "mana", "m")).json() == 7, 5, "mana on 1")
    finally:
        for reader in readers:
            reader.close()
    # Only worker 0 ever opened the json root: one owner of its journal.
    assert not [e for e in group.events() if e.get("worker") == 1 and e.get("container") == "stats"]


def test_conditional_writes_and_errors_are_relayed_unchanged(group, clients) -> None:
    zero, one = clients
    path = key_path("c2", "stats", "gold")
    created = one.put(path, json=10, headers={"if-none-match": "*"})
    assert created.status_code == 200
    etag = created.headers["etag"]
    again = one.put(path, json=11, headers={"if-none-match": "*"})
    assert again.status_code == 412 and again.json()["code"] == "precondition_failed"
    assert again.headers["etag"] == etag
    assert one.get(path, headers={"if-none-match": etag}).status_code == 304
    assert one.put(path, json=12, headers={"if-match": etag}).status_code == 200
    stale = one.put(path, json=13, headers={"if-match": etag})
    assert stale.status_code == 412 and stale.headers["etag"] != etag
    assert zero.get(path).json() == 12
    head = one.head(path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == "2"
    # The same answers, byte for byte, from the owner and through the other worker.
    for route in [path, key_path("c2", "nope", "k"), key_path("c2", "stats", "absent")]:
        mine, theirs = zero.get(route), one.get(route)
        assert (mine.status_code, mine.content) == (theirs.status_code, theirs.content)
        assert {k: v for k, v in mine.headers.items() if k != "x-request-id"} == {
            k: v for k, v in theirs.headers.items() if k != "x-request-id"
        }
    bad = one.put(path, content=b"{not json")
    assert bad.status_code == 400
    asked_id = one.get(path, headers={"x-request-id": "relayed-123"})
    assert asked_id.headers["x-request-id"] == "relayed-123"


def test_a_page_of_its_own_origin_writes_through_the_relay_another_sites_page_cannot(
    group, clients
) -> None:
    """The worker that takes a request judges where a browser says it comes from; the owner
    it relays a json write to does not judge it again against the relay's own Host."""
    zero, one = clients
    path = key_path("c5", "stats", "board")
    own_page = {"origin": group.url, "sec-fetch-site": "same-origin"}
    old_browser_own_page = {"origin": group.url}
    for client in (zero, one):
        for headers in (own_page, old_browser_own_page):
            answer = client.put(path, json=[1], headers=headers)
            assert answer.status_code == 200, answer.text
    other_site = {"origin": "http://evil.example", "sec-fetch-site": "cross-site"}
    for client in (zero, one):
        refused = client.put(path, json=[2], headers=other_site)
        assert refused.status_code == 403 and refused.json()["code"] == "cross_origin"
    assert one.get(path).json() == zero.get(path).json() == [1]


def raw_connection_to(daemon: DaemonProcess, worker: int, attempts: int = 200) -> socket.socket:
    """A raw keep-alive socket whose connection the given worker accepted."""
    for _ in range(attempts):
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=20)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_response(sock.makefile("rb"))
        if answer.status == 200 and json.loads(answer.body)["worker"] == worker:
            return sock
        sock.close()
    raise AssertionError(f"no connection reached worker {worker} in {attempts} tries")


def read_kept_alive(stream: BinaryIO) -> tuple[int, bytes]:
    """The next answer's status and body; it must not ask to close the connection."""
    answer = read_response(stream)
    assert "connection" not in answer.headers, f"a keep-alive answer asked to close: {answer}"
    return answer.status, answer.body


def test_pipelined_requests_from_many_connections_are_relayed_in_order(group) -> None:
    # More connections than the relay's pool to worker 0 holds, each pipelining
    # batches that mix writes, reads, a miss and a redis read: every answer must be
    # its own request's, in order, and no connection is asked to close.
    connections, batches = FORWARD_CONNECTIONS + 16, 6
    assert group.put("pipe", "mana", "m", 5).status_code == 200
    sockets = [raw_connection_to(group, 1) for _ in range(connections)]
    failures: list[str] = []

    def pipeline(number: int, sock: socket.socket) -> None:
        stream = sock.makefile("rb")
        path = key_path(f"pipe-{number % 8}", "stats", f"k{number}")
        try:
            for batch in range(batches):
                body = json.dumps({"n": number, "batch": batch}, separators=(",", ":")).encode()
                sock.sendall(
                    b"PUT %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                    % (path.encode(), len(body), body)
                    + b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode() * 5
                    + b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % (path + "-absent").encode()
                    + b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % key_path("pipe", "mana", "m").encode()
                )  # fmt: skip
                answers = [read_kept_alive(stream) for _ in range(8)]
                assert answers[0][0] == 200 and b'"ok":true' in answers[0][1], answers[0]
                assert answers[1:6] == [(200, body)] * 5, (number, batch, answers[1:6])
                assert answers[6][0] == 404 and b"not_found" in answers[6][1], answers[6]
                assert answers[7] == (200, b"5"), answers[7]
        except (AssertionError, OSError) as exc:
            failures.append(f"connection {number}: {exc!r}"[:500])
        finally:
            sock.close()

    threads = [threading.Thread(target=pipeline, args=(n, s)) for n, s in enumerate(sockets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not [t for t in threads if t.is_alive()], "a pipelined connection never finished"
    assert not failures, failures[:5]
    with httpx.Client(base_url=group.url, timeout=15) as client:  # the owner agrees
        for number in range(connections):
            got = client.get(key_path(f"pipe-{number % 8}", "stats", f"k{number}"))
            assert got.json() == {"n": number, "batch": batches - 1}


def test_change_feed_through_the_other_worker_arrives_event_by_event(group, clients) -> None:
    zero, one = clients
    lines: list[tuple[float, str]] = []
    opened = threading.Event()
    done = threading.Event()

    def watch() -> None:
        with one.stream("GET", "/v1/channels/c3/-/events") as stream:
            assert stream.headers["content-type"] == "text/event-stream"
            for line in stream.iter_lines():
                lines.append((time.monotonic(), line))
                opened.set()
                if sum(text.startswith('data: {"container') for _, text in lines) >= 3:
                    break
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    assert opened.wait(10)
    written = []
    for n in range(3):
        written.append(time.monotonic())
        assert zero.put(key_path("c3", "stats", f"k{n}"), json=n).status_code == 200
        # Each event arrives before the next write: relayed as it comes, not at the end.
        wait_until(lambda n=n: sum(t.startswith("event: set") for _, t in lines) > n, 5,
                   f"event {n} relayed")  # fmt: skip
        time.sleep(0.2)
    assert done.wait(10)
    data = [json.loads(text[6:]) for _, text in lines if text.startswith('data: {"container')]
    assert [(d["key"], d["value"]) for d in data] == [("k0", 0), ("k1", 1), ("k2", 2)]
    # A cursor from the relayed stream resumes on the owner, and the other way round.
    cursor = [text[4:] for _, text in lines if text.startswith("id: ")][1]
    with zero.stream("GET", "/v1/channels/c3/-/events", headers={"last-event-id": cursor}) as s:
        got = []
        for line in s.iter_lines():
            if line.startswith('data: {"container'):
                got.append(json.loads(line[6:])["key"])
            if len(got) == 2:
                break
    assert got == ["k1", "k2"]
    # A refusal is relayed as it is: an unknown container is a 404 before any stream.
    refused = one.get("/v1/channels/c3/-/events", params={"containers": "stats,nope"})
    assert refused.status_code == 404


def test_metrics_are_one_exposition_of_every_worker(group) -> None:
    healthz = {"method": "GET", "route": "/healthz", "status": "200"}
    before = metric(httpx.get(f"{group.url}/metrics", timeout=10).text,
                    "chanstore_http_requests_total", **healthz)  # fmt: skip
    hits = {0: 0, 1: 0}
    for n in range(30):
        with httpx.Client(base_url=group.url, timeout=5) as client:
            hits[client.get("/healthz").json()["worker"]] += 1
            assert client.put(key_path("m", "mana", f"k{n}"), json=n).status_code == 200
            assert client.get(key_path("m", "stats", "absent")).status_code == 404
    assert hits[0] and hits[1]
    text = httpx.get(f"{group.url}/metrics", timeout=10).text
    families = list(text_string_to_metric_families(text))  # a valid exposition
    names = [family.name for family in families]
    assert len(names) == len(set(names)), "a family appears twice"
    route = "/v1/channels/{channel}/{container}/{key}"
    assert metric(text, "chanstore_http_requests_total", method="PUT", route=route,
                  status="200") == 30  # fmt: skip
    assert metric(text, "chanstore_http_requests_total", method="GET", route=route,
                  status="404") == 30  # fmt: skip
    assert metric(text, "chanstore_http_requests_total", **healthz) == before + 30
    assert metric(text, "chanstore_http_request_duration_seconds_count", method="PUT",
                  route=route) == 30  # fmt: skip
    assert metric(text, "chanstore_ready") == 1
    assert metric(text, "chanstore_build_info", version=_version()) == 1
    # Both workers' connection caps: --max-connections holds per worker.
    assert metric(text, "chanstore_http_connections_max") == 2 * 4096
    for family in families:
        assert family.name in MERGE, f"{family.name} has no merge rule"
        for sample in family.samples:
            assert "worker" not in sample.labels
            assert "channel" not in sample.labels


def test_every_metric_a_worker_exports_has_a_merge_rule(group) -> None:
    """Each worker's own exposition (its private socket), not just the merged one."""
    for index in (0, 1):
        text = _private_get(group, index, "/metrics")
        for family in text_string_to_metric_families(text):
            assert family.name in MERGE, f"{family.name} has no merge rule"
    assert MERGE["chanstore_ready"] == MIN and MERGE["chanstore_backend_up"] == MIN


def test_reload_by_file_and_by_post_reaches_both_workers(group, clients, module_redis) -> None:
    zero, one = clients
    inventory = {"implementation": "redis", "name": "inventory", "load": True,
                 "settings": module_redis.settings}  # fmt: skip
    group.write_config([*json_and_redis_containers(module_redis), inventory])
    for client in (zero, one):
        wait_until(lambda c=client: c.get(key_path("r", "inventory")).status_code == 200, 10,
                   "the file's new container on each worker")  # fmt: skip
    group.write_config([*json_and_redis_containers(module_redis)])
    verdict = one.post("/-/reload")
    assert verdict.status_code == 200, verdict.text
    assert verdict.json()["ok"] is True
    for client in (zero, one):
        assert client.get(key_path("r", "inventory")).status_code == 404
    group.write_config("[{broken")
    rejected = zero.post("/-/reload")
    assert rejected.status_code == 400 and rejected.json()["ok"] is False
    assert any("JSON" in problem or "json" in problem for problem in rejected.json()["problems"])
    text = zero.get("/metrics").text
    assert metric(text, "chanstore_config_last_reload_successful") == 0
    assert one.get(key_path("r", "stats", "absent")).status_code == 404  # still serving
    group.write_config([*json_and_redis_containers(module_redis)])
    assert one.post("/-/reload").json()["ok"] is True
    # SIGHUP to the supervisor reaches both workers.
    mark = group.log_size()
    group.send_signal(signal.SIGHUP)

    def reloaded() -> set[int]:
        return {
            e.get("worker") for e in group.events(since=mark) if e["event"] == "config_reloaded"
        }

    wait_until(lambda: reloaded() == {0, 1}, 10, "both workers reloading on SIGHUP")


def test_readyz_is_ready_only_when_every_worker_is(group, clients) -> None:
    zero, one = clients
    assert zero.get("/readyz").status_code == 200
    assert one.get("/readyz").status_code == 200
    pids = worker_pids(group)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        answer = zero.get("/readyz")
        assert answer.status_code == 503
        assert answer.json()["problems"] == {"worker_1": "unavailable"}
        assert str(group.workdir) not in answer.text
        stale = zero.get("/metrics")
        assert stale.status_code == 503  # never a partial sum
    finally:
        os.kill(pids[1], signal.SIGCONT)
    wait_until(lambda: zero.get("/readyz").status_code == 200, 10, "ready again")


def test_owner_that_does_not_answer_is_a_clean_503(group, clients) -> None:
    _, one = clients
    assert one.put(key_path("o", "stats", "k"), json=1).status_code == 200
    pids = worker_pids(group)
    os.kill(pids[0], signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = one.get(key_path("o", "stats", "k"))
        took = time.monotonic() - started
        assert answer.status_code == 503 and answer.json()["code"] == "backend_unavailable"
        assert took < 5, took  # --backend-timeout 2
        assert one.get(key_path("o", "mana", "absent")).status_code == 404  # served here
    finally:
        os.kill(pids[0], signal.SIGCONT)
    assert one.get(key_path("o", "stats", "k")).json() == 1


def test_sigterm_stops_every_worker(group) -> None:
    pids = worker_pids(group)
    assert group.stop(signal.SIGTERM) == 0
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    stopped = {e.get("worker") for e in group.events() if e["event"] == "stopped"}
    assert {0, 1} <= stopped
    # Three processes wrote one log: each line whole, one JSON event.
    lines = group.log_lines()
    assert len(group.events()) == len(lines) > 0


def test_a_worker_killed_is_started_again_and_serves(group) -> None:
    before = worker_pids(group)
    os.kill(before[0], signal.SIGKILL)
    wait_until(lambda: group.events("worker_died"), 10, "the death logged")
    died = group.events("worker_died")[0]
    assert died["worker"] == 0 and "SIGKILL" in died["status"]

    def restarted() -> bool:
        try:
            return worker_pids(group)[0] != before[0]
        except (httpx.TransportError, TimeoutError):
            return False

    wait_until(restarted, 20, "worker 0 started again")
    one = connection_to(group, 1)
    try:
        assert one.put(key_path("k", "stats", "x"), json=1).status_code == 200
        assert one.get(key_path("k", "stats", "x")).json() == 1
    finally:
        one.close()
    assert group.running


def test_systemd_hears_one_service(start_daemon, module_redis, tmp_path) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        daemon = start_daemon(json_and_redis_containers(module_redis), args=WORKERS,
                              env={"NOTIFY_SOCKET": listener.address,
                                   "WATCHDOG_USEC": "2000000"})  # fmt: skip
        _, ready = listener.wait_for(lambda m: m.get("READY") == "1", "READY=1")
        assert "2 workers" in ready["STATUS"]
        listener.wait_for(lambda m: m.get("WATCHDOG") == "1", "WATCHDOG=1")
        assert daemon.stop() == 0
        listener.wait_for(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
        readies = [m for m in listener.received() if m.get("READY") == "1"]
        assert len(readies) == 1  # once, for both workers
    finally:
        listener.close()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_every_daemon_test_passes_against_two_workers() -> None:
    """The whole end-to-end suite of the daemon, run again with every daemon at
    ``--workers 2`` (``CHANSTORE_TEST_WORKERS=2``): the group must be the daemon its
    clients know. A test that counts per-process things (log lines, Redis
    subscriptions) counts them per worker (``DaemonProcess.lifecycle``, ``.workers``)."""
    if os.environ.get("CHANSTORE_TEST_WORKERS"):
        pytest.skip("this run is at two workers already")
    here = Path(__file__).parent
    env = {**os.environ, "CHANSTORE_TEST_WORKERS": "2"}
    root = here.parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here)],
        env=env, capture_output=True, text=True, timeout=1800, check=False, cwd=root,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def _private_get(daemon: DaemonProcess, index: int, target: str) -> str:
    """GET ``target`` from worker ``index``'s private socket."""
    folder = next(Path(p) for p in _group_folders(daemon))
    transport = httpx.HTTPTransport(uds=str(folder / f"worker-{index}.sock"))
    with httpx.Client(transport=transport, base_url="http://worker", timeout=10) as client:
        return client.get(target).text


def _group_folders(daemon: DaemonProcess) -> list[str]:
    """The group's private folder, found from a worker's open sockets."""
    pids = worker_pids(daemon)
    text = Path(f"/proc/{pids[0]}/net/unix").read_text()
    paths = [line.split()[-1] for line in text.splitlines() if "chanstore-workers-" in line]
    return sorted({path.rsplit("/", 1)[0] for path in paths if path.endswith(".sock")})


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def _version() -> str:
    return chanstore.__version__


def test_a_second_group_on_the_same_port_is_refused(group, tmp_path) -> None:
    """SO_REUSEPORT would let it take a share of the port's connections silently."""
    (tmp_path / "db.json").write_text(group.config_path.read_text())
    second = run_cli("serve", *WORKERS, "--db-config", str(tmp_path / "db.json"),
                     "--listen", group.listen, "--log-format", "json", cwd=tmp_path,
                     timeout=30)  # fmt: skip
    assert second.returncode == 2
    assert "another process listens there too" in second.stderr + second.stdout
    for _ in range(20):  # and the first keeps every connection
        with httpx.Client(base_url=group.url, timeout=5) as client:
            assert client.get("/healthz").json()["pid"] == group.process.pid
