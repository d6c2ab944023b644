"""Failover of the redis backend: seconds until writes resume, and acknowledged writes lost.

For each topology, a fresh setup on free loopback ports (no persistence):

* ``sentinel``: a primary, one replica and three sentinels (quorum 2,
  ``down-after-milliseconds 1000``);
* ``cluster``: three primaries with one replica each
  (``cluster-node-timeout 1000``), 24 domains spread over every primary;
* ``sentinel+2``, ``cluster+2``: the same with two replicas (per primary),
  for ``min_replicas`` 1 only;

and for ``min_replicas`` 0 and 1, one writer loops: each write a key of its
own (``set_many_together_async``, as the daemon's write lanes store, on one
event loop), each failure a BackendUnavailable. After 200 acknowledged
writes the primary (in the cluster, the primary of the first domain's slot)
is killed with SIGKILL. With ``min_replicas: 1`` the new primary has no
replica until the killed server is started again (empty) and copies it, so
the killed server is started again as soon as the failover is done, as an
operator or a supervisor would; with two replicas the new primary keeps one,
and nothing is started again. The loop ends once 200 writes in a row were
acknowledged after the last failure.

Figures: seconds from the kill to the first acknowledged write after the
last failure ("resumed"), writes that failed and how many of those were
refused as not acknowledged, and the acknowledged writes that the new
primary does not hold ("lost"), read back after the loop. With
``min_replicas`` 0 a loss is possible (asynchronous replication: what the
primary acknowledged but had not sent yet); with 1 it must be 0.

Usage: ``python3 bench/failover.py [--only sentinel|cluster] [--rounds N]``.
It uses the test suite's process helpers (tests/redis_topologies.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "daemon"), str(HERE.parent / "tests")]

from redis.crc import key_slot  # noqa: E402

from chanstore.backends.redisdb import RedisDatabase  # noqa: E402
from redis_topologies import ClusterSetup, SentinelSetup, require_redis, write_loop  # noqa: E402


def run(topology: str, min_replicas: int, folder: Path,
        replicas: int = 1) -> tuple[float, int, int, int, int]:  # fmt: skip
    """One failover: (seconds to resume, failed, not acknowledged, acknowledged, lost).

    With ``replicas`` > ``min_replicas`` the new primary keeps enough replicas: the
    killed server is not started again.
    """
    setup: SentinelSetup | ClusterSetup
    if topology == "sentinel":
        setup = SentinelSetup(folder, replicas=replicas)
    else:
        setup = ClusterSetup(folder, replicas_each=replicas)
    setup.start()
    restart = min_replicas >= replicas
    killed = []
    loop = asyncio.new_event_loop()
    try:
        settings = setup.settings(min_replicas=min_replicas, replica_timeout=0.5)
        domains = [f"service_bench.channel_{n}.loop" for n in range(24 if topology == "cluster"
                                                                    else 1)]  # fmt: skip
        backends = [RedisDatabase(domain=domain, **settings) for domain in domains]

        def write(key: str, value: int) -> None:
            backend = backends[value % len(backends)]
            [error] = loop.run_until_complete(
                RedisDatabase.set_many_together_async([(backend, {key: value})])
            )
            if error is not None:
                raise error

        def kill() -> None:
            if isinstance(setup, SentinelSetup):
                killed.append(setup.kill_primary())
            else:
                killed.append(setup.kill_primary_of(key_slot(backends[0].hash_name)))

        def restart_once_failed_over(_measure: object) -> None:
            if not (restart and killed and not killed[0].running):
                return
            if isinstance(setup, SentinelSetup):
                port = setup.primary_port()
                if port is not None and port != killed[0].port:
                    setup.restart(killed[0])
                return
            view = setup.view() or {}
            node = view.get(killed[0].port)
            serving = [p for p, n in view.items() if n["role"] == "primary" and n["slots"]
                       and "fail" not in n["flags"]]  # fmt: skip
            if node is not None and "fail" in node["flags"] and len(serving) == 3:
                setup.restart(killed[0])

        measure = write_loop(write, kill, step=restart_once_failed_over, deadline=120)
        held: dict[str, object] = {}
        for n, backend in enumerate(backends):
            keys = [key for key in measure.acknowledged if int(key[1:]) % len(backends) == n]
            held.update(backend.get_many(keys))
        lost = measure.lost(held)
        for backend in backends:
            backend.close()
        resumed = measure.seconds_to_resume
        assert resumed is not None
        return (resumed, measure.failures, measure.not_acknowledged, len(measure.acknowledged),
                len(lost))  # fmt: skip
    finally:
        loop.close()
        setup.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["sentinel", "cluster", "sentinel+2", "cluster+2"])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    require_redis()
    logging.disable(logging.ERROR)  # every failed write is logged: the table says enough
    names = [args.only] if args.only else ["sentinel", "cluster", "sentinel+2", "cluster+2"]
    print(f"{'topology':<10} {'min_replicas':>12} {'resumed (s)':>12} {'failed':>7} "
          f"{'not acked':>9} {'acked':>6} {'lost':>5}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="chanstore-failover-") as folder:
        for name in names:
            topology, _, more = name.partition("+")
            replicas = int(more or 1)
            for min_replicas in (0, 1) if replicas == 1 else (1,):
                where = Path(folder)
                results = [run(topology, min_replicas, where / f"{name}-{min_replicas}-{n}",
                               replicas) for n in range(args.rounds)]  # fmt: skip
                for resumed, failed, not_acked, acked, lost in results:
                    print(f"{name:<10} {min_replicas:>12} {resumed:>12.2f} {failed:>7} "
                          f"{not_acked:>9} {acked:>6} {lost:>5}", flush=True)  # fmt: skip
                if len(results) > 1:
                    print(f"{name:<10} {min_replicas:>12} median "
                          f"{statistics.median(r[0] for r in results):.2f} s, lost in total "
                          f"{sum(r[4] for r in results)}")  # fmt: skip


if __name__ == "__main__":
    main()
