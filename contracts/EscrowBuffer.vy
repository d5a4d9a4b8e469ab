# pragma version ~=0.4.3
# pragma nonreentrancy on
"""
@title EscrowBuffer
@custom:contract-name EscrowBuffer
@license AGPL-3.0-only
@notice Holds, per task type, money that the sinks could not absorb: the pool's overflow
        and direct deposits by funders. Each amount is an entry of a FIFO queue credited to
        the funder whose money it is. The pool releases entries head-first into its pot,
        at most the spare capacity of the last epoch. A funder withdraws any undrained
        entry of its own at any time. A per task type maximum level gives back-pressure:
        direct deposits beyond it revert with "escrow: full"; the pool leaves overflow
        beyond it in the funder's stream.
@custom:security Conservation: token.balanceOf(escrow) == total_held == sum of levels ==
        sum of live entries. Withdrawals are pull payments to the entry's own funder, so a
        funder whose transfers revert blocks nobody else. Only the wired pool may credit
        overflow or release entries; the owner only sets maximum levels and the minimum
        direct deposit.
"""

from ethereum.ercs import IERC20
from snekmate.auth import ownable
from snekmate.auth import ownable_2step

from modules import token_io
from interfaces import ICapacityRegistry

initializes: ownable
initializes: ownable_2step[ownable := ownable]
initializes: token_io

exports: (
    ownable_2step.owner,
    ownable_2step.pending_owner,
    ownable_2step.transfer_ownership,
    ownable_2step.accept_ownership,
    token_io.TOKEN,
)

WAD: constant(uint256) = 10**18
MAX_RELEASE: public(constant(uint256)) = 32
MAX_WITHDRAW: constant(uint256) = 32
MASK96: constant(uint256) = 2**96 - 1

REGISTRY: public(immutable(ICapacityRegistry))

struct Queue:
    head: uint256
    tail: uint256
    level: uint256
    max_level: uint256

queues: public(HashMap[bytes32, Queue])
# entry word: funder (bits 0..159) | amount (bits 160..255)
_entries: HashMap[bytes32, HashMap[uint256, uint256]]
balance_of: public(HashMap[bytes32, HashMap[address, uint256]])
total_held: public(uint256)
min_deposit: public(uint256)
pool: public(address)

event Wired:
    pool: address

event MaxLevelSet:
    task_type: indexed(bytes32)
    max_level: uint256

event MinDepositSet:
    min_deposit: uint256

event EscrowCredited:
    task_type: indexed(bytes32)
    funder: indexed(address)
    entry: uint256
    amount: uint256
    level: uint256

event EscrowReleased:
    task_type: indexed(bytes32)
    funder: indexed(address)
    entry: uint256
    amount: uint256
    level: uint256

event EscrowWithdrawn:
    task_type: indexed(bytes32)
    funder: indexed(address)
    entry: uint256
    amount: uint256
    level: uint256


@deploy
def __init__(registry: ICapacityRegistry, min_deposit: uint256):
    """
    @param registry The CapacityRegistry (settlement token and task types come from it).
    @param min_deposit Smallest direct deposit (keeps the queue free of dust entries).
    """
    ownable.__init__()
    ownable_2step.__init__()
    token_io.__init__(IERC20(staticcall registry.TOKEN()))
    REGISTRY = registry
    assert min_deposit > 0, "escrow: zero min deposit"
    self.min_deposit = min_deposit
    log MinDepositSet(min_deposit=min_deposit)


@external
def wire(pool: address):
    """
    @notice Sets, once, the pool allowed to credit overflow and release entries.
    @dev Owner only.
    """
    ownable._check_owner()
    assert self.pool == empty(address), "escrow: already wired"
    assert pool != empty(address), "escrow: zero address"
    self.pool = pool
    log Wired(pool=pool)


@external
def set_max_level(task_type: bytes32, max_level: uint256):
    """
    @notice Sets a task type's maximum escrow level (0 disables escrow for it: overflow
            then stays in the funders' streams). Lowering it below the current level only
            stops new money; queued entries stay withdrawable and drainable.
    @dev Owner only.
    """
    ownable._check_owner()
    assert staticcall REGISTRY.task_exists(task_type), "escrow: unknown task type"
    assert max_level <= MASK96, "escrow: max level too large"
    self.queues[task_type].max_level = max_level
    log MaxLevelSet(task_type=task_type, max_level=max_level)


@external
def set_min_deposit(min_deposit: uint256):
    """
    @notice Sets the smallest direct deposit.
    @dev Owner only.
    """
    ownable._check_owner()
    assert min_deposit > 0, "escrow: zero min deposit"
    self.min_deposit = min_deposit
    log MinDepositSet(min_deposit=min_deposit)


@external
def deposit(task_type: bytes32, amount: uint256) -> uint256:
    """
    @notice Queues `amount` (pulled from the caller) for the task type's pool; it drains in
            FIFO order as capacity frees and stays withdrawable until then.
    @param task_type The market.
    @param amount Tokens to queue, >= min_deposit.
    @return The entry id.
    """
    assert amount >= self.min_deposit, "escrow: below min deposit"
    q: Queue = self.queues[task_type]
    assert q.level + amount <= q.max_level, "escrow: full"
    token_io._pull(msg.sender, amount)
    self.total_held += amount
    return self._append(task_type, msg.sender, amount)


@external
def credit_overflow(task_type: bytes32, funders: DynArray[address, 16], amounts: DynArray[uint256, 16]):
    """
    @notice Credits overflow the pool has already transferred here, one entry per funder.
    @dev Pool only. The amounts must fit the room and must have arrived.
    """
    assert msg.sender == self.pool, "escrow: caller is not the pool"
    assert len(funders) == len(amounts), "escrow: length mismatch"
    total: uint256 = 0
    for a: uint256 in amounts:
        total += a
    held: uint256 = self.total_held + total
    assert token_io._balance() >= held, "escrow: overflow not received"
    assert self.queues[task_type].level + total <= self.queues[task_type].max_level, "escrow: full"
    self.total_held = held
    for k: uint256 in range(16):
        if k == len(funders):
            break
        if amounts[k] > 0:
            self._append(task_type, funders[k], amounts[k])


@external
def release(task_type: bytes32, max_amount: uint256) -> (DynArray[address, MAX_RELEASE], DynArray[uint256, MAX_RELEASE]):
    """
    @notice Sends up to `max_amount` to the pool, oldest entries first (at most 32 entries
            per call), and reports whose money it was.
    @dev Pool only.
    @return (funders, amounts) released, in queue order.
    """
    assert msg.sender == self.pool, "escrow: caller is not the pool"
    q: Queue = self.queues[task_type]
    funders: DynArray[address, MAX_RELEASE] = []
    amounts: DynArray[uint256, MAX_RELEASE] = []
    left: uint256 = max_amount
    total: uint256 = 0
    for _: uint256 in range(MAX_RELEASE):
        if q.head == q.tail or left == 0:
            break
        word: uint256 = self._entries[task_type][q.head]
        amount: uint256 = word >> 160
        if amount == 0:
            q.head += 1
            continue
        funder: address = convert(convert(word & (2**160 - 1), uint160), address)
        take: uint256 = min(amount, left)
        left -= take
        total += take
        amount -= take
        self._entries[task_type][q.head] = (word & (2**160 - 1)) | (amount << 160)
        self.balance_of[task_type][funder] -= take
        funders.append(funder)
        amounts.append(take)
        q.level -= take
        log EscrowReleased(task_type=task_type, funder=funder, entry=q.head, amount=take, level=q.level)
        if amount == 0:
            q.head += 1
    self.queues[task_type] = q
    if total > 0:
        self.total_held -= total
        token_io._push(msg.sender, total)
    return funders, amounts


@external
def withdraw(task_type: bytes32, ids: DynArray[uint256, MAX_WITHDRAW]) -> uint256:
    """
    @notice Withdraws the caller's own undrained entries.
    @param task_type The market.
    @param ids Entry ids (from EscrowCredited events or `entry`).
    @return The amount sent to the caller.
    """
    total: uint256 = 0
    for i: uint256 in ids:
        word: uint256 = self._entries[task_type][i]
        assert convert(convert(word & (2**160 - 1), uint160), address) == msg.sender, "escrow: not your entry"
        amount: uint256 = word >> 160
        assert amount > 0, "escrow: entry empty"
        self._entries[task_type][i] = word & (2**160 - 1)
        total += amount
        self.queues[task_type].level -= amount
        log EscrowWithdrawn(task_type=task_type, funder=msg.sender, entry=i, amount=amount, level=self.queues[task_type].level)
    assert total > 0, "escrow: nothing to withdraw"
    self.balance_of[task_type][msg.sender] -= total
    self.total_held -= total
    token_io._push(msg.sender, total)
    return total


@external
@view
def level(task_type: bytes32) -> uint256:
    """
    @notice Money queued for the task type.
    """
    return self.queues[task_type].level


@external
@view
def room(task_type: bytes32) -> uint256:
    """
    @notice How much more the queue accepts before it is full.
    """
    q: Queue = self.queues[task_type]
    if q.level >= q.max_level:
        return 0
    return q.max_level - q.level


@external
@view
def pressure_wad(task_type: bytes32) -> uint256:
    """
    @notice level / max_level in WAD (0 when escrow is disabled); read by the PricingCurve.
    """
    q: Queue = self.queues[task_type]
    if q.max_level == 0:
        return 0
    return q.level * WAD // q.max_level


@external
@view
def entry(task_type: bytes32, entry_id: uint256) -> (address, uint256):
    """
    @notice (funder, undrained amount) of an entry.
    """
    word: uint256 = self._entries[task_type][entry_id]
    return convert(convert(word & (2**160 - 1), uint160), address), word >> 160


@internal
def _append(task_type: bytes32, funder: address, amount: uint256) -> uint256:
    q: Queue = self.queues[task_type]
    q.level += amount
    assert q.level <= MASK96, "escrow: level too large"
    entry_id: uint256 = q.tail
    merged: bool = False
    if q.tail > q.head:
        last: uint256 = self._entries[task_type][q.tail - 1]
        if convert(convert(last & (2**160 - 1), uint160), address) == funder:
            # the newest entry is already this funder's: same FIFO position either way
            entry_id = q.tail - 1
            self._entries[task_type][entry_id] = last + (amount << 160)
            merged = True
    if not merged:
        self._entries[task_type][entry_id] = convert(funder, uint256) | (amount << 160)
        q.tail += 1
    self.queues[task_type] = q
    self.balance_of[task_type][funder] += amount
    log EscrowCredited(task_type=task_type, funder=funder, entry=entry_id, amount=amount, level=q.level)
    return entry_id
