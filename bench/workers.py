"""``chanstore serve --workers 2`` against ``--workers 1``: cached GETs, redis and json.

Three daemons run side by side over one redis-server and one db_config (a
redis container ``mana``, a json container ``stats``): ``--workers 1``,
``--workers 2`` with one ``SO_REUSEPORT`` socket per worker (the default), and
``--workers 2`` sharing one inherited socket (``CHANSTORE_WORKER_ACCEPT=shared``).
Every round runs wrk against each of them in turn (the order rotates from
round to round), for cached GETs of the redis container and of the json one
(which the second worker relays to the first); the ratios are per round, 2
workers over 1 in the same round, and the table shows their medians.

How the connections spread over the workers is read from each worker's own
metrics (its private socket, in a runtime folder this benchmark names): the
share of the requests the busiest worker answered.

wrk and the daemons share this machine's cores. ``--wrk-cpus 0`` pins wrk
with ``taskset`` (its threads then share one core), ``--daemon-cpus`` pins
the daemons; by default nothing is pinned, which is how the figures in the
README were taken (see there for both).

    python3 bench/workers.py [--rounds 5] [--seconds 8] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness import chanstore_command, free_port, progress, redis_server, stop, text_table
from harness import wait_until as wait_for_process

KEYS = 2000
CHANNELS = 8
CONNECTIONS = 32
WRK_THREADS = 2

WRK_SCRIPT = """
local counter = 0
function setup(thread)
  thread:set("offset", math.random(0, KEYS - 1))
end
function init(args)
  requests = {}
  for k = 0, KEYS - 1 do
    local path = string.format("/v1/channels/bench-%d/%s/k-%d", k % CHANNELS, CONTAINER, k)
    requests[k + 1] = wrk.format("GET", path)
  end
  counter = offset or 0
end
function request()
  counter = counter + 1
  return requests[(counter % KEYS) + 1]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, ' ..
    '"p99_us": %d, "errors": %d, "status": %d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect + e.read + e.write + e.timeout,
    e.status))
end
"""


@dataclass
class Setup:
    name: str
    workers: int
    accept: str | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    runtime: Path | None = None
    rps: dict[str, list[float]] = field(default_factory=dict)
    p99: dict[str, list[float]] = field(default_factory=dict)
    busiest: list[float] = field(default_factory=list)


def http(port: int, method: str, path: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                     headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def healthy(port: int) -> bool:
    try:
        return http(port, "GET", "/readyz") == {"status": "ready"}
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def daemon(setup: Setup, workdir: Path, cpus: str | None) -> Iterator[Setup]:
    setup.port = free_port()
    setup.runtime = Path(tempfile.mkdtemp(prefix=f"rt-{setup.name}-", dir=workdir))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHANSTORE_")}
    env["RUNTIME_DIRECTORY"] = str(setup.runtime)
    if setup.accept:
        env["CHANSTORE_WORKER_ACCEPT"] = setup.accept
    command = [chanstore_command(), "serve", "--db-config", "db.json", "--listen",
               f"127.0.0.1:{setup.port}", "--log-level", "warning",
               "--workers", str(setup.workers)]  # fmt: skip
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    log = workdir / f"{setup.name}.log"
    with log.open("wb") as out:
        setup.process = subprocess.Popen(command, cwd=workdir, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        try:
            wait_for_process(lambda: healthy(setup.port), setup.process, setup.name, log, 30)
            yield setup
        finally:
            status = stop(setup.process)
            if status != 0:
                progress(f"{setup.name} exited {status}: {log.read_text()[-2000:]}")


def worker_requests(setup: Setup) -> list[float]:
    """Requests each worker answered so far, from its private socket's metrics."""
    if setup.workers == 1 or setup.runtime is None:
        return []
    counts = []
    for sock in sorted(setup.runtime.glob("*/worker-*.sock")):
        text = subprocess.run(["curl", "-s", "--unix-socket", str(sock), "http://w/metrics"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        counts.append(sum(float(m.group(1)) for m in re.finditer(
            r'^chanstore_http_requests_total\{[^}]*route="/v1/channels/\{channel\}/\{container\}'
            r'/\{key\}"[^}]*\} ([0-9.e+]+)$', text, re.MULTILINE)))  # fmt: skip
    return counts


def run_wrk(setup: Setup, script: Path, seconds: int, cpus: str | None) -> tuple[float, float]:
    command = ["wrk", f"-t{WRK_THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
               "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{setup.port}"]  # fmt: skip
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    match = re.search(r"^WRK_RESULT (\{.*\})$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk failed:\n{out}")
    result = json.loads(match.group(1))
    if result["errors"] or result["status"]:
        raise RuntimeError(f"{setup.name}: wrk saw failures: {result}")
    return result["requests"] / (result["duration_us"] / 1e6), result["p99_us"] / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s")
    parser.add_argument("--wrk-cpus", default=None, help="taskset -c list for wrk")
    parser.add_argument("--daemon-cpus", default=None, help="taskset -c list for the daemons")
    args = parser.parse_args()
    rounds, seconds = (2, 3) if args.quick else (args.rounds, args.seconds)
    setups = [Setup("workers-1", 1), Setup("workers-2", 2), Setup("workers-2-shared", 2, "shared")]
    with tempfile.TemporaryDirectory(prefix="chanstore-bench-workers-") as folder:
        workdir = Path(folder)
        with redis_server(workdir) as redis_port, contextlib.ExitStack() as stack:
            entries = [
                {"implementation": "redis", "name": "mana",
                 "settings": {"host": "127.0.0.1", "port": redis_port}},
                {"implementation": "json", "name": "stats",
                 "settings": {"root_dir": str(workdir / "data")}},
            ]  # fmt: skip
            (workdir / "db.json").write_text(json.dumps(entries))
            for setup in setups:
                stack.enter_context(daemon(setup, workdir, args.daemon_cpus))
            progress("preloading 2,000 keys in each container")
            first = setups[0].port
            for container in ("mana", "stats"):
                for k in range(KEYS):
                    http(first, "PUT", f"/v1/channels/bench-{k % CHANNELS}/{container}/k-{k}",
                         {"hp": k, "name": f"player {k}"})  # fmt: skip
            scripts = {}
            for container in ("mana", "stats"):
                scripts[container] = workdir / f"{container}.lua"
                scripts[container].write_text(f'CONTAINER = "{container}"\nKEYS = {KEYS}\n'
                                              f"CHANNELS = {CHANNELS}\n" + WRK_SCRIPT)  # fmt: skip
            progress("warming up (each daemon loads the channels)")
            for setup in setups:
                for script in scripts.values():
                    run_wrk(setup, script, 2, args.wrk_cpus)
            for number in range(rounds):
                order = setups[number % 3 :] + setups[: number % 3]
                for setup in order:
                    for container, script in scripts.items():
                        before = worker_requests(setup)
                        rps, p99 = run_wrk(setup, script, seconds, args.wrk_cpus)
                        setup.rps.setdefault(container, []).append(rps)
                        setup.p99.setdefault(container, []).append(p99)
                        after = worker_requests(setup)
                        if container == "mana" and after:
                            served = [b - a for a, b in zip(before, after, strict=True)]
                            setup.busiest.append(max(served) / sum(served))
                        progress(f"round {number + 1}: {setup.name} {container} "
                                 f"{rps:,.0f} req/s p99 {p99:.2f} ms")  # fmt: skip
    report(setups, rounds, seconds, args)
    return 0


def report(setups: list[Setup], rounds: int, seconds: int, args: argparse.Namespace) -> None:
    one = setups[0]
    rows = []
    for setup in setups:
        for container, label in (("mana", "redis GET cached"), ("stats", "json GET cached")):
            rps = setup.rps[container]
            ratios = [r / base for r, base in zip(rps, one.rps[container], strict=True)]
            spread = (f"{statistics.median(setup.busiest) * 100:.0f}%"
                      if setup.busiest and container == "mana" else "")  # fmt: skip
            rows.append([setup.name, label, f"{statistics.median(rps):,.0f}",
                         f"{statistics.median(setup.p99[container]):.2f}",
                         f"{statistics.median(ratios):.2f}x",
                         " ".join(f"{r:.2f}" for r in ratios), spread])  # fmt: skip
    print(f"\nchanstore serve --workers: {rounds} rounds of {seconds} s, wrk -t{WRK_THREADS} "
          f"-c{CONNECTIONS}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"wrk pinned to {args.wrk_cpus or 'nothing'}, daemons to "
          f"{args.daemon_cpus or 'nothing'}")  # fmt: skip
    print(text_table(["setup", "measure", "req/s (median)", "p99 ms", "vs 1 worker",
                      "per-round ratios", "busiest worker's share"], rows,
                     right={2, 3, 4}))  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
