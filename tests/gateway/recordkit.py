"""Helpers shared by the accounting tests: a completion record (one upstream attempt,
everything but the key, request id, cost and time fixed), a sink that captures the records a
running gateway publishes, and a second connection holding SQLite's write lock. (A plain module
next to the tests, importable because pytest puts this directory on ``sys.path`` for them.)"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from gateway.accounting.records import AttemptRecord, CompletionRecord


def completion_record(key_id: str, rid: str, cost: int, ts: int = 1) -> CompletionRecord:
    return CompletionRecord(
        request_id=rid, key_id=key_id, created_ms=ts, finished_ms=ts, outcome="ok",
        http_status=200, provider="p", model="m", tier="cheap", stream=False, prompt_tokens=1,
        completion_tokens=1, usage_estimated=False, cost_micros=cost, billed_micros=cost,
        premium_cost_micros=cost, cascade_depth=0, confidence=None, explored=False, latency_ms=1,
        response_sha256=None, attempts=(AttemptRecord("p", "m", "cheap", "ok", cost, 1),),
    )


@contextlib.contextmanager
def captured_records(stack) -> Iterator[list[CompletionRecord]]:
    """The records the stack's gateway hands its record sinks (after their commit) while the
    block runs."""
    captured: list[CompletionRecord] = []

    class Capture:
        async def publish(self, record: CompletionRecord) -> None:
            captured.append(record)

    sink = Capture()
    stack.services.pipeline.sinks.append(sink)
    try:
        yield captured
    finally:
        stack.services.pipeline.sinks.remove(sink)


@contextlib.contextmanager
def locked(db_path: str | Path) -> Iterator[None]:
    """Another connection holds the SQLite database's write lock (reads go on: WAL)."""
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()
