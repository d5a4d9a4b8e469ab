# pragma version ~=0.4.3
# pragma nonreentrancy on
"""
@title CompletionTracker
@custom:contract-name CompletionTracker
@license AGPL-3.0-only
@notice Verifies dual-signed EIP-712 completion receipts
            Receipt(bytes32 taskType,address sink,address source,bytes32 taskId,
                    uint256 amount,bytes32 responseHash,uint256 nonce,uint256 deadline)
        signed by the sink (the provider) and by the source (the payer) over the same
        digest, relayed in batches by anyone, and credits the receipts' amounts as
        verified work in the BackpressurePool. It also owns the slashing policy: the pool
        reports a sink's relative, sustained shortfall at rebalance and this contract
        slashes `slash_bps` of it from the sink's bond.
@custom:security Replay protection is a per-source nonce bitmap keyed by the SIGNED
        source and nonce: nobody but the source can consume one of its nonces, so task ids
        cannot be squatted, and a receipt counts at most once. A receipt is skipped (never
        reverting the batch) when expired, zero, self-dealt (source == sink), replayed,
        badly signed (65 bytes, v in {27,28}, low s), for an unregistered sink, or when
        the source has not put at least that much money into the pool that it has not yet
        vouched for: a sink that pays itself through a second key must fund the pool with
        at least what it wants credited, so self-dealing cannot create free credit.
"""

from snekmate.auth import ownable
from snekmate.auth import ownable_2step
from snekmate.utils import eip712_domain_separator as eip712

from modules import signatures
from interfaces import ICapacityRegistry
from interfaces import IBackpressurePool

initializes: ownable
initializes: ownable_2step[ownable := ownable]
initializes: eip712

exports: (
    ownable_2step.owner,
    ownable_2step.pending_owner,
    ownable_2step.transfer_ownership,
    ownable_2step.accept_ownership,
    eip712.eip712Domain,
)

MAX_BATCH: public(constant(uint256)) = 64
BPS: constant(uint256) = 10_000

RECEIPT_TYPEHASH: public(constant(bytes32)) = keccak256(
    "Receipt(bytes32 taskType,address sink,address source,bytes32 taskId,uint256 amount,bytes32 responseHash,uint256 nonce,uint256 deadline)"
)

# Reasons a receipt is skipped (ReceiptRejected.reason)
REJECT_ZERO_AMOUNT: constant(uint8) = 1
REJECT_EXPIRED: constant(uint8) = 2
REJECT_SELF_DEALING: constant(uint8) = 3
REJECT_REPLAYED: constant(uint8) = 4
REJECT_BAD_SINK_SIG: constant(uint8) = 5
REJECT_BAD_SOURCE_SIG: constant(uint8) = 6
REJECT_SINK_NOT_REGISTERED: constant(uint8) = 7
REJECT_NOT_FUNDED: constant(uint8) = 8

REGISTRY: public(immutable(ICapacityRegistry))
POOL: public(immutable(IBackpressurePool))

struct Receipt:
    sink: address
    source: address
    task_id: bytes32
    amount: uint256
    response_hash: bytes32
    nonce: uint256
    deadline: uint256
    sink_sig: Bytes[65]
    source_sig: Bytes[65]

# source -> nonce >> 8 -> bitmap of used nonces
nonce_bitmap: public(HashMap[address, HashMap[uint256, uint256]])
slash_bps: public(uint256)
slash_threshold_bps: public(uint256)
total_verified: public(HashMap[bytes32, uint256])

event ReceiptRecorded:
    task_type: indexed(bytes32)
    sink: indexed(address)
    source: indexed(address)
    nonce: uint256
    task_id: bytes32
    amount: uint256

event ReceiptRejected:
    task_type: indexed(bytes32)
    source: indexed(address)
    nonce: uint256
    reason: uint8

event SlashParamsSet:
    slash_bps: uint256
    slash_threshold_bps: uint256

event ShortfallSlashed:
    task_type: indexed(bytes32)
    sink: indexed(address)
    shortfall: uint256
    requested: uint256
    taken: uint256


@deploy
def __init__(registry: ICapacityRegistry, pool: IBackpressurePool, slash_bps: uint256, slash_threshold_bps: uint256):
    """
    @param registry The CapacityRegistry (sink lookups, slashing).
    @param pool The BackpressurePool (verified credit, funding checks).
    @param slash_bps Share of a reported shortfall taken from the bond (BPS of money).
    @param slash_threshold_bps Backlog, in BPS of one full-capacity epoch, below which a
           shortfall is never slashed (receipts in flight are not under-delivery).
    """
    ownable.__init__()
    ownable_2step.__init__()
    eip712.__init__("Pura CompletionTracker", "1")
    REGISTRY = registry
    POOL = pool
    self._set_slash_params(slash_bps, slash_threshold_bps)


@external
def set_slash_params(slash_bps: uint256, slash_threshold_bps: uint256):
    """
    @notice Sets the slashing policy.
    @dev Owner only. Cannot slash anyone by itself: slashes follow only from the pool's
         rebalance.
    """
    ownable._check_owner()
    self._set_slash_params(slash_bps, slash_threshold_bps)


@external
def submit_receipts(task_type: bytes32, receipts: DynArray[Receipt, MAX_BATCH]) -> uint256:
    """
    @notice Verifies and records a batch of dual-signed receipts for one task type. Anyone
            may relay. Bad entries are skipped with ReceiptRejected(reason).
    @param task_type The market every receipt in the batch is for (part of the signed data).
    @param receipts Up to 64 receipts.
    @return The number of receipts recorded.
    """
    sinks: DynArray[address, MAX_BATCH] = []
    sink_slots: DynArray[uint256, MAX_BATCH] = []
    sink_amounts: DynArray[uint256, MAX_BATCH] = []
    sources: DynArray[address, MAX_BATCH] = []
    source_room: DynArray[uint256, MAX_BATCH] = []
    source_amounts: DynArray[uint256, MAX_BATCH] = []
    accepted: uint256 = 0
    total: uint256 = 0
    for r: Receipt in receipts:
        if r.amount == 0:
            log ReceiptRejected(task_type=task_type, source=r.source, nonce=r.nonce, reason=REJECT_ZERO_AMOUNT)
            continue
        if r.deadline < block.timestamp:
            log ReceiptRejected(task_type=task_type, source=r.source, nonce=r.nonce, reason=REJECT_EXPIRED)
            continue
        if r.sink == r.source:
            log ReceiptRejected(task_type=task_type, source=r.source, nonce=r.nonce, reason=REJECT_SELF_DEALING)
            continue
        word_index: uint256 = r.nonce >> 8
        bit: uint256 = 1 << (r.nonce & 255)
        bitmap: uint256 = self.nonce_bitmap[r.source][word_index]
        if bitmap & bit != 0:
            log ReceiptRejected(task_type=task_type, source=r.source, nonce=r.nonce, reason=REJECT_REPLAYED)
            continue
        digest: bytes32 = eip712._hash_typed_data_v4(keccak256(abi_encode(
            RECEIPT_TYPEHASH, task_type, r.sink, r.source, r.task_id, r.amount, r.response_hash, r.nonce, r.deadline
        )))
        if signatures._recover(digest, r.sink_sig) != r.sink:
            log ReceiptRejected(task_type=task_type, source=r.source, nonce=r.nonce, reason=REJECT_BAD_SINK_SIG)
            continue
        if signatures._recover(digest, r.source_sig) != r.source:
            log ReceiptRejected(task_type=task_type, source=r.source, nonce=r.nonce, reason=REJECT_BAD_SOURCE_SIG)
            continue

        # sink: registered? (one registry read per distinct sink per batch)
        k: uint256 = max_value(uint256)
        for i: uint256 in range(MAX_BATCH):
            if i == len(sinks):
                break
            if sinks[i] == r.sink:
                k = i
                break
        if k == max_value(uint256):
            sp1: uint256 = staticcall REGISTRY.slot_of(task_type, r.sink)
            if sp1 == 0:
                log ReceiptRejected(task_type=task_type, source=r.source, nonce=r.nonce, reason=REJECT_SINK_NOT_REGISTERED)
                continue
            k = len(sinks)
            sinks.append(r.sink)
            sink_slots.append(unsafe_sub(sp1, 1))
            sink_amounts.append(0)

        # source: enough money in the pot it has not vouched for yet?
        m: uint256 = max_value(uint256)
        for i: uint256 in range(MAX_BATCH):
            if i == len(sources):
                break
            if sources[i] == r.source:
                m = i
                break
        if m == max_value(uint256):
            m = len(sources)
            sources.append(r.source)
            source_room.append(staticcall POOL.funder_room(task_type, r.source))
            source_amounts.append(0)
        if r.amount > source_room[m]:
            log ReceiptRejected(task_type=task_type, source=r.source, nonce=r.nonce, reason=REJECT_NOT_FUNDED)
            continue

        source_room[m] = unsafe_sub(source_room[m], r.amount)  # checked just above
        source_amounts[m] += r.amount
        sink_amounts[k] += r.amount
        self.nonce_bitmap[r.source][word_index] = bitmap | bit
        total += r.amount
        accepted = unsafe_add(accepted, 1)  # <= 64
        log ReceiptRecorded(task_type=task_type, sink=r.sink, source=r.source, nonce=r.nonce, task_id=r.task_id, amount=r.amount)

    if accepted > 0:
        # drop sinks that only appeared in rejected entries
        slots: DynArray[uint256, MAX_BATCH] = []
        amounts: DynArray[uint256, MAX_BATCH] = []
        for i: uint256 in range(MAX_BATCH):
            if i == len(sinks):
                break
            if sink_amounts[i] > 0:
                slots.append(sink_slots[i])
                amounts.append(sink_amounts[i])
        extcall POOL.credit(task_type, slots, amounts, sources, source_amounts)
        self.total_verified[task_type] += total
    return accepted


@external
def report_shortfall(task_type: bytes32, sink: address, shortfall: uint256) -> uint256:
    """
    @notice Slashes `slash_bps` of a reported shortfall (money paid to the sink and not
            verified, beyond the absolute and relative thresholds) from the sink's bond.
    @dev Pool only (from rebalance). The pool reports each unit of shortfall once.
    @return The amount actually slashed.
    """
    assert msg.sender == POOL.address, "tracker: caller is not the pool"
    requested: uint256 = shortfall * self.slash_bps // BPS
    taken: uint256 = 0
    if requested > 0:
        taken = extcall REGISTRY.slash(task_type, sink, requested)
    log ShortfallSlashed(task_type=task_type, sink=sink, shortfall=shortfall, requested=requested, taken=taken)
    return taken


@external
@view
def nonce_used(source: address, nonce: uint256) -> bool:
    """
    @notice True once a receipt with this source and nonce has been recorded.
    """
    return self.nonce_bitmap[source][nonce >> 8] & (1 << (nonce & 255)) != 0


@external
@view
def receipt_digest(
    task_type: bytes32,
    sink: address,
    source: address,
    task_id: bytes32,
    amount: uint256,
    response_hash: bytes32,
    nonce: uint256,
    deadline: uint256,
) -> bytes32:
    """
    @notice The EIP-712 digest both parties sign.
    """
    return eip712._hash_typed_data_v4(keccak256(abi_encode(
        RECEIPT_TYPEHASH, task_type, sink, source, task_id, amount, response_hash, nonce, deadline
    )))


@internal
def _set_slash_params(slash_bps: uint256, slash_threshold_bps: uint256):
    assert slash_bps <= BPS, "tracker: slash above 100%"
    assert slash_threshold_bps >= 5_000 and slash_threshold_bps <= 100_000, "tracker: threshold out of range"
    self.slash_bps = slash_bps
    self.slash_threshold_bps = slash_threshold_bps
    log SlashParamsSet(slash_bps=slash_bps, slash_threshold_bps=slash_threshold_bps)
