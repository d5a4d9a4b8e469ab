"""Submits queued receipts to CompletionTracker in batches and confirms them from events.

A batch goes when `batch_size` receipts are queued or the oldest has waited
`batch_interval_s`. One transaction per task type (a batch is per task type), at most 64
receipts each. Outcomes come from the transaction's ReceiptRecorded / ReceiptRejected events:

* recorded -> confirmed;
* replayed -> confirmed (our nonce, so an earlier transaction of ours recorded it: the
  resubmission after a crash or a lost confirmation);
* not funded -> back to queued (the keeper's funding will catch up), until the deadline;
* expired or anything else -> rejected, with the reason.

If the chain is unreachable the rows go back to queued and the batcher backs off; nothing is
dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time

from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from gateway.chain.client import ChainClient, ChainError
from gateway.chain.outbox import Outbox, OutboxRow

log = logging.getLogger("pura.chain.batcher")

REPLAYED, NOT_FUNDED, EXPIRED = 4, 8, 2
MAX_BATCH = 64


class Batcher:
    def __init__(self, client: ChainClient, outbox: Outbox, batch_size: int, interval_s: float) -> None:
        self.client = client
        self.outbox = outbox
        self.batch_size = batch_size
        self.interval_s = interval_s
        self._wake = asyncio.Event()
        self.failures = 0
        self.last_error: str | None = None
        self.last_submit_at: float | None = None
        self.batches_sent = 0
        self.receipts_confirmed = 0
        self.receipts_rejected = 0
        self.gas_used = 0
        self.waiting_for_funds = 0

    def notify(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        backoff = self.interval_s
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                while await self._due():
                    sent = await self.flush_once()
                    if not sent:
                        break  # nothing fundable now: wait for the keeper's top-up
                backoff = self.interval_s
                self.failures = 0
            except (ChainError, OSError) as exc:
                self.failures += 1
                self.last_error = str(exc)
                backoff = min(30.0, self.interval_s * 2 ** min(self.failures, 5))
                log.warning("receipt submission failed; will retry", extra={"fields": {"error": str(exc)}})
            except Exception:  # never let the loop die
                self.failures += 1
                log.exception("receipt batcher error")
                backoff = min(30.0, self.interval_s * 2 ** min(self.failures, 5))

    async def _due(self) -> bool:
        counts = await self.outbox.counts()
        queued = counts.get("queued", 0)
        if queued >= self.batch_size:
            return True
        if queued == 0:
            return counts.get("sent", 0) > 0  # abandoned claims get reclaimed by claim()
        oldest = await self.outbox.oldest_queued_ms()
        return oldest is not None and (time.time() * 1000 - oldest) >= self.interval_s * 1000

    async def flush_once(self) -> int:
        """Claims up to one batch per task type and submits what the source's funding covers
        (the tracker refuses credit beyond it, and a refused receipt still costs gas);
        returns receipts submitted. The rest waits for the keeper's top-up."""
        groups = await self.outbox.claim(MAX_BATCH * 4)
        total = 0
        for task_type, rows in groups.items():
            try:
                room = await self.client.read(self.client.c["pool"].functions.funder_room(
                    bytes.fromhex(task_type.removeprefix("0x")), self.client.source))
            except BaseException:
                await self.outbox.requeue([r.request_id for r in rows])
                raise
            fundable: list[OutboxRow] = []
            for r in rows:  # oldest first, as long as the room lasts
                if r.amount > room:
                    break
                room -= r.amount
                fundable.append(r)
            waiting = rows[len(fundable):]
            if waiting:
                self.waiting_for_funds = sum(r.amount for r in waiting)
                await self.outbox.requeue([r.request_id for r in waiting])
            for start in range(0, len(fundable), MAX_BATCH):
                chunk = fundable[start:start + MAX_BATCH]
                try:
                    await self._submit(task_type, chunk)
                except BaseException:
                    # anything that did not settle goes back to the queue
                    await self.outbox.requeue([r.request_id for r in chunk])
                    raise
                total += len(chunk)
        return total

    async def _submit(self, task_type: str, rows: list[OutboxRow]) -> None:
        tracker = self.client.c["tracker"]
        fn = tracker.functions.submit_receipts(bytes.fromhex(task_type.removeprefix("0x")), [r.call_arg() for r in rows])
        try:
            receipt = await self.client.send(fn)
        except ContractLogicError as exc:
            raise ChainError(f"submit_receipts reverted: {exc}") from exc
        self.batches_sent += 1
        self.last_submit_at = time.time()
        self.gas_used += int(receipt["gasUsed"])
        tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
        by_nonce = {r.nonce: r for r in rows}
        outcomes: dict[str, tuple[str, int | None]] = {}
        requeue: list[str] = []
        for ev in tracker.events.ReceiptRecorded().process_receipt(receipt, errors=DISCARD):
            row = by_nonce.get(int(ev["args"]["nonce"]))
            if row is not None:
                outcomes[row.request_id] = ("confirmed", None)
        for ev in tracker.events.ReceiptRejected().process_receipt(receipt, errors=DISCARD):
            row = by_nonce.get(int(ev["args"]["nonce"]))
            if row is None or row.request_id in outcomes:
                continue
            reason = int(ev["args"]["reason"])
            if reason == REPLAYED:
                outcomes[row.request_id] = ("confirmed", None)
            elif reason == NOT_FUNDED and row.deadline > self.client.chain_now() + 60:
                requeue.append(row.request_id)
            else:
                outcomes[row.request_id] = ("rejected", reason)
        # anything the events did not mention (should not happen): retry it
        requeue += [r.request_id for r in rows if r.request_id not in outcomes and r.request_id not in requeue]
        await self.outbox.settle(outcomes, tx_hash)
        if requeue:
            await self.outbox.requeue(requeue)
        confirmed = sum(1 for s, _ in outcomes.values() if s == "confirmed")
        self.receipts_confirmed += confirmed
        self.receipts_rejected += len(outcomes) - confirmed
        log.info("receipt batch", extra={"fields": {
            "task_type": task_type[:10], "receipts": len(rows), "confirmed": confirmed,
            "requeued": len(requeue), "gas": int(receipt["gasUsed"]), "tx": tx_hash}})
