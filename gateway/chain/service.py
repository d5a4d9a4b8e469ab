"""The chain service: everything on-chain the gateway does, owned by the app's lifespan.

* :meth:`ChainService.terms` gives the pipeline, for a route about to be called, the terms of
  the receipt that request will produce (and the header a sidecar provider needs);
* :meth:`ChainService.issue` turns a completed answer into a dual-signed receipt and commits
  it to the outbox before the answer is sent;
* the batcher, the keeper and the weight source run in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass

from eth_account import Account
from eth_utils import to_checksum_address

from gateway.accounting.db import PostgresDatabase, SqliteDatabase
from gateway.chain.batcher import Batcher
from gateway.chain.client import ChainClient, ChainError, Deployment, task_type_id
from gateway.chain.keeper import Keeper
from gateway.chain.outbox import Outbox, OutboxRow
from gateway.chain.receipts import REQUEST_HEADER, ReceiptTerms, sign_as_sink, sink_signature_valid, task_id_for
from gateway.chain.weights import ChainWeightSource
from pura.layout import TASK_SCALE
from gateway.config import ChainConfig, ProviderConfig, RoutingConfig

log = logging.getLogger("pura.chain")


@dataclass(frozen=True, slots=True)
class SinkBinding:
    provider: str
    sink: str
    signer: str  # keystore | sidecar
    key: str | None  # keystore only


class ChainService:
    def __init__(self, config: RoutingConfig, db: SqliteDatabase | PostgresDatabase) -> None:
        cc = config.chain
        assert cc is not None
        self.cc: ChainConfig = cc
        self.deployment = Deployment.load(cc.deployment)
        source_key = os.environ.get(cc.source_key_env)
        if not source_key:
            raise ValueError(f"chain enabled but {cc.source_key_env} (the gateway's source key) is not set")
        self.client = ChainClient(cc.resolved_rpc_url(), self.deployment, source_key, cc.read_timeout_s,
                                  cc.tx_timeout_s)
        self.source = self.client.source
        self.outbox = Outbox(db)
        self.sinks: dict[str, SinkBinding] = {}
        for p in config.providers:
            if p.sink:
                self.sinks[p.name] = self._binding(p)
        self.task_types = {tier: task_type_id(name) for tier, name in cc.task_types.items()}
        bindings = []
        for p in config.providers:
            if p.name not in self.sinks:
                continue
            for tier in sorted({m.tier for m in p.models}):
                if tier in self.task_types:
                    bindings.append((p.name, tier, self.task_types[tier], self.sinks[p.name].sink))
        self.weights = ChainWeightSource(self.client, bindings, cc.refresh_interval_s, cc.stale_after_s)
        self.batcher = Batcher(self.client, self.outbox, cc.batch_size, cc.batch_interval_s)
        self.keeper: Keeper | None = None
        self.epoch_length = 0
        self.genesis = 0
        self.rejected_sink_signatures = 0
        self.receipts_issued = 0
        self._tasks: list[asyncio.Task] = []

    @staticmethod
    def _binding(p: ProviderConfig) -> SinkBinding:
        sink = to_checksum_address(p.sink)
        key = None
        if p.sink_signer == "keystore":
            if not p.sink_key_env or not os.environ.get(p.sink_key_env):
                raise ValueError(f"provider {p.name}: sink_signer = keystore needs sink_key_env set in the environment")
            key = os.environ[p.sink_key_env]
            if Account.from_key(key).address != sink:
                raise ValueError(f"provider {p.name}: the key in {p.sink_key_env} is not the key of sink {sink}")
        return SinkBinding(p.name, sink, p.sink_signer, key)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        recovered = await self.outbox.recover()
        if recovered:
            log.warning("requeued receipts left in flight by a previous process", extra={"fields": {"count": recovered}})
        registry = self.client.c["registry"]
        try:
            self.epoch_length, self.genesis = await self.client.read_many(
                [registry.functions.EPOCH_LENGTH(), registry.functions.GENESIS()]
            )
        except ChainError:
            # the chain may be down at start: serve anyway, read the clock later
            log.warning("chain unreachable at start; will retry")
            self.epoch_length = self.deployment.epoch_length or 3600
        self.keeper = Keeper(
            self.client, self.outbox, sorted(set(self.task_types.values())), int(self.epoch_length),
            interval_s=self.cc.keeper_interval_s, rebalance=self.cc.rebalance, fund=self.cc.fund,
            margin=self.cc.funding_margin, runway_epochs=self.cc.funding_runway_epochs,
            window_epochs=self.cc.funding_window_epochs, min_stream_rate=self.cc.min_stream_rate,
            genesis=int(self.genesis),
        )
        await self.weights.refresh()
        self._tasks = [
            asyncio.create_task(self.batcher.run(), name="pura-receipt-batcher"),
            asyncio.create_task(self.keeper.run(), name="pura-keeper"),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.client.close()

    # ------------------------------------------------------------------ receipts

    async def new_nonce(self) -> int:
        return await self.outbox.next_nonce(self.source)

    def terms(self, provider: ProviderConfig, tier: str, request_id: str, nonce: int, deadline: int,
              input_per_mtok: int, output_per_mtok: int) -> ReceiptTerms | None:
        binding = self.sinks.get(provider.name)
        task_type = self.task_types.get(tier)
        if binding is None or task_type is None:
            return None
        return ReceiptTerms(
            chain_id=self.deployment.chain_id,
            tracker=self.deployment.addresses["tracker"],
            task_type=task_type,
            source=self.source,
            sink=binding.sink,
            task_id="0x" + task_id_for(request_id).hex(),
            nonce=nonce,
            deadline=deadline,
            decimals=self.deployment.token_decimals,
            input_micros_per_mtok=input_per_mtok,
            output_micros_per_mtok=output_per_mtok,
        )

    def request_headers(self, provider: ProviderConfig, terms: ReceiptTerms | None) -> dict[str, str] | None:
        binding = self.sinks.get(provider.name)
        if terms is None or binding is None or binding.signer != "sidecar":
            return None
        return {REQUEST_HEADER: terms.encode()}

    async def issue(self, provider: str, terms: ReceiptTerms | None, cost_micros: int, response_sha256: str | None,
                    sink_signature: str | None, request_id: str) -> str:
        """Builds, signs and durably queues the receipt of one answered request.

        Returns what happened: "queued", "no_binding", "zero_amount", "bad_sink_signature"."""
        if terms is None or response_sha256 is None:
            return "no_binding"
        receipt = terms.receipt(cost_micros, response_sha256)
        if receipt.amount == 0:
            return "zero_amount"
        binding = self.sinks[provider]
        if binding.signer == "keystore":
            sink_sig = sign_as_sink(terms, receipt, binding.key)
        else:
            sink_sig = sink_signature
            if not sink_signature_valid(terms, receipt, sink_sig):
                # missing, forged, or for something other than what we received: no receipt
                self.rejected_sink_signatures += 1
                log.warning("sink signature missing or invalid; no receipt",
                            extra={"fields": {"request_id": request_id, "provider": provider}})
                return "bad_sink_signature"
        source_sig = "0x" + receipt.sign(self.client.account.key, terms.chain_id, terms.tracker).hex()
        await self.outbox.put(OutboxRow(
            request_id=request_id, provider=provider, task_type=terms.task_type, sink=terms.sink,
            source=terms.source, task_id=terms.task_id, amount=receipt.amount,
            response_hash="0x" + response_sha256, nonce=terms.nonce, deadline=terms.deadline,
            sink_sig=sink_sig, source_sig=source_sig, chain_ts=self.client.chain_now(),
        ))
        self.receipts_issued += 1
        if self.receipts_issued % self.cc.batch_size == 0:
            self.batcher.notify()
        return "queued"

    def saturated(self, tier: str) -> bool:
        """True when the tier's pool is saturated: its escrow is at least `spill_pressure` full
        (money the sinks cannot absorb is waiting), as of the last weights refresh."""
        task_type = self.task_types.get(tier)
        pressure = self.weights.state.escrow_pressure.get(task_type, 0) if task_type else 0
        return pressure >= int(self.cc.spill_pressure * 10**18)

    # ------------------------------------------------------------------ status

    async def status(self) -> dict:
        snap = self.weights.snapshot()
        counts = await self.outbox.counts()
        return {
            "chain_id": self.deployment.chain_id,
            "source": self.source,
            "weights": {
                "age_s": round(snap.age_s(), 3) if snap.as_of else None,
                "stale": snap.stale,
                "refresh_failures": self.weights.failures,
                "consecutive_failures": self.weights.consecutive_failures,
                "last_error": self.weights.last_error,
                "by_tier": {t: dict(w) for t, w in (snap.by_tier or {}).items()},
            },
            "sinks": [
                {"provider": v.provider, "tier": v.tier, "sink": v.sink, "units": v.units,
                 "backlog_epochs": (v.backlog / v.capacity) if v.capacity else 0.0,
                 "capacity_tasks": v.capacity / TASK_SCALE, "price": v.price, "unclaimed": v.unclaimed}
                for v in self.weights.state.sinks
            ],
            "escrow_pressure_wad": self.weights.state.escrow_pressure,
            "base_fee": self.weights.state.base_fee,
            "outbox": counts,
            "receipts_issued": self.receipts_issued,
            "rejected_sink_signatures": self.rejected_sink_signatures,
            "batcher": {
                "batches_sent": self.batcher.batches_sent,
                "confirmed": self.batcher.receipts_confirmed,
                "rejected": self.batcher.receipts_rejected,
                "gas_used": self.batcher.gas_used,
                "waiting_for_funds": self.batcher.waiting_for_funds,
                "consecutive_failures": self.batcher.failures,
                "last_error": self.batcher.last_error,
            },
            "keeper": None if self.keeper is None else {
                "rebalances": self.keeper.rebalances, "fundings": self.keeper.fundings,
                "instant_top_ups": self.keeper.instant_top_ups,
                "waiting_for_capacity": self.keeper.waiting_for_capacity,
                "last_error": self.keeper.last_error,
            },
            "as_of": time.time(),
        }
