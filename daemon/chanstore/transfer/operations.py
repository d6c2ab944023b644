"""The three transfers: :func:`export`, :func:`import_lines` and :func:`migrate`.

Each streams: it holds one batch of keys at a time (and the list of places,
a few names per channel), however much data there is. Each answers a
:class:`~chanstore.transfer.tally.Tally` per container, for the report.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

from chanstore.config import ContainerSpec, DbConfig
from chanstore.errors import ConfigError, CorruptValue
from chanstore.storage import container_domain
from chanstore.transfer.copying import (
    DEFAULT_BATCH_SIZE,
    Backends,
    copy_place,
    reconcile_place,
    store_batch,
    verify_place,
)
from chanstore.transfer.places import Place, places, select_containers
from chanstore.transfer.progress import Progress
from chanstore.transfer.records import Record, encode_record, read_records
from chanstore.transfer.tally import Tally

__all__ = ["export", "import_lines", "migrate"]


def export(
    config: DbConfig, service_id: str, out: IO[str], *,
    channels: Sequence[str] | None = None, containers: Sequence[str] | None = None,
    progress: IO[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[Tally]:  # fmt: skip
    """Write every stored key of the selected containers and channels to ``out``, a
    line each (see :mod:`chanstore.transfer.records`). A damaged value is counted
    and named, not written."""
    specs = select_containers(config, containers)
    todo = places(specs, service_id, channels)
    tallies = _tallies(specs, todo)
    by_name = config.by_name()
    backends = Backends()
    try:
        with _progress("export", len(todo), progress) as shown:
            for place in todo:
                tally = tallies[place.container]
                with backends.opened(by_name[place.container], place.domain) as source:
                    read = 0
                    for batch in source.scan_items(batch_size):
                        read += len(batch)
                        out.write("".join(_lines(place, batch, tally)))
                tally.keys += read
                shown.advance(read)
    finally:
        backends.close()
    out.flush()
    return list(tallies.values())


def import_lines(
    config: DbConfig, service_id: str, lines: Iterable[bytes], *,
    dry_run: bool = False, progress: IO[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[Tally]:  # fmt: skip
    """Store the records of ``lines`` (an export), keys whose value is already
    stored left alone, so that importing twice writes nothing the second time.

    Every line is checked before anything is stored (kept in a temporary file
    meanwhile, not in memory): a bad line is a :class:`ConfigError` naming it,
    and nothing changes.
    """
    specs = config.by_name()
    tallies = {name: Tally(name) for name in specs}
    with tempfile.TemporaryFile() as spool:
        count, named = _spool_checked(lines, specs, spool)
        if not dry_run:
            _refuse_served((specs[name] for name in sorted(named)), "import")
        spool.seek(0)
        backends = Backends()
        try:
            seen: set[Place] = set()
            with _progress("import", count, progress, unit="lines") as shown:
                for place, batch in _batches(read_records(spool, specs), service_id, batch_size):
                    tally = tallies[place.container]
                    with backends.opened(specs[place.container], place.domain) as target:
                        store_batch(target, batch, tally, write=not dry_run)
                    tally.keys += len(batch)
                    if place not in seen:
                        seen.add(place)
                        tally.channels += 1
                    shown.advance(len(batch), done=len(batch))
        finally:
            backends.close()
    return [tally for tally in tallies.values() if tally.keys]


def migrate(
    source_config: DbConfig, target_config: DbConfig, service_id: str, *,
    channels: Sequence[str] | None = None, containers: Sequence[str] | None = None,
    dry_run: bool = False, verify: bool = False, delete_extra: bool = False,
    progress: IO[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[Tally]:  # fmt: skip
    """Copy every channel's data of the containers both configs name from the
    source's backends to the target's, then check the target's key counts (and,
    with ``verify``, every value). Never deletes from the source, nor from the
    target unless ``delete_extra`` (keys the source no longer holds: a final
    pass after a copy made while the source was in use). Run again, it writes
    only what is still missing. ``dry_run`` reads both sides and writes nothing."""
    common = [spec.name for spec in source_config if spec.name in target_config.by_name()]
    if containers:
        select_containers(source_config, containers, role="--from")
        select_containers(target_config, containers, role="--to")
        common = [name for name in containers if name in common]
    if not common:
        raise ConfigError("the two db_configs name no container in common: nothing to migrate")
    source_specs = select_containers(source_config, common, role="--from")
    targets = target_config.by_name()
    if not dry_run:
        _refuse_served((targets[name] for name in common), "migrate")
    todo = places(source_specs, service_id, channels)
    tallies = _tallies(source_specs, todo)
    sources = source_config.by_name()
    source_backends, target_backends = Backends(), Backends()
    try:
        with _progress("migrate", len(todo), progress) as shown:
            for place in todo:
                with (
                    source_backends.opened(sources[place.container], place.domain) as source,
                    target_backends.opened(targets[place.container], place.domain) as target,
                ):
                    read = _migrate_place(place, source, target, tallies[place.container],
                                          dry_run=dry_run, verify=verify,
                                          delete_extra=delete_extra,
                                          batch_size=batch_size)  # fmt: skip
                shown.advance(read)
    finally:
        source_backends.close()
        target_backends.close()
    return list(tallies.values())


def _migrate_place(place: Place, source: Any, target: Any, tally: Tally, *, dry_run: bool,
                   verify: bool, delete_extra: bool, batch_size: int) -> int:  # fmt: skip
    read = copy_place(place, source, target, tally, batch_size=batch_size, write=not dry_run)
    reconcile_place(place, target, read, tally, delete_extra=delete_extra, write=not dry_run)
    if verify and not dry_run:
        verify_place(place, source, target, tally, batch_size=batch_size)
    return len(read)


def _tallies(specs: Sequence[ContainerSpec], todo: Sequence[Place]) -> dict[str, Tally]:
    tallies = {spec.name: Tally(spec.name) for spec in specs}
    for place in todo:
        tallies[place.container].channels += 1
    return tallies


def _progress(label: str, total: int, stream: IO[str] | None, *,
              unit: str = "channel containers") -> Progress:  # fmt: skip
    """Progress shown on ``stream``, or kept silently when there is none."""
    if stream is None:
        return Progress(label, total, io.StringIO(), unit=unit, bar=False)
    return Progress(label, total, stream, unit=unit)


def _lines(place: Place, batch: dict[str, Any], tally: Tally) -> Iterator[str]:
    for key, value in batch.items():
        if isinstance(value, CorruptValue):
            tally.damaged += 1
            tally.note(f"channel {place.channel!r} key {key[:200]!r}: {value}")
            continue
        tally.copied += 1
        yield encode_record(place.channel, place.container, key, value)


def _spool_checked(lines: Iterable[bytes], specs: Any, spool: IO[bytes]) -> tuple[int, set[str]]:
    """Copy ``lines`` into ``spool`` while checking every record; how many there are, and
    the containers they name."""

    def copied() -> Iterator[bytes]:
        for line in lines:
            spool.write(line)
            yield line

    count = 0
    named: set[str] = set()
    for record in read_records(copied(), specs):
        count += 1
        named.add(record.container)
    return count, named


def _refuse_served(specs: Iterable[ContainerSpec], command: str) -> None:
    """A :class:`ConfigError` when ``command`` would write to a store that a daemon serves
    from memory without hearing of it (a json root): it would answer the old values."""
    for spec in specs:
        serving = spec.engine.served_elsewhere(spec.settings)
        if serving is not None:
            raise ConfigError(
                f"container {spec.name!r}: {serving}; it would not hear of what {command} "
                f"writes there, and would go on answering the old values. Stop the daemon "
                f"first, or {command} through it: a db_config whose entries have "
                f'"implementation": "chanstore" and its url (see the README, "An in-process '
                f'service into the daemon")'
            )


def _batches(
    records: Iterator[Record], service_id: str, batch_size: int
) -> Iterator[tuple[Place, dict[str, Any]]]:
    """Consecutive records of one place, at most ``batch_size`` at a time."""
    place: Place | None = None
    batch: dict[str, Any] = {}
    for record in records:
        if place is None or (record.container, record.channel) != (place.container,
                                                                   place.channel):  # fmt: skip
            if batch and place is not None:
                yield place, batch
            batch = {}
            domain = container_domain(service_id, record.channel, record.container)
            place = Place(record.container, record.channel, domain)
        batch[record.key] = record.value
        if len(batch) >= batch_size:
            yield place, batch
            batch = {}
    if batch and place is not None:
        yield place, batch
