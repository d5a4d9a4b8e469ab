"""CapacityRegistry: every external function, every revert message, linear caps, the published
targets, and the EWMA the pool applies to them."""

import ape
import pytest
from ape import chain

from .conftest import CHEAP, PREMIUM, USDC, WAD, assert_conserved, hot, own_events, smoothed, warm_market
from bench.sim_model import ewma_decay
from pura.layout import TASK_SCALE
from pura.signing import task_type_id

ALPHA = 3 * 10**17


def test_constructor_params(registry, token, treasury):
    assert registry.TOKEN() == token.address
    assert registry.ALPHA_WAD() == ALPHA
    assert registry.EPOCH_LENGTH() == 3600
    assert registry.treasury() == treasury.address
    assert registry.MAX_SINKS() == 64


def test_constructor_rejects_bad_alpha_and_treasury(project, owner, token, treasury):
    with ape.reverts("registry: alpha out of range"):
        owner.deploy(project.CapacityRegistry, token, 3600, 0, 1, treasury)
    with ape.reverts("registry: alpha out of range"):
        owner.deploy(project.CapacityRegistry, token, 3600, WAD + 1, 1, treasury)
    with ape.reverts("registry: zero treasury"):
        owner.deploy(project.CapacityRegistry, token, 3600, ALPHA, 1, "0x" + "00" * 20)
    with ape.reverts("epoch_clock: zero epoch length"):
        owner.deploy(project.CapacityRegistry, token, 0, ALPHA, 1, treasury)


# ------------------------------------------------------------------ task types


def test_create_task_type(registry, owner):
    tid = task_type_id("new.market")
    tx = registry.create_task_type(tid, 50 * USDC, 2 * USDC, sender=owner)
    assert registry.task_exists(tid)
    assert registry.task_types(tid) == (50 * USDC, 2 * USDC)
    assert own_events(tx, registry) == [registry.TaskTypeCreated(task_type=tid, min_bond=50 * USDC, stake_per_unit=2 * USDC)]


def test_create_task_type_reverts(registry, owner, stranger):
    tid = task_type_id("x")
    with ape.reverts("ownable: caller is not the owner"):
        registry.create_task_type(tid, 10, 1, sender=stranger)
    with ape.reverts("registry: zero task type"):
        registry.create_task_type(b"\x00" * 32, 10, 1, sender=owner)
    with ape.reverts("registry: task type exists"):
        registry.create_task_type(CHEAP, 10, 1, sender=owner)
    with ape.reverts("registry: zero stake per unit"):
        registry.create_task_type(tid, 10, 0, sender=owner)
    with ape.reverts("registry: min bond below one unit"):
        registry.create_task_type(tid, 1, 2, sender=owner)
    with ape.reverts("registry: min bond too large"):
        registry.create_task_type(tid, 2**96, 1, sender=owner)


# ------------------------------------------------------------------ wiring, treasury, ownership


def test_wire_once_owner_only(project, owner, stranger, token, treasury, pool, tracker):
    reg = owner.deploy(project.CapacityRegistry, token, 3600, ALPHA, 1, treasury)
    with ape.reverts("ownable: caller is not the owner"):
        reg.wire(pool, tracker, sender=stranger)
    with ape.reverts("registry: zero address"):
        reg.wire("0x" + "00" * 20, tracker, sender=owner)
    tx = reg.wire(pool, tracker, sender=owner)
    assert own_events(tx, reg) == [reg.Wired(pool=pool.address, tracker=tracker.address)]
    with ape.reverts("registry: already wired"):
        reg.wire(pool, tracker, sender=owner)
    # the deployed registry is wired to the deployed pool and tracker
    assert reg.pool() == pool.address and reg.tracker() == tracker.address


def test_set_treasury(registry, owner, stranger):
    with ape.reverts("ownable: caller is not the owner"):
        registry.set_treasury(stranger, sender=stranger)
    with ape.reverts("registry: zero treasury"):
        registry.set_treasury("0x" + "00" * 20, sender=owner)
    tx = registry.set_treasury(stranger, sender=owner)
    assert registry.treasury() == stranger.address
    assert own_events(tx, registry) == [registry.TreasurySet(treasury=stranger.address)]


def test_pay_treasury_nothing(registry, stranger):
    with ape.reverts("registry: nothing accrued"):
        registry.pay_treasury(sender=stranger)


def test_two_step_ownership(registry, owner, stranger, keeper):
    registry.transfer_ownership(stranger, sender=owner)
    assert registry.owner() == owner.address
    assert registry.pending_owner() == stranger.address
    with ape.reverts("ownable_2step: caller is not the new owner"):
        registry.accept_ownership(sender=keeper)
    registry.accept_ownership(sender=stranger)
    assert registry.owner() == stranger.address
    with ape.reverts("ownable: caller is not the owner"):
        registry.create_task_type(task_type_id("y"), 10, 1, sender=owner)


# ------------------------------------------------------------------ registration


def test_register_sink(registry, token, sink_a, proto):
    before = token.balanceOf(sink_a)
    tx = registry.register_sink(CHEAP, 150 * USDC, 120, sender=sink_a)
    assert token.balanceOf(sink_a) == before - 150 * USDC
    assert registry.slot_of(CHEAP, sink_a) == 1
    assert registry.member_at(CHEAP, 0) == sink_a.address
    assert registry.bonds(CHEAP, sink_a) == (150 * USDC, 0, 0)
    assert registry.sink_state(CHEAP, sink_a) == (1, 120, 150, 0, 0)
    assert registry.target_of(CHEAP, 0) == (120, 1, False)
    assert registry.SinkRegistered(task_type=CHEAP, sink=sink_a.address, slot=0, bond=150 * USDC, declared=120) in own_events(tx, registry)
    assert registry.CapacityDeclared(task_type=CHEAP, sink=sink_a.address, declared=120, nonce=0) in own_events(tx, registry)
    assert_conserved(proto)


def test_register_sink_reverts(registry, sink_a):
    with ape.reverts("registry: unknown task type"):
        registry.register_sink(task_type_id("nope"), 150 * USDC, 1, sender=sink_a)
    with ape.reverts("registry: bond below minimum"):
        registry.register_sink(CHEAP, 100 * USDC - 1, 1, sender=sink_a)
    registry.register_sink(CHEAP, 100 * USDC, 1, sender=sink_a)
    with ape.reverts("registry: already registered"):
        registry.register_sink(CHEAP, 100 * USDC, 1, sender=sink_a)


def test_register_without_allowance_reverts(registry, token, stranger, owner, accounts):
    newbie = accounts[17]
    token.mint(newbie, 1000 * USDC, sender=owner)
    with ape.reverts():
        registry.register_sink(CHEAP, 100 * USDC, 1, sender=newbie)
    assert registry.slot_of(CHEAP, newbie) == 0


def test_sink_set_is_bounded_at_64(registry, pool, token, owner, accounts, clock, keeper):
    """MAX_SINKS = 64: the 65th registration reverts; every one of the 64 published entries
    reads back (slot 63 is alone in the last target word); after one leaves and the pool
    releases the slot, a newcomer takes the freed slot."""
    sinks = []
    for _ in range(65):
        a = accounts.generate_test_account()
        chain.set_balance(a.address, 10**20)
        token.mint(a, 100 * USDC, sender=owner)
        token.approve(registry, 100 * USDC, sender=a)
        sinks.append(a)
    for k, a in enumerate(sinks[:64]):
        registry.register_sink(CHEAP, 100 * USDC, 10 + k, sender=a)
    assert registry.slot_count(CHEAP) == 64
    assert registry.occupied(CHEAP) == 2**64 - 1
    n, words = registry.capacities(CHEAP)
    assert n == 64 and words == [(10 + k) | (1 << 248) for k in range(64)]
    assert registry.target_of(CHEAP, 63) == (73, 1, False)
    with ape.reverts("registry: sink set full"):
        registry.register_sink(CHEAP, 100 * USDC, 10, sender=sinks[64])
    # a leaving sink still holds its slot until the pool releases it
    registry.deregister_sink(CHEAP, sender=sinks[5])
    with ape.reverts("registry: sink set full"):
        registry.register_sink(CHEAP, 100 * USDC, 10, sender=sinks[64])
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)  # settles and releases slot 5
    assert registry.target_of(CHEAP, 5) == (0, 0, False)
    registry.register_sink(CHEAP, 100 * USDC, 7, sender=sinks[64])
    assert registry.slot_of(CHEAP, sinks[64]) == 6
    assert registry.capacities(CHEAP)[1][5] == 7 | (1 << 248)
    # the newcomer starts from zero in the pool, whatever the slot held before
    assert pool.hot_word(CHEAP, 5) == 0


# ------------------------------------------------------------------ linear cap


def test_capacity_is_capped_linearly_by_bond(registry, pool, sink_a, sink_b, clock, keeper):
    registry.register_sink(CHEAP, 300 * USDC, 10**9, sender=sink_a)  # cap = 300
    st = registry.sink_state(CHEAP, sink_a)
    assert st.cap == 300 and st.declared == 10**9
    # the cap binds: the published target is the cap, hard (a ceiling for the signal)
    assert registry.target_of(CHEAP, 0) == (300, 1, True)
    clock.next_epoch(200)
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 300 * TASK_SCALE
    # splitting the same 300 into three identities of 100 gives the same total cap
    assert sum([100 // 1, 100 // 1, 100 // 1]) == 300


def test_declared_capacity_above_max_is_clamped(registry, sink_a):
    registry.register_sink(CHEAP, 100 * USDC, 2**200, sender=sink_a)
    assert registry.sink_state(CHEAP, sink_a).declared == 2**32 - 1
    assert registry.target_of(CHEAP, 0) == (100, 1, True)


def test_capacities_view_reports_status(registry, sink_a, sink_b, clock):
    registry.register_sink(CHEAP, 100 * USDC, 50, sender=sink_a)
    registry.register_sink(CHEAP, 100 * USDC, 50, sender=sink_b)
    clock.next_epoch()
    registry.deregister_sink(CHEAP, sender=sink_b)
    n, words = registry.capacities(CHEAP)
    assert n == 2 and len(words) == 64 and not any(words[2:])
    # target 50 (declared below the cap of 100: not hard), active
    assert words[0] == 50 | (1 << 248)
    # leaving: no target
    assert words[1] == 2 << 248


def test_capacities_view_packs_seven_slots_per_word(registry, token, owner, accounts):
    """Every slot's entry round-trips through the packing, across word boundaries (slots
    6/7, 13/14, ...), with targets at the field's bounds, hard or not, active or leaving."""
    sinks = []
    for k in range(16):
        a = accounts.generate_test_account()
        chain.set_balance(a.address, 10**20)
        bond = (100 + k) * USDC
        token.mint(a, bond, sender=owner)
        token.approve(registry, bond, sender=a)
        declared = [2**32 - 1, 0, 100 + k, 1][k % 4]
        registry.register_sink(CHEAP, bond, declared, sender=a)
        sinks.append((a, declared, 100 + k))
    registry.deregister_sink(CHEAP, sender=sinks[7][0])
    registry.deregister_sink(CHEAP, sender=sinks[13][0])
    n, words = registry.capacities(CHEAP)
    assert n == 16
    for i, (a, declared, cap) in enumerate(sinks):
        if i in (7, 13):
            assert words[i] == 2 << 248
            assert registry.target_of(CHEAP, i) == (0, 2, False)
            continue
        target, hard = min(declared, cap), cap <= declared
        assert words[i] == target | (int(hard) << 32) | (1 << 248), i
        assert registry.target_of(CHEAP, i) == (target, 1, hard)
    with ape.reverts("registry: slot out of range"):
        registry.target_of(CHEAP, 64)


# ------------------------------------------------------------------ EWMA (applied by the pool)


def test_ewma_starts_at_zero_and_steps_once_per_epoch(registry, pool, sink_a, clock, keeper):
    pool.rebalance(CHEAP, sender=keeper)
    registry.register_sink(CHEAP, 200 * USDC, 100, sender=sink_a)
    # many declarations inside one epoch: only the last is the target, nothing moves now
    for c in (150, 10, 100):
        registry.declare_capacity(CHEAP, c, sender=sink_a)
    assert smoothed(pool, sink_a) == 0
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 30 * TASK_SCALE
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 51 * TASK_SCALE
    registry.declare_capacity(CHEAP, 200, sender=sink_a)
    registry.declare_capacity(CHEAP, 200, sender=sink_a)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    # 0.3 * 200 + 0.7 * 51 = 95.7
    assert smoothed(pool, sink_a) == 957 * TASK_SCALE // 10
    # two epochs without a rebalance: two steps at once, 200 - (200 - 95.7) * 0.49 = 148.893
    clock.next_epoch(2)
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 148_893 * TASK_SCALE // 1000


def test_first_rebalance_counts_epochs_from_zero(registry, pool, sink_a, sink_b, clock, keeper):
    """A market's first rebalance steps every signal once per epoch since epoch 0; a sink that
    registers after it starts from zero like any other."""
    start = clock.epoch()
    registry.register_sink(CHEAP, 200 * USDC, 100, sender=sink_a)
    clock.next_epoch(2)
    pool.rebalance(CHEAP, sender=keeper)
    gap = clock.epoch()
    assert gap >= start + 2
    expected = 100 * TASK_SCALE - 100 * TASK_SCALE * ewma_decay(gap, 7 * 10**17) // WAD
    assert smoothed(pool, sink_a) == expected
    registry.register_sink(CHEAP, 200 * USDC, 100, sender=sink_b)
    assert smoothed(pool, sink_b) == 0
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_b) == 30 * TASK_SCALE


def test_ewma_reaches_target_exactly(registry, pool, sink_a, clock, keeper):
    pool.rebalance(CHEAP, sender=keeper)
    registry.register_sink(CHEAP, 1000 * USDC, 997, sender=sink_a)
    e = 0
    while smoothed(pool, sink_a) != 997 * TASK_SCALE:
        clock.next_epoch()
        pool.rebalance(CHEAP, sender=keeper)
        e += 1
        assert e < 200
    # and downward too, smoothly: one step, then the rest after a long gap
    registry.declare_capacity(CHEAP, 3, sender=sink_a)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 3 * TASK_SCALE + 994 * TASK_SCALE * 7 // 10
    clock.next_epoch(300)
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 3 * TASK_SCALE


def test_declare_capacity_reverts_when_not_registered(registry, stranger):
    with ape.reverts("registry: not registered"):
        registry.declare_capacity(CHEAP, 5, sender=stranger)


def test_declare_capacity_event(registry, sink_a):
    registry.register_sink(CHEAP, 100 * USDC, 5, sender=sink_a)
    tx = registry.declare_capacity(CHEAP, 500, sender=sink_a)
    assert own_events(tx, registry) == [registry.CapacityDeclared(task_type=CHEAP, sink=sink_a.address, declared=500, nonce=0)]


# ------------------------------------------------------------------ bonds


def test_bond_changes_republish_min_of_declared_and_cap(registry, pool, proto, sink_a, clock, keeper):
    """A bond change republishes min(declared, cap), never the cap alone: with the declaration
    below the cap, adding or unbonding stake (above the declaration) leaves the target at
    the declaration; a slash that takes the cap below it makes the cap the target."""
    registry.register_sink(CHEAP, 300 * USDC, 120, sender=sink_a)
    registry.add_bond(CHEAP, 100 * USDC, sender=sink_a)
    assert registry.target_of(CHEAP, 0) == (120, 1, False)
    registry.request_unbond(CHEAP, 150 * USDC, sender=sink_a)  # cap 400 -> 250: a cut, hard
    assert registry.target_of(CHEAP, 0) == (120, 1, True)
    tracker_as_sender = ape.accounts[proto.tracker.address]  # anvil impersonation
    chain.set_balance(proto.tracker.address, 10**18)
    registry.slash(CHEAP, sink_a, 300 * USDC, sender=tracker_as_sender)  # 150 unbonding first, then 150
    assert registry.sink_state(CHEAP, sink_a).cap == 100
    assert registry.target_of(CHEAP, 0) == (100, 1, True)


def test_add_bond_raises_cap(registry, sink_a, proto):
    registry.register_sink(CHEAP, 100 * USDC, 500, sender=sink_a)
    tx = registry.add_bond(CHEAP, 50 * USDC, sender=sink_a)
    assert registry.sink_state(CHEAP, sink_a).cap == 150
    assert registry.target_of(CHEAP, 0) == (150, 1, True)  # still below the declared 500
    assert registry.bonds(CHEAP, sink_a).bonded == 150 * USDC
    assert own_events(tx, registry) == [registry.BondAdded(task_type=CHEAP, sink=sink_a.address, amount=50 * USDC, bonded=150 * USDC)]
    assert_conserved(proto)


def test_add_bond_reverts(registry, sink_a, stranger):
    with ape.reverts("registry: not registered"):
        registry.add_bond(CHEAP, 1, sender=stranger)
    registry.register_sink(CHEAP, 100 * USDC, 5, sender=sink_a)
    with ape.reverts("registry: zero amount"):
        registry.add_bond(CHEAP, 0, sender=sink_a)


def test_request_unbond_drops_cap_at_once(registry, pool, sink_a, clock, keeper):
    registry.register_sink(CHEAP, 300 * USDC, 300, sender=sink_a)
    clock.next_epoch(200)
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 300 * TASK_SCALE
    tx = registry.request_unbond(CHEAP, 150 * USDC, sender=sink_a)
    release = chain.blocks.head.timestamp + 7 * 86400
    # the cap drops in the same transaction, published hard: the pool's signal meets it at
    # the next rebalance instead of stepping down to it
    assert registry.sink_state(CHEAP, sink_a).cap == 150
    assert registry.sink_state(CHEAP, sink_a).cut_epoch_p1 == clock.epoch() + 1
    assert registry.target_of(CHEAP, 0) == (150, 1, True)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 150 * TASK_SCALE
    assert registry.bonds(CHEAP, sink_a) == (150 * USDC, 150 * USDC, release)
    assert own_events(tx, registry) == [registry.UnbondRequested(task_type=CHEAP, sink=sink_a.address, amount=150 * USDC,
                                                  unbonding=150 * USDC, release=release)]


def test_a_lowered_cap_caps_a_signal_that_is_still_stepping_down(registry, pool, sink_a, clock, keeper):
    """The case the hard mark exists for: the sink declared less than its cap and its signal
    is still stepping down toward it when unbonding lowers the cap below the signal. The cap
    does not bind the target (declared < cap), yet the next rebalance must not leave the
    signal above the cap. A declaration before that rebalance keeps the mark (front-running
    the keeper does not clear it); one after a later rebalance clears it, and smoothing is
    back to one step per epoch."""
    registry.register_sink(CHEAP, 500 * USDC, 450, sender=sink_a)
    clock.next_epoch(200)
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 450 * TASK_SCALE
    registry.declare_capacity(CHEAP, 100, sender=sink_a)
    assert registry.target_of(CHEAP, 0) == (100, 1, False)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 345 * TASK_SCALE  # 100 + 350 * 0.7: smoothed fall
    registry.request_unbond(CHEAP, 200 * USDC, sender=sink_a)  # cap 300 < signal 345
    cut = clock.epoch() + 1
    assert registry.sink_state(CHEAP, sink_a) == (1, 100, 300, 0, cut)
    assert registry.target_of(CHEAP, 0) == (100, 1, True)
    # the keeper has not run since: a new declaration keeps the mark, in this epoch...
    registry.declare_capacity(CHEAP, 250, sender=sink_a)
    assert registry.target_of(CHEAP, 0) == (250, 1, True)
    # ...and in the next one, before the keeper
    clock.next_epoch()
    registry.declare_capacity(CHEAP, 260, sender=sink_a)
    assert registry.target_of(CHEAP, 0) == (260, 1, True)
    assert registry.sink_state(CHEAP, sink_a).cut_epoch_p1 == cut
    pool.rebalance(CHEAP, sender=keeper)
    # one step would give 260 + 85 * 0.7 = 319.5 > cap 300: clamped to the target instead
    assert smoothed(pool, sink_a) == 260 * TASK_SCALE
    assert pool.last_epoch_p1(CHEAP) == clock.epoch() + 1 > cut
    # applied: the next declaration clears the mark, and a fall is smoothed again
    registry.declare_capacity(CHEAP, 200, sender=sink_a)
    assert registry.target_of(CHEAP, 0) == (200, 1, False)
    assert registry.sink_state(CHEAP, sink_a).cut_epoch_p1 == 0
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 242 * TASK_SCALE  # 200 + 60 * 0.7


def test_a_newcomer_takes_one_step_however_long_the_market_was_idle(registry, pool, sink_a, sink_b, clock, keeper):
    """Registering in a market nobody rebalanced for 20 epochs, then rebalancing, must not
    hand the new identity the 20 missed steps (a sink already earning does take them)."""
    registry.register_sink(CHEAP, 200 * USDC, 100, sender=sink_a)
    clock.next_epoch(40)
    pool.rebalance(CHEAP, sender=keeper)
    registry.declare_capacity(CHEAP, 200, sender=sink_a)
    clock.next_epoch(20)
    registry.register_sink(CHEAP, 200 * USDC, 100, sender=sink_b)
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_b) == 30 * TASK_SCALE
    gap = 200 * TASK_SCALE - smoothed(pool, sink_a)
    assert 0 < gap < TASK_SCALE  # 20 steps toward 200 at once: within a task of it


def test_declaring_zero_does_not_wipe_a_backlog(proto, pool, registry, signer, sink_a, sink_b, funder, clock,
                                                keeper, relayer):
    """A sink paid for work it did not deliver, whose signal then reaches 0 (it declared 0),
    has a backlog cap of 0. The clip must not erase what it owes: the saturation bit keeps
    its units at 0 after it declares again, until verified work is credited to it."""
    warm_market(proto, [sink_a, sink_b], [100, 100], clock, keeper)
    pool.distribute(CHEAP, 1 * USDC, sender=funder)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)  # both paid; neither delivers
    assert hot(pool, CHEAP, 1)["backlog"] > 0
    registry.declare_capacity(CHEAP, 0, sender=sink_b)
    clock.next_epoch(300)
    pool.rebalance(CHEAP, sender=keeper)
    h = hot(pool, CHEAP, 1)
    assert h["capacity"] == 0 and h["sat"] == 1
    registry.declare_capacity(CHEAP, 100, sender=sink_b)
    for _ in range(3):
        clock.next_epoch()
        pool.rebalance(CHEAP, sender=keeper)
    h = hot(pool, CHEAP, 1)
    assert h["capacity"] > 0 and h["units"] == 0 and h["sat"] == 1
    _, arg = signer.receipt(sink_b, funder, 1_000)
    proto.tracker.submit_receipts(CHEAP, [arg], sender=relayer)
    assert hot(pool, CHEAP, 1)["sat"] == 0


def test_a_rebalance_in_the_same_epoch_does_not_count_as_applying_a_cut(registry, pool, sink_a, clock, keeper):
    """A rebalance earlier in the epoch of the cut ran before it: the mark stays."""
    registry.register_sink(CHEAP, 500 * USDC, 100, sender=sink_a)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    registry.request_unbond(CHEAP, 100 * USDC, sender=sink_a)
    assert pool.last_epoch_p1(CHEAP) == registry.sink_state(CHEAP, sink_a).cut_epoch_p1
    registry.declare_capacity(CHEAP, 90, sender=sink_a)
    assert registry.target_of(CHEAP, 0) == (90, 1, True)
    assert registry.sink_state(CHEAP, sink_a).cut_epoch_p1 != 0


def test_request_unbond_reverts(registry, sink_a, stranger):
    with ape.reverts("registry: not registered"):
        registry.request_unbond(CHEAP, 1, sender=stranger)
    registry.register_sink(CHEAP, 150 * USDC, 5, sender=sink_a)
    with ape.reverts("registry: zero amount"):
        registry.request_unbond(CHEAP, 0, sender=sink_a)
    with ape.reverts("registry: amount exceeds bond"):
        registry.request_unbond(CHEAP, 150 * USDC + 1, sender=sink_a)
    with ape.reverts("registry: bond below minimum"):
        registry.request_unbond(CHEAP, 51 * USDC, sender=sink_a)


def test_withdraw_unbonded_after_period(registry, token, sink_a, clock, proto):
    registry.register_sink(CHEAP, 150 * USDC, 5, sender=sink_a)
    with ape.reverts("registry: nothing unbonding"):
        registry.withdraw_unbonded(CHEAP, sender=sink_a)
    registry.request_unbond(CHEAP, 50 * USDC, sender=sink_a)
    with ape.reverts("registry: still unbonding"):
        registry.withdraw_unbonded(CHEAP, sender=sink_a)
    clock.sleep(7 * 86400)
    before = token.balanceOf(sink_a)
    tx = registry.withdraw_unbonded(CHEAP, sender=sink_a)
    assert token.balanceOf(sink_a) == before + 50 * USDC
    assert own_events(tx, registry) == [registry.UnbondWithdrawn(task_type=CHEAP, sink=sink_a.address, amount=50 * USDC)]
    assert_conserved(proto)


def test_deregister_zeroes_capacity_and_unbonds_everything(registry, pool, sink_a, clock, keeper):
    registry.register_sink(CHEAP, 200 * USDC, 100, sender=sink_a)
    clock.next_epoch(5)
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) > 0
    tx = registry.deregister_sink(CHEAP, sender=sink_a)
    release = chain.blocks.head.timestamp + 7 * 86400
    assert registry.sink_state(CHEAP, sink_a) == (0, 0, 0, 0, 0)
    assert registry.slot_of(CHEAP, sink_a) == 0
    assert registry.member_at(CHEAP, 0) == sink_a.address  # until the pool releases the slot
    assert registry.target_of(CHEAP, 0) == (0, 2, False)
    assert registry.bonds(CHEAP, sink_a) == (0, 200 * USDC, release)
    assert own_events(tx, registry) == [registry.SinkDeregistered(task_type=CHEAP, sink=sink_a.address, slot=0,
                                                   unbonding=200 * USDC, release=release)]
    with ape.reverts("registry: not registered"):
        registry.deregister_sink(CHEAP, sender=sink_a)
    # it may come back at once, into another slot, with a fresh bond
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    assert registry.slot_of(CHEAP, sink_a) == 2
    assert registry.bonds(CHEAP, sink_a).unbonding == 200 * USDC


def test_release_slot_only_pool(registry, sink_a, stranger):
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    with ape.reverts("registry: caller is not the pool"):
        registry.release_slot(CHEAP, 0, sender=stranger)


def test_release_slot_requires_leaving(registry, pool, sink_a):
    """Even the pool cannot release a slot whose sink has not left."""
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    pool_as_sender = ape.accounts[pool.address]  # anvil impersonation
    chain.set_balance(pool.address, 10**18)
    with ape.reverts("registry: slot not leaving"):
        registry.release_slot(CHEAP, 0, sender=pool_as_sender)


def test_slash_only_tracker(registry, sink_a, stranger, owner):
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    for who in (stranger, owner, sink_a):
        with ape.reverts("registry: caller is not the tracker"):
            registry.slash(CHEAP, sink_a, 1, sender=who)
