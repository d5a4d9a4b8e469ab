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
MASK16: constant(uint256) = 2**16 - 1
MASK20: constant(uint256) = 2**20 - 1
MASK96: constant(uint256) = 2**96 - 1
MASK160: constant(uint256) = 2**160 - 1

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

# Packed storage: the per-epoch `advance` reads three words and writes one (it read seven
# and wrote two when every field had its own slot).
#   _fee_word[t]:  bits 0..95 base fee | 96..191 min fee | 192..255 last epoch + 1
#   _max_fee[t]:   the ceiling (< 2**96)
#   _cfg:          bits 0..159 pool | then 16 bits each: target utilisation, max step,
#                  20 bits each: congestion, max congestion, then the escrow multiplier
#                  (all BPS; _set_params bounds them to 10_000, 5_000, 100_000,
#                  1_000_000 and 100_000)
# Every field is bounded where it is set (MAX_FEE, _set_params), so the packing is lossless.
_fee_word: HashMap[bytes32, uint256]
_max_fee: HashMap[bytes32, uint256]
_cfg: uint256
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
    cfg: uint256 = self._cfg
    assert cfg & MASK160 == 0, "pricing: already wired"
    assert pool != empty(address) and escrow != empty(address), "pricing: zero address"
    self._cfg = cfg | convert(pool, uint256)
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
    f: Fee = self._fee(task_type)
    f.base_fee = base_fee
    f.min_fee = min_fee
    f.max_fee = max_fee
    self._store_fee(task_type, f)
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
    cfg: uint256 = self._cfg
    assert msg.sender == convert(cfg & MASK160, address), "pricing: caller is not the pool"
    f: Fee = self._fee(task_type)
    assert f.max_fee > 0, "pricing: task type not configured"
    factor_wad: uint256 = 0
    util_bps: uint256 = 0
    factor_wad, util_bps = fee_math._factor(demand, capacity_value, (cfg >> 160) & MASK16, (cfg >> 176) & MASK16)
    fee: uint256 = fee_math._compound(f.base_fee, f.min_fee, f.max_fee, factor_wad, epochs)
    f.base_fee = fee
    f.last_epoch_p1 = epoch + 1
    self._store_fee(task_type, f)
    log BaseFeeUpdated(task_type=task_type, epoch=epoch, utilisation_bps=util_bps, epochs=epochs, base_fee=fee)
    return fee


@external
@view
def base_fee(task_type: bytes32) -> uint256:
    """
    @notice The current base fee (money per task) of a configured task type.
    """
    fee: uint256 = self._fee_word[task_type] & MASK96
    assert fee > 0, "pricing: task type not configured"
    return fee


@external
@view
def fees(task_type: bytes32) -> Fee:
    """
    @notice A task type's fee state: base fee, bounds, and the last epoch advanced + 1.
    """
    return self._fee(task_type)


@external
@view
def params() -> Params:
    """
    @notice The global fee-controller and price-multiplier parameters.
    """
    return self._params(self._cfg)


@external
@view
def pool() -> address:
    """
    @notice The pool allowed to advance fees (zero until wired).
    """
    return convert(self._cfg & MASK160, address)


@external
@view
def price(task_type: bytes32, sink: address) -> uint256:
    """
    @notice The price per task quoted for `sink`:
            base_fee * (1 + min(congestion * b, max_congestion)) * (1 + escrow * pressure)
            with b the sink's backlog in epochs (from the pool) and pressure = escrow
            level / escrow max.
    """
    fee: uint256 = self._fee_word[task_type] & MASK96
    assert fee > 0, "pricing: task type not configured"
    cfg: uint256 = self._cfg
    p: Params = self._params(cfg)
    congestion_bps: uint256 = 0
    pool: address = convert(cfg & MASK160, address)
    if pool != empty(address):
        q: uint256 = 0
        e: uint256 = 0
        q, e = staticcall IBackpressurePool(pool).backlog_of(task_type, sink)
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
    self._cfg = (
        (self._cfg & MASK160)
        | (p.target_util_bps << 160)
        | (p.max_step_bps << 176)
        | (p.congestion_bps << 192)
        | (p.max_congestion_bps << 212)
        | (p.escrow_bps << 232)
    )
    log ParamsSet(
        target_util_bps=p.target_util_bps,
        max_step_bps=p.max_step_bps,
        congestion_bps=p.congestion_bps,
        max_congestion_bps=p.max_congestion_bps,
        escrow_bps=p.escrow_bps,
    )


@internal
@view
def _fee(task_type: bytes32) -> Fee:
    word: uint256 = self._fee_word[task_type]
    return Fee(
        base_fee=word & MASK96,
        min_fee=(word >> 96) & MASK96,
        max_fee=self._max_fee[task_type],
        last_epoch_p1=word >> 192,
    )


@internal
def _store_fee(task_type: bytes32, f: Fee):
    # base_fee and min_fee <= max_fee <= MAX_FEE (configure, and _compound's clamp)
    assert f.last_epoch_p1 < 2**64, "pricing: epoch overflow"
    self._fee_word[task_type] = f.base_fee | (f.min_fee << 96) | (f.last_epoch_p1 << 192)
    if self._max_fee[task_type] != f.max_fee:
        self._max_fee[task_type] = f.max_fee


@internal
@pure
def _params(cfg: uint256) -> Params:
    return Params(
        target_util_bps=(cfg >> 160) & MASK16,
        max_step_bps=(cfg >> 176) & MASK16,
        congestion_bps=(cfg >> 192) & MASK20,
        max_congestion_bps=(cfg >> 212) & MASK20,
        escrow_bps=cfg >> 232,
    )
