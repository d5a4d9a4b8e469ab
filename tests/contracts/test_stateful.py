"""Stateful fuzzing: one RuleBasedStateMachine per money-moving surface.

PoolEscrowMachine drives streams, instant distributions, receipts, escrow deposits and
withdrawals, departures, claims, drains and rebalances; RegistryTrackerMachine drives
registrations, bonds, declarations, relayed attestations, receipts (good, replayed and
forged) and slashing. After every step the invariants are checked to the wei. Each run
starts from a chain snapshot and restores it in teardown. Shrunk counterexamples become
plain regression tests at the bottom of this file."""

import os

import ape
from ape import chain
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

from .conftest import CHEAP, PREMIUM, USDC, WAD, hot, warm_market
from pura.layout import TASK_SCALE

LONG = os.environ.get("PURA_HYPOTHESIS_PROFILE") == "long"
MACHINE = settings(max_examples=60 if LONG else 5, stateful_step_count=80 if LONG else 25)
ZERO = "0x" + "00" * 20


class Env:
    """Fixture values handed to a machine class (hypothesis builds machines itself)."""

    proto = accounts = clock = signer = None


class PoolEscrowMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.p, self.clock, self.signer = Env.proto, Env.clock, Env.signer
        a = Env.accounts
        self.owner, self.keeper, self.relayer = a[0], a[7], a[8]
        self.sinks = [a[2], a[3], a[4]]
        self.funders = [a[5], a[6]]
        # everyone tokens can reach: sinks, funders, the treasury
        self.everyone = self.sinks + self.funders + [a[1]]
        self.snapshot = chain.snapshot()
        self.verified = 0
        self.entries = {}  # escrow entry id -> funder (ours)

    def teardown(self):
        chain.restore(self.snapshot)

    @initialize()
    def market(self):
        warm_market(self.p, self.sinks, [100, 150, 250], self.clock, self.keeper, epochs=30)
        self.p.escrow.set_max_level(CHEAP, 20 * USDC, sender=self.owner)
        self.supply = sum(self.p.token.balanceOf(h) for h in self.holders())

    def holders(self):
        return [self.p.pool, self.p.escrow, self.p.registry] + self.everyone

    # ---------------------------------------------------------------- funders

    @rule(f=st.integers(0, 1), amount=st.integers(0, 50 * USDC), rate=st.integers(0, 5_000))
    def fund(self, f, amount, rate):
        funder = self.funders[f]
        new = self.p.pool.stream_of(CHEAP, funder).funder == ZERO
        if new and amount < USDC:
            with ape.reverts("pool: below min funding"):
                self.p.pool.fund(CHEAP, amount, rate, sender=funder)
        else:
            self.p.pool.fund(CHEAP, amount, rate, sender=funder)

    @rule(f=st.integers(0, 1))
    def close(self, f):
        funder = self.funders[f]
        if self.p.pool.stream_of(CHEAP, funder).funder == ZERO:
            with ape.reverts("pool: no stream"):
                self.p.pool.close_stream(CHEAP, sender=funder)
        else:
            self.p.pool.close_stream(CHEAP, sender=funder)
            assert self.p.pool.stream_of(CHEAP, funder).remaining == 0

    @rule(f=st.integers(0, 1), amount=st.integers(0, 10 * USDC))
    def distribute(self, f, amount):
        funder = self.funders[f]
        new = self.p.pool.stream_of(CHEAP, funder).funder == ZERO
        if amount == 0:
            with ape.reverts("pool: zero amount"):
                self.p.pool.distribute(CHEAP, amount, sender=funder)
        elif new and amount < USDC:
            with ape.reverts("pool: below min funding"):
                self.p.pool.distribute(CHEAP, amount, sender=funder)
        else:
            self.p.pool.distribute(CHEAP, amount, sender=funder)

    @rule(f=st.integers(0, 1), amount=st.integers(0, 8 * USDC))
    def escrow_deposit(self, f, amount):
        e = self.p.escrow
        if amount < USDC:
            with ape.reverts("escrow: below min deposit"):
                e.deposit(CHEAP, amount, sender=self.funders[f])
        elif e.level(CHEAP) + amount > 20 * USDC:
            with ape.reverts("escrow: full"):
                e.deposit(CHEAP, amount, sender=self.funders[f])
        else:
            tx = e.deposit(CHEAP, amount, sender=self.funders[f])
            self.entries[e.EscrowCredited.from_receipt(tx)[0].entry] = self.funders[f].address

    @rule(f=st.integers(0, 1), data=st.data())
    def escrow_withdraw(self, f, data):
        e = self.p.escrow
        funder = self.funders[f]
        q = e.queues(CHEAP)
        mine = [i for i in range(q.head, q.tail) if e.entry(CHEAP, i) == (funder.address, e.entry(CHEAP, i)[1])
                and e.entry(CHEAP, i)[1] > 0]
        if not mine:
            with ape.reverts("escrow: nothing to withdraw"):
                e.withdraw(CHEAP, [], sender=funder)
            return
        ids = data.draw(st.lists(st.sampled_from(mine), min_size=1, max_size=len(mine), unique=True))
        expect = sum(e.entry(CHEAP, i)[1] for i in ids)
        before = self.p.token.balanceOf(funder)
        e.withdraw(CHEAP, ids, sender=funder)
        assert self.p.token.balanceOf(funder) == before + expect

    # ---------------------------------------------------------------- sinks

    @rule(s=st.integers(0, 2), f=st.integers(0, 1), frac=st.integers(1, 100))
    def receipt(self, s, f, frac):
        sink, funder = self.sinks[s], self.funders[f]
        room = self.p.pool.funder_room(CHEAP, funder)
        registered = self.p.registry.slot_of(CHEAP, sink) != 0
        amount = max(1, room * frac // 100)
        _, arg = self.signer.receipt(sink, funder, amount)
        tx = self.p.tracker.submit_receipts(CHEAP, [arg], sender=self.relayer)
        ok = self.p.tracker.ReceiptRecorded.from_receipt(tx)
        if not registered:
            assert not ok
        elif amount <= room:  # the room only grows (one more block of streaming)
            assert ok
        if ok:
            self.verified += amount
        # the same receipt never counts twice
        tx = self.p.tracker.submit_receipts(CHEAP, [arg], sender=self.relayer)
        assert not self.p.tracker.ReceiptRecorded.from_receipt(tx)

    @rule(s=st.integers(0, 2))
    def claim(self, s):
        sink = self.sinks[s]
        pos = self.p.pool.position(CHEAP, sink)
        owed = pos.unclaimed + pos.owed
        if owed == 0:
            with ape.reverts("pool: nothing to claim"):
                self.p.pool.claim(CHEAP, sender=sink)
        else:
            before = self.p.token.balanceOf(sink)
            self.p.pool.claim(CHEAP, sender=sink)
            assert self.p.token.balanceOf(sink) == before + owed

    @rule(s=st.integers(0, 2))
    def leave_or_join(self, s):
        sink, reg = self.sinks[s], self.p.registry
        if reg.slot_of(CHEAP, sink) != 0:
            reg.deregister_sink(CHEAP, sender=sink)
        elif reg.occupied(CHEAP) != 2**reg.slot_count(CHEAP) - 1 or reg.slot_count(CHEAP) < 64:
            reg.register_sink(CHEAP, 150 * USDC, 120, sender=sink)

    # ---------------------------------------------------------------- keepers, time

    @rule(seconds=st.integers(1, 4_000))
    def sleep(self, seconds):
        self.clock.sleep(seconds)

    @rule()
    def rebalance(self):
        pool = self.p.pool
        if not pool.rebalance_due(CHEAP):
            with ape.reverts("pool: rebalance not due"):
                pool.rebalance(CHEAP, sender=self.keeper)
            self.clock.next_epoch()
        reg = self.p.registry
        # what the rebalance reads (a slash inside it may change a target afterwards)
        n = reg.slot_count(CHEAP)
        targets = [reg.target_of(CHEAP, i) for i in range(n)]
        caps = [reg.sink_state(CHEAP, reg.member_at(CHEAP, i)).cap if targets[i].status == 1 else 0 for i in range(n)]
        before = [hot(pool, CHEAP, i)["capacity"] for i in range(n)]
        pool.rebalance(CHEAP, sender=self.keeper)
        for i in range(n):
            if reg.target_of(CHEAP, i).status != 1:  # free (released) or leaving: no units, nothing owed on the slot
                assert pool.hot_word(CHEAP, i) == 0
            else:
                # units <= smoothed capacity, which moved toward the target it read (an EWMA
                # step), never above the bond's cap, and not above a hard target
                h, t = hot(pool, CHEAP, i), targets[i].target * TASK_SCALE
                assert h["units"] <= h["capacity"] <= caps[i] * TASK_SCALE
                assert min(before[i], t) <= h["capacity"] <= max(before[i], t)
                if targets[i].hard:
                    assert h["capacity"] <= t

    @rule()
    def drain(self):
        pool = self.p.pool
        if pool.pools(CHEAP).spare == 0:
            with ape.reverts("pool: no spare capacity"):
                pool.drain_escrow(CHEAP, sender=self.keeper)
        elif self.p.escrow.level(CHEAP) == 0:
            with ape.reverts("pool: escrow empty"):
                pool.drain_escrow(CHEAP, sender=self.keeper)
        else:
            pool.drain_escrow(CHEAP, sender=self.keeper)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def money_is_conserved_to_the_wei(self):
        p, t = self.p, self.p.token
        assert t.balanceOf(p.pool) == p.pool.liabilities(CHEAP) + p.pool.liabilities(PREMIUM)
        assert t.balanceOf(p.escrow) == p.escrow.total_held() == p.escrow.level(CHEAP) + p.escrow.level(PREMIUM)
        assert t.balanceOf(p.registry) == p.registry.total_bonded() + p.registry.treasury_accrued()
        assert sum(t.balanceOf(h) for h in self.holders()) == self.supply

    @invariant()
    def escrow_balances_match_entries(self):
        e = self.p.escrow
        q = e.queues(CHEAP)
        live = [e.entry(CHEAP, i) for i in range(q.head, q.tail)]
        for funder in self.funders:
            assert e.balance_of(CHEAP, funder) == sum(a for f, a in live if f == funder.address)

    @invariant()
    def receipts_count_once(self):
        assert self.p.tracker.total_verified(CHEAP) == self.verified


def test_pool_and_escrow_machine(proto, accounts, clock, signer):
    Env.proto, Env.accounts, Env.clock, Env.signer = proto, accounts, clock, signer
    run_state_machine_as_test(PoolEscrowMachine, settings=MACHINE)


class RegistryTrackerMachine(RuleBasedStateMachine):
    """Bonds, caps, declarations, attestations, receipts and slashing, against a model of
    every sink's bond that only the rules and the Slashed events change."""

    def __init__(self):
        super().__init__()
        self.p, self.clock, self.signer = Env.proto, Env.clock, Env.signer
        a = Env.accounts
        self.owner, self.keeper, self.relayer = a[0], a[7], a[8]
        self.sinks = [a[2], a[3], a[4], a[10]]
        self.funder = a[5]
        self.snapshot = chain.snapshot()
        self.bonds = {s.address: [0, 0] for s in self.sinks}  # bonded, unbonding
        self.accrued = 0
        self.accepted = set()
        self.verified = 0
        self.att_nonce = {s.address: 0 for s in self.sinks}

    def teardown(self):
        chain.restore(self.snapshot)

    @initialize()
    def funding(self):
        self.p.pool.fund(CHEAP, 200 * USDC, 500, sender=self.funder)

    def _slashed(self, tx):
        for ev in self.p.registry.Slashed.from_receipt(tx):
            b = self.bonds[ev.sink]
            from_unbonding = min(ev.taken, b[1])
            b[1] -= from_unbonding
            b[0] -= ev.taken - from_unbonding
            self.accrued += ev.taken

    def _registered(self, s):
        return self.p.registry.slot_of(CHEAP, self.sinks[s]) != 0

    @rule(s=st.integers(0, 3), units=st.integers(50, 400), cap=st.integers(0, 1_000))
    def register(self, s, units, cap):
        sink, reg = self.sinks[s], self.p.registry
        bond = units * USDC
        if self._registered(s):
            with ape.reverts("registry: already registered"):
                reg.register_sink(CHEAP, bond, cap, sender=sink)
        elif bond < 100 * USDC:
            with ape.reverts("registry: bond below minimum"):
                reg.register_sink(CHEAP, bond, cap, sender=sink)
        else:
            reg.register_sink(CHEAP, bond, cap, sender=sink)
            self.bonds[sink.address][0] += bond

    @rule(s=st.integers(0, 3))
    def deregister(self, s):
        sink = self.sinks[s]
        if not self._registered(s):
            with ape.reverts("registry: not registered"):
                self.p.registry.deregister_sink(CHEAP, sender=sink)
        else:
            self.p.registry.deregister_sink(CHEAP, sender=sink)
            b = self.bonds[sink.address]
            b[1] += b[0]
            b[0] = 0

    @rule(s=st.integers(0, 3), amount=st.integers(0, 100 * USDC))
    def add_bond(self, s, amount):
        sink = self.sinks[s]
        if not self._registered(s):
            with ape.reverts("registry: not registered"):
                self.p.registry.add_bond(CHEAP, amount, sender=sink)
        elif amount == 0:
            with ape.reverts("registry: zero amount"):
                self.p.registry.add_bond(CHEAP, amount, sender=sink)
        else:
            self.p.registry.add_bond(CHEAP, amount, sender=sink)
            self.bonds[sink.address][0] += amount

    @rule(s=st.integers(0, 3), amount=st.integers(0, 300 * USDC))
    def request_unbond(self, s, amount):
        sink, reg = self.sinks[s], self.p.registry
        b = self.bonds[sink.address]
        if not self._registered(s):
            msg = "registry: not registered"
        elif amount == 0:
            msg = "registry: zero amount"
        elif amount > b[0]:
            msg = "registry: amount exceeds bond"
        elif b[0] - amount < 100 * USDC:
            msg = "registry: bond below minimum"
        else:
            msg = None
        if msg:
            with ape.reverts(msg):
                reg.request_unbond(CHEAP, amount, sender=sink)
        else:
            reg.request_unbond(CHEAP, amount, sender=sink)
            b[0] -= amount
            b[1] += amount

    @rule(s=st.integers(0, 3))
    def withdraw_unbonded(self, s):
        sink, reg = self.sinks[s], self.p.registry
        b = self.bonds[sink.address]
        if b[1] == 0:
            with ape.reverts("registry: nothing unbonding"):
                reg.withdraw_unbonded(CHEAP, sender=sink)
        elif chain.pending_timestamp < reg.bonds(CHEAP, sink).release:
            with ape.reverts("registry: still unbonding"):
                reg.withdraw_unbonded(CHEAP, sender=sink)
        else:
            reg.withdraw_unbonded(CHEAP, sender=sink)
            b[1] = 0

    @rule(s=st.integers(0, 3), c=st.integers(0, 2**33))
    def declare(self, s, c):
        if not self._registered(s):
            with ape.reverts("registry: not registered"):
                self.p.registry.declare_capacity(CHEAP, c, sender=self.sinks[s])
        else:
            self.p.registry.declare_capacity(CHEAP, c, sender=self.sinks[s])

    @rule(s=st.integers(0, 3), c=st.integers(0, 1_000), jump=st.integers(-1, 2), forged=st.booleans())
    def attest(self, s, c, jump, forged):
        sink = self.sinks[s]
        nonce = max(0, self.att_nonce[sink.address] + jump)
        key = self.sinks[(s + 1) % 4] if forged else None
        _, arg = self.signer.attestation(sink, c, nonce, key=key)
        reg = self.p.registry
        sp1 = reg.slot_of(CHEAP, sink)
        stored = reg.sink_state(CHEAP, sink).nonce if sp1 else None
        tx = reg.submit_attestations(CHEAP, [arg], sender=self.relayer)
        accepted = bool(reg.CapacitiesAttested.from_receipt(tx))
        assert accepted == (sp1 != 0 and not forged and nonce > stored)
        if accepted:
            self.att_nonce[sink.address] = nonce
            assert reg.sink_state(CHEAP, sink).declared == c
            assert reg.target_of(CHEAP, sp1 - 1).target == min(c, reg.sink_state(CHEAP, sink).cap)

    @rule(s=st.integers(0, 3), frac=st.integers(1, 50), attack=st.sampled_from(["none", "sink", "source", "replay"]))
    def receipt(self, s, frac, attack):
        sink = self.sinks[s]
        amount = max(1, self.p.pool.funder_room(CHEAP, self.funder) * frac // 100)
        if attack == "replay" and not self.accepted:
            attack = "none"  # nothing to replay yet: an honest receipt
        if attack == "replay":
            source, nonce = next(iter(self.accepted))
            _, arg = self.signer.receipt(sink, self.funder, amount, nonce=nonce)
        else:
            key = {"sink": self.sinks[(s + 1) % 4], "source": self.keeper}.get(attack)
            _, arg = self.signer.receipt(sink, self.funder, amount,
                                         sink_key=key if attack == "sink" else None,
                                         source_key=key if attack == "source" else None)
        tx = self.p.tracker.submit_receipts(CHEAP, [arg], sender=self.relayer)
        ok = self.p.tracker.ReceiptRecorded.from_receipt(tx)
        key = (self.funder.address, arg[5])
        if attack != "none" or key in self.accepted or not self._registered(s):
            assert not ok
        if ok:
            self.accepted.add(key)
            self.verified += amount

    @rule()
    def epoch(self):
        self.clock.next_epoch()
        tx = self.p.pool.rebalance(CHEAP, sender=self.keeper)
        self._slashed(tx)

    @rule(seconds=st.integers(3_600, 8 * 86_400))
    def sleep(self, seconds):
        self.clock.sleep(seconds)

    @invariant()
    def bonds_are_accounted(self):
        reg, t = self.p.registry, self.p.token
        assert t.balanceOf(reg) == reg.total_bonded() + reg.treasury_accrued()
        assert reg.treasury_accrued() == self.accrued
        assert reg.total_bonded() == sum(b[0] + b[1] for b in self.bonds.values())
        for sink in self.sinks:
            on_chain = reg.bonds(CHEAP, sink)
            assert [on_chain.bonded, on_chain.unbonding] == self.bonds[sink.address]
            sp1 = reg.slot_of(CHEAP, sink)
            if sp1:
                st_ = reg.sink_state(CHEAP, sink)
                assert st_.cap == min(on_chain.bonded // USDC, 2**32 - 1)
                hard = st_.cap <= st_.declared or st_.cut_epoch_p1 != 0
                assert reg.target_of(CHEAP, sp1 - 1) == (min(st_.declared, st_.cap), 1, hard)
                # the pool's signal is within the cap unless a lowered cap is still pending
                # (then the next rebalance clamps it: asserted in the pool machine)
                if st_.cut_epoch_p1 == 0:
                    assert hot(self.p.pool, CHEAP, sp1 - 1)["capacity"] <= st_.cap * TASK_SCALE

    @invariant()
    def no_receipt_counted_twice(self):
        tr = self.p.tracker
        assert tr.total_verified(CHEAP) == self.verified
        for source, nonce in self.accepted:
            assert tr.nonce_used(source, nonce)


def test_registry_and_tracker_machine(proto, accounts, clock, signer):
    Env.proto, Env.accounts, Env.clock, Env.signer = proto, accounts, clock, signer
    run_state_machine_as_test(RegistryTrackerMachine, settings=MACHINE)
