"""The export format: one JSON object a line, ``{"channel", "container", "key", "value"}``.

``value`` is the stored, type-marked form (a set is
``{"_moobius_type": "builtins.set", "_moobius_val": [...]}``), so a line
carries any value the library stores, registered dataclasses included,
without the exporting or importing process knowing their classes. Lines are
ASCII (``\\u`` escapes), so a file survives any tool that mangles encodings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from chanstore import codec
from chanstore.errors import ConfigError
from chanstore.keys import check_channel_id, check_key

__all__ = ["FIELDS", "MAX_LINE_BYTES", "Record", "encode_record", "read_records"]

FIELDS = ("channel", "container", "key", "value")
#: The longest line import reads: a key's value, however large, fits well within it.
MAX_LINE_BYTES = 256 * 1024 * 1024
#: How many bad lines import names before it stops looking for more.
MAX_PROBLEMS = 20


@dataclass(frozen=True)
class Record:
    """One stored key: where it lives, and its value as a :class:`~chanstore.codec.Document`."""

    channel: str
    container: str
    key: str
    value: codec.Document


def encode_record(channel: str, container: str, key: str, value: codec.Document) -> str:
    """The line (with its newline) that stores ``value`` under ``key``."""
    # The stored form is compact ASCII JSON already: spliced in, not parsed and dumped again.
    stored = codec.encode(value)
    head = json.dumps({"channel": channel, "container": container, "key": key})
    return f'{head[:-1]}, "value": {stored}}}\n'


def read_records(lines: Iterable[bytes | str], containers: Iterable[str]) -> Iterator[Record]:
    """The records of ``lines``, checked; blank lines are skipped.

    Raises :class:`ConfigError` naming up to :data:`MAX_PROBLEMS` bad lines
    (by number, with what was wrong and what was expected) once they are all
    read, so that a caller that checks a whole file first changes nothing.
    """
    known = frozenset(containers)
    problems: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = _record(line, known)
        except ValueError as exc:
            if len(problems) < MAX_PROBLEMS:
                problems.append(f"line {number}: {exc}")
            continue
        if not problems:
            yield record
    if problems:
        raise ConfigError(problems)


def _record(line: bytes | str, known: frozenset[str]) -> Record:
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"longer than {MAX_LINE_BYTES} bytes")
    try:
        item = json.loads(line, parse_constant=_not_json)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object with {', '.join(FIELDS)}, "
                         f"not {type(item).__name__}")  # fmt: skip
    missing = [name for name in FIELDS if name not in item]
    extra = [name for name in item if name not in FIELDS]
    if missing or extra:
        wrong = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown field {', '.join(map(repr, extra))}" if extra else "",
            )
            if part
        )
        raise ValueError(f"{wrong} (expected exactly {', '.join(FIELDS)})")
    container = item["container"]
    if container not in known:
        shown = ", ".join(sorted(known)) or "none"
        raise ValueError(f"container {container!r} is not in the db_config (it has: {shown})")
    channel = check_channel_id(_text(item["channel"], "channel"))
    key = check_key(_text(item["key"], "key"))
    return Record(channel, container, key, codec.Document(item["value"]))


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, not {type(value).__name__}")
    return value


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON value")
