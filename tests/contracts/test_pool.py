"""BackpressurePool: streams, splits, overflow, backlog, departures, claims, guards."""

import ape
from ape import chain

from .conftest import (CHEAP, PREMIUM, USDC, WAD, absorbable, assert_conserved, hot, own_events, smoothed, split,
                       warm_market)
from pura.layout import TASK_SCALE


def test_constructor_and_wiring(pool, registry, pricing, escrow, tracker, token):
    assert pool.REGISTRY() == registry.address
    assert pool.PRICING() == pricing.address
    assert pool.ESCROW() == escrow.address
    assert pool.tracker() == tracker.address
    assert pool.TOKEN() == token.address
    assert pool.EPOCH_LENGTH() == registry.EPOCH_LENGTH()
    assert pool.GENESIS() == registry.GENESIS()
    assert (pool.tolerance_bps(), pool.min_funding(), pool.drain_bps()) == (20_000, USDC, 10_000)


def test_wire_once_owner_only(project, owner, stranger, registry, pricing, escrow, tracker):
    p = owner.deploy(project.BackpressurePool, registry, pricing, escrow, 20_000, 1)
    with ape.reverts("ownable: caller is not the owner"):
        p.wire(tracker, sender=stranger)
    with ape.reverts("pool: zero address"):
        p.wire("0x" + "00" * 20, sender=owner)
    p.wire(tracker, sender=owner)
    with ape.reverts("pool: already wired"):
        p.wire(tracker, sender=owner)


def test_set_params(pool, owner, stranger):
    with ape.reverts("ownable: caller is not the owner"):
        pool.set_params(20_000, 1, 10_000, sender=stranger)
    with ape.reverts("pool: tolerance out of range"):
        pool.set_params(999, 1, 10_000, sender=owner)
    with ape.reverts("pool: tolerance out of range"):
        pool.set_params(100_001, 1, 10_000, sender=owner)
    with ape.reverts("pool: zero min funding"):
        pool.set_params(20_000, 0, 10_000, sender=owner)
    with ape.reverts("pool: drain share above 100%"):
        pool.set_params(20_000, 1, 10_001, sender=owner)
    tx = pool.set_params(30_000, 5, 5_000, sender=owner)
    assert own_events(tx, pool) == [pool.ParamsSet(tolerance_bps=30_000, min_funding=5, drain_bps=5_000)]


# ------------------------------------------------------------------ streams


def test_fund_opens_stream(pool, token, funder, proto):
    before = token.balanceOf(funder)
    tx = pool.fund(CHEAP, 100 * USDC, 1000, sender=funder)
    assert token.balanceOf(funder) == before - 100 * USDC
    st = pool.stream_of(CHEAP, funder)
    assert (st.funder, st.rate, st.remaining, st.contrib) == (funder.address, 1000, 100 * USDC, 0)
    assert pool.stream_count(CHEAP) == 1
    assert own_events(tx, pool) == [pool.StreamFunded(task_type=CHEAP, funder=funder.address, amount=100 * USDC,
                                                      rate=1000, remaining=100 * USDC)]
    assert_conserved(proto)


def test_fund_reverts(pool, funder, accounts, owner, token):
    from pura.signing import task_type_id
    with ape.reverts("pool: unknown task type"):
        pool.fund(task_type_id("nope"), 100 * USDC, 1, sender=funder)
    with ape.reverts("pool: below min funding"):
        pool.fund(CHEAP, USDC - 1, 1, sender=funder)


def test_funder_set_is_bounded_at_16(pool, token, owner, accounts):
    funders = []
    for _ in range(17):
        a = accounts.generate_test_account()
        chain.set_balance(a.address, 10**20)
        token.mint(a, 10 * USDC, sender=owner)
        token.approve(pool, 10 * USDC, sender=a)
        funders.append(a)
    for a in funders[:16]:
        pool.fund(CHEAP, USDC, 1, sender=a)
    with ape.reverts("pool: funder set full"):
        pool.fund(CHEAP, USDC, 1, sender=funders[16])
    with ape.reverts("pool: funder set full"):
        pool.distribute(CHEAP, USDC, sender=funders[16])


def test_stream_accrues_at_rate_and_close_refunds_the_rest(pool, token, funder, clock, proto):
    pool.fund(CHEAP, 100 * USDC, 7, sender=funder)
    t0 = chain.blocks.head.timestamp
    clock.sleep(1000)
    # close in the next block: elapsed = (its timestamp - t0)
    before = token.balanceOf(funder)
    tx = pool.close_stream(CHEAP, sender=funder)
    elapsed = chain.blocks.head.timestamp - t0
    refund = 100 * USDC - 7 * elapsed
    assert token.balanceOf(funder) == before + refund
    assert own_events(tx, pool) == [pool.StreamClosed(task_type=CHEAP, funder=funder.address, refunded=refund)]
    assert pool.pools(CHEAP).pending == 7 * elapsed
    assert pool.credit_of(CHEAP, funder) == (7 * elapsed, 0)
    assert_conserved(proto)


def test_stream_stops_when_deposit_runs_out(pool, funder, clock):
    pool.fund(CHEAP, USDC, 10**6, sender=funder)  # 1 USDC at 1 USDC/s
    clock.sleep(50)
    st = pool.stream_of(CHEAP, funder)
    assert st.remaining == 0 and st.contrib == USDC
    assert pool.funder_room(CHEAP, funder) == USDC


def test_top_up_and_rate_change_settle_first(pool, funder, clock):
    pool.fund(CHEAP, 10 * USDC, 100, sender=funder)
    t0 = chain.blocks.head.timestamp
    clock.sleep(100)
    pool.fund(CHEAP, 5 * USDC, 200, sender=funder)
    t1 = chain.blocks.head.timestamp
    st = pool.streams(CHEAP, 0)
    assert st.remaining == 15 * USDC - 100 * (t1 - t0)
    assert st.contrib == 100 * (t1 - t0) and st.rate == 200 and st.last == t1


def test_close_without_stream_reverts(pool, stranger):
    with ape.reverts("pool: no stream"):
        pool.close_stream(CHEAP, sender=stranger)


def test_distribute(pool, funder, proto):
    with ape.reverts("pool: zero amount"):
        pool.distribute(CHEAP, 0, sender=funder)
    tx = pool.distribute(CHEAP, 3 * USDC, sender=funder)
    assert pool.pools(CHEAP).pending == 3 * USDC
    assert pool.credit_of(CHEAP, funder) == (3 * USDC, 0)
    assert pool.Distributed(task_type=CHEAP, funder=funder.address, amount=3 * USDC) in own_events(tx, pool)
    assert_conserved(proto)


# ------------------------------------------------------------------ rebalance


def test_rebalance_guards(pool, keeper, clock):
    from pura.signing import task_type_id
    with ape.reverts("pool: unknown task type"):
        pool.rebalance(task_type_id("nope"), sender=keeper)
    pool.rebalance(CHEAP, sender=keeper)
    assert not pool.rebalance_due(CHEAP)
    with ape.reverts("pool: rebalance not due"):
        pool.rebalance(CHEAP, sender=keeper)
    clock.next_epoch()
    assert pool.rebalance_due(CHEAP)
    pool.rebalance(CHEAP, sender=keeper)


def test_units_follow_smoothed_capacity(proto, pool, registry, sink_a, sink_b, sink_c, clock, keeper):
    warm_market(proto, [sink_a, sink_b, sink_c], [100, 200, 300], clock, keeper)
    for slot, sink in enumerate([sink_a, sink_b, sink_c]):
        h = hot(pool, CHEAP, slot)
        assert h["units"] == h["capacity"] == pool.position(CHEAP, sink).capacity > 0
    assert pool.pools(CHEAP).total_units == sum(hot(pool, CHEAP, i)["units"] for i in range(3))


def test_split_is_exact_and_dust_stays_in_the_pot(proto, pool, sink_a, sink_b, sink_c, funder, clock, keeper, tracker):
    warm_market(proto, [sink_a, sink_b, sink_c], [100, 200, 300], clock, keeper)
    units = [hot(pool, CHEAP, i)["units"] for i in range(3)]
    amount = 1_000_003  # odd on purpose, below the 6 USDC/epoch the sinks absorb
    pool.distribute(CHEAP, amount, sender=funder)
    clock.next_epoch()
    tx = pool.rebalance(CHEAP, sender=keeper)
    paid, dust = split(amount, units)
    assert [hot(pool, CHEAP, i)["unclaimed"] for i in range(3)] == paid
    assert pool.pools(CHEAP).pending == dust
    assert 0 < dust < 3
    ev = pool.Rebalanced.from_receipt(tx)[0]
    assert ev.inflow == amount and ev.distributed == sum(paid) and ev.to_escrow == 0
    assert_conserved(proto)


def test_idle_sink_is_never_penalised(proto, pool, registry, sink_a, sink_b, clock, keeper):
    """Property 2: with no payments there is no backlog, so weights stay at capacity."""
    warm_market(proto, [sink_a, sink_b], [100, 100], clock, keeper)
    for _ in range(5):
        clock.next_epoch()
        pool.rebalance(CHEAP, sender=keeper)
    for slot, sink in enumerate([sink_a, sink_b]):
        h = hot(pool, CHEAP, slot)
        assert h["backlog"] == 0 and h["mark"] == 0
        assert h["units"] == h["capacity"] == smoothed(pool, sink)
    assert registry.bonds(CHEAP, sink_a).bonded == 100 * USDC


def test_overflow_goes_to_escrow_credited_to_its_funder(proto, pool, escrow, sink_a, funder, clock, keeper):
    warm_market(proto, [sink_a], [100], clock, keeper)  # absorbs 100 tasks * 0.01 = ~1 USDC/epoch
    cap = absorbable(proto, CHEAP, hot(pool, CHEAP, 0)["units"])
    pool.distribute(CHEAP, 5 * USDC, sender=funder)
    clock.next_epoch()
    tx = pool.rebalance(CHEAP, sender=keeper)
    ev = pool.Rebalanced.from_receipt(tx)[0]
    assert ev.distributed == cap
    assert ev.to_escrow == 5 * USDC - cap
    assert escrow.level(CHEAP) == 5 * USDC - cap
    assert escrow.entry(CHEAP, 0) == (funder.address, 5 * USDC - cap)
    assert escrow.balance_of(CHEAP, funder) == 5 * USDC - cap
    # the overflow no longer counts as this funder's money in the pot
    assert pool.credit_of(CHEAP, funder) == (cap, 0)
    assert_conserved(proto)


def test_overflow_beyond_escrow_max_stays_in_the_stream(proto, pool, escrow, registry, sink_a, funder, clock, keeper):
    """PREMIUM has escrow_max 0: overflow cannot leave, it is handed back to the stream."""
    min_bond, spu = registry.task_types(PREMIUM)
    registry.register_sink(PREMIUM, min_bond, 100, sender=sink_a)
    clock.next_epoch(40)
    pool.rebalance(PREMIUM, sender=keeper)
    # ~100 tasks * 0.0875 = 8.75 USDC absorbable per epoch; stream 36 USDC per epoch
    pool.fund(PREMIUM, 50 * USDC, 10_000, sender=funder)
    clock.next_epoch()
    tx = pool.rebalance(PREMIUM, sender=keeper)
    ev = pool.Rebalanced.from_receipt(tx)[0]
    assert ev.to_escrow == 0 and ev.stalled == ev.inflow - ev.distributed > 0
    st = pool.streams(PREMIUM, 0)
    assert st.remaining + ev.inflow - ev.stalled == 50 * USDC
    assert escrow.level(PREMIUM) == 0
    assert_conserved(proto)


def test_first_epoch_without_units_overflows_everything(proto, pool, escrow, registry, sink_a, funder, clock, keeper):
    registry.register_sink(CHEAP, 100 * USDC, 100, sender=sink_a)
    pool.distribute(CHEAP, 2 * USDC, sender=funder)
    clock.next_epoch()
    tx = pool.rebalance(CHEAP, sender=keeper)
    ev = pool.Rebalanced.from_receipt(tx)[0]
    assert ev.distributed == 0 and ev.to_escrow == 2 * USDC
    assert escrow.level(CHEAP) == 2 * USDC


def test_escrow_drains_into_spare_capacity_fifo(proto, pool, escrow, sink_a, funder, funder_b, clock, keeper):
    warm_market(proto, [sink_a], [100], clock, keeper)
    escrow.deposit(CHEAP, 2 * USDC, sender=funder)
    escrow.deposit(CHEAP, 2 * USDC, sender=funder_b)
    spare = absorbable(proto, CHEAP, hot(pool, CHEAP, 0)["units"])  # nothing else comes in
    clock.next_epoch()
    tx = pool.rebalance(CHEAP, sender=keeper)
    ev = pool.Rebalanced.from_receipt(tx)[0]
    assert ev.drained == min(spare, 4 * USDC)
    # oldest first: funder's entry drains before funder_b's
    assert escrow.entry(CHEAP, 0)[1] == 2 * USDC - min(spare, 2 * USDC)
    assert escrow.entry(CHEAP, 1)[1] == 2 * USDC - max(0, spare - 2 * USDC)
    assert pool.pools(CHEAP).pending == ev.drained
    assert pool.credit_of(CHEAP, funder)[0] == min(spare, 2 * USDC)
    assert_conserved(proto)


def test_drain_escrow_permissionless(proto, pool, escrow, sink_a, funder, clock, keeper, stranger):
    warm_market(proto, [sink_a], [100], clock, keeper)
    with ape.reverts("pool: escrow empty"):
        pool.drain_escrow(CHEAP, sender=stranger)
    spare = pool.pools(CHEAP).spare
    assert spare > 0
    escrow.deposit(CHEAP, 2 * USDC, sender=funder)
    tx = pool.drain_escrow(CHEAP, sender=stranger)
    drained = min(spare, 2 * USDC)
    assert escrow.level(CHEAP) == 2 * USDC - drained
    assert pool.pools(CHEAP).spare == spare - drained
    assert pool.pools(CHEAP).pending == drained
    assert pool.EscrowDrained(task_type=CHEAP, amount=drained) in own_events(tx, pool)
    assert_conserved(proto)


def test_drain_without_spare_reverts(pool, stranger):
    with ape.reverts("pool: no spare capacity"):
        pool.drain_escrow(CHEAP, sender=stranger)


# ------------------------------------------------------------------ backlog and weights


def pool_capacity(proto, sink):
    """Smoothed capacity as of the last rebalance, in the pool's unit (tasks * TASK_SCALE)."""
    return smoothed(proto.pool, sink)


def _stream_for(pool, funder, per_epoch):
    rate = per_epoch // 3600
    pool.fund(CHEAP, 500 * USDC, rate, sender=funder)
    return rate


def test_unverified_payment_builds_backlog_and_lowers_weight(proto, pool, sink_a, sink_b, funder, clock, keeper):
    warm_market(proto, [sink_a, sink_b], [100, 100], clock, keeper)
    u0 = [hot(pool, CHEAP, i)["units"] for i in range(2)]
    _stream_for(pool, funder, 1_600_000)  # 80 % of what two sinks absorb
    clock.next_epoch()
    tx = pool.rebalance(CHEAP, sender=keeper)
    fee = pool.Rebalanced.from_receipt(tx)[0].fee
    h = [hot(pool, CHEAP, i) for i in range(2)]
    for i in range(2):
        # paid, nothing verified: the whole payment is backlog, in tasks at the period's fee
        assert h[i]["unclaimed"] > 0
        assert h[i]["backlog"] == h[i]["unclaimed"] * TASK_SCALE // fee
        capacity = pool_capacity(proto, [sink_a, sink_b][i])
        assert h[i]["units"] == capacity - h[i]["backlog"] * 10_000 // 20_000 < u0[i]


def test_receipts_clear_backlog_and_the_share_moves_to_the_worker(proto, pool, tracker, signer, sink_a, sink_b,
                                                                    funder, clock, keeper, relayer):
    """Property 1 in miniature: sink_b stops delivering; the funder's work is all done by
    sink_a, which backs it with receipts during each epoch. Within a few epochs sink_b's
    share is ~0 and the money goes to sink_a."""
    warm_market(proto, [sink_a, sink_b], [100, 100], clock, keeper)
    _stream_for(pool, funder, 1_600_000)
    shares = []
    for epoch in range(6):
        clock.to_epoch(clock.epoch() + 1, offset=-5)  # receipts land just before the epoch ends
        room = pool.funder_room(CHEAP, funder)
        if room > 0:
            _, arg = signer.receipt(sink_a, funder, room)
            tracker.submit_receipts(CHEAP, [arg], sender=relayer)
        clock.next_epoch()
        pool.rebalance(CHEAP, sender=keeper)
        units = [hot(pool, CHEAP, i)["units"] for i in range(2)]
        shares.append(units[1] / sum(units))
    # sink_a stays near full weight: its only backlog is pot money (escrow drained back
    # in) that reached it before the funder vouched for it
    assert hot(pool, CHEAP, 0)["backlog"] <= 10 * TASK_SCALE
    assert hot(pool, CHEAP, 0)["units"] >= 90 * TASK_SCALE
    assert shares[0] < 0.5 and shares[-1] < 0.05, shares
    assert all(b < a for a, b in zip(shares, shares[1:])), shares


def test_a_saturated_sink_stays_at_zero_when_its_signal_rises_until_it_delivers(
        proto, pool, registry, tracker, signer, sink_a, sink_b, funder, clock, keeper, relayer):
    """A dead sink that keeps declaring: once its backlog hits the cap (H epochs) its weight
    stays 0 even while its smoothed signal climbs (the cap climbs with it, which used to
    hand it Cbar_new - Cbar_old of weight back); one verified receipt clears the bit."""
    warm_market(proto, [sink_a, sink_b], [100, 100], clock, keeper)
    _stream_for(pool, funder, 1_600_000)

    def epoch(receipt_for_b=0):
        clock.to_epoch(clock.epoch() + 1, offset=-5)
        if receipt_for_b:
            _, arg = signer.receipt(sink_b, funder, receipt_for_b)
            tracker.submit_receipts(CHEAP, [arg], sender=relayer)
        room = pool.funder_room(CHEAP, funder)
        if room > 0:
            _, arg = signer.receipt(sink_a, funder, room)
            tracker.submit_receipts(CHEAP, [arg], sender=relayer)
        clock.next_epoch()
        pool.rebalance(CHEAP, sender=keeper)
        return hot(pool, CHEAP, 1)

    for _ in range(6):  # the backlog approaches the cap (geometrically: it never reaches it)
        b = epoch()
    assert b["sat"] == 0 and 0 < b["units"] < pool_capacity(proto, sink_b) // 10
    # its declared capacity wobbles down: the cap (H x the smoothed signal) falls below the
    # backlog and clips it, which is what saturates
    registry.declare_capacity(CHEAP, 60, sender=sink_b)
    b = epoch()
    assert b["sat"] == 1 and b["units"] == 0
    assert b["backlog"] == pool_capacity(proto, sink_b) * 20_000 // 10_000  # at the cap
    # ...and up again, past where it was: its smoothed signal rises every epoch
    _, spu = registry.task_types(CHEAP)
    registry.add_bond(CHEAP, 50 * spu, sender=sink_b)
    registry.declare_capacity(CHEAP, 150, sender=sink_b)
    signal = [pool_capacity(proto, sink_b)]
    for _ in range(4):
        b = epoch()
        signal.append(pool_capacity(proto, sink_b))
        assert b["units"] == 0 and b["sat"] == 1, b
    assert signal[-1] > signal[0] * 15 // 10  # it really rose
    assert_conserved(proto)
    # it delivers again: one receipt clears the bit at once, the next rebalance weighs it
    b = epoch(receipt_for_b=1_000)
    assert b["sat"] == 0 and b["units"] > 0


def test_late_receipts_still_clear_backlog(proto, pool, tracker, signer, sink_a, funder, clock, keeper, relayer):
    """Receipts relayed after the rebalance that paid for the work still count: the sink's
    backlog falls back to the fee-conversion residue of one epoch's fee move."""
    warm_market(proto, [sink_a], [100], clock, keeper)
    _stream_for(pool, funder, 800_000)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    h = hot(pool, CHEAP, 0)
    assert h["backlog"] > 0
    _, arg = signer.receipt(sink_a, funder, h["unclaimed"])
    tracker.submit_receipts(CHEAP, [arg], sender=relayer)
    assert hot(pool, CHEAP, 0)["backlog"] <= h["backlog"] * 1250 // 10_000


def test_departed_sink_gets_nothing_after_leaving_and_is_owed_its_balance(proto, pool, registry, sink_a, sink_b,
                                                                           funder, funder_b, clock, keeper, token):
    warm_market(proto, [sink_a, sink_b], [100, 100], clock, keeper)
    pool.distribute(CHEAP, USDC, sender=funder)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    earned_b = hot(pool, CHEAP, 1)["unclaimed"]
    assert earned_b > 0
    registry.deregister_sink(CHEAP, sender=sink_b)
    pool.fund(CHEAP, USDC, 0, sender=funder_b)  # a paused stream keeps a funder slot
    pool.distribute(CHEAP, USDC // 4, sender=funder_b)  # less than sink_a alone absorbs
    clock.next_epoch()
    tx = pool.rebalance(CHEAP, sender=keeper)
    assert pool.SlotSettled(task_type=CHEAP, sink=sink_b.address, slot=1, owed=earned_b) in own_events(tx, pool)
    assert pool.hot_word(CHEAP, 1) == 0
    assert registry.member_at(CHEAP, 1) == "0x" + "00" * 20
    assert pool.owed(CHEAP, sink_b) == earned_b
    # all of the second distribution went to sink_a (the leaving sink is out of the split)
    ev = pool.Rebalanced.from_receipt(tx)[0]
    assert ev.distributed == USDC // 4 and ev.to_escrow == 0
    before = token.balanceOf(sink_b)
    pool.claim(CHEAP, sender=sink_b)
    assert token.balanceOf(sink_b) == before + earned_b
    assert_conserved(proto)


def test_freed_slot_is_reused(proto, pool, registry, sink_a, sink_b, sink_c, clock, keeper):
    warm_market(proto, [sink_a, sink_b], [100, 100], clock, keeper)
    registry.deregister_sink(CHEAP, sender=sink_a)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    registry.register_sink(CHEAP, 100 * USDC, 50, sender=sink_c)
    assert registry.slot_of(CHEAP, sink_c) == 1  # slot 0 again
    assert pool.hot_word(CHEAP, 0) == 0


# ------------------------------------------------------------------ claims, credit


def test_claim(proto, pool, token, sink_a, funder, clock, keeper, stranger):
    with ape.reverts("pool: nothing to claim"):
        pool.claim(CHEAP, sender=stranger)
    warm_market(proto, [sink_a], [100], clock, keeper)
    pool.distribute(CHEAP, USDC // 2 + USDC // 2, sender=funder)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    owed = hot(pool, CHEAP, 0)["unclaimed"]
    assert owed > 0
    before = token.balanceOf(sink_a)
    tx = pool.claim(CHEAP, sender=sink_a)
    assert token.balanceOf(sink_a) == before + owed
    assert own_events(tx, pool) == [pool.Claimed(task_type=CHEAP, sink=sink_a.address, amount=owed)]
    assert hot(pool, CHEAP, 0)["unclaimed"] == 0
    with ape.reverts("pool: nothing to claim"):
        pool.claim(CHEAP, sender=sink_a)
    assert_conserved(proto)


def test_credit_only_tracker(pool, owner, stranger, funder):
    for who in (owner, stranger, funder):
        with ape.reverts("pool: caller is not the tracker"):
            pool.credit(CHEAP, [0], [1], [funder], [1], sender=who)


def test_credit_guards_hold_even_for_the_tracker(proto, pool, tracker, funder, sink_a, clock, keeper):
    """The tracker checks funding per receipt first; the pool re-checks the totals, so even
    a faulty tracker could not credit beyond a source's funding or mismatch arrays."""
    warm_market(proto, [sink_a], [100], clock, keeper)
    pool.distribute(CHEAP, USDC, sender=funder)
    as_tracker = ape.accounts[tracker.address]
    chain.set_balance(tracker.address, 10**18)
    with ape.reverts("pool: length mismatch"):
        pool.credit(CHEAP, [0], [], [funder], [1], sender=as_tracker)
    with ape.reverts("pool: credit exceeds funding"):
        pool.credit(CHEAP, [0], [USDC + 1], [funder], [USDC + 1], sender=as_tracker)
    pool.credit(CHEAP, [0], [USDC], [funder], [USDC], sender=as_tracker)
    assert pool.credit_of(CHEAP, funder) == (USDC, USDC)


# ------------------------------------------------------------------ packed storage


def test_set_params_keeps_the_tracker_and_wiring_keeps_the_params(project, owner, registry, pricing, escrow, tracker):
    p = owner.deploy(project.BackpressurePool, registry, pricing, escrow, 100_000, 7)
    assert (p.tracker(), p.tolerance_bps(), p.min_funding(), p.drain_bps()) == ("0x" + "00" * 20, 100_000, 7, 10_000)
    p.wire(tracker, sender=owner)
    assert (p.tracker(), p.tolerance_bps(), p.drain_bps()) == (tracker.address, 100_000, 10_000)
    p.set_params(1_000, 1, 0, sender=owner)
    assert (p.tracker(), p.tolerance_bps(), p.min_funding(), p.drain_bps()) == (tracker.address, 1_000, 1, 0)


def test_the_largest_deposit_round_trips_through_the_packed_stream(pool, escrow, token, owner, accounts, clock, proto):
    """Stream deposits and contributions are stored in 96-bit fields, the pot in 128 bits.
    token_io caps every amount and the pool's balance at 2**96 - 1, so the largest deposit
    possible must come back exact (a wrong mask or shift would cut it), and anything larger
    is refused before it reaches a packed word."""
    whale = accounts.generate_test_account()
    chain.set_balance(whale.address, 10**20)
    token.mint(whale, 2**97, sender=owner)
    token.approve(pool, 2**256 - 1, sender=whale)
    with ape.reverts("token_io: amount too large"):
        pool.fund(CHEAP, 2**96, 1, sender=whale)
    room = 2**96 - 1 - token.balanceOf(pool)
    tx = pool.fund(CHEAP, room, 2**64, sender=whale)
    st = pool.streams(CHEAP, pool.stream_count(CHEAP) - 1)
    t0 = chain.provider.get_block(tx.block_number).timestamp
    assert tuple(st) == (whale.address, 2**64, room, t0, 0)
    with ape.reverts("token_io: balance too large"):
        pool.distribute(CHEAP, 1, sender=whale)
    # a rebalance settles the stream (no sinks: what streamed overflows to escrow, and what
    # escrow cannot take goes back into the deposit); the money word stays exact
    clock.next_epoch()
    tx = pool.rebalance(CHEAP, sender=whale)
    st = pool.streams(CHEAP, pool.stream_count(CHEAP) - 1)
    assert (st.last, st.contrib) == (chain.provider.get_block(tx.block_number).timestamp, 0)
    assert st.remaining + escrow.balance_of(CHEAP, whale) == room
    assert token.balanceOf(whale) == 2**97 - room
    assert_conserved(proto)


def test_closed_streams_are_compacted_and_every_funder_keeps_its_own_stream(pool, token, owner, accounts, clock, keeper, proto):
    """Closed streams leave gaps that later live streams move into at the next rebalance,
    and a funder's index is rewritten only when its stream moved: close the first, a middle
    and the last of six, then check that every survivor (moved or not) tops up its own
    stream, that closed funders come back at the end, and that the funder -> index map
    agrees with the array after each round."""
    fs = []
    for i in range(6):
        a = accounts.generate_test_account()
        chain.set_balance(a.address, 10**20)
        token.mint(a, 100 * USDC, sender=owner)
        token.approve(pool, 2**256 - 1, sender=a)
        pool.fund(CHEAP, (10 + i) * USDC, 0, sender=a)
        fs.append(a)

    def layout():
        n = pool.stream_count(CHEAP)
        out = [pool.streams(CHEAP, j) for j in range(n)]
        for st in out:  # stream_of goes through the funder's index
            assert tuple(pool.stream_of(CHEAP, st.funder))[:3] == tuple(st)[:3]
        assert pool.streams(CHEAP, n).funder == "0x" + "00" * 20
        return [st.funder for st in out]

    for k in (1, 3, 5):
        pool.close_stream(CHEAP, sender=fs[k])
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    # live streams shift down into the gaps in order: 0 stays, 2 -> 1, 4 -> 2
    assert layout() == [fs[0].address, fs[2].address, fs[4].address]
    for k in (1, 3, 5):
        assert pool.stream_of(CHEAP, fs[k]).funder == "0x" + "00" * 20
    for k in (0, 2, 4):  # unmoved and moved alike top up their own stream
        pool.fund(CHEAP, USDC, 0, sender=fs[k])
        assert pool.stream_of(CHEAP, fs[k]).remaining == (11 + k) * USDC
    pool.fund(CHEAP, 2 * USDC, 0, sender=fs[5])
    pool.fund(CHEAP, 2 * USDC, 0, sender=fs[1])
    pool.close_stream(CHEAP, sender=fs[2])
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    assert layout() == [fs[0].address, fs[4].address, fs[5].address, fs[1].address]
    pool.fund(CHEAP, USDC, 0, sender=fs[5])
    assert pool.stream_of(CHEAP, fs[5]).remaining == 3 * USDC
    for k in (0, 1, 4, 5):
        pool.close_stream(CHEAP, sender=fs[k])
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    assert layout() == []
    assert_conserved(proto)
