# pragma version ~=0.4.3
# pragma nonreentrancy on
"""
@title CapacityRegistry
@custom:contract-name CapacityRegistry
@license AGPL-3.0-only
@notice Task types, sink registrations, bonds and the capacity targets.
        A sink bonds settlement tokens per task type; its declared capacity (tasks per
        epoch) is capped LINEARLY by its bond: cap = bonded // stake_per_unit, so
        splitting one bond across identities gains nothing. The target min(declared, cap)
        is published per slot, seven to a storage word, for the BackpressurePool, which
        smooths it (EWMA, alpha = ALPHA_WAD set here, one step per elapsed epoch) in the
        sink's own pool word: the one word a rebalance touches per sink anyway.
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
from modules import signatures
from interfaces import IBackpressurePool

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

# Per (task type, sink) word, the one an attestation reads and writes:
#   bits   0..7    slot + 1 (0: not a member; a LEAVING sink is no longer a member)
#   bits   8..39   declared  what the sink last declared (tasks per epoch, <= MAX_CAPACITY)
#   bits  40..71   cap       bonded // stake_per_unit, clamped to MAX_CAPACITY
#   bits  72..103  nonce     last accepted attestation nonce; kept when the sink leaves, so
#                            its old attestations cannot be replayed after it re-registers
#   bits 104..167  cut       epoch + 1 of the last lowering of the cap, until a later
#                            rebalance has applied it (0: none pending)
# Per slot entry of the published targets, 36 bits, seven to a word (slot // 7, at
# (slot % 7) * 36): the rebalance reads 10 words for 64 sinks instead of 64.
#   bits   0..31   target    min(declared, cap); 0 unless ACTIVE
#   bits  32..33   status    FREE / ACTIVE / LEAVING
#   bit       34   hard      the target is also a ceiling for the pool's smoothed signal:
#                            set while the cap binds (cap <= declared) or a lowered cap has
#                            not yet been applied by a rebalance. The pool steps its signal
#                            by one EWMA step per epoch either way and, when hard, clamps it
#                            to the target, so it never stays above the bond's cap.
MASK32: constant(uint256) = 2**32 - 1
MASK36: constant(uint256) = 2**36 - 1
MASK64: constant(uint256) = 2**64 - 1
SLOT_MASK: constant(uint256) = 255
PER_WORD: constant(uint256) = 7
TARGET_WORDS: constant(uint256) = 10  # ceil(MAX_SINKS / PER_WORD)
HARD_BIT: constant(uint256) = 2**34
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

struct SinkState:
    slot_plus_one: uint256
    declared: uint256
    cap: uint256
    nonce: uint256
    cut_epoch_p1: uint256

struct Target:
    target: uint256
    status: uint256
    hard: bool

task_types: public(HashMap[bytes32, TaskType])
# the sink word (layout above)
_sink: HashMap[bytes32, HashMap[address, uint256]]
# occupant of each slot (ACTIVE or LEAVING); empty when FREE
member_at: public(HashMap[bytes32, address[MAX_SINKS]])
# high-water mark of slots ever used, the loop bound for `capacities`
slot_count: public(HashMap[bytes32, uint256])
# bit i set while slot i is not FREE
occupied: public(HashMap[bytes32, uint256])
# published targets (layout above); a fixed array costs one hash per access, a nested map two
_targets: HashMap[bytes32, uint256[TARGET_WORDS]]
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
    @dev The pool's smoothed signal starts at 0 and steps toward the declaration from the
         next rebalance on: a new identity earns its weight over ~1/alpha epochs.
    @param task_type The market.
    @param bond Bond to lock, >= the task type's min_bond.
    @param capacity Declared capacity (tasks per epoch); clamped to the bond's cap.
    @return The sink's slot index.
    """
    tt: TaskType = self.task_types[task_type]
    assert tt.stake_per_unit > 0, "registry: unknown task type"
    word: uint256 = self._sink[task_type][msg.sender]
    assert word & SLOT_MASK == 0, "registry: already registered"
    assert bond >= tt.min_bond, "registry: bond below minimum"
    slot: uint256 = self._free_slot(task_type)
    token_io._pull(msg.sender, bond)

    b: Bond = self.bonds[task_type][msg.sender]
    b.bonded += bond
    self.bonds[task_type][msg.sender] = b
    self.total_bonded += bond

    self.member_at[task_type][slot] = msg.sender
    self.occupied[task_type] |= (1 << slot)
    declared: uint256 = min(capacity, MAX_CAPACITY)
    cap: uint256 = min(b.bonded // tt.stake_per_unit, MAX_CAPACITY)
    # the nonce survives an earlier membership (see the layout)
    nonce: uint256 = (word >> 72) & MASK32
    self._sink[task_type][msg.sender] = self._pack_sink(slot + 1, declared, cap, nonce)
    self._publish(task_type, slot, declared, cap, STATUS_ACTIVE, cap <= declared)
    log SinkRegistered(task_type=task_type, sink=msg.sender, slot=slot, bond=bond, declared=declared)
    log CapacityDeclared(task_type=task_type, sink=msg.sender, declared=declared, nonce=nonce)
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
    word: uint256 = self._sink[task_type][msg.sender]
    slot: uint256 = self._slot_in(word)
    # keep only the nonce
    self._sink[task_type][msg.sender] = word & (MASK32 << 72)
    self._publish(task_type, slot, 0, 0, STATUS_LEAVING, False)
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
    assert self._target(task_type, slot).status == STATUS_LEAVING, "registry: slot not leaving"
    sink: address = self.member_at[task_type][slot]
    self._publish(task_type, slot, 0, 0, STATUS_FREE, False)
    self.member_at[task_type][slot] = empty(address)
    self.occupied[task_type] &= ~(1 << slot)
    log SlotReleased(task_type=task_type, slot=slot, sink=sink)


@external
def declare_capacity(task_type: bytes32, capacity: uint256):
    """
    @notice Declares the caller's capacity (tasks per epoch). Clamped to the bond's cap.
    @dev The pool's smoothed signal steps toward it at the next rebalance; several
         declarations in one epoch only replace each other, so the signal moves at most one
         EWMA step per epoch.
    @param task_type The market.
    @param capacity The new declared capacity.
    """
    word: uint256 = self._declare(task_type, self._sink[task_type][msg.sender], min(capacity, MAX_CAPACITY), True)
    self._sink[task_type][msg.sender] = word
    declared: uint256 = (word >> 8) & MASK32
    log CapacityDeclared(task_type=task_type, sink=msg.sender, declared=declared, nonce=(word >> 72) & MASK32)


@external
def submit_attestations(task_type: bytes32, attestations: DynArray[Attestation, MAX_ATTESTATIONS]) -> uint256:
    """
    @notice Relays EIP-712 CapacityAttestation(taskType, sink, capacity, nonce, deadline)
            signed by the sinks of one task type. Anyone may relay. Each entry is
            (head, r, vs): head = sink << 96 | capacity << 64 | nonce << 32 | deadline, the
            signature in EIP-2098 compact form (the only form accepted).
    @dev A bad entry (expired, unregistered sink, nonce not above the last accepted one,
         bad signature) is skipped with AttestationRejected; the batch never reverts for it.
         The accepted ones are logged together in one CapacitiesAttested. Per attestation:
         the sink word (one cold read, one write) and its slot's entry in the published
         targets (a word shared by seven slots).
    @param task_type The market every attestation in the batch is for (part of the signed data).
    @param attestations Up to 64 signed attestations.
    @return The number accepted.
    """
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
        word: uint256 = self._sink[task_type][sink]
        if word & SLOT_MASK == 0:
            log AttestationRejected(task_type=task_type, sink=sink, nonce=nonce, reason=REJECT_NOT_REGISTERED)
            continue
        if nonce <= (word >> 72) & MASK32:
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
        # the new nonce (< 2**32: read from a 32-bit field), then the declaration
        word = (word & ~(MASK32 << 72)) | (nonce << 72)
        self._sink[task_type][sink] = self._declare(task_type, word, capacity, True)
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
    self._slot(task_type, msg.sender)
    assert amount > 0, "registry: zero amount"
    token_io._pull(msg.sender, amount)
    b: Bond = self.bonds[task_type][msg.sender]
    b.bonded += amount
    self.bonds[task_type][msg.sender] = b
    self.total_bonded += amount
    self._set_cap(task_type, msg.sender, b.bonded)
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
    self._slot(task_type, msg.sender)
    assert amount > 0, "registry: zero amount"
    b: Bond = self.bonds[task_type][msg.sender]
    assert amount <= b.bonded, "registry: amount exceeds bond"
    assert b.bonded - amount >= self.task_types[task_type].min_bond, "registry: bond below minimum"
    b.bonded -= amount
    b.unbonding += amount
    b.release = block.timestamp + UNBONDING_PERIOD
    self.bonds[task_type][msg.sender] = b
    self._set_cap(task_type, msg.sender, b.bonded)
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
        if from_bonded > 0 and self._sink[task_type][sink] & SLOT_MASK != 0:
            self._set_cap(task_type, sink, b.bonded)
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
    return self._sink[task_type][sink] & SLOT_MASK


@external
@view
def sink_state(task_type: bytes32, sink: address) -> SinkState:
    """
    @notice A sink's record: slot + 1 (0 if not a member), declared capacity, cap (bond //
            stake_per_unit, at most MAX_CAPACITY), the last accepted attestation nonce, and
            the epoch + 1 of a lowered cap not yet known to be applied (0: none). The
            smoothed capacity lives in the pool (BackpressurePool.position).
    """
    word: uint256 = self._sink[task_type][sink]
    return SinkState(
        slot_plus_one=word & SLOT_MASK,
        declared=(word >> 8) & MASK32,
        cap=(word >> 40) & MASK32,
        nonce=(word >> 72) & MASK32,
        cut_epoch_p1=(word >> 104) & MASK64,
    )


@external
@view
def target_of(task_type: bytes32, slot: uint256) -> Target:
    """
    @notice A slot's published entry: target min(declared, cap), status (0 free, 1 active,
            2 leaving), and whether the target is also a ceiling for the pool's signal.
    """
    assert slot < MAX_SINKS, "registry: slot out of range"
    return self._target(task_type, slot)


@external
@view
def capacities(task_type: bytes32) -> (uint256, uint256[MAX_SINKS]):
    """
    @notice The number of slots in use n and, per slot, its published entry as the pool
            reads it: target (tasks per epoch, bits 0..31), hard (bit 32), and status (0 free,
            1 active, 2 leaving) in the top byte; entries from n on are 0. Read by the pool
            once per rebalance: ten storage words for 64 sinks.
    @dev A fixed-size array: no length bookkeeping per entry (cheaper than a DynArray).
    """
    out: uint256[MAX_SINKS] = empty(uint256[MAX_SINKS])
    n: uint256 = self.slot_count[task_type]
    word: uint256 = 0
    k: uint256 = 0
    sh: uint256 = PER_WORD * 36  # forces a read at i = 0
    for i: uint256 in range(MAX_SINKS):
        if i == n:
            break
        if sh == PER_WORD * 36:
            word = self._targets[task_type][k]
            k = unsafe_add(k, 1)  # <= TARGET_WORDS: i < 64 = 7 * 9 + 1
            sh = 0
        e: uint256 = (word >> sh) & MASK36
        out[i] = (e & MASK32) | ((e >> 34) << 32) | (((e >> 32) & 3) << STATUS_SHIFT)
        sh = unsafe_add(sh, 36)
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
    return self._slot_in(self._sink[task_type][sink])


@internal
@pure
def _slot_in(word: uint256) -> uint256:
    sp1: uint256 = word & SLOT_MASK
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
def _set_cap(task_type: bytes32, sink: address, bonded: uint256):
    """
    @dev Recomputes a member's cap after a bond change and republishes its target. A lower
         cap is recorded (cut) and published hard: the pool's signal may sit above the new
         cap, so the next rebalance clamps it there; the mark lasts until a later rebalance.
    """
    word: uint256 = self._sink[task_type][sink]
    old_cap: uint256 = (word >> 40) & MASK32
    cap: uint256 = min(bonded // self.task_types[task_type].stake_per_unit, MAX_CAPACITY)
    word = (word & ~(MASK32 << 40)) | (cap << 40)
    if cap < old_cap:
        word = (word & ~(MASK64 << 104)) | ((epoch_clock._epoch() + 1) << 104)
    # a slash lands here in the middle of the pool's rebalance, whose views are locked
    # then: never ask the pool from this path (a pending cut just stays pending)
    self._sink[task_type][sink] = self._declare(task_type, word, (word >> 8) & MASK32, False)


@internal
def _declare(task_type: bytes32, word_in: uint256, declared: uint256, may_clear: bool) -> uint256:
    """
    @dev Sets `declared` in a member's word, publishes its target, and returns the word.
         The target is hard while the cap binds or a lowered cap is pending: lowered in an
         epoch no rebalance has started after (a rebalance in the same epoch may have run
         before the lowering, so only a later one counts). With `may_clear`, an applied cut
         is cleared (asking the pool for its last rebalance epoch).
    """
    word: uint256 = (word_in & ~(MASK32 << 8)) | (declared << 8)
    cap: uint256 = (word >> 40) & MASK32
    hard: bool = cap <= declared
    cut: uint256 = (word >> 104) & MASK64
    if cut != 0:
        applied: bool = False
        if may_clear and self.pool != empty(address):
            applied = staticcall IBackpressurePool(self.pool).last_epoch_p1(task_type) > cut
        if applied:
            word &= ~(MASK64 << 104)
        else:
            hard = True
    self._publish(task_type, self._slot_in(word), declared, cap, STATUS_ACTIVE, hard)
    return word


@internal
def _publish(task_type: bytes32, slot: uint256, declared: uint256, cap: uint256, status: uint256, hard: bool):
    """
    @dev Writes the slot's entry in the published targets (declared, cap <= MAX_CAPACITY;
         slot < MAX_SINKS, so the word index is < TARGET_WORDS).
    """
    e: uint256 = min(declared, cap) | (status << 32)
    if hard:
        e |= HARD_BIT
    k: uint256 = unsafe_div(slot, PER_WORD)
    sh: uint256 = unsafe_mul(unsafe_sub(slot, unsafe_mul(k, PER_WORD)), 36)
    self._targets[task_type][k] = (self._targets[task_type][k] & ~(MASK36 << sh)) | (e << sh)


@internal
@view
def _target(task_type: bytes32, slot: uint256) -> Target:
    k: uint256 = slot // PER_WORD
    e: uint256 = (self._targets[task_type][k] >> ((slot % PER_WORD) * 36)) & MASK36
    return Target(target=e & MASK32, status=(e >> 32) & 3, hard=e & HARD_BIT != 0)


@internal
@pure
def _pack_sink(slot_plus_one: uint256, declared: uint256, cap: uint256, nonce: uint256) -> uint256:
    # slot_plus_one <= MAX_SINKS, declared and cap <= MAX_CAPACITY, nonce < 2**32 (a 32-bit field)
    return slot_plus_one | (declared << 8) | (cap << 40) | (nonce << 72)
