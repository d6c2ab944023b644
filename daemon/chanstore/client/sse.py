"""Server-Sent Events, decoded from bytes as they arrive: how the change feed is read."""

from __future__ import annotations

import re
from typing import NamedTuple

from chanstore.client.errors import ClientError

__all__ = ["WATCH_MAX_EVENT_BYTES", "RawEvent", "SSEDecoder"]

#: The largest event a watch accepts (a value is at most the daemon's body limit).
WATCH_MAX_EVENT_BYTES = 64 * 1024 * 1024


class RawEvent(NamedTuple):
    """A dispatched Server-Sent Event: its type, its data lines joined, the last id seen."""

    type: str
    data: str
    id: str


_EOL = re.compile(rb"\r\n?|\n")
_BOM = b"\xef\xbb\xbf"


class SSEDecoder:
    """Parses an event stream from bytes as they arrive, by the WHATWG rules.

    Lines end with CRLF, LF or CR (a CRLF split between two chunks is one
    end of line); a leading BOM is dropped; a line starting with ``:`` is a
    comment; ``field: value`` loses one space after the colon; ``data`` lines
    are joined with LF; ``id`` sets the last event id (kept across events,
    and ignored when it holds NUL); ``retry`` (digits only) sets the delay
    before reconnecting; an empty line dispatches an event that has data.
    An event or line past ``max_event_bytes`` is a ClientError.
    """

    def __init__(self, last_id: str = "", max_event_bytes: int = WATCH_MAX_EVENT_BYTES) -> None:
        self.last_id = last_id
        #: Seconds to wait before reconnecting, once the stream said (``retry:``).
        self.retry: float | None = None
        self._max = max_event_bytes
        self._buffer = bytearray()
        self._skip_lf = False
        self._at_start = True
        self._type = ""
        self._data: list[str] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[RawEvent]:
        """The events that ``chunk`` completes, in order."""
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        searched = len(self._buffer)  # what is already buffered holds no end of line
        self._buffer += chunk
        if self._at_start:
            if len(self._buffer) < len(_BOM) and _BOM.startswith(self._buffer):
                return []  # perhaps a BOM, not all here yet
            self._at_start = False
            if self._buffer.startswith(_BOM):
                del self._buffer[: len(_BOM)]
                searched = 0
        events: list[RawEvent] = []
        start = 0
        for match in _EOL.finditer(self._buffer, searched):
            self._line(self._buffer[start : match.start()].decode("utf-8", "replace"), events)
            start = match.end()
            if start == len(self._buffer) and match.group() == b"\r":
                self._skip_lf = True  # the LF of this CRLF may open the next chunk
        del self._buffer[:start]
        if len(self._buffer) + self._size > self._max:
            raise ClientError(f"an event of the change feed is larger than {self._max} bytes")
        return events

    def _line(self, line: str, events: list[RawEvent]) -> None:
        if not line:
            if self._data:
                events.append(RawEvent(self._type or "message", "\n".join(self._data),
                                       self.last_id))  # fmt: skip
            self._type, self._data, self._size = "", [], 0
            return
        if line.startswith(":"):
            return  # a comment: the daemon's heartbeat
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._type = value
        elif name == "data":
            self._data.append(value)
            self._size += len(value) + 1
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value) / 1000
