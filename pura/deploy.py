"""Deploy and wire the five Pura contracts (ape-based; used by scripts, tests, demos).

Order: [TestToken] -> CapacityRegistry -> PricingCurve -> EscrowBuffer -> BackpressurePool
-> CompletionTracker, then one-time wiring (registry <- pool, tracker; pool <- tracker;
pricing <- pool, escrow; escrow <- pool) and per task type configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pura.params import ProtocolParams
from pura.signing import task_type_id


@dataclass
class Protocol:
    token: Any
    registry: Any
    pricing: Any
    escrow: Any
    pool: Any
    tracker: Any

    def contracts(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "registry": self.registry,
            "pricing": self.pricing,
            "escrow": self.escrow,
            "pool": self.pool,
            "tracker": self.tracker,
        }


def deploy_protocol(project, deployer, params: ProtocolParams, token=None, treasury: str | None = None) -> Protocol:
    """Deploys everything in dependency order, wires it and configures the task types."""
    if token is None:
        token = deployer.deploy(project.TestToken, "Pura Test USD", "pUSD", params.token_decimals)
    treasury = treasury or params.treasury or deployer.address
    registry = deployer.deploy(
        project.CapacityRegistry,
        token,
        params.epoch_length,
        params.alpha_wad,
        params.unbonding_period,
        treasury,
    )
    pricing = deployer.deploy(project.PricingCurve, registry)
    escrow = deployer.deploy(project.EscrowBuffer, registry, params.escrow_min_deposit)
    pool = deployer.deploy(
        project.BackpressurePool, registry, pricing, escrow, params.tolerance_bps, params.min_funding
    )
    tracker = deployer.deploy(
        project.CompletionTracker, registry, pool, params.slash_bps, params.slash_threshold_bps
    )
    registry.wire(pool, tracker, sender=deployer)
    pool.wire(tracker, sender=deployer)
    pricing.wire(pool, escrow, sender=deployer)
    escrow.wire(pool, sender=deployer)
    proto = Protocol(token, registry, pricing, escrow, pool, tracker)
    for tt in params.task_types:
        configure_task_type(proto, deployer, tt)
    return proto


def configure_task_type(proto: Protocol, owner, tt) -> bytes:
    tid = task_type_id(tt.name)
    proto.registry.create_task_type(tid, tt.min_bond, tt.stake_per_unit, sender=owner)
    proto.pricing.configure(tid, tt.base_fee, tt.min_fee, tt.max_fee, sender=owner)
    proto.escrow.set_max_level(tid, tt.escrow_max, sender=owner)
    return tid
