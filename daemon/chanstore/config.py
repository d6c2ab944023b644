"""db_config: the list of containers every channel gets, parsed and checked.

An entry names a container and its backend::

    {"implementation": "json", "name": "health_bars", "load": true,
     "clear": false, "settings": {"root_dir": "data"}}

:func:`load_db_config` accepts the list itself or the path of a JSON file
holding it, and returns a :class:`DbConfig`, or raises one
:class:`~chanstore.errors.ConfigError` listing every problem it found, each
naming the entry's index, the field and what was expected. Nothing is built
from a config that has a problem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chanstore.backends.base import DatabaseInterface
from chanstore.backends.registry import get_engine
from chanstore.errors import ConfigError

__all__ = ["ContainerSpec", "DbConfig", "load_db_config", "parse_db_config"]

FIELDS = ("implementation", "name", "load", "clear", "settings")
#: MoobiusStorage's public attributes: a container named like one would hide it.
#: (Spelled out here, not read from the class, so that config need not import
#: storage, which imports config; a test keeps the two in step.)
RESERVED_NAMES = frozenset({
    "add_container", "add_spec", "channel_id", "close", "containers", "domain_of", "put",
    "remove_container", "service_id", "strict_mode",
})  # fmt: skip


@dataclass(frozen=True)
class ContainerSpec:
    """One db_config entry, checked."""

    name: str
    implementation: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    load: bool = True
    clear: bool = False

    @property
    def engine(self) -> type[DatabaseInterface]:
        """The backend class ``implementation`` names."""
        return get_engine(self.implementation)

    def same_backend(self, other: ContainerSpec) -> bool:
        """Whether ``other`` stores its data in the same place, the same way."""
        return self.engine is other.engine and dict(self.settings) == dict(other.settings)

    def as_entry(self) -> dict[str, Any]:
        """The entry as it is written in a db_config file."""
        return {"implementation": self.implementation, "name": self.name, "load": self.load,
                "clear": self.clear, "settings": dict(self.settings)}  # fmt: skip


@dataclass(frozen=True)
class DbConfig:
    """A checked db_config: its containers in order, and warnings worth showing."""

    containers: tuple[ContainerSpec, ...]
    warnings: tuple[str, ...] = ()
    source: str = "db_config"

    def __iter__(self) -> Any:
        return iter(self.containers)

    def __len__(self) -> int:
        return len(self.containers)

    def by_name(self) -> dict[str, ContainerSpec]:
        """The containers keyed by name."""
        return {spec.name: spec for spec in self.containers}


def load_db_config(config: Any) -> DbConfig:
    """Check ``config`` (a list of entries, a JSON file's path, or a DbConfig)."""
    if isinstance(config, DbConfig):
        return config
    if isinstance(config, str | os.PathLike):
        return parse_db_config(_read_json_file(Path(config)), source=str(config))
    return parse_db_config(config)


def _read_json_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"db_config file {str(path)!r} cannot be read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"db_config file {str(path)!r} is not UTF-8 text: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"db_config file {str(path)!r} is not valid JSON: line {exc.lineno} column "
            f"{exc.colno}: {exc.msg}"
        ) from exc


def parse_db_config(entries: Any, *, source: str = "db_config") -> DbConfig:
    """Check every entry of ``entries``; raise one ConfigError listing all problems."""
    if (
        isinstance(entries, Mapping)
        or not isinstance(entries, Sequence)
        or isinstance(entries, str | bytes)
    ):
        raise ConfigError(
            f"{source}: expected a list of container entries, got {type(entries).__name__}"
        )
    problems: list[str] = []
    warnings: list[str] = []
    specs: list[ContainerSpec] = []
    first_index: dict[str, int] = {}
    for index, entry in enumerate(entries):
        spec = _parse_entry(index, entry, problems, warnings)
        if spec is None:
            continue
        if spec.name in first_index:
            problems.append(
                f"entry {index}: field 'name': {spec.name!r} is already the name of entry "
                f"{first_index[spec.name]}; names must be unique"
            )
            continue
        first_index[spec.name] = index
        specs.append(spec)
    if problems:
        raise ConfigError([f"{source}: {problem}" for problem in problems])
    return DbConfig(tuple(specs), tuple(f"{source}: {w}" for w in warnings), source)


def _parse_entry(
    index: int, entry: Any, problems: list[str], warnings: list[str]
) -> ContainerSpec | None:
    where = f"entry {index}"
    if not isinstance(entry, Mapping):
        problems.append(
            f"{where}: expected an object with the fields {', '.join(FIELDS)}, "
            f"got {type(entry).__name__}"
        )
        return None
    found = len(problems)
    for unknown in sorted(set(entry) - set(FIELDS), key=str):
        problems.append(f"{where}: unknown field {unknown!r} (known: {', '.join(FIELDS)})")
    name = entry.get("name")
    if isinstance(name, str):
        where = f"entry {index} ({name!r})"
    name_problem = check_container_name(name)
    if name_problem:
        problems.append(f"{where}: field 'name': {name_problem}")
    implementation = entry.get("implementation")
    engine = None
    if not isinstance(implementation, str):
        problems.append(
            f"{where}: field 'implementation': expected a backend name such as 'json' or "
            f"'redis', got {_shown(implementation)}"
        )
    else:
        try:
            engine = get_engine(implementation)
        except ConfigError as exc:
            problems.append(f"{where}: field 'implementation': {exc}")
    for flag in ("load", "clear"):
        if flag in entry and not isinstance(entry[flag], bool):
            problems.append(f"{where}: field {flag!r}: expected true or false, got "
                            f"{_shown(entry[flag])}")  # fmt: skip
    settings = entry.get("settings", {})
    if not isinstance(settings, Mapping):
        problems.append(f"{where}: field 'settings': expected an object, got {_shown(settings)}")
    elif engine is not None:
        setting_problems, setting_warnings = engine.check_settings(settings)
        problems.extend(f"{where}: field 'settings': {p}" for p in setting_problems)
        warnings.extend(f"{where}: {w}" for w in setting_warnings)
    if len(problems) > found:
        return None
    return ContainerSpec(
        name=name,
        implementation=implementation,
        settings=dict(settings),
        load=entry.get("load", True),
        clear=entry.get("clear", False),
    )


def check_container_name(name: Any) -> str | None:
    """Why ``name`` cannot name a container, or None when it can."""
    if not isinstance(name, str):
        return f"expected a string, got {_shown(name)}"
    if not name.isidentifier():
        return f"{name!r} is not a Python identifier (letters, digits and _, not first a digit)"
    if name.startswith("_"):
        return f"{name!r} starts with '_', which is kept for MoobiusStorage's internals"
    if name in RESERVED_NAMES:
        return f"{name!r} is the name of a MoobiusStorage attribute; choose another"
    return None


def _shown(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"[:120]
