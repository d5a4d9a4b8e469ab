"""Fixtures for the contract suites: actors named by role, a deployed protocol, a clock.

Ape isolates every test in a chain snapshot, so module-scoped deployments are shared
read-only baselines and each test starts from them.
"""

import os

import ape_foundry.provider as _foundry_provider
import pytest
from ape.exceptions import ContractLogicError, TransactionError
from ape import chain
from hypothesis import HealthCheck, settings

from pura import layout
from pura.deploy import deploy_protocol
from pura.params import ProtocolParams, TaskTypeParams
from pura.signing import Attestation, Receipt, task_type_id

# Hypothesis: a quick profile for CI, a long one for thorough runs
# (`ape test --hypothesis-profile=long` or PURA_HYPOTHESIS_PROFILE=long).
settings.register_profile(
    "ci",
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=400,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.load_profile(os.environ.get("PURA_HYPOTHESIS_PROFILE", "ci"))



def _revert_without_trace(self, exception, revert_message=None, **kwargs):
    """ape-foundry builds and prints a full call trace for every revert, ~0.7 s each; the
    suites check hundreds of expected reverts by message, so skip the trace (messages are
    decoded exactly as before; `# dev:` revert comments are not used here). Failing tests still show the revert message."""
    if not revert_message or revert_message == "0x":
        revert_message = TransactionError.DEFAULT_MESSAGE
    if revert_message.startswith("revert: "):
        revert_message = revert_message[8:]
    kwargs.pop("trace", None)
    kwargs["set_ape_traceback"] = False
    # no compiler enrichment either: it resolves `# dev:` comments through a source
    # traceback, which these suites do not use
    return ContractLogicError(base_err=exception, revert_message=revert_message, **kwargs)


_foundry_provider.FoundryProvider._handle_execution_reverted = _revert_without_trace

USDC = 10**6
EPOCH = 3600
CHEAP = task_type_id("llm.cheap")
PREMIUM = task_type_id("llm.premium")

PARAMS = ProtocolParams(
    epoch_length=EPOCH,
    alpha_wad=3 * 10**17,
    unbonding_period=7 * 86400,
    tolerance_bps=20_000,
    min_funding=1 * USDC,
    escrow_min_deposit=1 * USDC,
    slash_bps=5_000,
    slash_threshold_bps=10_000,
    task_types=(
        TaskTypeParams(
            name="llm.cheap",
            min_bond=100 * USDC,
            stake_per_unit=1 * USDC,
            base_fee=10_000,  # 0.01 token per task
            min_fee=1,
            max_fee=10**12,
            escrow_max=10_000 * USDC,
        ),
        TaskTypeParams(
            name="llm.premium",
            min_bond=500 * USDC,
            stake_per_unit=5 * USDC,
            base_fee=100_000,
            min_fee=10,
            max_fee=10**12,
            escrow_max=0,
        ),
    ),
    token_decimals=6,
)
WAD = 10**18


@pytest.fixture
def owner(accounts):
    return accounts[0]


@pytest.fixture
def treasury(accounts):
    return accounts[1]


@pytest.fixture
def sink_a(accounts):
    return accounts[2]


@pytest.fixture
def sink_b(accounts):
    return accounts[3]


@pytest.fixture
def sink_c(accounts):
    return accounts[4]


@pytest.fixture
def funder(accounts):
    return accounts[5]


@pytest.fixture
def funder_b(accounts):
    return accounts[6]


@pytest.fixture
def keeper(accounts):
    return accounts[7]


@pytest.fixture
def relayer(accounts):
    return accounts[8]


@pytest.fixture
def stranger(accounts):
    return accounts[9]


@pytest.fixture
def sink_keys(accounts):
    """A sink's second key (for self-dealing attacks)."""
    return accounts[10]


@pytest.fixture(scope="module")
def proto(project, accounts):
    owner, treasury = accounts[0], accounts[1]
    p = deploy_protocol(project, owner, PARAMS, treasury=treasury.address)
    for a in list(accounts)[:16]:
        p.token.mint(a, 1_000_000 * USDC, sender=owner)
        for spender in (p.registry, p.pool, p.escrow):
            p.token.approve(spender, 2**256 - 1, sender=a)
    return p


@pytest.fixture(scope="module")
def token(proto):
    return proto.token


@pytest.fixture(scope="module")
def registry(proto):
    return proto.registry


@pytest.fixture(scope="module")
def pool(proto):
    return proto.pool


@pytest.fixture(scope="module")
def tracker(proto):
    return proto.tracker


@pytest.fixture(scope="module")
def pricing(proto):
    return proto.pricing


@pytest.fixture(scope="module")
def escrow(proto):
    return proto.escrow


class Clock:
    """Moves the chain across protocol epochs."""

    def __init__(self, registry):
        self.registry = registry
        self.genesis = registry.GENESIS()
        self.length = registry.EPOCH_LENGTH()

    def epoch(self) -> int:
        return (chain.blocks.head.timestamp - self.genesis) // self.length

    def to_epoch(self, e: int, offset: int = 1):
        target = self.genesis + e * self.length + offset
        assert target > chain.blocks.head.timestamp, "clock only moves forward"
        chain.pending_timestamp = target
        chain.mine()

    def next_epoch(self, n: int = 1):
        self.to_epoch(self.epoch() + n)

    def sleep(self, seconds: int):
        chain.pending_timestamp = chain.blocks.head.timestamp + seconds
        chain.mine()


@pytest.fixture
def clock(registry):
    return Clock(registry)


class Signer:
    """Builds and signs receipts and attestations with the test accounts' keys."""

    def __init__(self, proto):
        self.proto = proto
        self.chain_id = chain.chain_id
        self.next_nonce = {}

    def receipt(self, sink, source, amount, *, nonce=None, task_type=CHEAP, task_id=None, response_hash=None,
                deadline=None, sink_key=None, source_key=None):
        if nonce is None:
            nonce = self.next_nonce.get(source.address, 0)
            self.next_nonce[source.address] = nonce + 1
        r = Receipt(
            task_type=task_type,
            sink=sink.address,
            source=source.address,
            task_id=task_id or nonce.to_bytes(32, "big"),
            amount=amount,
            response_hash=response_hash or (b"\x11" * 32),
            nonce=nonce,
            deadline=deadline if deadline is not None else chain.blocks.head.timestamp + 86400,
        )
        sink_sig = r.sign((sink_key or sink).private_key, self.chain_id, self.proto.tracker.address)
        source_sig = r.sign((source_key or source).private_key, self.chain_id, self.proto.tracker.address)
        return r, r.as_call_arg(sink_sig, source_sig)

    def attestation(self, sink, capacity, nonce, *, task_type=CHEAP, deadline=None, key=None):
        a = Attestation(
            task_type=task_type,
            sink=sink.address,
            capacity=capacity,
            nonce=nonce,
            deadline=deadline if deadline is not None else chain.blocks.head.timestamp + 3600,
        )
        sig = a.sign((key or sink).private_key, self.chain_id, self.proto.registry.address)
        return a, a.as_call_arg(sig)


@pytest.fixture
def signer(proto):
    return Signer(proto)


def assert_conserved(proto, task_types=(CHEAP, PREMIUM)):
    """Conservation to the wei across the three contracts that hold money."""
    t = proto.token
    assert t.balanceOf(proto.pool) == sum(proto.pool.liabilities(tt) for tt in task_types)
    assert t.balanceOf(proto.escrow) == proto.escrow.total_held()
    assert proto.escrow.total_held() == sum(proto.escrow.level(tt) for tt in task_types)
    assert t.balanceOf(proto.registry) == proto.registry.total_bonded() + proto.registry.treasury_accrued()


def own_events(tx, contract):
    """The events a transaction emitted from `contract` (token Transfers etc. filtered out)."""
    return [log for log in tx.events if log.contract_address == contract.address]


def warm_market(proto, sinks, capacities, clock, keeper, *, task=CHEAP, bond_per_unit=USDC, epochs=40):
    """Registers sinks (bond = capacity * stake_per_unit, at least the min bond), lets their
    smoothed capacity converge, and runs one rebalance so units are set."""
    reg = proto.registry
    min_bond, spu = reg.task_types(task)
    for s, c in zip(sinks, capacities):
        reg.register_sink(task, max(c * spu, min_bond), c, sender=s)
    clock.next_epoch(epochs)
    proto.pool.rebalance(task, sender=keeper)  # sets units
    clock.next_epoch()
    proto.pool.rebalance(task, sender=keeper)  # a period with units: spare capacity is known


def absorbable(proto, task, units_total):
    """Money the sinks absorb next period: units * current fee / TASK_SCALE."""
    return layout.absorbable(units_total, proto.pricing.base_fee(task))


def split(amount, units):
    """The pool's exact split: floor(amount * u / U) each, remainder stays in the pot."""
    total = sum(units)
    paid = [amount * u // total for u in units] if total else [0] * len(units)
    return paid, amount - sum(paid)


def hot(pool, task, slot):
    """Decodes the pool's packed per-slot word."""
    h = layout.decode_hot(pool.hot_word(task, slot))
    return {
        "capacity": h.capacity,
        "units": h.units,
        "sat": int(h.saturated),
        "mark": int(h.marked),
        "backlog": h.backlog,
        "x": h.x,
        "unclaimed": h.unclaimed,
    }


def smoothed(pool, sink, task=CHEAP):
    """The pool's smoothed capacity of `sink` (tasks * TASK_SCALE, as of the last rebalance)."""
    return pool.position(task, sink).capacity
