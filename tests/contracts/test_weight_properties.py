"""SPEC §4 backpressure-weight properties 1-4, checked on the deployed contracts with
hypothesis-chosen markets (few examples in CI, many under the long profile).

Sinks deliver through receipts the funder relays just before each epoch ends, for the
work they actually did: min(what the pool pays them, what they can do)."""

import os

from ape import chain
from hypothesis import given, settings, strategies as st

from .conftest import CHEAP, USDC, hot, warm_market
from pura.market import expected_pay

LONG = os.environ.get("PURA_HYPOTHESIS_PROFILE") == "long"
FEW = settings(max_examples=30 if LONG else 3)


class Market:
    def __init__(self, proto, accounts, clock, signer, capacities):
        self.p, self.clock, self.signer = proto, clock, signer
        self.sinks = [accounts[2 + i] for i in range(len(capacities))]
        self.funder, self.keeper, self.relayer = accounts[5], accounts[7], accounts[8]
        warm_market(proto, self.sinks, capacities, clock, self.keeper)

    def units(self):
        return [hot(self.p.pool, CHEAP, i)["units"] for i in range(len(self.sinks))]

    def shares(self):
        u = self.units()
        return [x / sum(u) for x in u] if sum(u) else [0.0] * len(u)

    def stream(self, per_epoch):
        self.p.pool.fund(CHEAP, 2_000 * USDC, max(1, per_epoch // 3600), sender=self.funder)

    def epoch(self, can_do):
        """One epoch: each sink delivers min(its pay, can_do[i] tasks * fee); returns pay."""
        self.clock.to_epoch(self.clock.epoch() + 1, offset=-10)
        fee = self.p.pricing.base_fee(CHEAP)
        pay = expected_pay(self.p.pool, self.p.pricing, CHEAP, self.sinks, [self.funder], 11)
        room = self.p.pool.funder_room(CHEAP, self.funder)
        args = []
        for sink, p, c in zip(self.sinks, pay, can_do):
            amount = min(p + p // 100, c * fee, room)  # a little over: late streaming seconds
            if amount > 0:
                room -= amount
                args.append(self.signer.receipt(sink, self.funder, amount)[1])
        if args:
            self.p.tracker.submit_receipts(CHEAP, args, sender=self.relayer)
        self.clock.next_epoch()
        before = [hot(self.p.pool, CHEAP, i)["unclaimed"] for i in range(len(self.sinks))]
        self.p.pool.rebalance(CHEAP, sender=self.keeper)
        return [hot(self.p.pool, CHEAP, i)["unclaimed"] - b for i, b in enumerate(before)]


capacity_lists = st.lists(st.integers(40, 400), min_size=3, max_size=4)


@FEW
@given(caps=capacity_lists, load=st.floats(0.3, 0.7), dead=st.integers(0, 3))
def test_p1_a_sink_that_stops_delivering_loses_its_share_to_the_others(proto, accounts, clock, signer, caps, load,
                                                                        dead):
    dead %= len(caps)
    with chain.isolate():
        m = Market(proto, accounts, clock, signer, caps)
        fee = proto.pricing.base_fee(CHEAP)
        m.stream(int(load * sum(caps) * fee))
        for _ in range(2):
            m.epoch(caps)
        can_do = list(caps)
        can_do[dead] = 0
        for _ in range(8):
            m.epoch(can_do)
        shares = m.shares()
        assert shares[dead] < 0.05, shares
        live = [c for i, c in enumerate(caps) if i != dead]
        for i, c in enumerate(caps):
            if i != dead:
                # the others split the rest in proportion to their weights (capacities)
                assert abs(shares[i] / (1 - shares[dead]) - c / sum(live)) < 0.02, (shares, caps)


@FEW
@given(caps=capacity_lists, epochs=st.integers(1, 6))
def test_p2_an_idle_sink_is_never_penalised(proto, accounts, clock, signer, caps, epochs):
    with chain.isolate():
        m = Market(proto, accounts, clock, signer, caps)
        for _ in range(epochs):
            m.epoch([0] * len(caps))  # nobody pays, nobody delivers
        for i, sink in enumerate(m.sinks):
            h = hot(proto.pool, CHEAP, i)
            assert h["backlog"] == 0
            assert h["units"] == h["capacity"] == proto.pool.position(CHEAP, sink).capacity
        assert proto.registry.treasury_accrued() == 0


@FEW
@given(true_caps=st.lists(st.integers(60, 200), min_size=3, max_size=3), factor=st.sampled_from([2, 5]),
       liar=st.integers(0, 2))
def test_p3_an_over_declaring_sink_converges_to_the_share_it_delivers(proto, accounts, clock, signer, true_caps,
                                                                      factor, liar):
    declared = list(true_caps)
    declared[liar] *= factor
    with chain.isolate():
        m = Market(proto, accounts, clock, signer, declared)
        fee = proto.pricing.base_fee(CHEAP)
        # demand saturates what the sinks can really do
        m.stream(int(1.3 * sum(true_caps) * fee))
        for _ in range(16):
            m.epoch(true_caps)
        shares = m.shares()
        target = true_caps[liar] / sum(true_caps)
        assert abs(shares[liar] - target) / target < 0.05, (shares, target)


@FEW
@given(caps=capacity_lists, load=st.floats(0.2, 0.75))
def test_p4_honest_sinks_below_capacity_waste_nothing(proto, accounts, clock, signer, caps, load):
    with chain.isolate():
        m = Market(proto, accounts, clock, signer, caps)
        fee = proto.pricing.base_fee(CHEAP)
        m.stream(int(load * sum(caps) * fee))
        total_pay = 0
        for _ in range(6):
            total_pay += sum(m.epoch(caps))
        assert proto.escrow.level(CHEAP) == 0  # nothing overflowed
        for i, sink in enumerate(m.sinks):
            h = hot(proto.pool, CHEAP, i)
            assert h["units"] >= h["capacity"] * 99 // 100  # weights stay at capacity
        verified = proto.tracker.total_verified(CHEAP)
        assert verified >= total_pay * 99 // 100  # ~all payment matched by verified work
