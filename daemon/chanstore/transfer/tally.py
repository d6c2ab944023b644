"""What a transfer did, per container: the counts its report shows."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MAX_EXAMPLES", "Tally", "render"]

#: How many damaged or mismatched keys a tally names; the rest are counted only.
MAX_EXAMPLES = 10


@dataclass
class Tally:
    """The counts of one container."""

    container: str
    channels: int = 0
    #: Keys read from the source (damaged ones included).
    keys: int = 0
    #: Keys written to the target (with ``--dry-run``: that would be written).
    copied: int = 0
    #: Keys the target held with the same value already, left alone.
    unchanged: int = 0
    #: Target keys the source does not hold, deleted (``--delete-extra``; with
    #: ``--dry-run``: that would be deleted).
    deleted: int = 0
    #: Source values that exist but cannot be read: not copied, and never passed off as absent.
    damaged: int = 0
    #: Keys the target holds, counted after copying (None until counted).
    target_keys: int | None = None
    #: Channels whose target key count differs from the source's.
    count_mismatches: int = 0
    #: Keys whose value in the target differs from the source's (``--verify``).
    value_mismatches: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, example: str) -> None:
        """Name a damaged or mismatched key, up to :data:`MAX_EXAMPLES` of them."""
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)

    @property
    def ok(self) -> bool:
        """Whether everything of this container was read, and checked where asked."""
        return not (self.damaged or self.count_mismatches or self.value_mismatches)


_COLUMNS = (
    ("container", "container"),
    ("channels", "channels"),
    ("keys", "keys"),
    ("copied", "copied"),
    ("unchanged", "unchanged"),
    ("deleted", "deleted"),
    ("damaged", "damaged"),
    ("target keys", "target_keys"),
)


def render(tallies: list[Tally], *, dry_run: bool = False, verified: bool = False) -> str:
    """The per-container report: a table, then what went wrong, if anything."""
    headers = [title for title, _ in _COLUMNS]
    if dry_run:
        headers[3], headers[5] = "would copy", "would delete"
    headers.append("verdict")
    rows = [
        [_shown(getattr(tally, name)) for _, name in _COLUMNS] + [_verdict(tally, verified)]
        for tally in tallies
    ]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)).rstrip()
             for row in [headers, *rows]]  # fmt: skip
    for tally in tallies:
        lines.extend(f"  {tally.container}: {example}" for example in tally.examples)
    return "\n".join(lines)


def _shown(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _verdict(tally: Tally, verified: bool) -> str:
    problems = []
    if tally.damaged:
        problems.append(f"{tally.damaged:,} damaged")
    if tally.count_mismatches:
        problems.append(f"{tally.count_mismatches:,} channels' counts differ")
    if tally.value_mismatches:
        problems.append(f"{tally.value_mismatches:,} values differ")
    if problems:
        return "FAILED: " + ", ".join(problems)
    return "ok, values verified" if verified else "ok"
