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

The rows a flush submits are claimed from the outbox under a lease (``reclaim_after_ms``, 2
min), after which any replica's claim takes them over: that is how a dead batcher's rows come
back. A live one renews the lease of everything it has not submitted yet before each
transaction and submits only the rows it still holds, so a claim of several transactions'
worth of rows outlasts the lease on a slow chain without another replica resubmitting them.
Between two renewals lies one transaction, so the lease must outlast one transaction's worst
case; :class:`Batcher` refuses a client whose timeouts allow more.
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
LEASE_MARGIN_S = 30.0  # lease beyond one transaction's worst case: database writes, replica clock skew


def renewal_gap_s(client: ChainClient) -> float:
    """The longest a flush can go between two renewals of its lease, as ChainClient bounds it:
    one transaction (waiting for the send lock behind the keeper's send, 4 read timeouts, its
    own send, 4 more, then its receipt, ``tx_timeout_s``) and the next task type's credit-room
    read (one read timeout). Database writes are left to the margin."""
    return client.tx_timeout_s + 9 * client.timeout_s


class Batcher:
    def __init__(self, client: ChainClient, outbox: Outbox, batch_size: int, interval_s: float) -> None:
        gap_s, lease_s = renewal_gap_s(client), outbox.reclaim_after_ms / 1000
        if lease_s < gap_s + LEASE_MARGIN_S:
            raise ValueError(
                f"[chain] tx_timeout_s = {client.tx_timeout_s:g} and read_timeout_s = {client.timeout_s:g} let one "
                f"receipt transaction hold its rows for up to {gap_s:g} s (tx_timeout_s + 9 x read_timeout_s), "
                f"which must be at least {LEASE_MARGIN_S:g} s shorter than the receipt outbox's claim lease of "
                f"{lease_s:g} s: another replica would resubmit receipts still in flight. Lower tx_timeout_s to "
                f"at most {lease_s - LEASE_MARGIN_S - 9 * client.timeout_s:g} s (or read_timeout_s)."
            )
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
        returns receipts submitted. The rest waits for the keeper's top-up.

        Before each transaction the lease of every claimed row not yet submitted is renewed,
        and the transaction carries only the rows still held: a row another replica took over
        meanwhile (this process stalled past the lease, or the clocks disagree) is that
        replica's to submit. If anything fails, every row not yet settled goes back to the queue
        at once, not only the failing transaction's.
        """
        groups = await self.outbox.claim(MAX_BATCH * 4)
        held = [r.request_id for rows in groups.values() for r in rows]  # claimed, not yet submitted
        total = 0
        try:
            for task_type, rows in groups.items():
                room = await self.client.read(self.client.c["pool"].functions.funder_room(
                    bytes.fromhex(task_type.removeprefix("0x")), self.client.source))
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
                    gone = {r.request_id for r in waiting}
                    held = [rid for rid in held if rid not in gone]
                for start in range(0, len(fundable), MAX_BATCH):
                    held = await self.outbox.renew(held)
                    still = set(held)
                    claimed = fundable[start:start + MAX_BATCH]
                    chunk = [r for r in claimed if r.request_id in still]
                    if len(chunk) < len(claimed):
                        log.warning("receipts taken over by another batcher; not submitting them", extra={
                            "fields": {"task_type": task_type[:10], "receipts": len(claimed) - len(chunk)}})
                    if not chunk:
                        continue
                    await self._submit(task_type, chunk)
                    done = {r.request_id for r in chunk}
                    held = [rid for rid in held if rid not in done]
                    total += len(chunk)
        except BaseException:
            await self.outbox.requeue(held)
            raise
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
