"""MoobiusStorage: one CachedDict per db_config entry, for one channel.

::

    storage = MoobiusStorage(service_id, channel_id, "config/db.json")
    storage.health_bars["alice"] = 100

Each container lives on the domain
``service_<service id>.channel_<channel id>.<name>``, the original SDK's
layout; the ids are encoded by :func:`chanstore.keys.encode_domain_part`, so a
``.`` or ``/`` in an id can neither add a level nor reach another channel's
data, while plain ids keep the original folders.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from chanstore.backends.base import DatabaseInterface
from chanstore.backends.registry import get_engine
from chanstore.cache import CachedDict
from chanstore.config import (
    RESERVED_NAMES,
    ContainerSpec,
    check_container_name,
    load_db_config,
    parse_db_config,
)
from chanstore.errors import ConfigError
from chanstore.keys import check_channel_id, check_key, encode_domain_part
from chanstore.metrics import Metrics

__all__ = ["RESERVED_NAMES", "ChannelStorage", "MoobiusStorage", "container_domain"]

MAX_SERVICE_ID_BYTES = 256


def container_domain(service_id: Any, channel_id: Any, name: str) -> str:
    """The backend domain of container ``name`` of one channel."""
    return (
        f"service_{encode_domain_part(service_id)}.channel_{encode_domain_part(channel_id)}.{name}"
    )


class MoobiusStorage:
    """The containers of one channel, each an attribute named by its entry.

    ``db_config`` is a list of entries, or the path of a JSON file holding
    one (see :mod:`chanstore.config`). A bad entry raises
    :class:`~chanstore.errors.ConfigError` before anything is built.
    ``strict_mode`` is passed to every CachedDict; the daemon always runs strict.
    """

    def __init__(
        self,
        service_id: Any,
        channel_id: Any,
        db_config: Any = (),
        *,
        strict_mode: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        check_key(str(service_id), what="service id", max_bytes=MAX_SERVICE_ID_BYTES)
        self.service_id = service_id
        self.channel_id = check_channel_id(channel_id)
        self.strict_mode = strict_mode
        self._metrics = metrics
        self._containers: dict[str, CachedDict] = {}
        try:
            for spec in load_db_config(db_config):
                self.add_spec(spec)
        except BaseException:
            self.close()
            raise

    @property
    def containers(self) -> Mapping[str, CachedDict]:
        """The containers by name (read-only view)."""
        return MappingProxyType(self._containers)

    def domain_of(self, name: str) -> str:
        """The backend domain of this channel's container ``name``."""
        return container_domain(self.service_id, self.channel_id, name)

    def add_spec(self, spec: ContainerSpec) -> CachedDict:
        """Build, load or clear, and attach the container ``spec`` describes."""
        backend = spec.engine(domain=self.domain_of(spec.name), **spec.settings)
        try:
            return self.put(spec.name, backend, load=spec.load, clear=spec.clear)
        except BaseException:
            backend.close()
            raise

    def put(
        self, attr_name: str, database: DatabaseInterface, load: bool = True, clear: bool = False
    ) -> CachedDict:
        """Attach a CachedDict over ``database`` as ``self.<attr_name>``.

        ``clear`` deletes the domain's data, ``load`` reads it all now (the
        original SDK's meaning; ``clear`` wins when both are set).
        """
        problem = check_container_name(attr_name)
        if problem is None and attr_name in self._containers:
            problem = f"{attr_name!r} is already a container of this channel"
        if problem:
            raise ConfigError(f"cannot add container: {problem}")
        cached = CachedDict(database, self.strict_mode, name=attr_name, metrics=self._metrics)
        if clear:
            cached.clear()
        elif load:
            cached.load()
        self._containers[attr_name] = cached
        setattr(self, attr_name, cached)
        return cached

    def add_container(
        self,
        implementation: str,
        settings: Mapping[str, Any] | None = None,
        name: str = "",
        load: bool = True,
        clear: bool = False,
    ) -> CachedDict:
        """Add one container from the fields of a db_config entry (the original's API)."""
        entry = {"implementation": implementation, "name": name, "load": load, "clear": clear,
                 "settings": dict(settings or {})}  # fmt: skip
        (spec,) = parse_db_config([entry]).containers
        return self.add_spec(spec)

    def remove_container(self, name: str) -> CachedDict:
        """Detach container ``name`` (its data stays in the backend) and return it."""
        cached = self._containers.pop(name)
        delattr(self, name)
        return cached

    def close(self) -> None:
        """Close every container's backend; the data stays stored."""
        for name in list(self._containers):
            self.remove_container(name).close()

    def __repr__(self) -> str:
        names = ", ".join(self._containers)
        return (
            f"MoobiusStorage(service_id={self.service_id!r}, channel_id={self.channel_id!r}, "
            f"containers=[{names}], strict={self.strict_mode})"
        )

    __str__ = __repr__


#: The original SDK's name for the same thing.
ChannelStorage = MoobiusStorage

#: Names a container cannot take: they would hide MoobiusStorage's own attributes.

# get_engine is re-exported here for code that imported it from the original's storage module.
__all__ += ["get_engine"]
