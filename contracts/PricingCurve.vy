# pragma version ~=0.4.3
# pragma nonreentrancy on
"""
@title PricingCurve
@custom:contract-name PricingCurve
@license AGPL-3.0-only
@notice Per task type base fee (money per task, settlement-token base units), moved once
        per epoch toward a target utilisation, EIP-1559 style:
            factor = 1 + step * (u - u*) / u*,   clamped to [1 - step, 1 + step]
            fee'   = clamp(fee * factor^n, min_fee, max_fee)
        where u = demand / capacity value of the period (both money, from the pool) and n
        is the number of epochs the period covered (catch-up in one call, bounded).
        A sink's quoted price adds a congestion multiplier that rises with its backlog (in
        epochs) and an escrow-pressure multiplier, both capped.
@custom:security The fee has a ceiling (`max_fee` <= 2**96), so it can neither overflow nor
        make a price computation overflow. Only the owner configures fees and parameters
        (with events); only the wired pool advances fees. With no capacity at all, demand
        raises the fee (scarcity) and no demand lowers it.
"""

from snekmate.auth import ownable
from snekmate.auth import ownable_2step

from modules import fee_math
from interfaces import ICapacityRegistry
from interfaces import IEscrowBuffer
from interfaces import IBackpressurePool

initializes: ownable
initializes: ownable_2step[ownable := ownable]

exports: (
    ownable_2step.owner,
    ownable_2step.pending_owner,
    ownable_2step.transfer_ownership,
    ownable_2step.accept_ownership,
)

WAD: constant(uint256) = 10**18
BPS: constant(uint256) = 10_000
MAX_FEE: public(constant(uint256)) = 2**96 - 1

REGISTRY: public(immutable(ICapacityRegistry))

struct Fee:
    base_fee: uint256
    min_fee: uint256
    max_fee: uint256
    last_epoch_p1: uint256

struct Params:
    target_util_bps: uint256
    max_step_bps: uint256
    congestion_bps: uint256
    max_congestion_bps: uint256
    escrow_bps: uint256

fees: public(HashMap[bytes32, Fee])
params: public(Params)
pool: public(address)
escrow: public(address)

event Wired:
    pool: address
    escrow: address

event FeeConfigured:
    task_type: indexed(bytes32)
    base_fee: uint256
    min_fee: uint256
    max_fee: uint256

event ParamsSet:
    target_util_bps: uint256
    max_step_bps: uint256
    congestion_bps: uint256
    max_congestion_bps: uint256
    escrow_bps: uint256

event BaseFeeUpdated:
    task_type: indexed(bytes32)
    epoch: indexed(uint256)
    utilisation_bps: uint256
    epochs: uint256
    base_fee: uint256


@deploy
def __init__(registry: ICapacityRegistry):
    """
    @param registry The CapacityRegistry (task types must exist there to be priced).
    @dev Defaults: target utilisation 80 %, step 12.5 %, congestion +100 % per epoch of
         backlog capped at +300 %, escrow pressure up to +80 %.
    """
    ownable.__init__()
    ownable_2step.__init__()
    REGISTRY = registry
    self._set_params(Params(
        target_util_bps=8_000,
        max_step_bps=1_250,
        congestion_bps=10_000,
        max_congestion_bps=30_000,
        escrow_bps=8_000,
    ))


@external
def wire(pool: address, escrow: address):
    """
    @notice Sets, once, the pool allowed to advance fees and the escrow read for pressure.
    @dev Owner only.
    """
    ownable._check_owner()
    assert self.pool == empty(address), "pricing: already wired"
    assert pool != empty(address) and escrow != empty(address), "pricing: zero address"
    self.pool = pool
    self.escrow = escrow
    log Wired(pool=pool, escrow=escrow)


@external
def configure(task_type: bytes32, base_fee: uint256, min_fee: uint256, max_fee: uint256):
    """
    @notice Sets a task type's fee bounds and current base fee (money per task).
    @dev Owner only. 1 <= min_fee <= base_fee <= max_fee <= MAX_FEE. Re-configuring keeps
         the epoch bookkeeping.
    """
    ownable._check_owner()
    assert staticcall REGISTRY.task_exists(task_type), "pricing: unknown task type"
    assert min_fee > 0, "pricing: zero min fee"
    assert min_fee <= base_fee and base_fee <= max_fee, "pricing: fee outside bounds"
    assert max_fee <= MAX_FEE, "pricing: max fee too large"
    f: Fee = self.fees[task_type]
    f.base_fee = base_fee
    f.min_fee = min_fee
    f.max_fee = max_fee
    self.fees[task_type] = f
    log FeeConfigured(task_type=task_type, base_fee=base_fee, min_fee=min_fee, max_fee=max_fee)


@external
def set_params(
    target_util_bps: uint256,
    max_step_bps: uint256,
    congestion_bps: uint256,
    max_congestion_bps: uint256,
    escrow_bps: uint256,
):
    """
    @notice Sets the global fee-controller and price-multiplier parameters.
    @dev Owner only.
    """
    ownable._check_owner()
    self._set_params(Params(
        target_util_bps=target_util_bps,
        max_step_bps=max_step_bps,
        congestion_bps=congestion_bps,
        max_congestion_bps=max_congestion_bps,
        escrow_bps=escrow_bps,
    ))


@external
def advance(task_type: bytes32, epoch: uint256, demand: uint256, capacity_value: uint256, epochs: uint256) -> uint256:
    """
    @notice Moves the base fee for a closed period of `epochs` epochs.
    @dev Pool only (called from rebalance, at most once per epoch per task type).
    @param task_type The market.
    @param epoch The epoch the pool is closing at.
    @param demand Money that wanted to be paid this period (fresh inflow + queued escrow).
    @param capacity_value Money the sinks' full smoothed capacity absorbs this period.
    @param epochs Epochs the period covered (1..255).
    @return The new base fee.
    """
    assert msg.sender == self.pool, "pricing: caller is not the pool"
    f: Fee = self.fees[task_type]
    assert f.max_fee > 0, "pricing: task type not configured"
    factor_wad: uint256 = 0
    util_bps: uint256 = 0
    factor_wad, util_bps = fee_math._factor(demand, capacity_value, self.params.target_util_bps, self.params.max_step_bps)
    fee: uint256 = fee_math._compound(f.base_fee, f.min_fee, f.max_fee, factor_wad, epochs)
    f.base_fee = fee
    f.last_epoch_p1 = epoch + 1
    self.fees[task_type] = f
    log BaseFeeUpdated(task_type=task_type, epoch=epoch, utilisation_bps=util_bps, epochs=epochs, base_fee=fee)
    return fee


@external
@view
def base_fee(task_type: bytes32) -> uint256:
    """
    @notice The current base fee (money per task) of a configured task type.
    """
    fee: uint256 = self.fees[task_type].base_fee
    assert fee > 0, "pricing: task type not configured"
    return fee


@external
@view
def price(task_type: bytes32, sink: address) -> uint256:
    """
    @notice The price per task quoted for `sink`:
            base_fee * (1 + min(congestion * b, max_congestion)) * (1 + escrow * pressure)
            with b the sink's backlog in epochs (from the pool) and pressure = escrow
            level / escrow max.
    """
    fee: uint256 = self.fees[task_type].base_fee
    assert fee > 0, "pricing: task type not configured"
    p: Params = self.params
    congestion_bps: uint256 = 0
    if self.pool != empty(address):
        q: uint256 = 0
        e: uint256 = 0
        q, e = staticcall IBackpressurePool(self.pool).backlog_of(task_type, sink)
        if q > 0:
            if e == 0:
                congestion_bps = p.max_congestion_bps
            else:
                congestion_bps = min(p.congestion_bps * q // e, p.max_congestion_bps)
    pressure_wad: uint256 = 0
    if self.escrow != empty(address):
        pressure_wad = min(staticcall IEscrowBuffer(self.escrow).pressure_wad(task_type), WAD)
    price: uint256 = fee * (BPS + congestion_bps) // BPS
    return price * (WAD + p.escrow_bps * pressure_wad // BPS) // WAD


@internal
def _set_params(p: Params):
    assert p.target_util_bps > 0 and p.target_util_bps <= BPS, "pricing: target utilisation out of range"
    assert p.max_step_bps > 0 and p.max_step_bps <= 5_000, "pricing: step out of range"
    assert p.congestion_bps <= 100_000, "pricing: congestion too steep"
    assert p.max_congestion_bps <= 1_000_000, "pricing: congestion cap too high"
    assert p.escrow_bps <= 100_000, "pricing: escrow multiplier too high"
    self.params = p
    log ParamsSet(
        target_util_bps=p.target_util_bps,
        max_step_bps=p.max_step_bps,
        congestion_bps=p.congestion_bps,
        max_congestion_bps=p.max_congestion_bps,
        escrow_bps=p.escrow_bps,
    )
