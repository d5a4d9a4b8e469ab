"""Server-sent events: an incremental parser and the encoder.

The parser keeps a buffer across network chunks, so an event split over two reads is joined
before it is decoded (the seed split each chunk on newlines and silently dropped tokens).
"""

from __future__ import annotations


class SSEParser:
    """Feed bytes, get the ``data`` payload of every complete event (comments ignored)."""

    __slots__ = ("_buffer", "_data")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._data:
            return self._feed_lines(buffer)
        # Fast path for what every OpenAI-compatible server sends: events of one "data: "
        # line each, ended by a blank line. The first block of any other shape (comments,
        # other fields, multi-line data, extra blank lines) and everything after it go
        # through the line parser, so the result is the same either way.
        blocks = buffer.split(b"\n\n")
        rest = blocks.pop()  # after the last blank line: an incomplete event, or b""
        events: list[bytes] = []
        for i, block in enumerate(blocks):
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append(block[6:])
            else:
                return events + self._feed_lines(b"\n\n".join(blocks[i:]) + b"\n\n" + rest)
        if b"\n" in rest:  # complete lines of an unfinished event: parsed now, not re-read
            return events + self._feed_lines(rest)
        self._buffer = rest
        return events

    def _feed_lines(self, buffer: bytes) -> list[bytes]:
        """The general parser (SSE's line rules); ``buffer`` has ``\n`` line ends only."""
        # one split, not a slice per line: a read often holds a whole answer's events
        lines = buffer.split(b"\n")
        self._buffer = lines.pop()  # the unterminated rest (b"" when the chunk ended a line)
        events: list[bytes] = []
        for line in lines:
            if not line:
                if self._data:
                    events.append(b"\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            if field == b"data":
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return events

    @property
    def pending(self) -> bool:
        """True when a partial event is buffered (the stream ended mid-event)."""
        return bool(self._buffer.strip() or self._data)


def encode_event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


DONE = b"[DONE]"
