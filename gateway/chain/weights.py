"""Routing weights read from the pools: one input of the router (gateway.routing.weights).

Every refresh reads, for each (provider, tier) bound to a sink and a task type, the sink's
position in the pool (smoothed capacity, units, backlog, unclaimed) and its quoted price, plus each
task type's escrow pressure, in ONE batched JSON-RPC round trip with a timeout. The router's
weight for a provider in a tier is its pool units in that tier's task type.

If the chain is slow or down the previous snapshot stays in force (marked stale after
`stale_after_s`), the failure is counted and reported (`/api/status`, the
`X-Pura-Weights-Age` header), and the next successful refresh clears it: the gateway keeps
serving on last-known weights and recovers by itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from gateway.chain.client import ChainClient, ChainError
from gateway.routing.weights import WeightSnapshot

log = logging.getLogger("pura.chain.weights")


@dataclass(frozen=True, slots=True)
class SinkView:
    provider: str
    tier: str
    task_type: str
    sink: str
    units: int
    backlog: int  # tasks * pura.layout.TASK_SCALE
    capacity: int  # tasks * pura.layout.TASK_SCALE
    unclaimed: int
    price: int


@dataclass
class ChainState:
    sinks: list[SinkView] = field(default_factory=list)
    escrow_pressure: dict[str, int] = field(default_factory=dict)  # task type -> WAD
    base_fee: dict[str, int] = field(default_factory=dict)
    as_of: float = 0.0


class ChainWeightSource:
    def __init__(self, client: ChainClient, bindings: list[tuple[str, str, str, str]], refresh_interval_s: float,
                 stale_after_s: float) -> None:
        """`bindings`: (provider, tier, task type id, sink address)."""
        self.client = client
        self.bindings = bindings
        self.refresh_interval_s = refresh_interval_s
        self.stale_after_s = stale_after_s
        self.state = ChainState()
        self.failures = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self._snapshot = WeightSnapshot(weights={}, source="chain", as_of=0.0, by_tier={}, stale=True)

    def snapshot(self) -> WeightSnapshot:
        snap = self._snapshot
        stale = snap.as_of == 0.0 or (time.time() - snap.as_of) > self.stale_after_s
        if stale != snap.stale:
            snap = WeightSnapshot(weights=snap.weights, source=snap.source, as_of=snap.as_of,
                                  by_tier=snap.by_tier, stale=stale)
            self._snapshot = snap
        return snap

    async def refresh(self) -> None:
        try:
            self.state = await self.read()
        except ChainError as exc:
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = str(exc)
            log.warning("chain weights unavailable; serving last-known", extra={"fields": {"error": str(exc)}})
            return
        self.consecutive_failures = 0
        self.last_error = None
        by_tier: dict[str, dict[str, float]] = {}
        for v in self.state.sinks:
            by_tier.setdefault(v.tier, {})[v.provider] = float(v.units)
        flat: dict[str, float] = {}
        for tier_weights in by_tier.values():
            for p, w in tier_weights.items():
                flat[p] = max(flat.get(p, 0.0), w)
        self._snapshot = WeightSnapshot(weights=flat, source="chain", as_of=self.state.as_of, by_tier=by_tier,
                                        stale=False)

    async def read(self) -> ChainState:
        pool, pricing, escrow = self.client.c["pool"], self.client.c["pricing"], self.client.c["escrow"]
        calls = []
        for _provider, _tier, tt, sink in self.bindings:
            tid = bytes.fromhex(tt[2:])
            calls.append(pool.functions.position(tid, sink))
            calls.append(pricing.functions.price(tid, sink))
        task_types = sorted({b[2] for b in self.bindings})
        for tt in task_types:
            calls.append(escrow.functions.pressure_wad(bytes.fromhex(tt[2:])))
            calls.append(pricing.functions.base_fee(bytes.fromhex(tt[2:])))
        results = await self.client.read_many(calls)
        state = ChainState(as_of=time.time())
        for k, (provider, tier, tt, sink) in enumerate(self.bindings):
            # Position = (slot, capacity, units, backlog, unclaimed, owed)
            position, price = results[2 * k], results[2 * k + 1]
            state.sinks.append(SinkView(provider, tier, tt, sink, int(position[2]), int(position[3]),
                                        int(position[1]), int(position[4]), int(price)))
        base = 2 * len(self.bindings)
        for j, tt in enumerate(task_types):
            state.escrow_pressure[tt] = int(results[base + 2 * j])
            state.base_fee[tt] = int(results[base + 2 * j + 1])
        return state
