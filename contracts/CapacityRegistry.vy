# pragma version ~=0.4.3
# pragma nonreentrancy on
"""
@title CapacityRegistry
@custom:contract-name CapacityRegistry
@license AGPL-3.0-only
@notice Task types, sink registrations, bonds and the smoothed capacity signal.
        A sink bonds settlement tokens per task type; its declared capacity (tasks per
        epoch) is capped LINEARLY by its bond: cap = bonded // stake_per_unit, so
        splitting one bond across identities gains nothing. The declared capacity is
        smoothed by an EWMA that steps at most once per epoch, lazily, in WAD fixed
        point, and reaches its target exactly.
@custom:security Trust: the owner creates task types, sets the treasury address and
        wires the pool and tracker ONCE; it can never move a member's bond. Only the
        wired CompletionTracker can slash, and only the wired BackpressurePool can
        release the slot of a sink that left. Bonds being unbonded, and bonds of sinks
        that left, stay slashable until withdrawn.
"""

from ethereum.ercs import IERC20
from snekmate.auth import ownable
from snekmate.auth import ownable_2step
from snekmate.utils import eip712_domain_separator as eip712
from snekmate.utils import ecdsa

from modules import epoch_clock
from modules import token_io
from modules import ewma
from modules import signatures

initializes: ownable
initializes: ownable_2step[ownable := ownable]
initializes: eip712
initializes: epoch_clock
initializes: token_io

exports: (
    ownable_2step.owner,
    ownable_2step.pending_owner,
    ownable_2step.transfer_ownership,
    ownable_2step.accept_ownership,
    eip712.eip712Domain,
    epoch_clock.GENESIS,
    epoch_clock.EPOCH_LENGTH,
    token_io.TOKEN,
)

MAX_SINKS: public(constant(uint256)) = 64
MAX_ATTESTATIONS: constant(uint256) = 64
MAX_CAPACITY: public(constant(uint256)) = 2**32 - 1
WAD: constant(uint256) = 10**18

# Packed per-slot capacity word (one storage slot, the only one the pool reads per sink):
#   bits   0..95   s        smoothed capacity at epoch e0, WAD-scaled (< 2**32 * 1e18 < 2**92)
#   bits  96..127  declared what the sink last declared (tasks per epoch)
#   bits 128..159  cap      bonded // stake_per_unit, clamped to MAX_CAPACITY
#   bits 160..191  e0       epoch at which `s` was materialised
#   bits 192..223  nonce    last accepted attestation nonce
#   bits 224..231  status   FREE / ACTIVE / LEAVING
MASK32: constant(uint256) = 2**32 - 1
MASK96: constant(uint256) = 2**96 - 1
STATUS_FREE: constant(uint256) = 0
STATUS_ACTIVE: constant(uint256) = 1
STATUS_LEAVING: constant(uint256) = 2
# Status as reported to the pool by `capacities`: in the top byte of each word.
STATUS_SHIFT: constant(uint256) = 248

ATTESTATION_TYPEHASH: public(constant(bytes32)) = keccak256(
    "CapacityAttestation(bytes32 taskType,address sink,uint32 capacity,uint32 nonce,uint32 deadline)"
)

# Reasons an attestation is skipped (AttestationRejected.reason)
REJECT_EXPIRED: constant(uint8) = 1
REJECT_NOT_REGISTERED: constant(uint8) = 2
REJECT_STALE_NONCE: constant(uint8) = 3
REJECT_BAD_SIGNATURE: constant(uint8) = 4

ALPHA_WAD: public(immutable(uint256))
DECAY_WAD: immutable(uint256)
UNBONDING_PERIOD: public(immutable(uint256))

struct TaskType:
    min_bond: uint256
    stake_per_unit: uint256

struct Bond:
    bonded: uint256
    unbonding: uint256
    release: uint256

# A relayed attestation in three static words (96 bytes of calldata; the typed struct
# with a 65-byte signature took ~320): the signed fields packed into one word, and the
# signature in EIP-2098 compact form.
#   head = sink << 96 | capacity << 64 | nonce << 32 | deadline    (each field uint32)
#   vs   = (v - 27) << 255 | s
struct Attestation:
    head: uint256
    r: uint256
    vs: uint256

struct CapState:
    s: uint256
    declared: uint256
    cap: uint256
    e0: uint256
    nonce: uint256
    status: uint256

task_types: public(HashMap[bytes32, TaskType])
# slot index + 1 of an ACTIVE sink; 0 when not registered (a LEAVING sink is no longer a member)
_slot_plus_one: HashMap[bytes32, HashMap[address, uint256]]
# occupant of each slot (ACTIVE or LEAVING); empty when FREE
member_at: public(HashMap[bytes32, address[MAX_SINKS]])
# high-water mark of slots ever used, the loop bound for `capacities`
slot_count: public(HashMap[bytes32, uint256])
# bit i set while slot i is not FREE
occupied: public(HashMap[bytes32, uint256])
# per task type, one word per slot: a fixed array costs one hash per access, a nested map two
_cap_state: HashMap[bytes32, uint256[MAX_SINKS]]
bonds: public(HashMap[bytes32, HashMap[address, Bond]])
total_bonded: public(uint256)
treasury: public(address)
treasury_accrued: public(uint256)
pool: public(address)
tracker: public(address)

event TaskTypeCreated:
    task_type: indexed(bytes32)
    min_bond: uint256
    stake_per_unit: uint256

event Wired:
    pool: address
    tracker: address

event TreasurySet:
    treasury: indexed(address)

event SinkRegistered:
    task_type: indexed(bytes32)
    sink: indexed(address)
    slot: uint256
    bond: uint256
    declared: uint256

event SinkDeregistered:
    task_type: indexed(bytes32)
    sink: indexed(address)
    slot: uint256
    unbonding: uint256
    release: uint256

event SlotReleased:
    task_type: indexed(bytes32)
    slot: uint256
    sink: address

event CapacityDeclared:
    task_type: indexed(bytes32)
    sink: indexed(address)
    declared: uint256
    nonce: uint256

event CapacitiesAttested:
    task_type: indexed(bytes32)
    # the `head` of every accepted attestation, in batch order: sink, declared capacity and
    # nonce as submitted (one event per batch, not one per sink: ~250 gas per entry, not ~2,000)
    heads: DynArray[uint256, MAX_ATTESTATIONS]

event AttestationRejected:
    task_type: indexed(bytes32)
    sink: indexed(address)
    nonce: uint256
    reason: uint8

event BondAdded:
    task_type: indexed(bytes32)
    sink: indexed(address)
    amount: uint256
    bonded: uint256

event UnbondRequested:
    task_type: indexed(bytes32)
    sink: indexed(address)
    amount: uint256
    unbonding: uint256
    release: uint256

event UnbondWithdrawn:
    task_type: indexed(bytes32)
    sink: indexed(address)
    amount: uint256

event Slashed:
    task_type: indexed(bytes32)
    sink: indexed(address)
    requested: uint256
    taken: uint256

event TreasuryPaid:
    treasury: indexed(address)
    amount: uint256


@deploy
def __init__(
    token: IERC20,
    epoch_length: uint256,
    alpha_wad: uint256,
    unbonding_period: uint256,
    treasury: address,
):
    """
    @param token The settlement ERC-20 (bonds and payments), any decimals.
    @param epoch_length Seconds per epoch; the protocol clock starts now.
    @param alpha_wad EWMA weight of a new declaration, WAD (0.3 = 3e17), in (0, 1].
    @param unbonding_period Seconds between an unbond request and its withdrawal.
    @param treasury Receiver of slashed bonds.
    """
    assert alpha_wad > 0 and alpha_wad <= WAD, "registry: alpha out of range"
    assert treasury != empty(address), "registry: zero treasury"
    ownable.__init__()
    ownable_2step.__init__()
    eip712.__init__("Pura CapacityRegistry", "1")
    epoch_clock.__init__(block.timestamp, epoch_length)
    token_io.__init__(token)
    ALPHA_WAD = alpha_wad
    DECAY_WAD = WAD - alpha_wad
    UNBONDING_PERIOD = unbonding_period
    self.treasury = treasury
    log TreasurySet(treasury=treasury)


# ---------------------------------------------------------------- owner


@external
def wire(pool: address, tracker: address):
    """
    @notice Sets, once, the pool allowed to release slots and the tracker allowed to slash.
    @dev Owner only. After this call nobody can change either address.
    @param pool The BackpressurePool of this deployment.
    @param tracker The CompletionTracker of this deployment.
    """
    ownable._check_owner()
    assert self.pool == empty(address), "registry: already wired"
    assert pool != empty(address) and tracker != empty(address), "registry: zero address"
    self.pool = pool
    self.tracker = tracker
    log Wired(pool=pool, tracker=tracker)


@external
def create_task_type(task_type: bytes32, min_bond: uint256, stake_per_unit: uint256):
    """
    @notice Creates a market. Its parameters are fixed for its lifetime so that a sink's
            cap cannot be changed under it.
    @dev Owner only.
    @param task_type Market id, e.g. keccak256("llm.cheap").
    @param min_bond Smallest bond a sink must keep while registered (token base units).
    @param stake_per_unit Bond per unit of declared capacity (token base units per task/epoch).
    """
    ownable._check_owner()
    assert task_type != empty(bytes32), "registry: zero task type"
    assert self.task_types[task_type].stake_per_unit == 0, "registry: task type exists"
    assert stake_per_unit > 0, "registry: zero stake per unit"
    assert min_bond >= stake_per_unit, "registry: min bond below one unit"
    assert min_bond <= token_io.MAX_AMOUNT, "registry: min bond too large"
    self.task_types[task_type] = TaskType(min_bond=min_bond, stake_per_unit=stake_per_unit)
    log TaskTypeCreated(task_type=task_type, min_bond=min_bond, stake_per_unit=stake_per_unit)


@external
def set_treasury(treasury: address):
    """
    @notice Sets the receiver of slashed bonds.
    @dev Owner only. Already-accrued slashes go to the new treasury when paid.
    @param treasury The new receiver.
    """
    ownable._check_owner()
    assert treasury != empty(address), "registry: zero treasury"
    self.treasury = treasury
    log TreasurySet(treasury=treasury)


@external
def pay_treasury() -> uint256:
    """
    @notice Sends accrued slashes to the treasury. Anyone may call.
    @return The amount sent.
    """
    amount: uint256 = self.treasury_accrued
    assert amount > 0, "registry: nothing accrued"
    self.treasury_accrued = 0
    token_io._push(self.treasury, amount)
    log TreasuryPaid(treasury=self.treasury, amount=amount)
    return amount


# ---------------------------------------------------------------- sinks


@external
def register_sink(task_type: bytes32, bond: uint256, capacity: uint256) -> uint256:
    """
    @notice Bonds `bond` tokens (pulled from the caller) and registers the caller as a sink.
    @dev The smoothed signal starts at 0 and steps toward the declaration from the next
         epoch on: a new identity earns its weight over ~1/alpha epochs.
    @param task_type The market.
    @param bond Bond to lock, >= the task type's min_bond.
    @param capacity Declared capacity (tasks per epoch); clamped to the bond's cap.
    @return The sink's slot index.
    """
    tt: TaskType = self.task_types[task_type]
    assert tt.stake_per_unit > 0, "registry: unknown task type"
    assert self._slot_plus_one[task_type][msg.sender] == 0, "registry: already registered"
    assert bond >= tt.min_bond, "registry: bond below minimum"
    slot: uint256 = self._free_slot(task_type)
    token_io._pull(msg.sender, bond)

    b: Bond = self.bonds[task_type][msg.sender]
    b.bonded += bond
    self.bonds[task_type][msg.sender] = b
    self.total_bonded += bond

    self._slot_plus_one[task_type][msg.sender] = slot + 1
    self.member_at[task_type][slot] = msg.sender
    self.occupied[task_type] |= (1 << slot)
    declared: uint256 = min(capacity, MAX_CAPACITY)
    cap: uint256 = min(b.bonded // tt.stake_per_unit, MAX_CAPACITY)
    st: CapState = CapState(s=0, declared=declared, cap=cap, e0=epoch_clock._epoch(), nonce=0, status=STATUS_ACTIVE)
    self._cap_state[task_type][slot] = self._pack(st)
    log SinkRegistered(task_type=task_type, sink=msg.sender, slot=slot, bond=bond, declared=declared)
    log CapacityDeclared(task_type=task_type, sink=msg.sender, declared=declared, nonce=0)
    return slot


@external
def deregister_sink(task_type: bytes32):
    """
    @notice Leaves the market: capacity drops to zero at once and the whole bond starts
            unbonding (still slashable until withdrawn).
    @dev The slot stays LEAVING until the pool settles it at its next rebalance; the pool
         gives a LEAVING slot no share of anything distributed after this call.
    @param task_type The market.
    """
    slot: uint256 = self._slot(task_type, msg.sender)
    self._slot_plus_one[task_type][msg.sender] = 0
    self._cap_state[task_type][slot] = self._pack(
        CapState(s=0, declared=0, cap=0, e0=epoch_clock._epoch(), nonce=0, status=STATUS_LEAVING)
    )
    b: Bond = self.bonds[task_type][msg.sender]
    b.unbonding += b.bonded
    b.bonded = 0
    b.release = block.timestamp + UNBONDING_PERIOD
    self.bonds[task_type][msg.sender] = b
    log SinkDeregistered(task_type=task_type, sink=msg.sender, slot=slot, unbonding=b.unbonding, release=b.release)


@external
def release_slot(task_type: bytes32, slot: uint256):
    """
    @notice Frees the slot of a sink that left, after the pool settled its balance.
    @dev Pool only.
    @param task_type The market.
    @param slot A LEAVING slot.
    """
    assert msg.sender == self.pool, "registry: caller is not the pool"
    word: uint256 = self._cap_state[task_type][slot]
    assert (word >> 224) & 255 == STATUS_LEAVING, "registry: slot not leaving"
    sink: address = self.member_at[task_type][slot]
    self._cap_state[task_type][slot] = 0
    self.member_at[task_type][slot] = empty(address)
    self.occupied[task_type] &= ~(1 << slot)
    log SlotReleased(task_type=task_type, slot=slot, sink=sink)


@external
def declare_capacity(task_type: bytes32, capacity: uint256):
    """
    @notice Declares the caller's capacity (tasks per epoch). Clamped to the bond's cap.
    @dev Takes effect in the smoothed signal from the next epoch on; several declarations
         in one epoch only replace each other, so the signal moves at most one EWMA step
         per epoch.
    @param task_type The market.
    @param capacity The new declared capacity.
    """
    slot: uint256 = self._slot(task_type, msg.sender)
    st: CapState = self._materialised(task_type, slot)
    st.declared = min(capacity, MAX_CAPACITY)
    self._cap_state[task_type][slot] = self._pack(st)
    log CapacityDeclared(task_type=task_type, sink=msg.sender, declared=st.declared, nonce=st.nonce)


@external
def submit_attestations(task_type: bytes32, attestations: DynArray[Attestation, MAX_ATTESTATIONS]) -> uint256:
    """
    @notice Relays EIP-712 CapacityAttestation(taskType, sink, capacity, nonce, deadline)
            signed by the sinks of one task type. Anyone may relay. Each entry is
            (head, r, vs): head = sink << 96 | capacity << 64 | nonce << 32 | deadline, the
            signature in EIP-2098 compact form (the only form accepted).
    @dev A bad entry (expired, unregistered sink, nonce not above the last accepted one,
         bad signature) is skipped with AttestationRejected; the batch never reverts for it.
         The accepted ones are logged together in one CapacitiesAttested. Works on the
         packed word directly: one cold read and one write per attestation besides the
         sink -> slot lookup.
    @param task_type The market every attestation in the batch is for (part of the signed data).
    @param attestations Up to 64 signed attestations.
    @return The number accepted.
    """
    now_epoch: uint256 = epoch_clock._epoch()
    # the domain separator once per batch (snekmate's _hash_typed_data_v4 re-derives it per call)
    domain: bytes32 = eip712._domain_separator_v4()
    accepted: DynArray[uint256, MAX_ATTESTATIONS] = []
    for a: Attestation in attestations:
        head: uint256 = a.head
        sink: address = convert(convert(head >> 96, uint160), address)
        nonce: uint256 = (head >> 32) & MASK32
        if head & MASK32 < block.timestamp:
            log AttestationRejected(task_type=task_type, sink=sink, nonce=nonce, reason=REJECT_EXPIRED)
            continue
        sp1: uint256 = self._slot_plus_one[task_type][sink]
        if sp1 == 0:
            log AttestationRejected(task_type=task_type, sink=sink, nonce=nonce, reason=REJECT_NOT_REGISTERED)
            continue
        slot: uint256 = unsafe_sub(sp1, 1)  # sp1 != 0
        word: uint256 = self._cap_state[task_type][slot]
        if nonce <= (word >> 192) & MASK32:
            log AttestationRejected(task_type=task_type, sink=sink, nonce=nonce, reason=REJECT_STALE_NONCE)
            continue
        capacity: uint256 = (head >> 64) & MASK32
        digest: bytes32 = keccak256(concat(
            x"1901", domain,
            keccak256(abi_encode(ATTESTATION_TYPEHASH, task_type, sink, capacity, nonce, head & MASK32)),
        ))
        # signatures._recover_compact's rule, inlined: an internal call per entry costs
        # ~120 gas (0.8% of an attestation); tests pin both copies to the same rule
        sig_s: uint256 = a.vs & signatures.S_MASK
        if (
            sig_s > ecdsa._MALLEABILITY_THRESHOLD or sig_s == 0 or a.r == 0
            or ecrecover(digest, unsafe_add(a.vs >> 255, 27), a.r, sig_s) != sink
        ):
            log AttestationRejected(task_type=task_type, sink=sink, nonce=nonce, reason=REJECT_BAD_SIGNATURE)
            continue
        # the signal up to now under the old target, read from the packed word as `capacities` does
        s: uint256 = word & MASK96
        e0: uint256 = (word >> 160) & MASK32
        if now_epoch > e0:
            target: uint256 = unsafe_mul(min((word >> 96) & MASK32, (word >> 128) & MASK32), WAD)  # < 2**92
            if s != target:
                s = ewma._step(s, target, ewma._decay(unsafe_sub(now_epoch, e0), DECAY_WAD))
        # keep cap (bits 128..159) and status (224..231); replace s, declared, e0, nonce
        self._cap_state[task_type][slot] = (
            s
            | (capacity << 96)
            | (word & (MASK32 << 128))
            | (now_epoch << 160)
            | (nonce << 192)
            | (word & (255 << 224))
        )
        accepted.append(head)
    if len(accepted) > 0:
        log CapacitiesAttested(task_type=task_type, heads=accepted)
    return len(accepted)


# ---------------------------------------------------------------- bonds


@external
def add_bond(task_type: bytes32, amount: uint256):
    """
    @notice Adds `amount` (pulled from the caller) to the caller's bond; raises its cap.
    @param task_type The market.
    @param amount Tokens to add.
    """
    slot: uint256 = self._slot(task_type, msg.sender)
    assert amount > 0, "registry: zero amount"
    token_io._pull(msg.sender, amount)
    b: Bond = self.bonds[task_type][msg.sender]
    b.bonded += amount
    self.bonds[task_type][msg.sender] = b
    self.total_bonded += amount
    self._set_cap(task_type, slot, b.bonded)
    log BondAdded(task_type=task_type, sink=msg.sender, amount=amount, bonded=b.bonded)


@external
def request_unbond(task_type: bytes32, amount: uint256):
    """
    @notice Starts unbonding `amount`. It stops counting toward the cap at once, stays
            slashable, and can be withdrawn after UNBONDING_PERIOD.
    @dev The remaining bond must stay >= min_bond; leave with deregister_sink instead.
         A new request restarts the clock for everything unbonding.
    @param task_type The market.
    @param amount Tokens to unbond.
    """
    slot: uint256 = self._slot(task_type, msg.sender)
    assert amount > 0, "registry: zero amount"
    b: Bond = self.bonds[task_type][msg.sender]
    assert amount <= b.bonded, "registry: amount exceeds bond"
    assert b.bonded - amount >= self.task_types[task_type].min_bond, "registry: bond below minimum"
    b.bonded -= amount
    b.unbonding += amount
    b.release = block.timestamp + UNBONDING_PERIOD
    self.bonds[task_type][msg.sender] = b
    self._set_cap(task_type, slot, b.bonded)
    log UnbondRequested(task_type=task_type, sink=msg.sender, amount=amount, unbonding=b.unbonding, release=b.release)


@external
def withdraw_unbonded(task_type: bytes32) -> uint256:
    """
    @notice Withdraws everything unbonding once its release time has passed.
    @param task_type The market.
    @return The amount sent to the caller.
    """
    b: Bond = self.bonds[task_type][msg.sender]
    assert b.unbonding > 0, "registry: nothing unbonding"
    assert block.timestamp >= b.release, "registry: still unbonding"
    amount: uint256 = b.unbonding
    b.unbonding = 0
    self.bonds[task_type][msg.sender] = b
    self.total_bonded -= amount
    token_io._push(msg.sender, amount)
    log UnbondWithdrawn(task_type=task_type, sink=msg.sender, amount=amount)
    return amount


@external
def slash(task_type: bytes32, sink: address, amount: uint256) -> uint256:
    """
    @notice Confiscates up to `amount` of a sink's bond for the treasury.
    @dev Tracker only. Takes from the unbonding part first (so unbonding cannot dodge a
         slash), then the active bond, whose cap shrinks at once.
    @param task_type The market.
    @param sink The sink.
    @param amount Requested amount.
    @return The amount actually taken (bounded by what is bonded).
    """
    assert msg.sender == self.tracker, "registry: caller is not the tracker"
    b: Bond = self.bonds[task_type][sink]
    from_unbonding: uint256 = min(amount, b.unbonding)
    from_bonded: uint256 = min(amount - from_unbonding, b.bonded)
    taken: uint256 = from_unbonding + from_bonded
    if taken > 0:
        b.unbonding -= from_unbonding
        b.bonded -= from_bonded
        self.bonds[task_type][sink] = b
        self.total_bonded -= taken
        self.treasury_accrued += taken
        sp1: uint256 = self._slot_plus_one[task_type][sink]
        if from_bonded > 0 and sp1 != 0:
            self._set_cap(task_type, unsafe_sub(sp1, 1), b.bonded)
    log Slashed(task_type=task_type, sink=sink, requested=amount, taken=taken)
    return taken


# ---------------------------------------------------------------- views


@external
@view
def task_exists(task_type: bytes32) -> bool:
    """
    @notice True if the owner created this task type.
    """
    return self.task_types[task_type].stake_per_unit > 0


@external
@view
def current_epoch() -> uint256:
    """
    @notice The protocol epoch number now.
    """
    return epoch_clock._epoch()


@external
@view
def slot_of(task_type: bytes32, sink: address) -> uint256:
    """
    @notice Slot index + 1 of a registered sink, 0 if it is not registered.
    """
    return self._slot_plus_one[task_type][sink]


@external
@view
def smoothed_capacity_wad(task_type: bytes32, sink: address) -> uint256:
    """
    @notice The sink's smoothed capacity this epoch, WAD-scaled (0 if not registered).
    """
    sp1: uint256 = self._slot_plus_one[task_type][sink]
    if sp1 == 0:
        return 0
    return self._advance(self._unpack(self._cap_state[task_type][unsafe_sub(sp1, 1)]), epoch_clock._epoch()).s


@external
@view
def smoothed_capacity(task_type: bytes32, sink: address) -> uint256:
    """
    @notice The sink's smoothed capacity this epoch in whole tasks, rounded to nearest.
    """
    sp1: uint256 = self._slot_plus_one[task_type][sink]
    if sp1 == 0:
        return 0
    s: uint256 = self._advance(self._unpack(self._cap_state[task_type][unsafe_sub(sp1, 1)]), epoch_clock._epoch()).s
    return (s + WAD // 2) // WAD


@external
@view
def capacity_state(task_type: bytes32, slot: uint256) -> CapState:
    """
    @notice The slot's capacity record as stored (s not advanced to the current epoch).
    """
    return self._unpack(self._cap_state[task_type][slot])


@external
@view
def capacities(task_type: bytes32) -> (uint256, uint256[MAX_SINKS]):
    """
    @notice The number of slots in use n and, per slot, the smoothed capacity this epoch
            (WAD, low 96 bits) with the slot status (0 free, 1 active, 2 leaving) in the
            top byte; entries from n on are 0. Read by the pool once per rebalance.
    @dev A fixed-size array: no length bookkeeping per entry (cheaper than a DynArray).
    """
    out: uint256[MAX_SINKS] = empty(uint256[MAX_SINKS])
    n: uint256 = self.slot_count[task_type]
    now_epoch: uint256 = epoch_clock._epoch()
    # (1 - alpha)^gap for the last gap seen: sinks that declared in the same epoch share it,
    # so a market whose sinks are quiet pays one exponentiation, not one per sink
    last_gap: uint256 = 0
    last_f: uint256 = WAD
    for i: uint256 in range(MAX_SINKS):
        if i == n:
            break
        word: uint256 = self._cap_state[task_type][i]
        status: uint256 = (word >> 224) & 255
        if status != STATUS_ACTIVE:
            out[i] = status << STATUS_SHIFT
            continue
        s: uint256 = word & MASK96
        e0: uint256 = (word >> 160) & MASK32
        if now_epoch > e0:
            target: uint256 = unsafe_mul(min((word >> 96) & MASK32, (word >> 128) & MASK32), WAD)  # < 2**92
            if s != target:
                gap: uint256 = unsafe_sub(now_epoch, e0)  # now_epoch > e0
                if gap != last_gap:
                    last_gap = gap
                    last_f = ewma._decay(gap, DECAY_WAD)
                s = ewma._step(s, target, last_f)
        out[i] = s | (STATUS_ACTIVE << STATUS_SHIFT)
    return n, out


@external
@view
def attestation_digest(task_type: bytes32, sink: address, capacity: uint32, nonce: uint32, deadline: uint32) -> bytes32:
    """
    @notice The EIP-712 digest a sink signs for a CapacityAttestation.
    """
    return eip712._hash_typed_data_v4(
        keccak256(abi_encode(ATTESTATION_TYPEHASH, task_type, sink, capacity, nonce, deadline))
    )


# ---------------------------------------------------------------- internal


@internal
@view
def _slot(task_type: bytes32, sink: address) -> uint256:
    sp1: uint256 = self._slot_plus_one[task_type][sink]
    assert sp1 != 0, "registry: not registered"
    return unsafe_sub(sp1, 1)


@internal
def _free_slot(task_type: bytes32) -> uint256:
    """
    @dev Lowest FREE slot (bounded scan of a 64-bit mask in memory), else a new one.
    """
    occ: uint256 = self.occupied[task_type]
    n: uint256 = self.slot_count[task_type]
    for i: uint256 in range(MAX_SINKS):
        if i == n:
            break
        if (occ >> i) & 1 == 0:
            return i
    assert n < MAX_SINKS, "registry: sink set full"
    self.slot_count[task_type] = n + 1
    return n


@internal
def _set_cap(task_type: bytes32, slot: uint256, bonded: uint256):
    """
    @dev Recomputes the cap after a bond change. The signal is materialised first (the old
         target applied up to now), then clamped to the new cap at once.
    """
    st: CapState = self._materialised(task_type, slot)
    st.cap = min(bonded // self.task_types[task_type].stake_per_unit, MAX_CAPACITY)
    st.s = min(st.s, st.cap * WAD)
    self._cap_state[task_type][slot] = self._pack(st)


@internal
@view
def _materialised(task_type: bytes32, slot: uint256) -> CapState:
    return self._advance(self._unpack(self._cap_state[task_type][slot]), epoch_clock._epoch())


@internal
@view
def _advance(st: CapState, now_epoch: uint256) -> CapState:
    """
    @dev Applies the EWMA steps of the epochs elapsed since e0 (see modules/ewma.vy).
    """
    out: CapState = st
    if now_epoch <= st.e0:
        return out
    out.s = ewma._advance(st.s, min(st.declared, st.cap) * WAD, now_epoch - st.e0, DECAY_WAD)
    out.e0 = now_epoch
    return out


@internal
@pure
def _unpack(word: uint256) -> CapState:
    return CapState(
        s=word & MASK96,
        declared=(word >> 96) & MASK32,
        cap=(word >> 128) & MASK32,
        e0=(word >> 160) & MASK32,
        nonce=(word >> 192) & MASK32,
        status=(word >> 224) & 255,
    )


@internal
@pure
def _pack(st: CapState) -> uint256:
    # every field is range-checked by construction: s <= cap * WAD < 2**92, declared and
    # cap <= MAX_CAPACITY, nonce <= MASK32 (checked on entry); e0 fits 32 bits for any
    # epoch length >= 1 s until the year 2106.
    assert st.e0 <= MASK32, "registry: epoch overflow"
    return (
        st.s
        | (st.declared << 96)
        | (st.cap << 128)
        | (st.e0 << 160)
        | (st.nonce << 192)
        | (st.status << 224)
    )
