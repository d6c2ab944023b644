"""chanstore.client's sync and async clients against a real daemon."""

from __future__ import annotations

import asyncio

import pytest
from daemon_harness import DaemonProcess, free_port

from chanstore.client import AsyncClient, Client, ClientError, DaemonUnreachable


def test_sync_client_containers_behave_like_dicts(daemon: DaemonProcess, channel: str) -> None:
    with Client(daemon.url) as client:
        stats = client.channel(channel).stats
        stats["HP"] = 5
        assert stats["HP"] == 5
        assert client.channel(channel)["stats"]["HP"] == 5
        stats["HP"] += 1
        assert stats["HP"] == 6
        with pytest.raises(KeyError):
            stats["absent"]
        assert stats.get("absent", "default") == "default"
        assert "HP" in stats
        assert "absent" not in stats

        stats.update({"MP": 3, "odd/key": [1, 2]}, name="Ann")
        assert len(stats) == 4
        assert sorted(stats) == ["HP", "MP", "name", "odd/key"]
        assert dict(stats.items()) == {"HP": 6, "MP": 3, "name": "Ann", "odd/key": [1, 2]}
        assert stats.get_many(["HP", "odd/key", "nope"]) == {"HP": 6, "odd/key": [1, 2]}

        del stats["HP"]
        with pytest.raises(KeyError):
            del stats["HP"]
        assert stats.pop("MP") == 3
        assert stats.setdefault("level", 1) == 1
        assert sorted(stats) == ["level", "name", "odd/key"]

        # What the dict shows is what another client reads.
        assert client.get_many(channel, "stats", ["name", "level"]) == {"name": "Ann", "level": 1}
        assert client.delete_many(channel, "stats", ["name", "absent"]) == ["name"]
        assert sorted(client.keys(channel, "stats")) == ["level", "odd/key"]
        assert [c["name"] for c in client.containers()] == ["stats", "profiles"]


def test_sync_client_errors_say_what_went_wrong(daemon: DaemonProcess, channel: str) -> None:
    with Client(daemon.url) as client:
        with pytest.raises(ClientError) as unknown:
            client.channel(channel).nosuch["HP"] = 1
        assert not isinstance(unknown.value, KeyError)
        assert unknown.value.status == 404
        assert "nosuch" in str(unknown.value)
        assert "stats" in str(unknown.value)  # it lists the containers there are

        # An unknown container is not an absent key: no KeyError to mistake for one.
        with pytest.raises(ClientError) as reading:
            client.channel(channel).nosuch["HP"]
        assert not isinstance(reading.value, KeyError)
        assert reading.value.status == 404
    with Client(daemon.url) as client, pytest.raises(ClientError) as too_long:
        client.set(channel, "stats", "k" * 1025, 1)
    assert too_long.value.status == 400
    assert "1024" in str(too_long.value)

    with Client(f"http://127.0.0.1:{free_port()}", timeout=2) as nobody:
        with pytest.raises(DaemonUnreachable) as unreachable:
            nobody.get(channel, "stats", "HP")
        assert unreachable.value.status is None


def test_async_client(daemon: DaemonProcess, channel: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(daemon.url) as client:
            await client.set(channel, "profiles", "name", "Ann")
            assert await client.get(channel, "profiles", "name") == "Ann"
            with pytest.raises(KeyError):
                await client.get(channel, "profiles", "absent")

            # Many requests at once, over the client's pool of keep-alive connections.
            await asyncio.gather(*(client.set(channel, "profiles", f"k{n}", n) for n in range(100)))
            values = await client.get_many(channel, "profiles", [f"k{n}" for n in range(100)])
            assert values == {f"k{n}": n for n in range(100)}
            results = await asyncio.gather(
                *(client.get(channel, "profiles", f"k{n}") for n in range(100))
            )
            assert results == list(range(100))

            await client.set_many(channel, "profiles", {"a/b": 1, "..": 2})
            assert sorted(await client.keys(channel, "profiles")) == sorted(
                ["name", "a/b", "..", *(f"k{n}" for n in range(100))]
            )
            assert await client.delete_many(channel, "profiles", ["a/b", "absent"]) == ["a/b"]
            await client.delete(channel, "profiles", "name")
            with pytest.raises(KeyError):
                await client.delete(channel, "profiles", "name")
            with pytest.raises(ClientError) as unknown:
                await client.set(channel, "nosuch", "k", 1)
            assert unknown.value.status == 404

            verdict = await client.reload()
            assert verdict["ok"] is True

    asyncio.run(scenario())
    assert daemon.get(channel, "profiles", "..").json() == 2


def test_async_client_unreachable(channel: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(f"http://127.0.0.1:{free_port()}", timeout=2) as client:
            await client.get(channel, "stats", "HP")

    with pytest.raises(DaemonUnreachable):
        asyncio.run(scenario())
