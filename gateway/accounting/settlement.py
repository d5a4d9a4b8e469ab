"""Group-committed settlement: completed requests are settled in batches, after their response.

Why: on the 2-core target machine one SQLite commit costs 50-100 us, more than all the SQL of a
settlement. Settling each request in its own transaction, before its response, put two commits
on every request's critical path. Here the pipeline computes the bill in memory (the same
``min(cost, reservation)`` rule the database applies), answers, and queues the record; a
background task commits everything queued during the last ``delay_ms`` in one transaction, then
hands the committed records to the record sinks (so the receipt outbox of issue 5 only ever sees
records that are durable).

The same commit writes the rate-limit counts of the requests admitted since the last one (the
limit itself is enforced in memory, see :mod:`gateway.accounting.ratelimit`) and each key's last
use, one statement per key.

Safety: a reservation (a carve of the process's budget lease, see
:mod:`gateway.accounting.leases`) stays held until its settlement commits, so the budget bound
holds throughout. The same commit gives each lease back what its settled carves released and,
when that still fits under the cap, holds it again for the requests to come. If the process dies before a batch commits, those records are lost but their
reservations are released by the sweeper: the keys are never over-charged. Reports call
:meth:`SettlementQueue.flush` first, so a client always reads its own completed requests.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from gateway.accounting.records import CompletionRecord, RecordSink
from gateway.accounting.store import Store

log = logging.getLogger("pura.settlement")


@dataclass(frozen=True, slots=True)
class Settlement:
    reservation_id: str | None
    record: CompletionRecord
    cap_micros: int


class SettlementQueue:
    def __init__(
        self,
        store: Store,
        sinks: list[RecordSink],
        delay_ms: float = 5.0,
        max_batch: int = 512,
    ) -> None:
        self.store = store
        self.sinks = sinks
        self.delay_s = delay_ms / 1000
        self.max_batch = max_batch
        self._items: list[Settlement] = []
        self._wake = asyncio.Event()
        self._done = asyncio.Condition()
        self._submitted = 0
        self._committed = 0
        self._task: asyncio.Task | None = None
        self._leases_task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pura-settlement")
        self._leases_task = asyncio.create_task(self._keep_leases(), name="pura-leases")
        self.store.on_unwritten = self._wake.set

    def submit(self, settlement: Settlement) -> None:
        self._items.append(settlement)
        self._submitted += 1
        self._wake.set()

    async def flush(self) -> None:
        """Return once everything submitted before this call is committed."""
        target = self._submitted
        if self._committed >= target:
            return
        self._wake.set()
        async with self._done:
            await self._done.wait_for(lambda: self._committed >= target)

    async def close(self) -> None:
        """Commit what is queued, then stop."""
        if self._task is None:
            return
        await self.flush()
        if self.store.rates.has_unwritten:
            await self._commit([])
        tasks = [t for t in (self._task, self._leases_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = self._leases_task = None
        try:
            await self.store.return_leases()
        except Exception:  # the sweeper releases them after the TTL
            log.exception("returning budget leases failed")

    async def _keep_leases(self) -> None:
        """Give back idle budget leases and keep held ones fresh (see accounting.leases)."""
        while True:
            await asyncio.sleep(self.store.leases.idle_ms / 2000)
            try:
                await self.store.maintain_leases()
            except Exception:
                log.exception("budget lease upkeep failed")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if self.delay_s > 0 and len(self._items) < self.max_batch:
                await asyncio.sleep(self.delay_s)
            self._wake.clear()
            batch, self._items = self._items[: self.max_batch], self._items[self.max_batch :]
            if self._items:
                self._wake.set()
            if batch or self.store.rates.has_unwritten:
                await self._commit(batch)

    async def _commit(self, batch: list[Settlement]) -> None:
        items = [(s.reservation_id, s.record, s.cap_micros) for s in batch]
        try:
            await self.store.settle_many(items)
        except Exception:
            # One bad record must not lose the others: settle them one by one.
            log.exception("batch settlement failed; settling one by one")
            for item in items:
                try:
                    await self.store.settle(*item)
                except Exception:
                    log.exception("settlement failed", extra={"fields": {"request_id": item[1].request_id}})
        self._committed += len(batch)
        async with self._done:
            self._done.notify_all()
        for settlement in batch:
            for sink in self.sinks:
                try:
                    await sink.publish(settlement.record)
                except Exception:  # a sink must never break settlement
                    log.exception("record sink failed")
