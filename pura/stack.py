"""The full local stack: a chain with the contracts, providers registered as sinks, a funded
gateway source, and the gateway + LOCAL STAND-IN providers wired to them.

Used by the main job (``./dev demo``, :mod:`pura.demo`) and by the chain tests. The chain
side uses ape (deploy, register, time travel); the gateway talks to the same node over
JSON-RPC with its own client, exactly as it would to Base Sepolia.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ape import chain

from pura.deploy import Protocol, deploy_protocol
from pura.params import PricingParams, ProtocolParams, TaskTypeParams
from pura.signing import task_type_id

USDC = 10**6
# The stack's stand-in model: illustrative prices large enough that the gateway's spend
# streams (a stream moves whole base units per second).
STACK_PRICES = {"input_usd_per_mtok": "10", "output_usd_per_mtok": "40"}
TIER_TASKS = {"cheap": "llm.cheap", "mid": "llm.mid", "premium": "llm.premium"}


def stack_params(epoch_length: int = 3600) -> ProtocolParams:
    """Local parameters sized to the stack's stand-ins (STACK_MODELS: illustrative prices,
    10/40 USD per million tokens): a cheap answer costs ~3,000 micro-USD, so the cheap task
    type starts at 4,000 base units (6-decimal token) per task."""
    return ProtocolParams(
        epoch_length=epoch_length,
        alpha_wad=3 * 10**17,
        unbonding_period=7 * 86400,
        tolerance_bps=20_000,
        min_funding=USDC // 100,
        escrow_min_deposit=USDC // 100,
        slash_bps=5_000,
        slash_threshold_bps=10_000,
        task_types=(
            TaskTypeParams("llm.cheap", 100 * USDC, USDC, 4_000, 1, 10**8, 1_000 * USDC),
            TaskTypeParams("llm.mid", 100 * USDC, USDC, 30_000, 1, 10**9, 1_000 * USDC),
            TaskTypeParams("llm.premium", 100 * USDC, USDC, 100_000, 1, 10**10, 1_000 * USDC),
        ),
        token_decimals=6,
        pricing=PricingParams(target_util_bps=9_500),  # as the network files: see docs/simulation.md E3
    )


@dataclass
class ChainStack:
    proto: Protocol
    record_path: Path
    rpc_url: str
    owner: object
    keeper: object
    source: object
    sinks: dict[str, object] = field(default_factory=dict)

    @property
    def genesis(self) -> int:
        return self.proto.registry.GENESIS()

    @property
    def epoch_length(self) -> int:
        return self.proto.registry.EPOCH_LENGTH()

    def epoch(self) -> int:
        return (chain.blocks.head.timestamp - self.genesis) // self.epoch_length

    def goto(self, epoch: int, offset: int = 1) -> None:
        """Moves chain time to `offset` seconds into `epoch` (forward only)."""
        target = self.genesis + epoch * self.epoch_length + offset
        if target <= chain.blocks.head.timestamp:
            return
        chain.pending_timestamp = target
        chain.mine()

    def advance(self, seconds: int) -> None:
        chain.pending_timestamp = chain.blocks.head.timestamp + seconds
        chain.mine()


def deploy_stack(project, accounts, workdir: Path, params: ProtocolParams | None = None) -> ChainStack:
    """Deploys and writes the deployment record the gateway reads (deployments/ format)."""
    params = params or stack_params()
    owner, treasury, keeper, source = accounts[0], accounts[1], accounts[7], accounts[5]
    proto = deploy_protocol(project, owner, params, treasury=treasury.address)
    record = {
        "chain_id": chain.chain_id,
        "deployer": owner.address,
        "owner": owner.address,
        "contracts": {
            name: {"address": c.address, "contract": type(c).__name__}
            for name, c in proto.contracts().items() if name != "token"
        },
        "settlement_token": {"address": proto.token.address, "decimals": params.token_decimals},
        "params": params.to_json(),
        "task_types": {tt.name: "0x" + task_type_id(tt.name).hex() for tt in params.task_types},
        "genesis": proto.registry.GENESIS(),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "deployment.json"
    path.write_text(json.dumps(record, indent=2))
    uri = chain.provider.uri if hasattr(chain.provider, "uri") else chain.provider.http_uri
    return ChainStack(proto, path, uri, owner, keeper, source)


def register_sinks(stack: ChainStack, sinks: dict[str, tuple[object, int, list[str]]]) -> None:
    """`sinks`: provider name -> (account, capacity per epoch, tiers it serves)."""
    p = stack.proto
    for name, (account, capacity, tiers) in sinks.items():
        p.token.mint(account, 10_000 * USDC, sender=stack.owner)
        p.token.approve(p.registry, 2**256 - 1, sender=account)
        for tier in tiers:
            tid = task_type_id(TIER_TASKS[tier])
            min_bond, spu = p.registry.task_types(tid)
            p.registry.register_sink(tid, max(min_bond, capacity * spu), capacity, sender=account)
        stack.sinks[name] = account


def fund_source(stack: ChainStack, amount: int = 10_000 * USDC) -> None:
    p = stack.proto
    p.token.mint(stack.source, amount, sender=stack.owner)
    p.token.approve(p.pool, 2**256 - 1, sender=stack.source)


def warm(stack: ChainStack, epochs: int = 15) -> None:
    """Lets the sinks' smoothed capacity converge and sets the first units."""
    stack.goto(stack.epoch() + epochs)
    for name in TIER_TASKS.values():
        stack.proto.pool.rebalance(task_type_id(name), sender=stack.keeper)


def chain_config(stack: ChainStack, **overrides) -> dict:
    """The [chain] section for a gateway on this stack (the source key goes in the env)."""
    os.environ["PURA_CHAIN_SOURCE_KEY"] = stack.source.private_key
    cfg = {
        "deployment": str(stack.record_path),
        "rpc_url": stack.rpc_url,
        "rpc_url_env": "PURA_STACK_RPC_UNUSED",
        "task_types": dict(TIER_TASKS),
        "refresh_interval_s": 1.0,
        "stale_after_s": 10.0,
        "batch_interval_s": 0.5,
        "keeper_interval_s": 0.5,
        "read_timeout_s": 2.0,
    }
    cfg.update(overrides)
    return cfg


# --------------------------------------------------------------------------- driving a stack


def gateway_status(base_url: str) -> dict:
    import httpx

    return httpx.get(base_url.removesuffix("/v1") + "/api/status", timeout=5).json()


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.2, what: str = "condition"):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out waiting for {what}")


def drained(base_url: str) -> bool:
    out = gateway_status(base_url)["chain"]["outbox"]
    return out.get("queued", 0) == 0 and out.get("sent", 0) == 0


def settled(base_url: str) -> bool:
    """Drained, or what is left waits for pool capacity (overload: the sinks cannot absorb
    more money this epoch, so the keeper does not top up and those receipts wait)."""
    s = gateway_status(base_url)["chain"]
    out = s["outbox"]
    if out.get("sent", 0):
        return False
    return out.get("queued", 0) == 0 or (s["keeper"] or {}).get("waiting_for_capacity", 0) > 0


def run_epoch(st: ChainStack, gw, ask, n_requests: int, slices: int = 10, label: str = "") -> None:
    """One epoch of traffic with chain time moving through it (so streams accrue as
    receipts arrive, as in real time), then the next epoch starts, the gateway's keeper
    rebalances and its weights refresh. `gw` is a gateway.devstack.LocalStack."""
    svc = gw.services.chain
    epoch = st.epoch()
    per = max(1, n_requests // slices)
    sent = 0
    for k in range(slices):
        for _ in range(per if k < slices - 1 else n_requests - sent):
            ask(f"{label}{epoch}-{sent}")
            sent += 1
        st.goto(epoch, offset=(k + 1) * st.epoch_length // slices - 5)
    wait_until(lambda: settled(gw.base_url), what="receipts confirmed (or waiting for capacity)")
    rebalances = svc.keeper.rebalances
    st.goto(epoch + 1)
    wait_until(lambda: svc.keeper.rebalances > rebalances, what="the keeper's rebalance")
    refreshed = svc.weights.state.as_of
    wait_until(lambda: svc.weights.state.as_of > refreshed, what="weights after the rebalance")
