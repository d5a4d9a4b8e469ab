"""The accounting record of a completed request, and the hook that consumes it.

:class:`CompletionRecord` is produced exactly once per request, after settlement, and handed to
every registered :class:`RecordSink`. It carries what a dual-signed receipt needs (issue 5):
request id (the receipt's task id), provider (the sink), model, tier, cost in integer micro-USD
(the amount) and the SHA-256 of the answer (the response hash). The on-chain outbox will be a
``RecordSink`` that stores the record durably before returning.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("pura.records")


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One upstream call made while answering a request."""

    provider: str
    model: str
    tier: str
    outcome: str  # ok | accepted | rejected | error | timeout | client_error | cut
    cost_micros: int
    latency_ms: int
    score: float | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class CompletionRecord:
    """The settled accounting record of one request (money in integer micro-USD)."""

    request_id: str
    key_id: str
    created_ms: int
    finished_ms: int
    outcome: str  # ok | partial | failed
    http_status: int
    provider: str | None
    model: str | None
    tier: str | None
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    usage_estimated: bool
    cost_micros: int  # what the upstream calls cost at the price table (all attempts)
    billed_micros: int  # what the key was charged (== cost unless clamped to the reservation)
    premium_cost_micros: int  # the same tokens at the premium reference price
    cascade_depth: int
    confidence: float | None
    explored: bool
    latency_ms: int
    response_sha256: str | None
    attempts: tuple[AttemptRecord, ...] = field(default_factory=tuple)


def answer_hash(text: str) -> str:
    """The response hash: SHA-256 of the UTF-8 answer text the client received.

    The answer text is the concatenated ``content`` of choice 0 (plus tool-call names and
    arguments), identical for streamed and non-streamed delivery of the same answer.
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RecordSink(Protocol):
    """Consumes completion records (issue 5: the receipt outbox)."""

    async def publish(self, record: CompletionRecord) -> None: ...


class LoggingRecordSink:
    """A sink that only logs at DEBUG; the default until the receipt outbox exists."""

    async def publish(self, record: CompletionRecord) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "completion record %s provider=%s cost_micros=%d sha256=%s",
                record.request_id,
                record.provider,
                record.cost_micros,
                record.response_sha256,
            )
