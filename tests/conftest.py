"""Fixtures shared by every test: real redis-servers, metrics registries, backends.

``backend_factory`` is the one place that knows every storing backend: the
contract suite and the CachedDict tests run once per param, so a new backend
is tested everywhere by adding one param (and one branch in ``_build``).
Helpers that are not fixtures live in support.py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from chanstore.backends.base import DatabaseInterface
from chanstore.metrics import Metrics
from redis_topologies import ClusterSetup, require_redis
from support import DictDatabase, RedisServer, free_port, wait_until

__all__ = ["RedisServer", "free_port", "wait_until"]  # importable from here, as they were

IN_CI = bool(os.environ.get("CI"))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session. Missing redis-server fails in CI, skips elsewhere."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (scripts/test installs it as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    """A real 3-primary, 3-replica Redis Cluster a test module shares (killing nothing)."""
    require_redis()
    setup = ClusterSetup(tmp_path_factory.mktemp("cluster"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
def redis_settings(redis_server: RedisServer) -> Iterator[dict[str, object]]:
    """Settings for a RedisDatabase on an empty database of the session's server."""
    redis_server.flush()
    yield redis_server.settings
    redis_server.flush()


@pytest.fixture
def metrics() -> Metrics:
    """Metrics on a registry of their own, so tests can read exact values."""
    return Metrics(CollectorRegistry())


BACKENDS = ["json-fsync", "json-nofsync", "redis", "dict"]


class BackendFactory:
    """Builds backends of one kind on any domain; the same domain means the same data.

    ``engine`` and ``settings`` are the class and the settings every backend is
    built with (for its class methods, such as ``list_domains``).
    """

    def __init__(self, kind: str, engine: type[DatabaseInterface],
                 settings: dict[str, Any]) -> None:  # fmt: skip
        self.kind = kind
        self.engine = engine
        self.settings = settings
        self.built: list[DatabaseInterface] = []

    def __call__(self, domain: str = "contract.test") -> DatabaseInterface:
        backend = self.engine(domain=domain, **self.settings)
        self.built.append(backend)
        return backend

    def close_all(self) -> None:
        for backend in self.built:
            backend.close()


def _build(kind: str, request: pytest.FixtureRequest, folder: Path) -> BackendFactory:
    if kind.startswith("json"):
        from chanstore.backends.jsonfiles import JSONDatabase  # noqa: PLC0415

        return BackendFactory(kind, JSONDatabase,
                              {"root_dir": str(folder), "fsync": kind == "json-fsync"})  # fmt: skip
    if kind == "redis":
        from chanstore.backends.redisdb import RedisDatabase  # noqa: PLC0415

        return BackendFactory(kind, RedisDatabase, dict(request.getfixturevalue("redis_settings")))
    if kind == "dict":
        return BackendFactory(kind, DictDatabase, {"store": {}})
    raise AssertionError(f"no way to build backend {kind!r}")


@pytest.fixture(params=BACKENDS)
def backend_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendFactory]:
    """A factory of backends of each storing kind in turn, closed after the test."""
    factory = _build(request.param, request, tmp_path / "data")
    yield factory
    factory.close_all()


@pytest.fixture
def backend(backend_factory: BackendFactory) -> DatabaseInterface:
    """One backend of each storing kind, on the domain ``contract.test``."""
    return backend_factory()


@pytest.fixture
def open_tmp_path() -> Iterator[Path]:
    """A fresh folder that every user may enter (pytest's own are 0700, root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="chanstore-test-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base)
