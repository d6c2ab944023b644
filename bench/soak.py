"""A soak run of a real daemon: mixed load with reloads, a Redis outage and bad input.

    python bench/soak.py --minutes 3

Starts redis-server (appendonly, fsync always) and ``chanstore serve`` itself,
then for the given time runs: writers and readers on a json and a redis
container, bulk calls, reloads (valid and invalid), one Redis outage of a few
seconds, bad input, and a stream of new channels. Prints requests served,
errors by kind, p99 latency, RSS over time, and a verdict. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx

RSS_GROWTH_BOUND_MIB = 64.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


class Soak:
    def __init__(self, minutes: float, workdir: Path) -> None:
        self.duration = minutes * 60
        self.workdir = workdir
        self.redis_port = free_port()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.acked: dict[tuple[str, str, str], int] = {}  # (channel, container, key) -> value
        self.outage = threading.Event()
        self.stop = threading.Event()
        self.rss: list[tuple[float, float]] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.daemon: subprocess.Popen[bytes] | None = None

    # -- processes -----------------------------------------------------------

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait(self._redis_pings, 10, "redis-server")

    def _redis_pings(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop_redis(self) -> None:
        assert self.redis is not None
        self.redis.terminate()
        self.redis.wait(timeout=10)

    def config(self, valid: bool = True, extra: bool = False) -> str:
        redis = {"host": "127.0.0.1", "port": self.redis_port, "socket_timeout": 2.0,
                 "socket_connect_timeout": 1.0}  # fmt: skip
        entries = [
            {"implementation": "json", "name": "stats", "load": True, "clear": False,
             "settings": {"root_dir": "data"}},
            {"implementation": "redis", "name": "mana", "load": True, "clear": False,
             "settings": redis},
        ]  # fmt: skip
        if extra:
            entries.append({"implementation": "json", "name": "extra", "load": True,
                            "clear": False, "settings": {"root_dir": "data"}})  # fmt: skip
        return json.dumps(entries) if valid else json.dumps(entries)[:-7]

    def start_daemon(self) -> None:
        (self.workdir / "db.json").write_text(self.config())
        log = (self.workdir / "daemon.log").open("ab")
        self.daemon = subprocess.Popen(
            [sys.executable, "-m", "chanstore.cli", "serve", "--db-config", "db.json",
             "--listen", f"127.0.0.1:{self.port}", "--log-format", "json",
             "--idle-timeout", "5", "--service-id", "soak"],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def healthy() -> bool:
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait(healthy, 30, "the daemon")

    # -- recording -------------------------------------------------------------

    def record(self, kind: str, container: str, status: int | str, elapsed: float) -> None:
        with self.lock:
            label = f"{kind} {status}"
            self.counts[label] = self.counts.get(label, 0) + 1
            self.latencies.append(elapsed)
            in_outage = container == "mana" and self.outage.is_set()
            if isinstance(status, int) and status >= 500 and not in_outage:
                self.failures.append(f"{kind} on {container} got {status} outside an outage")
            if isinstance(status, str):
                self.failures.append(f"{kind} on {container}: transport error {status}")

    def call(self, http: httpx.Client, kind: str, container: str, method: str, path: str,
             **options) -> httpx.Response | None:  # fmt: skip
        started = time.perf_counter()
        try:
            response = http.request(method, path, **options)
        except httpx.HTTPError as exc:
            self.record(kind, container, type(exc).__name__, time.perf_counter() - started)
            return None
        self.record(kind, container, response.status_code, time.perf_counter() - started)
        return response

    # -- load ------------------------------------------------------------------

    def writer(self, number: int) -> None:
        rng = random.Random(number)
        with httpx.Client(base_url=self.url, timeout=30) as http:
            value = 0
            while not self.stop.is_set():
                value += 1
                container = rng.choice(["stats", "mana"])
                channel, key = f"soak-{rng.randrange(20)}", f"w{number}-{rng.randrange(30)}"
                path = f"/v1/channels/{channel}/{container}/{key}"
                response = self.call(http, "put", container, "PUT", path, json=value)
                if response is not None and response.status_code == 200:
                    with self.lock:
                        self.acked[(channel, container, key)] = value
                response = self.call(http, "get", container, "GET", path)
                if response is not None and response.status_code == 200:
                    with self.lock:
                        if response.json() < self.acked.get((channel, container, key), 0):
                            self.failures.append(f"stale read of {path}")
                if rng.random() < 0.1:
                    values = {f"b{number}-{i}": i for i in range(20)}
                    self.call(
                        http,
                        "bulk_set",
                        container,
                        "POST",
                        f"/v1/channels/bulk/{container}/-/set",
                        json={"values": values},
                    )
                    self.call(
                        http,
                        "bulk_get",
                        container,
                        "POST",
                        f"/v1/channels/bulk/{container}/-/get",
                        json={"keys": list(values)},
                    )

    def channels(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            number = 0
            while not self.stop.is_set():
                number += 1
                self.call(
                    http, "new_channel", "stats", "GET", f"/v1/channels/many-{number}/stats/k"
                )

    def bad_input(self) -> None:
        rng = random.Random(7)
        nasty = ["%2E%2E", "%2F", "%00", "%FF", "a" * 2000, "%C0%AE"]
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.stop.is_set():
                path = f"/v1/channels/{rng.choice(nasty)}/stats/{rng.choice(nasty)}"
                body = rng.choice([b"{", b"[" * 5000, bytes(rng.randrange(256) for _ in range(50)),
                                   b'"' + b"x" * 2_000_000 + b'"'])  # fmt: skip
                response = self.call(http, "bad_input", "stats", "PUT", path, content=body)
                if response is not None and response.status_code < 400:
                    self.failures.append(f"bad input {path[:60]} got {response.status_code}")
                time.sleep(0.05)

    def reloads(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            number = 0
            while not self.stop.wait(2.0):
                number += 1
                valid = number % 3 != 0
                (self.workdir / "db.json").write_text(self.config(valid, extra=number % 2 == 0))
                response = self.call(http, "reload", "-", "POST", "/-/reload")
                if response is not None and response.status_code != (200 if valid else 400):
                    self.failures.append(f"reload (valid={valid}) got {response.status_code}")
            (self.workdir / "db.json").write_text(self.config())
            self.call(http, "reload", "-", "POST", "/-/reload")

    def sample_rss(self, started: float) -> None:
        assert self.daemon is not None
        while True:
            self.rss.append((time.monotonic() - started, rss_mib(self.daemon.pid)))
            if self.stop.wait(10):
                return

    # -- the run -----------------------------------------------------------------

    def run(self) -> int:
        self.start_redis()
        self.start_daemon()
        started = time.monotonic()
        threads = [threading.Thread(target=self.writer, args=(n,)) for n in range(4)]
        threads += [threading.Thread(target=f) for f in (self.channels, self.bad_input,
                                                          self.reloads)]  # fmt: skip
        threads.append(threading.Thread(target=self.sample_rss, args=(started,)))
        for thread in threads:
            thread.start()
        outage_at = self.duration / 2
        time.sleep(outage_at)
        self.outage.set()
        self.stop_redis()
        time.sleep(4)
        self.start_redis()
        time.sleep(3)  # the daemon reconnects by itself; answers in this window may still be 503
        self.outage.clear()
        time.sleep(max(0.0, self.duration - (time.monotonic() - started)))
        self.stop.set()
        for thread in threads:
            thread.join(timeout=60)
        lost = self.check_acknowledged()
        return self.report(lost, time.monotonic() - started)

    def check_acknowledged(self) -> list[str]:
        lost = []
        with httpx.Client(base_url=self.url, timeout=30) as http:
            for (channel, container, key), value in self.acked.items():
                response = http.get(f"/v1/channels/{channel}/{container}/{quote(key)}")
                if response.status_code != 200 or response.json() < value:
                    lost.append(f"{channel}/{container}/{key}: acked {value}, read "
                                f"{response.status_code} {response.text[:60]}")  # fmt: skip
        return lost

    def report(self, lost: list[str], elapsed: float) -> int:
        assert self.daemon is not None
        latencies = sorted(self.latencies)
        p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0.0
        served = len(latencies)
        print(f"soak: {elapsed:.0f}s, {served} requests ({served / elapsed:.0f}/s), "
              f"p99 {p99 * 1000:.1f} ms, {len(self.acked)} acknowledged keys checked")  # fmt: skip
        print("requests by kind and status:")
        for label, count in sorted(self.counts.items()):
            print(f"  {label:24} {count}")
        print("RSS over time (s: MiB): " + ", ".join(f"{t:.0f}: {m:.1f}" for t, m in self.rss))
        reasons = list(dict.fromkeys(self.failures))[:20]
        if lost:
            reasons.append(f"{len(lost)} acknowledged writes lost, e.g. {lost[:3]}")
        rss = [m for _t, m in self.rss]
        if rss and max(rss) - rss[0] > RSS_GROWTH_BOUND_MIB:
            reasons.append(f"RSS grew by {max(rss) - rss[0]:.1f} MiB (> {RSS_GROWTH_BOUND_MIB})")
        if self.daemon.poll() is not None:
            reasons.append(f"the daemon exited with {self.daemon.returncode}")
        log = (self.workdir / "daemon.log").read_text(errors="replace")
        if "Traceback" in log or "request_crashed" in log:
            reasons.append("the daemon's log reports a crash")
        print("verdict: " + ("PASS" if not reasons else "FAIL"))
        for reason in reasons:
            print(f"  - {reason}")
        return 0 if not reasons else 1

    def close(self) -> None:
        for process in (self.daemon, self.redis):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="chanstore-soak-"))
    soak = Soak(args.minutes, workdir)
    try:
        return soak.run()
    finally:
        soak.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
