"""Structured logging: one JSON object per line.

The pipeline writes exactly one ``pura.request`` line per request through :class:`RequestLog`;
other loggers (``pura.*``) get the same JSON envelope through :class:`JsonFormatter`, with extra
fields passed as ``extra={"fields": {...}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

import msgspec

# one JSON object per line; what JSON has no spelling for is written as its str(), as the
# standard library's ``default=str`` did
_LINES = msgspec.json.Encoder(enc_hook=str)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            payload.update(fields)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, separators=(",", ":"))


def configure(level: str = "INFO") -> None:
    """Install the JSON formatter on the ``pura`` logger tree (idempotent)."""
    logger = logging.getLogger("pura")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_pura", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler._pura = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    logging.Formatter.converter = time.gmtime


class RequestLog:
    """The one-line-per-request log, written in batches.

    Each request adds one record; the records are encoded and written together a few
    milliseconds later in a single ``write`` (a syscall per line costs tens of microseconds on the
    target machine), so neither the write nor the JSON encoding is on a request's critical path.
    """

    def __init__(self, stream: object | None = None, delay_s: float = 0.005) -> None:
        self._stream = stream
        self._delay_s = delay_s
        self._records: list[dict] = []
        self._scheduled = False

    def emit(self, fields: dict) -> None:
        record = {"ts": round(time.time(), 3), "level": "info", "logger": "pura.request", "msg": "request"}
        record.update(fields)
        self._records.append(record)
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_later(self._delay_s, self.flush)
            except RuntimeError:  # no loop (tests calling synchronously): write now
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._records:
            return
        stream = self._stream or sys.stderr
        records, self._records = self._records, []
        stream.write(_LINES.encode_lines(records).decode())
        stream.flush()
