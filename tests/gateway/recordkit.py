"""A completion record for accounting tests: one upstream attempt, everything but the key,
request id, cost and time fixed. (A plain module next to the tests, importable because pytest
puts this directory on ``sys.path`` for them.)"""

from __future__ import annotations

from gateway.accounting.records import AttemptRecord, CompletionRecord


def completion_record(key_id: str, rid: str, cost: int, ts: int = 1) -> CompletionRecord:
    return CompletionRecord(
        request_id=rid, key_id=key_id, created_ms=ts, finished_ms=ts, outcome="ok",
        http_status=200, provider="p", model="m", tier="cheap", stream=False, prompt_tokens=1,
        completion_tokens=1, usage_estimated=False, cost_micros=cost, billed_micros=cost,
        premium_cost_micros=cost, cascade_depth=0, confidence=None, explored=False, latency_ms=1,
        response_sha256=None, attempts=(AttemptRecord("p", "m", "cheap", "ok", cost, 1),),
    )
