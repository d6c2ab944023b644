"""Which channels' containers a transfer moves: its *places*.

A place is one container of one channel: the backend domain
``service_<id>.channel_<id>.<name>`` (see :func:`chanstore.storage.container_domain`).
Named channels give their places directly; otherwise each backend lists the
domains it holds under ``service_<id>.channel_`` (a directory walk, ``SCAN``:
see :meth:`~chanstore.backends.base.DatabaseInterface.list_domains`), once per
distinct backend however many containers share it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from chanstore.config import ContainerSpec, DbConfig
from chanstore.errors import ConfigError, ListingUnsupported
from chanstore.keys import check_channel_id, decode_domain_part, encode_domain_part
from chanstore.storage import container_domain

__all__ = ["Place", "channel_prefix", "places", "select_containers"]


@dataclass(frozen=True, order=True)
class Place:
    """One container of one channel, and the backend domain that holds it."""

    container: str
    channel: str
    domain: str


def channel_prefix(service_id: str) -> str:
    """What every channel domain of ``service_id`` starts with."""
    return f"service_{encode_domain_part(service_id)}.channel_"


def select_containers(
    config: DbConfig, names: Sequence[str] | None, *, role: str = "db_config"
) -> list[ContainerSpec]:
    """The containers of ``config`` that ``names`` name (all of them when None).

    A name ``config`` does not have is a :class:`ConfigError` listing those it has.
    """
    by_name = config.by_name()
    if not names:
        return list(config)
    unknown = [name for name in names if name not in by_name]
    if unknown:
        known = ", ".join(by_name) or "none"
        raise ConfigError(
            f"{role} has no container {', '.join(map(repr, unknown))} (it has: {known})"
        )
    return [by_name[name] for name in dict.fromkeys(names)]


def places(
    specs: Sequence[ContainerSpec], service_id: str, channels: Iterable[str] | None = None
) -> list[Place]:
    """The places of ``specs`` for ``channels`` (every channel their backends hold,
    when None), sorted by container and channel.

    Raises :class:`ConfigError` when a backend cannot list its domains (name the
    channels then) or a channel id is not valid.
    """
    if channels is not None:
        ids = [_checked_channel(channel) for channel in channels]
        return sorted(
            Place(spec.name, channel, container_domain(service_id, channel, spec.name))
            for spec in specs
            for channel in dict.fromkeys(ids)
        )
    found: list[Place] = []
    for group in _by_backend(specs):
        found.extend(_listed(group, service_id))
    return sorted(found)


def _checked_channel(channel: str) -> str:
    try:
        return check_channel_id(channel)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _by_backend(specs: Sequence[ContainerSpec]) -> list[list[ContainerSpec]]:
    """``specs`` grouped by the place their data lives: one listing serves each group."""
    groups: dict[tuple[type, str], list[ContainerSpec]] = {}
    for spec in specs:
        where = json.dumps(dict(spec.settings), sort_keys=True, default=str)
        groups.setdefault((spec.engine, where), []).append(spec)
    return list(groups.values())


def _listed(group: list[ContainerSpec], service_id: str) -> Iterator[Place]:
    """The places of ``group`` (containers on one backend) that hold data."""
    first = group[0]
    names = {spec.name for spec in group}
    prefix = channel_prefix(service_id)
    try:
        for domain in first.engine.list_domains(prefix, **first.settings):
            place = _place_of(domain, prefix)
            if place is not None and place.container in names:
                yield place
    except ListingUnsupported as exc:
        shown = ", ".join(repr(spec.name) for spec in group)
        raise ConfigError(
            f"{'container' if len(group) == 1 else 'containers'} {shown} ({first.implementation}) "
            f"cannot list its channels ({exc}); "
            "name them with --channel"
        ) from exc


def _place_of(domain: str, prefix: str) -> Place | None:
    """The place ``domain`` is, or None for a domain of another shape (not a channel's)."""
    parts = domain[len(prefix) :].split(".")
    if not domain.startswith(prefix) or len(parts) != 2 or not all(parts):
        return None
    channel, name = decode_domain_part(parts[0]), parts[1]
    return Place(name, channel, domain)
