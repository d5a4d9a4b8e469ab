"""Slashing: only paid under-delivery, relative to the best paid sink, in proportion to the
shortfall, once per unit of shortfall; unbonding or leaving does not dodge it."""

import pytest

from .conftest import CHEAP, USDC, assert_conserved, hot, warm_market


@pytest.fixture
def three(proto, sink_a, sink_b, sink_c, funder, clock, keeper):
    warm_market(proto, [sink_a, sink_b, sink_c], [100, 100, 100], clock, keeper)
    proto.pool.fund(CHEAP, 500 * USDC, 2_400_000 // 3600, sender=funder)  # ~80 % of capacity
    return proto


def run_epochs(proto, signer, clock, keeper, relayer, funder, workers, n):
    """n epochs in which `workers` back the funder's work with receipts just before each
    epoch ends (the funder's unvouched money split evenly among them)."""
    slashes = []
    for _ in range(n):
        clock.to_epoch(clock.epoch() + 1, offset=-5)
        room = proto.pool.funder_room(CHEAP, funder)
        if workers and room > 0:
            args = [signer.receipt(w, funder, room // len(workers))[1] for w in workers]
            proto.tracker.submit_receipts(CHEAP, args, sender=relayer)
        clock.next_epoch()
        tx = proto.pool.rebalance(CHEAP, sender=keeper)
        slashes += list(proto.tracker.ShortfallSlashed.from_receipt(tx))
    return slashes


def test_non_delivering_sink_is_slashed_in_proportion(three, signer, clock, keeper, relayer, funder,
                                                      sink_a, sink_b, sink_c, treasury, token):
    reg = three.registry
    slashes = run_epochs(three, signer, clock, keeper, relayer, funder, [sink_a, sink_b], 6)
    assert slashes and {s.sink for s in slashes} == {sink_c.address}
    for s in slashes:
        assert s.requested == s.shortfall * 5_000 // 10_000 and s.taken == s.requested
    taken = sum(s.taken for s in slashes)
    assert reg.bonds(CHEAP, sink_c).bonded == 100 * USDC - taken
    assert reg.bonds(CHEAP, sink_a).bonded == 100 * USDC and reg.bonds(CHEAP, sink_b).bonded == 100 * USDC
    assert reg.treasury_accrued() == taken
    # the slash never exceeds half of what sink_c was paid beyond one epoch of tolerance
    assert taken <= hot(three.pool, CHEAP, 2)["unclaimed"] // 2
    before = token.balanceOf(treasury)
    reg.pay_treasury(sender=keeper)
    assert token.balanceOf(treasury) == before + taken
    assert_conserved(three)


def test_each_unit_of_shortfall_is_slashed_once(three, signer, clock, keeper, relayer, funder, sink_a, sink_b,
                                                 sink_c):
    paid_before = hot(three.pool, CHEAP, 2)["unclaimed"]
    slashes = run_epochs(three, signer, clock, keeper, relayer, funder, [sink_a, sink_b], 12)
    paid = hot(three.pool, CHEAP, 2)["unclaimed"] - paid_before
    reported = sum(s.shortfall for s in slashes)
    # everything reported was paid to sink_c and never verified, and no more than that
    assert 0 < reported <= paid
    # as its weight falls, so does what it is paid, and so do new slashes
    assert slashes[-1].shortfall < slashes[0].shortfall / 20


def test_source_outage_slashes_nobody(three, signer, clock, keeper, relayer, funder):
    """No receipts at all (the payer stopped confirming): every sink backlogs equally; that
    is not evidence against any sink. Weights fall together, money waits in escrow."""
    slashes = run_epochs(three, signer, clock, keeper, relayer, funder, [], 6)
    assert slashes == []
    assert three.escrow.level(CHEAP) > 0


def test_idle_sinks_are_never_slashed(proto, sink_a, sink_b, clock, keeper):
    warm_market(proto, [sink_a, sink_b], [100, 100], clock, keeper)
    for _ in range(8):
        clock.next_epoch()
        tx = proto.pool.rebalance(CHEAP, sender=keeper)
        assert proto.tracker.ShortfallSlashed.from_receipt(tx) == []
    assert proto.registry.treasury_accrued() == 0


def test_unbonding_does_not_dodge_the_slash(three, signer, clock, keeper, relayer, funder, sink_a, sink_b, sink_c):
    run_epochs(three, signer, clock, keeper, relayer, funder, [sink_a, sink_b], 1)
    reg = three.registry
    reg.add_bond(CHEAP, 100 * USDC, sender=sink_c)
    reg.request_unbond(CHEAP, 100 * USDC, sender=sink_c)  # tries to pull half out first
    slashes = run_epochs(three, signer, clock, keeper, relayer, funder, [sink_a, sink_b], 4)
    taken = sum(s.taken for s in slashes if s.sink == sink_c.address)
    assert taken > 0
    b = reg.bonds(CHEAP, sink_c)
    # slashes hit the unbonding part first
    assert b.unbonding == 100 * USDC - min(taken, 100 * USDC)
    assert_conserved(three)


def test_leaving_does_not_dodge_the_slash(three, signer, clock, keeper, relayer, funder, sink_a, sink_b, sink_c):
    """sink_c was paid one epoch and delivered nothing (not yet past the threshold), then
    leaves. Its departure is judged against its last weight: the shortfall is slashed from
    the bond it is unbonding."""
    first = run_epochs(three, signer, clock, keeper, relayer, funder, [sink_a, sink_b], 1)
    assert first == []
    reg = three.registry
    before = reg.bonds(CHEAP, sink_c)
    reg.deregister_sink(CHEAP, sender=sink_c)
    slashes = [s for s in run_epochs(three, signer, clock, keeper, relayer, funder, [sink_a, sink_b], 1)
               if s.sink == sink_c.address]
    assert slashes and slashes[0].taken > 0
    assert reg.bonds(CHEAP, sink_c).unbonding == before.bonded + before.unbonding - slashes[0].taken
    assert_conserved(three)
