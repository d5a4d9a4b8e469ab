"""Keeps the gateway's pools funded and rebalanced.

* **Funding**: per task type the gateway pays through one prepaid stream whose rate follows
  its measured spend (receipt money over the last `window` epochs) times a margin slightly
  below 1, and tops the deposit up to `runway` epochs of streaming before it runs out (rate
  changes below 20 % are not worth a transaction). Receipts need their money in the pot
  before the tracker credits them; when queued receipts exceed the source's room, an instant
  distribution adds exactly the shortfall. Together the pool receives about what the gateway
  vouches for: more would be paid to sinks as unverified work (backlog for everyone), less
  would leave receipts waiting.
* **Rebalance**: when an epoch is due (`pool.rebalance_due`), call `rebalance`. Several
  keepers (other gateways, `ape run rebalance`) may race; the loser's transaction reverts
  cheaply with "pool: rebalance not due", which is success here.
"""

from __future__ import annotations

import asyncio
import logging
import time

from web3.exceptions import ContractLogicError

from gateway.chain.client import ChainClient, ChainError
from gateway.chain.outbox import Outbox
from pura.layout import TASK_SCALE

log = logging.getLogger("pura.chain.keeper")


class Keeper:
    def __init__(self, client: ChainClient, outbox: Outbox, task_types: list[str], epoch_length: int,
                 *, interval_s: float, rebalance: bool, fund: bool, margin: float, runway_epochs: float,
                 window_epochs: float, min_stream_rate: int = 20, genesis: int = 0) -> None:
        self.client = client
        self.outbox = outbox
        self.task_types = task_types
        self.epoch_length = epoch_length
        self.interval_s = interval_s
        self.do_rebalance = rebalance
        self.do_fund = fund
        self.margin = margin
        self.runway_epochs = runway_epochs
        self.window_epochs = window_epochs
        self.min_stream_rate = min_stream_rate
        self.genesis = genesis
        self.rebalances = 0
        self.fundings = 0
        self.instant_top_ups = 0
        self.waiting_for_capacity = 0
        self.last_error: str | None = None
        self._approved = False

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
                self.last_error = None
            except (ChainError, OSError) as exc:
                self.last_error = str(exc)
                log.warning("keeper tick failed; will retry", extra={"fields": {"error": str(exc)}})
            except Exception as exc:
                self.last_error = str(exc)
                log.exception("keeper error")
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        await self.client.block_timestamp()  # keeps the chain clock estimate fresh
        if self.do_rebalance:
            await self.rebalance_due()
        if self.do_fund:
            for tt in self.task_types:
                await self.fund(tt)

    async def rebalance_due(self) -> int:
        pool = self.client.c["pool"]
        done = 0
        due = await self.client.read_many([pool.functions.rebalance_due(bytes.fromhex(t[2:])) for t in self.task_types])
        for tt, is_due in zip(self.task_types, due):
            if not is_due:
                continue
            try:
                await self.client.send(pool.functions.rebalance(bytes.fromhex(tt[2:])))
                self.rebalances += 1
                done += 1
            except ContractLogicError as exc:
                if "rebalance not due" not in str(exc):  # another keeper was first: fine
                    raise ChainError(f"rebalance reverted: {exc}") from exc
        return done

    def epoch_bounds(self) -> tuple[int, int]:
        """(start, end) of the current chain epoch, by the chain's clock."""
        now = self.client.chain_now()
        start = self.genesis + (now - self.genesis) // self.epoch_length * self.epoch_length
        return start, start + self.epoch_length

    async def desired_rate(self, task_type: str) -> int:
        """Base units per second: spend over the last `window` completed epochs x margin
        (constant within an epoch, so the stream is not re-sent every tick)."""
        start, _ = self.epoch_bounds()
        window_s = max(1, int(self.window_epochs * self.epoch_length))
        spent = await self.outbox.amount_between(task_type, start - window_s, start)
        return round(spent * self.margin / window_s)

    async def fund(self, task_type: str) -> None:
        rate = await self.desired_rate(task_type)
        pool = self.client.c["pool"]
        tid = bytes.fromhex(task_type[2:])
        stream = await self.client.read(pool.functions.stream_of(tid, self.client.source))
        current_rate, remaining = int(stream[1]), int(stream[2])
        # hysteresis around the minimum streaming rate: start at the minimum, pause below half
        if rate < self.min_stream_rate and (current_rate == 0 or rate < self.min_stream_rate // 2):
            if current_rate > 0:  # spend fell below streaming size: pause, keep the deposit
                await self.client.send(pool.functions.fund(tid, 0, 0))
                self.fundings += 1
            await self.cover_receipts(task_type)
            return
        need = int(rate * self.runway_epochs * self.epoch_length)
        change_rate = current_rate == 0 or abs(rate - current_rate) * 5 > current_rate
        top_up = need - remaining if remaining < need // 3 or current_rate == 0 else 0
        amount = max(0, top_up)
        if change_rate or amount:
            await self._approve(amount)
            await self.client.send(pool.functions.fund(tid, amount, rate if change_rate else current_rate))
            self.fundings += 1
            log.info("stream funded", extra={"fields": {"task_type": task_type[:10], "amount": amount,
                                                        "rate": rate if change_rate else current_rate}})
        await self.cover_receipts(task_type)

    async def cover_receipts(self, task_type: str) -> None:
        """Receipts waiting for funding: put the shortfall in the pot at once (an instant
        distribution), so the gateway's vouched-for money is money it paid, but never more
        than the sinks can absorb this epoch. Beyond that the pot would overflow to escrow,
        which takes the money out of the pot again (and out of the credit room): topping up
        would only feed the escrow. Receipts past that point wait; the money already paid to
        the sinks stays creditable, so they are credited as the pot refills."""
        owed = await self.outbox.unconfirmed_amount(task_type)
        if owed == 0:
            return
        pool, pricing = self.client.c["pool"], self.client.c["pricing"]
        tid = bytes.fromhex(task_type[2:])
        room, state, fee, count = await self.client.read_many([
            pool.functions.funder_room(tid, self.client.source), pool.functions.pools(tid),
            pricing.functions.base_fee(tid), pool.functions.stream_count(tid),
        ])
        if owed <= room:
            return
        streams = await self.client.read_many(
            [pool.functions.streams(tid, j) for j in range(count)] + [pool.functions.stream_of(tid, self.client.source)]
        )
        unsettled = 0
        now = self.client.chain_now()
        for st in streams[:-1]:  # every funder's streaming since its last settlement joins the pot
            unsettled += min(int(st[2]), int(st[1]) * max(0, now - int(st[3])))
        _, end = self.epoch_bounds()
        own = streams[-1]  # the gateway's own stream keeps paying until the epoch ends
        to_come = min(int(own[2]), int(own[1]) * max(0, end - now))
        pot = int(state[1]) + unsettled + to_come
        absorbable = int(state[2]) * int(fee) // TASK_SCALE
        top_up = min(owed - room, absorbable - pot)
        if top_up <= 0:
            self.waiting_for_capacity = owed - room
            return
        self.waiting_for_capacity = owed - room - top_up
        await self._approve(top_up)
        await self.client.send(pool.functions.distribute(tid, top_up))
        self.instant_top_ups += 1
        log.info("receipts covered", extra={"fields": {"task_type": task_type[:10], "amount": top_up}})

    async def _approve(self, amount: int) -> None:
        if not self._approved and amount > 0:
            await self.client.ensure_allowance(self.client.c["pool"].address, amount)
            self._approved = True
