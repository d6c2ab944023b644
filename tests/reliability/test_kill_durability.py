"""SIGKILL the daemon (and Redis) under write load: nothing it acknowledged is lost.

Writers PUT (and bulk-set) increasing sequence numbers to a json container (fsync on) and a
redis container (redis-server with an append-only file fsynced on every
write); the daemon is killed with SIGKILL at a random moment, three times,
and restarted. After each restart every acknowledged write reads back with
its acknowledged value or a later one from the same writer, and every json
data file parses. In the last round Redis is SIGKILLed too and restarted
from its append-only file.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

from load_helpers import (
    Ledger,
    Writer,
    daemon_running,
    durable_redis,
    json_entry,
    json_files_parse,
    redis_entry,
    wait_until,
)

ROUNDS = 3
WRITERS_PER_CONTAINER = 3


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    redis = durable_redis(tmp_path / "redis")
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    ledger = Ledger()
    config = [json_entry("jdur", settings={"fsync": True}), redis_entry("rdur", redis)]
    try:
        with daemon_running(tmp_path / "daemon", config) as daemon:
            for round_number in range(ROUNDS):
                writers = [
                    Writer(
                        daemon.url,
                        ledger,
                        container,
                        f"ch-{index % 2}",
                        f"r{round_number}w{index}",
                        bulk=index == 0,
                    )
                    for container in ("jdur", "rdur")
                    for index in range(WRITERS_PER_CONTAINER)
                ]
                acked_before = ledger.acknowledged
                for writer in writers:
                    writer.start()
                # Once writes flow (a slow disk may take a while), kill at a random moment.
                wait_until(lambda: ledger.acknowledged >= acked_before + 20, 30,  # noqa: B023
                           f"round {round_number}: writes to be acknowledged")  # fmt: skip
                time.sleep(rng.uniform(0.0, 0.6))
                daemon.stop(signal.SIGKILL)
                if round_number == ROUNDS - 1:
                    redis.process.kill()  # Redis dies without a chance to flush anything
                    redis.process.wait(timeout=10)
                    redis.process = None
                for writer in writers:
                    writer.stop()
                assert ledger.acknowledged > acked_before
                if redis.process is None:
                    redis.start()  # from its append-only file, on the same port
                daemon.start(same_port=True)
                lost = ledger.lost(daemon)
                assert lost == [], f"seed {seed}, round {round_number}: lost {lost[:20]}"
                assert json_files_parse(daemon.data_dir) > 0
                # Half-written temporary files a kill leaves behind never show up as keys.
                for container, channel in {(c, ch) for c, ch, _ in ledger.sent}:
                    listed = set(daemon.keys(channel, container))
                    sent = {k for c, ch, k in ledger.sent if (c, ch) == (container, channel)}
                    acked = {k for c, ch, k in ledger.acked if (c, ch) == (container, channel)}
                    assert acked <= listed <= sent, (container, channel, listed - sent)
            print(f"seed {seed}: {ledger.acknowledged} writes acknowledged over {ROUNDS} "
                  f"SIGKILLs ({len(ledger.acked)} keys), statuses {ledger.statuses}, "
                  f"lost 0")  # fmt: skip
            # Nothing but 200s or failed connections: a kill never produced a 5xx answer.
            assert set(ledger.statuses) == {200}, ledger.statuses
    finally:
        redis.stop()
