"""``chanstore serve --workers 2`` against ``--workers 1``: cached GETs, redis and json.

Three daemons run side by side over one redis-server and one db_config (a
redis container ``mana``, a json container ``stats``): ``--workers 1``,
``--workers 2`` with one ``SO_REUSEPORT`` socket per worker (the default), and
``--workers 2`` sharing one inherited socket (``CHANSTORE_WORKER_ACCEPT=shared``).
Every round runs wrk against each of them in turn (the order rotates from
round to round), for cached GETs of the redis container and of the json one
(which the second worker relays to the first), each twice: one request per
round trip, and pipelined (each connection sends 8 requests, then reads their
8 answers; wrk's latency is then that of the batch). The ratios are per
round, 2 workers over 1 in the same round, and the table shows their medians.

wrk and the daemons share this machine's cores, so what wrk spends is taken
from the workers: each run reads the CPU time the daemon (the supervisor and
its workers) and wrk used, and the report shows the ceiling that leaves, the
machine's cores over what one request costs at one worker, daemon and wrk
together (``cores / (daemon cores + wrk cores)`` at one worker). Pipelining is
there to lower wrk's share, so that what the workers scale to shows.

How the connections spread over the workers is read from each worker's own
metrics (its private socket, in a runtime folder this benchmark names): the
share of the requests the busiest worker answered.

``--wrk-cpus 0`` pins wrk with ``taskset`` (its threads then share one core),
``--daemon-cpus`` pins the daemons; by default nothing is pinned, which is how
the figures in the README were taken (see there for both).

    python3 bench/workers.py [--rounds 5] [--seconds 8] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    chanstore_command,
    free_port,
    progress,
    redis_server,
    stop,
    text_table,
    tree_cpu_seconds,
)
from harness import wait_until as wait_for_process

KEYS = 2000
CHANNELS = 8
CONNECTIONS = 32
WRK_THREADS = 2
DEPTHS = (1, 8)  # requests each connection sends before it reads their answers
CONTAINERS = {"mana": "redis", "stats": "json"}

# Every batch holds DEPTH requests for consecutive keys; wrk counts the answers.
WRK_SCRIPT = """
local counter = 0
function setup(thread)
  thread:set("offset", math.random(0, KEYS - 1))
end
function init(args)
  batches = {}
  for b = 0, KEYS / DEPTH - 1 do
    local batch = {}
    for i = 0, DEPTH - 1 do
      local k = b * DEPTH + i
      local path = string.format("/v1/channels/bench-%d/%s/k-%d", k % CHANNELS, CONTAINER, k)
      batch[i + 1] = wrk.format("GET", path)
    end
    batches[b + 1] = table.concat(batch)
  end
  counter = offset or 0
end
function request()
  counter = counter + 1
  return batches[(counter % #batches) + 1]
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
    runs: dict[tuple[str, int], list[Run]] = field(default_factory=dict)  # (container, depth)
    busiest: list[float] = field(default_factory=list)


@dataclass
class Run:
    """One wrk run against one daemon: its rate and p99, and the cores each side used."""

    rps: float
    p99_ms: float
    daemon_cores: float
    wrk_cores: float


def wrk_script(container: str, depth: int) -> str:
    assert KEYS % depth == 0, "every batch holds DEPTH keys"
    return (f'CONTAINER = "{container}"\nKEYS = {KEYS}\nCHANNELS = {CHANNELS}\n'
            f"DEPTH = {depth}\n" + WRK_SCRIPT)  # fmt: skip


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


def run_wrk(setup: Setup, script: Path, seconds: int, cpus: str | None) -> Run:
    command = ["wrk", f"-t{WRK_THREADS}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency",
               "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{setup.port}"]  # fmt: skip
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    assert setup.process is not None
    daemon_before = tree_cpu_seconds(setup.process.pid)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    elapsed = time.monotonic() - started
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    daemon_cores = (tree_cpu_seconds(setup.process.pid) - daemon_before) / elapsed
    wrk_cores = (children_after.ru_utime + children_after.ru_stime - children_before.ru_utime
                 - children_before.ru_stime) / elapsed  # fmt: skip
    match = re.search(r"^WRK_RESULT (\{.*\})$", out, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk failed:\n{out}")
    result = json.loads(match.group(1))
    if result["errors"] or result["status"]:
        raise RuntimeError(f"{setup.name}: wrk saw failures: {result}")
    rps = result["requests"] / (result["duration_us"] / 1e6)
    p99_ms = result["p99_us"] / 1000
    if result["requests"] and not result["p50_us"]:
        # wrk times a batch when its last answer arrives: none timed means none completed
        # on its connection, which the ratio alone would hide.
        progress(f"{setup.name}: wrk timed no batch of its {result['requests']:,} answers")
        p99_ms = math.nan
    return Run(rps, p99_ms, daemon_cores, wrk_cores)


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
            for container in CONTAINERS:
                for depth in DEPTHS:
                    scripts[container, depth] = workdir / f"{container}-{depth}.lua"
                    scripts[container, depth].write_text(wrk_script(container, depth))
            progress("warming up (each daemon loads the channels)")
            for setup in setups:
                for script in scripts.values():
                    run_wrk(setup, script, 2, args.wrk_cpus)
            for number in range(rounds):
                order = setups[number % 3 :] + setups[: number % 3]
                for setup in order:
                    for (container, depth), script in scripts.items():
                        before = worker_requests(setup)
                        run = run_wrk(setup, script, seconds, args.wrk_cpus)
                        setup.runs.setdefault((container, depth), []).append(run)
                        after = worker_requests(setup)
                        if (container, depth) == ("mana", 1) and after:
                            served = [b - a for a, b in zip(before, after, strict=True)]
                            setup.busiest.append(max(served) / sum(served))
                        progress(f"round {number + 1}: {setup.name} {container} x{depth}: "
                                 f"{run.rps:,.0f} req/s p99 {run.p99_ms:.2f} ms, cores: daemon "
                                 f"{run.daemon_cores:.2f}, wrk {run.wrk_cores:.2f}")  # fmt: skip
    report(setups, rounds, seconds, args)
    return 0


def median_p99(runs: list[Run]) -> str:
    timed = [run.p99_ms for run in runs if not math.isnan(run.p99_ms)]
    return f"{statistics.median(timed):.2f}" if timed else "n/a"


def measure_name(container: str, depth: int) -> str:
    return f"{CONTAINERS[container]} GET cached" + (f", pipelined x{depth}" if depth > 1 else "")


def report(setups: list[Setup], rounds: int, seconds: int, args: argparse.Namespace) -> None:
    one = setups[0]
    cores = os.cpu_count() or 1
    rows = []
    for setup in setups:
        for (container, depth), runs in setup.runs.items():
            bases = one.runs[container, depth]
            ratios = [run.rps / base.rps for run, base in zip(runs, bases, strict=True)]
            spread = (f"{statistics.median(setup.busiest) * 100:.0f}%"
                      if setup.busiest and (container, depth) == ("mana", 1) else "")  # fmt: skip
            rows.append([setup.name, measure_name(container, depth),
                         f"{statistics.median(run.rps for run in runs):,.0f}",
                         median_p99(runs),
                         f"{statistics.median(run.daemon_cores for run in runs):.2f}",
                         f"{statistics.median(run.wrk_cores for run in runs):.2f}",
                         f"{statistics.median(ratios):.2f}x",
                         " ".join(f"{r:.2f}" for r in ratios), spread])  # fmt: skip
    print(f"\nchanstore serve --workers: {rounds} rounds of {seconds} s, wrk -t{WRK_THREADS} "
          f"-c{CONNECTIONS}, {cores} CPUs, Python {platform.python_version()}, "
          f"wrk pinned to {args.wrk_cpus or 'nothing'}, daemons to "
          f"{args.daemon_cpus or 'nothing'}")  # fmt: skip
    print(text_table(["setup", "measure", "req/s (median)", "p99 ms", "daemon cores",
                      "wrk cores", "vs 1 worker", "per-round ratios",
                      "busiest worker's share"], rows, right={2, 3, 4, 5, 6}))  # fmt: skip
    print(
        f"\nWhat wrk leaves for workers on {cores} cores, if a request cost what it costs at "
        "one worker (cores / (daemon cores + wrk cores) at one worker, medians):"
    )
    for (container, depth), runs in one.runs.items():
        spent = statistics.median(run.daemon_cores + run.wrk_cores for run in runs)
        print(f"  {measure_name(container, depth)}: {cores / spent:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
