"""How far a long transfer has come: a bar on a terminal, plain lines otherwise.

On a terminal, :mod:`tqdm` draws the bar (it redraws one line with carriage
returns and sizes itself to the window). Into a pipe or a log, those escapes
would be noise, so :class:`Progress` writes a plain line instead every
``interval`` seconds and one at the end::

    migrate: 120/1,000 channel containers, 12,000 keys (2,400 keys/s)
"""

from __future__ import annotations

import os
import time
from typing import IO, Any

__all__ = ["LINE_INTERVAL", "Progress"]

#: Seconds between plain progress lines.
LINE_INTERVAL = 5.0


class Progress:
    """Progress over ``total`` things (``unit``), told of each as it is done with
    :meth:`advance`. ``bar``: draw a bar (default: when ``stream`` is a terminal)."""

    def __init__(
        self, label: str, total: int, stream: IO[str], *, unit: str = "channel containers",
        interval: float = LINE_INTERVAL, bar: bool | None = None,
    ) -> None:  # fmt: skip
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self.keys = 0
        self._stream = stream
        self._interval = interval
        self._started = self._last_line = time.monotonic()
        self._bar: Any = None
        if bar if bar is not None else _is_terminal(stream):
            from tqdm import tqdm  # noqa: PLC0415 - only a terminal needs it

            # Sized to the window as it changes. A terminal that reports no size (0x0, as
            # a bare pseudo-terminal does) gets 80x24: tqdm would hide a bar on 0 rows.
            fixed = {} if _columns(stream) > 0 else {"ncols": 80, "nrows": 24}
            self._bar = tqdm(total=total, desc=label, unit=f" {unit}", file=stream, leave=True,
                             dynamic_ncols=not fixed, **fixed)  # fmt: skip

    def advance(self, keys: int, done: int = 1) -> None:
        """``done`` more are done, with ``keys`` keys."""
        self.done += done
        self.keys += keys
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.keys:,} keys", refresh=False)
            self._bar.update(done)
            return
        now = time.monotonic()
        if now - self._last_line >= self._interval:
            self._last_line = now
            self._line(now)

    def close(self) -> None:
        """The work ended (done or not): the last line, or the bar left as it stands."""
        if self._bar is not None:
            self._bar.close()
        elif self.total:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        self._stream.write(
            f"{self.label}: {self.done:,}/{self.total:,} {self.unit}, "
            f"{self.keys:,} keys ({self.keys / elapsed:,.0f} keys/s)\n"
        )
        self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False
