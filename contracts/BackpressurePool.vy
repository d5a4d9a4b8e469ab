# pragma version ~=0.4.3
# pragma nonreentrancy on
"""
@title BackpressurePool
@custom:contract-name BackpressurePool
@license AGPL-3.0-only
@notice A self-contained streaming distribution pool per task type (ERC-20, no
        Superfluid). Funders prepay streams (rate in tokens/second, topped up, closed
        with a refund of what has not streamed) or distribute instantly. Once per epoch a
        permissionless `rebalance` splits what came in among the sinks by units, updates
        each sink's virtual backlog (work paid for but not verified by receipts, in tasks),
        and sets the next epoch's units from the backpressure weight
            w_k = max(0, Cbar_k - Q_k / H)        (tasks per epoch)
        i.e. Cbar_k * max(0, 1 - b_k / H) with b_k = Q_k / Cbar_k epochs of backlog
        (modules/backpressure.vy).
        Money the sinks cannot absorb (sum of w_k * fee per epoch) goes to the EscrowBuffer,
        credited to the funder it came from; what the escrow cannot take stays unstreamed
        in the funder's stream (back-pressure). Members claim (pull) their balance.
@custom:security Conservation (checked by the stateful tests after every step):
            token.balanceOf(pool) == liabilities() summed over task types
        where liabilities = unstreamed deposits + pot (incl. dust) + unclaimed + owed.
        Rounding remainders stay in the pot and are distributed next epoch; nothing is
        stranded. Units are set only by `rebalance`, from on-chain state; nobody (owner
        included) can set units. A LEAVING sink gets no share of anything distributed
        after it left; its balance moves to `owed` and its slot is released.
        Trust: the wired CompletionTracker credits verified work; the wired EscrowBuffer
        and PricingCurve are called only by this pool.
"""

from ethereum.ercs import IERC20
from snekmate.auth import ownable
from snekmate.auth import ownable_2step

from modules import epoch_clock
from modules import token_io
from modules import backpressure
from modules import ewma
from interfaces import ICapacityRegistry
from interfaces import IPricingCurve
from interfaces import IEscrowBuffer
from interfaces import ICompletionTracker

initializes: ownable
initializes: ownable_2step[ownable := ownable]
initializes: epoch_clock
initializes: token_io

exports: (
    ownable_2step.owner,
    ownable_2step.pending_owner,
    ownable_2step.transfer_ownership,
    ownable_2step.accept_ownership,
    epoch_clock.GENESIS,
    epoch_clock.EPOCH_LENGTH,
    token_io.TOKEN,
)

MAX_SINKS: public(constant(uint256)) = 64
MAX_FUNDERS: public(constant(uint256)) = 16
MAX_CATCH_UP: constant(uint256) = 255
WAD: constant(uint256) = 10**18
BPS: constant(uint256) = 10_000
# capacities, units and backlogs are tasks (per epoch) scaled by 1e5: a capacity is at most
# MAX_CAPACITY * 1e5 < 2**49 (the registry's MAX_CAPACITY = 2**32 - 1)
UNIT_DIV: constant(uint256) = 10**5

# Packed per-slot word (the one pool slot a rebalance touches per sink):
#   bits   0..48  c: smoothed capacity, one EWMA step per elapsed epoch toward the
#                 registry's published target (at each rebalance), never above a hard target
#   bits  49..97  units of the current epoch (<= c)
#   bit       98  saturated: the backlog reached its cap (H epochs) and no verified work
#                 has been credited since; the sink's units stay 0 until credit() clears it
#   bit       99  slash mark present (see _slash_mark)
#   bits 100..159 x + BIAS, x = backlog at the last rebalance minus verified credit since,
#                 in tasks * 1e5 (money converted at the fee when paid / credited); the
#                 stored backlog is capped at H epochs of capacity <= 10 * 2**49 < BIAS
#   bits 160..255 unclaimed balance
MASK49: constant(uint256) = 2**49 - 1
MASK60: constant(uint256) = 2**60 - 1
MASK96: constant(uint256) = 2**96 - 1
MASK32: constant(uint256) = 2**32 - 1
MASK64: constant(uint256) = 2**64 - 1
MASK128: constant(uint256) = 2**128 - 1
MASK160: constant(uint256) = 2**160 - 1
SAT_BIT: constant(uint256) = 2**98
MARK_BIT: constant(uint256) = 2**99
BIAS: constant(uint256) = 2**59
# registry.capacities() entry: target (tasks) in bits 0..31, hard at bit 32, status at 248
HARD_BIT: constant(uint256) = 2**32

STATUS_ACTIVE: constant(uint256) = 1
STATUS_LEAVING: constant(uint256) = 2

REGISTRY: public(immutable(ICapacityRegistry))
# 1 - alpha of the EWMA (alpha is the registry's ALPHA_WAD), WAD
DECAY_WAD: immutable(uint256)
PRICING: public(immutable(IPricingCurve))
ESCROW: public(immutable(IEscrowBuffer))

struct Stream:
    funder: address
    rate: uint256
    remaining: uint256
    last: uint256
    contrib: uint256

struct PackedStream:
    funder: address
    rate: uint256
    money: uint256

struct PoolState:
    last_epoch_p1: uint256
    pending: uint256
    total_units: uint256
    spare: uint256
    fee: uint256

struct Suspect:
    slot: uint256
    backlog: uint256
    capacity: uint256
    mark: uint256
    sink: address

struct Position:
    slot: uint256
    capacity: uint256
    units: uint256
    backlog: uint256
    unclaimed: uint256
    owed: uint256

# Packed words (Vyper gives every variable and struct member its own slot; a rebalance
# reads all of these, so packing saves a cold read per field). The packing is lossless
# because every field is bounded, and each write asserts its bound (a revert, never a
# silent cut). The money bounds are not the pool's own: token_io caps every amount and the
# pool's balance at 2**96 - 1 when money is pulled in, a stream's remaining + contrib is
# money the pool holds, and the pot is at most the balance plus what escrow drained (whose
# balance token_io caps too), so < 2**128. Raising token_io's cap means revisiting these
# widths: a failing assert in rebalance would stop the market's rebalances.
#   _cfg:        bits 0..159 tracker | 160..191 tolerance H (BPS) | 192..223 drain share (BPS)
#   _pot[t]:     bits 0..127 pending (the pot) | 128..255 spare (both money, < 2**128)
#   _clock[t]:   bits 0..63 last epoch + 1 | 64..159 fee of the last period (< 2**96)
#                | 160..255 total units (<= 64 * 2**49)
#   _streams[t][j]: funder; rate; money = remaining (bits 0..95) | contrib (96..191)
#                   | last settled time (192..255): a settlement writes one word
_cfg: uint256
min_funding: public(uint256)
_pot: HashMap[bytes32, uint256]
_clock: HashMap[bytes32, uint256]
_streams: HashMap[bytes32, HashMap[uint256, PackedStream]]
stream_count: public(HashMap[bytes32, uint256])
_stream_plus_one: HashMap[bytes32, HashMap[address, uint256]]
# funded (low 128 bits) | credited (high 128 bits): money this funder put in the pot
# (net of what overflowed back out) and verified credit it has vouched for.
_credit: HashMap[bytes32, HashMap[address, uint256]]
# per task type, one word per slot: a fixed array costs one hash per access, a nested map two
_hot: HashMap[bytes32, uint256[MAX_SINKS]]
_slash_mark: HashMap[bytes32, uint256[MAX_SINKS]]
owed: public(HashMap[bytes32, HashMap[address, uint256]])
owed_total: public(HashMap[bytes32, uint256])

event Wired:
    tracker: address

event ParamsSet:
    tolerance_bps: uint256
    min_funding: uint256
    drain_bps: uint256

event StreamFunded:
    task_type: indexed(bytes32)
    funder: indexed(address)
    amount: uint256
    rate: uint256
    remaining: uint256

event StreamClosed:
    task_type: indexed(bytes32)
    funder: indexed(address)
    refunded: uint256

event Distributed:
    task_type: indexed(bytes32)
    funder: indexed(address)
    amount: uint256

event Credited:
    task_type: indexed(bytes32)
    total: uint256

event Rebalanced:
    task_type: indexed(bytes32)
    epoch: indexed(uint256)
    inflow: uint256
    distributed: uint256
    to_escrow: uint256
    stalled: uint256
    drained: uint256
    pending: uint256
    fee: uint256
    total_units: uint256

event Allocations:
    task_type: indexed(bytes32)
    epoch: indexed(uint256)
    words: DynArray[uint256, MAX_SINKS]

event EscrowDrained:
    task_type: indexed(bytes32)
    amount: uint256

event SlotSettled:
    task_type: indexed(bytes32)
    sink: indexed(address)
    slot: uint256
    owed: uint256

event Claimed:
    task_type: indexed(bytes32)
    sink: indexed(address)
    amount: uint256


@deploy
def __init__(
    registry: ICapacityRegistry,
    pricing: IPricingCurve,
    escrow: IEscrowBuffer,
    tolerance_bps: uint256,
    min_funding: uint256,
):
    """
    @param registry The CapacityRegistry (settlement token and epoch clock come from it).
    @param pricing The PricingCurve.
    @param escrow The EscrowBuffer.
    @param tolerance_bps H, the backlog (in epochs, BPS) at which a sink's weight reaches 0.
    @param min_funding Smallest first deposit that takes one of the MAX_FUNDERS slots.
    """
    ownable.__init__()
    ownable_2step.__init__()
    epoch_clock.__init__(staticcall registry.GENESIS(), staticcall registry.EPOCH_LENGTH())
    token_io.__init__(IERC20(staticcall registry.TOKEN()))
    REGISTRY = registry
    DECAY_WAD = WAD - staticcall registry.ALPHA_WAD()
    PRICING = pricing
    ESCROW = escrow
    self._set_params(tolerance_bps, min_funding, BPS)


# ---------------------------------------------------------------- owner


@external
def wire(tracker: address):
    """
    @notice Sets, once, the CompletionTracker allowed to credit verified work.
    @dev Owner only.
    @param tracker The CompletionTracker of this deployment.
    """
    ownable._check_owner()
    cfg: uint256 = self._cfg
    assert cfg & MASK160 == 0, "pool: already wired"
    assert tracker != empty(address), "pool: zero address"
    self._cfg = cfg | convert(tracker, uint256)
    log Wired(tracker=tracker)


@external
def set_params(tolerance_bps: uint256, min_funding: uint256, drain_bps: uint256):
    """
    @notice Sets the weight tolerance H, the minimum first funding and the share of spare
            capacity used to drain escrow each epoch.
    @dev Owner only. Never touches balances or units directly.
    """
    ownable._check_owner()
    self._set_params(tolerance_bps, min_funding, drain_bps)


# ---------------------------------------------------------------- funders


@external
def fund(task_type: bytes32, amount: uint256, rate: uint256):
    """
    @notice Opens or tops up the caller's prepaid stream and sets its rate.
    @param task_type The market.
    @param amount Tokens to add to the stream's deposit (pulled from the caller; may be 0
           to only change the rate of an existing stream).
    @param rate Tokens per second streamed into the pool while the deposit lasts.
    """
    j: uint256 = self._funder_slot(task_type, msg.sender, amount)
    st: Stream = self._settled(task_type, self._stream(task_type, j))
    if amount > 0:
        token_io._pull(msg.sender, amount)
        st.remaining += amount
    st.rate = rate
    self._store_stream(task_type, j, st)
    log StreamFunded(task_type=task_type, funder=msg.sender, amount=amount, rate=rate, remaining=st.remaining)


@external
def close_stream(task_type: bytes32) -> uint256:
    """
    @notice Stops the caller's stream and refunds what has not streamed.
    @param task_type The market.
    @return The refund.
    """
    sp1: uint256 = self._stream_plus_one[task_type][msg.sender]
    assert sp1 != 0, "pool: no stream"
    j: uint256 = unsafe_sub(sp1, 1)
    st: Stream = self._settled(task_type, self._stream(task_type, j))
    refund: uint256 = st.remaining
    st.remaining = 0
    st.rate = 0
    self._store_stream(task_type, j, st)
    if refund > 0:
        token_io._push(msg.sender, refund)
    log StreamClosed(task_type=task_type, funder=msg.sender, refunded=refund)
    return refund


@external
def distribute(task_type: bytes32, amount: uint256):
    """
    @notice Instant distribution: `amount` joins this epoch's pot, split at the next
            rebalance like streamed money (overflow rules included).
    @param task_type The market.
    @param amount Tokens pulled from the caller.
    """
    assert amount > 0, "pool: zero amount"
    j: uint256 = self._funder_slot(task_type, msg.sender, amount)
    token_io._pull(msg.sender, amount)
    st: Stream = self._stream(task_type, j)
    st.contrib += amount
    self._store_stream(task_type, j, st)
    self._add_pending(task_type, amount)
    self._add_funded(task_type, msg.sender, amount)
    log Distributed(task_type=task_type, funder=msg.sender, amount=amount)


# ---------------------------------------------------------------- tracker


@external
def credit(
    task_type: bytes32,
    slots: DynArray[uint256, MAX_SINKS],
    slot_amounts: DynArray[uint256, MAX_SINKS],
    sources: DynArray[address, MAX_SINKS],
    source_amounts: DynArray[uint256, MAX_SINKS],
):
    """
    @notice Credits verified work (already checked receipts) to sinks' backlogs.
    @dev Tracker only. Each source's total must fit within the money it put in the pot and
         has not yet vouched for; the tracker checks this per receipt first, this re-check
         only guards the invariant.
    """
    assert msg.sender == convert(self._cfg & MASK160, address), "pool: caller is not the tracker"
    assert len(slots) == len(slot_amounts) and len(sources) == len(source_amounts), "pool: length mismatch"
    for k: uint256 in range(MAX_SINKS):
        if k == len(sources):
            break
        src: address = sources[k]
        sp1: uint256 = self._stream_plus_one[task_type][src]
        if sp1 != 0:
            j: uint256 = unsafe_sub(sp1, 1)
            self._store_stream(task_type, j, self._settled(task_type, self._stream(task_type, j)))
        c: uint256 = self._credit[task_type][src]
        credited: uint256 = (c >> 128) + source_amounts[k]
        assert credited <= c & (2**128 - 1), "pool: credit exceeds funding"
        self._credit[task_type][src] = (c & (2**128 - 1)) | (credited << 128)
    total: uint256 = 0
    fee: uint256 = staticcall PRICING.base_fee(task_type)
    for k: uint256 in range(MAX_SINKS):
        if k == len(slots):
            break
        total += slot_amounts[k]
        amount: uint256 = backpressure._to_tasks(slot_amounts[k], fee)
        word: uint256 = self._hot[task_type][slots[k]]
        xb: uint256 = (word >> 100) & MASK60
        # x saturates at -(BIAS - 1): credit beyond any backlog is dropped at the next
        # rebalance anyway (Q = max(0, x + paid)), so saturation loses nothing.
        if xb > amount:
            xb = unsafe_sub(xb, amount)
        else:
            xb = 1
        # verified work clears the saturation bit: the sink is delivering again
        self._hot[task_type][slots[k]] = (word & ~((MASK60 << 100) | SAT_BIT)) | (xb << 100)
    log Credited(task_type=task_type, total=total)


# ---------------------------------------------------------------- keepers


@external
def rebalance(task_type: bytes32) -> uint256:
    """
    @notice Closes the epoch for `task_type`: settles streams, splits the pot among sinks
            by their units, moves overflow to escrow, updates backlogs, slashes sustained
            relative under-delivery through the tracker, drains escrow into spare capacity,
            advances the fee, and sets the next epoch's units. Anyone may call, once per
            epoch; a second call in the same epoch reverts cheaply ("pool: rebalance not due").
    @param task_type The market.
    @return The new total units.
    """
    ps: PoolState = self._pool(task_type)
    epoch: uint256 = epoch_clock._epoch()
    assert epoch + 1 > ps.last_epoch_p1, "pool: rebalance not due"
    n_epochs: uint256 = 1
    if ps.last_epoch_p1 == 0:
        assert staticcall REGISTRY.task_exists(task_type), "pool: unknown task type"
    else:
        n_epochs = min(epoch + 1 - ps.last_epoch_p1, MAX_CATCH_UP)

    # 1. streams: settle in memory; fresh inflow = everything funders put in this period
    nf: uint256 = self.stream_count[task_type]
    sts: DynArray[Stream, MAX_FUNDERS] = []
    inflow: uint256 = 0
    for j: uint256 in range(MAX_FUNDERS):
        if j == nf:
            break
        st: Stream = self._stream(task_type, j)
        streamed: uint256 = self._streamed(st)
        if streamed > 0:
            st.remaining -= streamed
            st.contrib += streamed
            ps.pending += streamed
            self._add_funded(task_type, st.funder, streamed)
        st.last = block.timestamp
        inflow += st.contrib
        sts.append(st)

    # 2. what the sinks can absorb this period, at the fee of the period. The units in
    #    force are the last rebalance's total minus those of sinks that left since.
    n: uint256 = 0
    caps: uint256[MAX_SINKS] = empty(uint256[MAX_SINKS])
    n, caps = staticcall REGISTRY.capacities(task_type)
    fee: uint256 = staticcall PRICING.base_fee(task_type)
    level_before: uint256 = staticcall ESCROW.level(task_type)
    u_eff: uint256 = ps.total_units
    for i: uint256 in range(MAX_SINKS):
        if i == n:
            break
        if caps[i] >> 248 == STATUS_LEAVING:
            u_eff -= (self._hot[task_type][i] >> 49) & MASK49
    absorbable: uint256 = u_eff * fee * n_epochs // UNIT_DIV
    to_sinks: uint256 = 0
    if u_eff > 0:
        to_sinks = min(ps.pending, absorbable)

    # 3. overflow (fresh money only) to escrow, FIFO-credited to its funder; what escrow
    #    cannot take goes back into the funder's unstreamed deposit (back-pressure)
    overflow: uint256 = min(ps.pending - to_sinks, inflow)
    moved: uint256 = 0
    stalled: uint256 = 0
    if overflow > 0:
        room: uint256 = staticcall ESCROW.room(task_type)
        e_funders: DynArray[address, MAX_FUNDERS] = []
        e_amounts: DynArray[uint256, MAX_FUNDERS] = []
        for j: uint256 in range(MAX_FUNDERS):
            if j == len(sts):
                break
            ov: uint256 = overflow * sts[j].contrib // inflow
            if ov == 0:
                continue
            acc: uint256 = min(ov, room)
            room -= acc
            if acc > 0:
                e_funders.append(sts[j].funder)
                e_amounts.append(acc)
                moved += acc
            if ov > acc:
                sts[j].remaining += ov - acc
                stalled += ov - acc
            self._sub_funded(task_type, sts[j].funder, ov)
        ps.pending -= moved + stalled
        if moved > 0:
            token_io._push(ESCROW.address, moved)
            extcall ESCROW.credit_overflow(task_type, e_funders, e_amounts)

    # 4. one pass: split, backlog (tasks), next units; slashing candidates judged after.
    #    Unchecked arithmetic below rests on these bounds: units and capacities < 2**49
    #    (capacity <= 2**32 tasks, scaled by 1e5), u_eff <= 64 * 2**49, fee in
    #    [1, 2**96) (PricingCurve's bounds), to_sinks <= min(pending < 2**128, absorbable),
    #    tolerance in [1_000, 100_000] (_set_params), threshold <= 100_000 (the tracker's
    #    setter), stored x + BIAS < 2**60 (a 60-bit field). Each line says which it uses.
    cfg: uint256 = self._cfg
    tracker: ICompletionTracker = ICompletionTracker(convert(cfg & MASK160, address))
    hh: uint256 = (cfg >> 160) & MASK32
    thr_bps: uint256 = staticcall tracker.slash_threshold_bps()
    # (1 - alpha)^gap, gap = the epochs since the last rebalance (the real gap, not the pay
    # catch-up cap; a market's first rebalance counts from epoch 0): a signal takes one
    # EWMA step per elapsed epoch toward the target published now (a signal at 0, one step).
    f_gap: uint256 = ewma._decay(epoch + 1 - max(ps.last_epoch_p1, 1), DECAY_WAD)
    words: DynArray[uint256, MAX_SINKS] = []
    suspects: DynArray[Suspect, MAX_SINKS] = []
    b_min: uint256 = max_value(uint256)
    distributed: uint256 = 0
    new_total: uint256 = 0
    for i: uint256 in range(MAX_SINKS):
        if i == n:
            break
        cap_word: uint256 = caps[i]
        status: uint256 = cap_word >> 248
        if status != STATUS_ACTIVE and status != STATUS_LEAVING:
            words.append(0)
            continue
        w: uint256 = self._hot[task_type][i]
        u_prev: uint256 = (w >> 49) & MASK49
        # capacity in tasks * 1e5: the smoothed signal, or for a leaving sink its last weight
        c_i: uint256 = u_prev
        p_i: uint256 = 0
        if status == STATUS_ACTIVE:
            c_i = w & MASK49
            # One EWMA step per elapsed epoch (a burst of declarations moves it one step per
            # epoch). A hard target (the cap binds, or was lowered since the last rebalance)
            # is also a ceiling: stake that stopped counting stops earning at once.
            target: uint256 = unsafe_mul(cap_word & MASK32, UNIT_DIV)  # < 2**49
            if c_i != target:
                # a signal at 0 (a newcomer) takes one step, however long the market was
                # idle: a new identity earns its weight over ~1/alpha epochs
                f: uint256 = f_gap
                if c_i == 0 and ps.last_epoch_p1 != 0:
                    f = DECAY_WAD
                c_i = ewma._step(c_i, target, f)  # between c_i and target
                if cap_word & HARD_BIT != 0:
                    c_i = min(c_i, target)
            if u_eff > 0:
                # < 2**128 * 2**49; the units of active sinks sum to u_eff, so p_i <= to_sinks
                p_i = unsafe_div(unsafe_mul(to_sinks, u_prev), u_eff)
                distributed = unsafe_add(distributed, p_i)  # sum <= to_sinks
        # Q = max(0, x + paid), in tasks at the period's fee (paid < 2**128, fee >= 1)
        q: uint256 = 0
        xb: uint256 = unsafe_add((w >> 100) & MASK60, backpressure._to_tasks(p_i, fee))
        if xb > BIAS:
            q = unsafe_sub(xb, BIAS)
        if status == STATUS_ACTIVE and p_i > 0 and c_i > 0:
            b_min = min(b_min, unsafe_div(unsafe_mul(q, WAD), c_i))  # q < 2**60 + 2**145
        # the slash mark follows the backlog down, so a later rise is new shortfall
        mark: uint256 = 0
        mark_flag: uint256 = w & MARK_BIT
        if mark_flag != 0:
            mark = self._slash_mark[task_type][i]
            if q < mark:
                mark = q
                self._slash_mark[task_type][i] = q
                if q == 0:
                    mark_flag = 0
        # paid (or leaving), beyond the absolute threshold and above the mark: a suspect,
        # judged against the best paid sink once every sink has been seen
        if (p_i > 0 or status == STATUS_LEAVING) and q > unsafe_div(unsafe_mul(c_i, thr_bps), BPS) and q > mark:
            suspects.append(Suspect(slot=i, backlog=q, capacity=c_i, mark=mark, sink=empty(address)))
        unclaimed: uint256 = unsafe_add(w >> 160, p_i)  # < 2**96 + 2**128
        if status == STATUS_LEAVING:
            sink: address = self._settle_leaving(task_type, i, unclaimed)
            if len(suspects) > 0 and suspects[len(suspects) - 1].slot == i:
                suspects[len(suspects) - 1].sink = sink
            words.append(0)
            continue
        # Saturation: H epochs of paid work undelivered. The cap follows the smoothed signal,
        # so without the bit a dead sink that keeps declaring would win weight back by every
        # upward wobble of its signal (w = Cbar - Q/H > 0 again). With it, the weight stays 0
        # until verified work is credited (credit() clears the bit).
        q_cap: uint256 = backpressure._backlog_cap(c_i, hh)
        sat: uint256 = w & SAT_BIT
        # (q > 0: with a zero cap, a sink whose signal reached 0 keeps owing its backlog
        # through the bit instead of having it wiped by the clip below)
        if q >= q_cap and q > 0:
            sat = SAT_BIT
        q = min(min(q, q_cap), BIAS - 1)
        units: uint256 = 0
        if sat == 0:
            # w = Cbar - Q / H, floored at 0 (q < 2**59)
            units = backpressure._units(c_i, q, hh)
        new_total = unsafe_add(new_total, units)  # <= 64 * 2**49
        assert unclaimed <= MASK96, "pool: balance overflow"
        word: uint256 = c_i | (units << 49) | sat | mark_flag | ((q + BIAS) << 100) | (unclaimed << 160)
        self._hot[task_type][i] = word
        words.append(word)
    ps.pending -= distributed

    # relative slashing: only backlog more than `thr` epochs beyond the best paid sink's
    # counts (a source-wide outage backlogs everyone alike and slashes nobody), and each
    # unit of shortfall is slashed at most once (the mark)
    if b_min == max_value(uint256):
        b_min = 0
    for sus: Suspect in suspects:
        base: uint256 = max(b_min * sus.capacity // WAD + sus.capacity * thr_bps // BPS, sus.mark)
        if sus.backlog <= base:
            continue
        sink: address = sus.sink
        if sink == empty(address):
            sink = staticcall REGISTRY.member_at(task_type, sus.slot)
            self._slash_mark[task_type][sus.slot] = sus.backlog
            words[sus.slot] = words[sus.slot] | MARK_BIT
            self._hot[task_type][sus.slot] = words[sus.slot]
        extcall tracker.report_shortfall(
            task_type, sink, backpressure._to_money(sus.backlog - base, fee)
        )

    # 5. drain escrow into the spare capacity of this period
    spare: uint256 = absorbable - to_sinks
    drained: uint256 = 0
    allowance: uint256 = spare * ((cfg >> 192) & MASK32) // BPS
    if allowance > 0 and level_before > 0:
        drained = self._drain(task_type, allowance)
        ps.pending += drained
    # the spare allowance beyond 2**128 - 1 is unusable anyway (escrow holds < 2**96), so
    # it is clamped to its field (reachable only with absurd fees x capacities x catch-up)
    ps.spare = min(spare - min(spare, drained), MASK128)

    # 6. fee: utilisation = (fresh inflow + money already queued in escrow) / what the
    #    sinks could absorb this period. Usable capacity (weights), not declared capacity:
    #    a sink that declares but does not deliver adds nothing, so when sinks fail the
    #    scarcity shows in the fee instead of piling up in escrow.
    extcall PRICING.advance(task_type, epoch, inflow + level_before, absorbable, n_epochs)

    # 7. write back streams (contributions consumed), dropping closed ones
    self._store_streams(task_type, sts)
    ps.last_epoch_p1 = epoch + 1
    ps.total_units = new_total
    ps.fee = fee
    self._store_pool(task_type, ps)
    log Rebalanced(
        task_type=task_type,
        epoch=epoch,
        inflow=inflow,
        distributed=distributed,
        to_escrow=moved,
        stalled=stalled,
        drained=drained,
        pending=ps.pending,
        fee=fee,
        total_units=new_total,
    )
    log Allocations(task_type=task_type, epoch=epoch, words=words)
    return new_total


@external
def drain_escrow(task_type: bytes32) -> uint256:
    """
    @notice Pulls queued escrow money into the pot, up to the spare capacity left from the
            last rebalance. Anyone may call.
    @param task_type The market.
    @return The amount drained.
    """
    pot: uint256 = self._pot[task_type]
    spare: uint256 = pot >> 128
    assert spare > 0, "pool: no spare capacity"
    drained: uint256 = self._drain(task_type, spare)
    assert drained > 0, "pool: escrow empty"
    pending: uint256 = (pot & MASK128) + drained
    assert pending <= MASK128, "pool: amount overflow"
    self._pot[task_type] = pending | ((spare - drained) << 128)
    return drained


# ---------------------------------------------------------------- sinks


@external
def claim(task_type: bytes32) -> uint256:
    """
    @notice Pays the caller everything it has earned in this market (pull payment).
    @param task_type The market.
    @return The amount paid.
    """
    amount: uint256 = self.owed[task_type][msg.sender]
    if amount > 0:
        self.owed[task_type][msg.sender] = 0
        self.owed_total[task_type] -= amount
    sp1: uint256 = staticcall REGISTRY.slot_of(task_type, msg.sender)
    if sp1 != 0:
        i: uint256 = unsafe_sub(sp1, 1)
        w: uint256 = self._hot[task_type][i]
        amount += w >> 160
        self._hot[task_type][i] = w & (2**160 - 1)
    assert amount > 0, "pool: nothing to claim"
    token_io._push(msg.sender, amount)
    log Claimed(task_type=task_type, sink=msg.sender, amount=amount)
    return amount


# ---------------------------------------------------------------- views


@external
@view
def tracker() -> address:
    """
    @notice The CompletionTracker allowed to credit verified work (zero until wired).
    """
    return convert(self._cfg & MASK160, address)


@external
@view
def tolerance_bps() -> uint256:
    """
    @notice H, the backlog (in epochs, BPS) at which a sink's weight reaches 0.
    """
    return (self._cfg >> 160) & MASK32


@external
@view
def drain_bps() -> uint256:
    """
    @notice The share (BPS) of each epoch's spare capacity used to drain escrow.
    """
    return (self._cfg >> 192) & MASK32


@external
@view
def pools(task_type: bytes32) -> PoolState:
    """
    @notice A market's pool state: last epoch rebalanced + 1, the pot (money not yet
            split), total units in force, spare capacity left for draining, and the fee
            of the last period.
    """
    return self._pool(task_type)


@external
@view
def streams(task_type: bytes32, index: uint256) -> Stream:
    """
    @notice The stream at `index` as stored (settled up to its `last` time).
    """
    return self._stream(task_type, index)


@external
@view
def position(task_type: bytes32, sink: address) -> Position:
    """
    @notice A sink's slot (index + 1, 0 if not registered), smoothed capacity and units
            (tasks * 1e5, as of the last rebalance), backlog (tasks * 1e5: the last
            rebalance's backlog minus verified credit since), unclaimed and owed balances
            (money).
    """
    out: Position = empty(Position)
    out.owed = self.owed[task_type][sink]
    sp1: uint256 = staticcall REGISTRY.slot_of(task_type, sink)
    out.slot = sp1
    if sp1 != 0:
        w: uint256 = self._hot[task_type][unsafe_sub(sp1, 1)]
        out.capacity = w & MASK49
        out.units = (w >> 49) & MASK49
        xb: uint256 = (w >> 100) & MASK60
        if xb > BIAS:
            out.backlog = xb - BIAS
        out.unclaimed = w >> 160
    return out


@external
@view
def backlog_of(task_type: bytes32, sink: address) -> (uint256, uint256):
    """
    @notice (backlog, smoothed capacity), both in tasks * 1e5: their ratio is the backlog
            in epochs, used by the PricingCurve. The capacity is the last rebalance's, the
            backlog the last rebalance's minus verified credit since.
    """
    sp1: uint256 = staticcall REGISTRY.slot_of(task_type, sink)
    if sp1 == 0:
        return 0, 0
    w: uint256 = self._hot[task_type][unsafe_sub(sp1, 1)]
    xb: uint256 = (w >> 100) & MASK60
    q: uint256 = 0
    if xb > BIAS:
        q = xb - BIAS
    return q, w & MASK49


@external
@view
def hot_word(task_type: bytes32, slot: uint256) -> uint256:
    """
    @notice The packed per-slot word: capacity | units << 49 | saturated << 98 | mark << 99
            | (x + 2**59) << 100 | unclaimed << 160.
    """
    return self._hot[task_type][slot]


@external
@view
def funder_room(task_type: bytes32, funder: address) -> uint256:
    """
    @notice How much more verified credit `funder` may vouch for: what it has put in the
            pot (streams settled up to now, instant distributions, drained escrow, net of
            overflow) minus what it has already credited.
    """
    c: uint256 = self._credit[task_type][funder]
    funded: uint256 = c & (2**128 - 1)
    sp1: uint256 = self._stream_plus_one[task_type][funder]
    if sp1 != 0:
        funded += self._streamed(self._stream(task_type, unsafe_sub(sp1, 1)))
    credited: uint256 = c >> 128
    if credited >= funded:
        return 0
    return funded - credited


@external
@view
def credit_of(task_type: bytes32, funder: address) -> (uint256, uint256):
    """
    @notice (funded, credited) as stored.
    """
    c: uint256 = self._credit[task_type][funder]
    return c & (2**128 - 1), c >> 128


@external
@view
def stream_of(task_type: bytes32, funder: address) -> Stream:
    """
    @notice The funder's stream with the unsettled part moved from `remaining` to `contrib`.
    """
    sp1: uint256 = self._stream_plus_one[task_type][funder]
    if sp1 == 0:
        return empty(Stream)
    st: Stream = self._stream(task_type, unsafe_sub(sp1, 1))
    streamed: uint256 = self._streamed(st)
    st.remaining -= streamed
    st.contrib += streamed
    st.last = block.timestamp
    return st


@external
@view
def liabilities(task_type: bytes32) -> uint256:
    """
    @notice Everything this pool owes in one market: unstreamed deposits + pot + unclaimed
            + owed. Summed over markets it equals the pool's token balance.
    """
    total: uint256 = (self._pot[task_type] & MASK128) + self.owed_total[task_type]
    nf: uint256 = self.stream_count[task_type]
    for j: uint256 in range(MAX_FUNDERS):
        if j == nf:
            break
        total += self._streams[task_type][j].money & MASK96
    for i: uint256 in range(MAX_SINKS):
        total += self._hot[task_type][i] >> 160
    return total


@external
@view
def last_epoch_p1(task_type: bytes32) -> uint256:
    """
    @notice The epoch of the last rebalance of `task_type`, plus one (0 before the first).
            Read by the registry to know whether a lowered cap has been applied.
    """
    return self._clock[task_type] & MASK64


@external
@view
def rebalance_due(task_type: bytes32) -> bool:
    """
    @notice True when `rebalance` would not revert with "pool: rebalance not due".
    """
    return epoch_clock._epoch() + 1 > self._clock[task_type] & MASK64


# ---------------------------------------------------------------- internal


@internal
@view
def _pool(task_type: bytes32) -> PoolState:
    pot: uint256 = self._pot[task_type]
    clock: uint256 = self._clock[task_type]
    return PoolState(
        last_epoch_p1=clock & MASK64,
        pending=pot & MASK128,
        total_units=clock >> 160,
        spare=pot >> 128,
        fee=(clock >> 64) & MASK96,
    )


@internal
def _store_pool(task_type: bytes32, ps: PoolState):
    # spare is clamped by the caller; fee < 2**96 (PricingCurve.MAX_FEE); total units
    # <= 64 * 2**49; epochs fit 64 bits for any realistic clock
    assert ps.pending <= MASK128 and ps.spare <= MASK128, "pool: amount overflow"
    assert ps.last_epoch_p1 <= MASK64 and ps.fee <= MASK96 and ps.total_units < 2**96, "pool: state overflow"
    self._pot[task_type] = ps.pending | (ps.spare << 128)
    self._clock[task_type] = ps.last_epoch_p1 | (ps.fee << 64) | (ps.total_units << 160)


@internal
def _add_pending(task_type: bytes32, amount: uint256):
    pot: uint256 = self._pot[task_type]
    pending: uint256 = (pot & MASK128) + amount
    assert pending <= MASK128, "pool: amount overflow"
    self._pot[task_type] = (pot & ~MASK128) | pending


@internal
@view
def _stream(task_type: bytes32, j: uint256) -> Stream:
    ps: PackedStream = self._streams[task_type][j]
    return Stream(
        funder=ps.funder,
        rate=ps.rate,
        remaining=ps.money & MASK96,
        last=ps.money >> 192,
        contrib=(ps.money >> 96) & MASK96,
    )


@internal
def _store_stream(task_type: bytes32, j: uint256, st: Stream):
    # unchanged fields cost a warm no-op write (100 gas) after the read that preceded it
    assert st.remaining <= MASK96 and st.contrib <= MASK96, "pool: amount overflow"
    self._streams[task_type][j] = PackedStream(
        funder=st.funder,
        rate=st.rate,
        money=st.remaining | (st.contrib << 96) | (st.last << 192),
    )


@internal
def _set_params(tolerance_bps: uint256, min_funding: uint256, drain_bps: uint256):
    assert tolerance_bps >= 1_000 and tolerance_bps <= 100_000, "pool: tolerance out of range"
    assert min_funding > 0, "pool: zero min funding"
    assert drain_bps <= BPS, "pool: drain share above 100%"
    self._cfg = (self._cfg & MASK160) | (tolerance_bps << 160) | (drain_bps << 192)
    self.min_funding = min_funding
    log ParamsSet(tolerance_bps=tolerance_bps, min_funding=min_funding, drain_bps=drain_bps)


@internal
def _funder_slot(task_type: bytes32, funder: address, amount: uint256) -> uint256:
    sp1: uint256 = self._stream_plus_one[task_type][funder]
    if sp1 != 0:
        return unsafe_sub(sp1, 1)
    assert staticcall REGISTRY.task_exists(task_type), "pool: unknown task type"
    assert amount >= self.min_funding, "pool: below min funding"
    j: uint256 = self.stream_count[task_type]
    assert j < MAX_FUNDERS, "pool: funder set full"
    self.stream_count[task_type] = j + 1
    self._stream_plus_one[task_type][funder] = j + 1
    self._store_stream(task_type, j, Stream(funder=funder, rate=0, remaining=0, last=block.timestamp, contrib=0))
    return j


@internal
@view
def _streamed(st: Stream) -> uint256:
    # a node may evaluate a view with a block time before the stream's last settlement
    if block.timestamp <= st.last:
        return 0
    return min(st.remaining, st.rate * unsafe_sub(block.timestamp, st.last))


@internal
def _settled(task_type: bytes32, st_in: Stream) -> Stream:
    """
    @dev Moves what streamed since `st.last` from the deposit into the pot; the caller
         stores the returned stream.
    """
    st: Stream = st_in
    streamed: uint256 = self._streamed(st)
    st.last = block.timestamp
    if streamed > 0:
        st.remaining -= streamed
        st.contrib += streamed
        self._add_pending(task_type, streamed)
        self._add_funded(task_type, st.funder, streamed)
    return st


@internal
def _add_funded(task_type: bytes32, funder: address, amount: uint256):
    c: uint256 = self._credit[task_type][funder]
    funded: uint256 = (c & (2**128 - 1)) + amount
    assert funded < 2**128, "pool: funding overflow"
    self._credit[task_type][funder] = (c & ~(2**128 - 1)) | funded


@internal
def _sub_funded(task_type: bytes32, funder: address, amount: uint256):
    c: uint256 = self._credit[task_type][funder]
    # amount <= this period's contribution, which was added to funded
    self._credit[task_type][funder] = c - amount


@internal
def _drain(task_type: bytes32, max_amount: uint256) -> uint256:
    before: uint256 = token_io._balance()
    funders: DynArray[address, 32] = []
    amounts: DynArray[uint256, 32] = []
    funders, amounts = extcall ESCROW.release(task_type, max_amount)
    total: uint256 = 0
    for k: uint256 in range(32):
        if k == len(funders):
            break
        total += amounts[k]
        self._add_funded(task_type, funders[k], amounts[k])
    assert total <= max_amount, "pool: escrow released too much"
    assert token_io._balance() - before == total, "pool: escrow transfer mismatch"
    if total > 0:
        log EscrowDrained(task_type=task_type, amount=total)
    return total


@internal
def _settle_leaving(task_type: bytes32, slot: uint256, unclaimed: uint256) -> address:
    sink: address = staticcall REGISTRY.member_at(task_type, slot)
    if unclaimed > 0:
        self.owed[task_type][sink] += unclaimed
        self.owed_total[task_type] += unclaimed
    self._hot[task_type][slot] = 0
    self._slash_mark[task_type][slot] = 0
    extcall REGISTRY.release_slot(task_type, slot)
    log SlotSettled(task_type=task_type, sink=sink, slot=slot, owed=unclaimed)
    return sink


@internal
def _store_streams(task_type: bytes32, sts: DynArray[Stream, MAX_FUNDERS]):
    """
    @dev Writes the settled streams back with contributions reset, compacting away
         closed ones (no rate, no deposit): later live streams shift down into the gaps,
         keeping their order; a funder's index is rewritten only when its stream moved.
    """
    kept: uint256 = 0
    for j: uint256 in range(MAX_FUNDERS):
        if j == len(sts):
            break
        st: Stream = sts[j]
        st.contrib = 0
        if st.rate == 0 and st.remaining == 0:
            self._stream_plus_one[task_type][st.funder] = 0
            continue
        self._store_stream(task_type, kept, st)
        if kept != j:  # moved into a gap: its index changed
            self._stream_plus_one[task_type][st.funder] = kept + 1
        kept += 1
    for j: uint256 in range(MAX_FUNDERS):
        if j < kept:
            continue
        if j >= len(sts):
            break
        self._streams[task_type][j] = empty(PackedStream)
    self.stream_count[task_type] = kept
