"""SIGTERM and SIGINT with requests in flight: finish them, keep every acknowledged write."""

from __future__ import annotations

import asyncio
import signal
import threading

import httpx
import pytest
from daemon_harness import DaemonProcess, key_path, wait_until

from chanstore.client import AsyncClient, ClientError

WRITERS = 8


def _write_until_refused(daemon: DaemonProcess, channel: str, worker: int,
                         acknowledged: dict[str, int], stop: threading.Event) -> None:  # fmt: skip
    with httpx.Client(base_url=daemon.url, timeout=30) as http:
        for number in range(100_000):
            if stop.is_set():
                return
            key = f"w{worker}-{number}"
            try:
                response = http.put(key_path(channel, "stats", key), json=number)
            except httpx.TransportError:
                return  # the daemon stopped listening
            if response.status_code == 200:
                acknowledged[key] = number
            elif response.status_code != 503:
                raise AssertionError(f"PUT {key}: {response.status_code} {response.text}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_with_writes_in_flight_keeps_every_acknowledged_write(
    start_daemon, channel: str, signum: int
) -> None:
    daemon = start_daemon()
    acknowledged: dict[str, int] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            _write_until_refused(daemon, channel, worker, acknowledged, stop)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(acknowledged) >= 200, 30, "writes to be acknowledged")
        assert daemon.stop(signum) == 0
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert daemon.lifecycle("stopping", "stopped") == ["stopping", "stopped"]

    daemon.start()
    with daemon.client() as client:
        stored = client.get_many(channel, "stats", list(acknowledged))
    assert stored == acknowledged


def test_sigterm_with_async_clients_in_flight(start_daemon, channel: str) -> None:
    daemon = start_daemon()

    async def scenario() -> tuple[dict[str, int], int]:
        acknowledged: dict[str, int] = {}
        async with AsyncClient(daemon.url) as client:

            async def write(number: int) -> None:
                key = f"a{number}"
                try:
                    await client.set(channel, "profiles", key, number)
                except ClientError:
                    return  # refused or cut off by the shutdown: not acknowledged
                acknowledged[key] = number

            first = [asyncio.create_task(write(n)) for n in range(200)]
            await asyncio.gather(*first[:50])
            returncode = await asyncio.to_thread(daemon.stop, signal.SIGTERM)
            more = [asyncio.create_task(write(n)) for n in range(200, 250)]
            await asyncio.gather(*first, *more)
        return acknowledged, returncode

    acknowledged, returncode = asyncio.run(scenario())
    assert returncode == 0
    assert len(acknowledged) >= 50

    daemon.start()
    with daemon.client() as client:
        assert client.get_many(channel, "profiles", list(acknowledged)) == acknowledged
