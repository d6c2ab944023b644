"""Whether a redis entry's settings make one topology (standalone, sentinel, cluster).

What the ``mode`` setting may name, which settings belong to which mode, and
every way a db_config entry can fail to describe one deployment, worded as
what was wrong and what was expected. Apart from the backend because it reads
settings only: it connects to nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from chanstore.backends.redis_pools import CLUSTER, SENTINEL, STANDALONE

__all__ = ["MODES", "address", "topology_problems"]

#: The topologies a redis entry's ``mode`` may name.
MODES = (STANDALONE, SENTINEL, CLUSTER)
#: Settings that only one mode takes, and that mode.
_MODE_OF = {"sentinels": SENTINEL, "master_name": SENTINEL, "nodes": CLUSTER}


def address(entry: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:port"`` for IPv6) as a pair; ValueError when it is not one."""
    host, colon, port = entry.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'{entry!r} is not "host:port" (a port from 1 to 65535)')
    return host, int(port)


def topology_problems(settings: Mapping[str, Any]) -> list[str]:
    """Why ``settings`` (of the right types) do not make one topology; empty when they do."""
    problems: list[str] = []
    mode = settings.get("mode", STANDALONE)
    if mode not in MODES:
        problems.append(f"setting 'mode' must be 'standalone', 'sentinel' or 'cluster', not "
                        f"{mode!r}")  # fmt: skip
        return problems
    for name in ("sentinels", "nodes"):
        entries = settings.get(name)
        if entries is None:
            continue
        if not entries:
            problems.append(f'setting {name!r} must list at least one "host:port"')
        for index, entry in enumerate(entries):
            try:
                if not isinstance(entry, str):
                    raise ValueError(f'{entry!r} is not a "host:port" string')
                address(entry)
            except ValueError as exc:
                problems.append(f"setting {name!r}: item {index}: {exc}")
    if settings.get("master_name") == "":
        problems.append("setting 'master_name' must name the primary that the sentinels "
                        "monitor (as in their 'sentinel monitor <name> ...'), not ''")  # fmt: skip
    min_replicas = settings.get("min_replicas")
    if isinstance(min_replicas, int) and min_replicas < 0:
        problems.append(f"setting 'min_replicas' must be 0 or more, not {min_replicas}")
    timeout = settings.get("replica_timeout")
    if isinstance(timeout, int | float) and not timeout > 0:
        problems.append(f"setting 'replica_timeout' must be more than 0 seconds (how long a "
                        f"write waits for its replicas), not {timeout!r}")  # fmt: skip
    for name, only in _MODE_OF.items():
        if name in settings and mode != only:
            problems.append(f"setting {name!r} is a setting of {only} mode, and the mode is "
                            f"{mode}: add \"mode\": \"{only}\", or remove {name!r}")  # fmt: skip
    if mode == SENTINEL:
        for name in ("sentinels", "master_name"):
            if name not in settings:
                problems.append(f"sentinel mode needs setting {name!r} (expected "
                                + ('["host:port", ...], the sentinels to ask' if name ==
                                   "sentinels" else "the name the sentinels monitor the "
                                   "primary by") + ")")  # fmt: skip
        for name in ("url", "host", "port"):
            if name in settings:
                problems.append(f"setting {name!r} names one server, but in sentinel mode "
                                f"the sentinels name the primary: remove {name!r}")  # fmt: skip
    if mode == CLUSTER:
        if "nodes" not in settings:
            problems.append("cluster mode needs setting 'nodes' (expected "
                            '["host:port", ...]: any reachable nodes of the cluster; the '
                            "rest is discovered)")  # fmt: skip
        for name in ("url", "host", "port"):
            if name in settings:
                problems.append(f"setting {name!r} names one server, but in cluster mode the "
                                f"servers are 'nodes': remove {name!r}")  # fmt: skip
        if settings.get("db", 0) != 0:
            problems.append(f"setting 'db' must be 0 in cluster mode (a Redis Cluster has only "
                            f"database 0), not {settings['db']}")  # fmt: skip
        prefix = settings.get("key_prefix", "")
        if "{" in prefix or "}" in prefix:
            problems.append(f"setting 'key_prefix' cannot hold '{{' or '}}' in cluster mode "
                            f"(the domain is the names' hash tag), not {prefix!r}")  # fmt: skip
    return problems
