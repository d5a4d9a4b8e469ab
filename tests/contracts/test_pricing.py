"""PricingCurve: configuration, the bounded fee controller, per-sink prices, guards."""

import ape
from ape import chain

from .conftest import CHEAP, PREMIUM, USDC, WAD, hot, own_events, warm_market
from pura.signing import task_type_id


def impersonate(address):
    chain.set_balance(address, 10**18)
    return ape.accounts[address]


def test_defaults_and_config(pricing, registry):
    assert pricing.REGISTRY() == registry.address
    assert pricing.params() == (8_000, 1_250, 10_000, 30_000, 8_000)
    assert pricing.fees(CHEAP) == (10_000, 1, 10**12, 0)
    assert pricing.base_fee(CHEAP) == 10_000


def test_configure(pricing, owner, stranger):
    with ape.reverts("ownable: caller is not the owner"):
        pricing.configure(CHEAP, 5, 1, 10, sender=stranger)
    with ape.reverts("pricing: unknown task type"):
        pricing.configure(task_type_id("nope"), 5, 1, 10, sender=owner)
    with ape.reverts("pricing: zero min fee"):
        pricing.configure(CHEAP, 5, 0, 10, sender=owner)
    with ape.reverts("pricing: fee outside bounds"):
        pricing.configure(CHEAP, 11, 1, 10, sender=owner)
    with ape.reverts("pricing: fee outside bounds"):
        pricing.configure(CHEAP, 1, 2, 10, sender=owner)
    with ape.reverts("pricing: max fee too large"):
        pricing.configure(CHEAP, 5, 1, 2**96, sender=owner)
    tx = pricing.configure(CHEAP, 5, 1, 10, sender=owner)
    assert own_events(tx, pricing) == [pricing.FeeConfigured(task_type=CHEAP, base_fee=5, min_fee=1, max_fee=10)]
    assert pricing.base_fee(CHEAP) == 5


def test_unconfigured_task_type_has_no_fee(pricing, stranger, sink_a):
    with ape.reverts("pricing: task type not configured"):
        pricing.base_fee(task_type_id("nope"))
    with ape.reverts("pricing: task type not configured"):
        pricing.price(task_type_id("nope"), sink_a)


def test_set_params(pricing, owner, stranger):
    with ape.reverts("ownable: caller is not the owner"):
        pricing.set_params(8_000, 1_250, 10_000, 30_000, 8_000, sender=stranger)
    for args, msg in [
        ((0, 1_250, 1, 1, 1), "pricing: target utilisation out of range"),
        ((10_001, 1_250, 1, 1, 1), "pricing: target utilisation out of range"),
        ((8_000, 0, 1, 1, 1), "pricing: step out of range"),
        ((8_000, 5_001, 1, 1, 1), "pricing: step out of range"),
        ((8_000, 1_250, 100_001, 1, 1), "pricing: congestion too steep"),
        ((8_000, 1_250, 1, 1_000_001, 1), "pricing: congestion cap too high"),
        ((8_000, 1_250, 1, 1, 100_001), "pricing: escrow multiplier too high"),
    ]:
        with ape.reverts(msg):
            pricing.set_params(*args, sender=owner)
    tx = pricing.set_params(5_000, 1_000, 20_000, 40_000, 0, sender=owner)
    assert own_events(tx, pricing) == [pricing.ParamsSet(target_util_bps=5_000, max_step_bps=1_000,
                                                        congestion_bps=20_000, max_congestion_bps=40_000,
                                                        escrow_bps=0)]


def test_wire_once(project, owner, stranger, registry, pool, escrow):
    p = owner.deploy(project.PricingCurve, registry)
    with ape.reverts("ownable: caller is not the owner"):
        p.wire(pool, escrow, sender=stranger)
    with ape.reverts("pricing: zero address"):
        p.wire(pool, "0x" + "00" * 20, sender=owner)
    p.wire(pool, escrow, sender=owner)
    with ape.reverts("pricing: already wired"):
        p.wire(pool, escrow, sender=owner)


def test_advance_only_pool(pricing, owner, stranger):
    for who in (owner, stranger):
        with ape.reverts("pricing: caller is not the pool"):
            pricing.advance(CHEAP, 1, 1, 1, 1, sender=who)


def test_advance_moves_toward_target_with_bounded_steps(pricing, pool):
    p = impersonate(pool.address)
    # at target (80 %): unchanged
    pricing.advance(CHEAP, 1, 80, 100, 1, sender=p)
    assert pricing.base_fee(CHEAP) == 10_000
    # 90 %: +12.5 % * (0.9 - 0.8) / 0.8 = +1.5625 %
    tx = pricing.advance(CHEAP, 2, 90, 100, 1, sender=p)
    assert pricing.base_fee(CHEAP) == 10_157  # ceil(10_000 * 1.015625)
    assert own_events(tx, pricing) == [pricing.BaseFeeUpdated(task_type=CHEAP, epoch=2, utilisation_bps=9_000,
                                                             epochs=1, base_fee=10_157)]
    # huge demand: capped at +12.5 %
    pricing.advance(CHEAP, 3, 10**9, 100, 1, sender=p)
    assert pricing.base_fee(CHEAP) == (10_157 * 1125 + 999) // 1000
    # no demand: -12.5 %
    before = pricing.base_fee(CHEAP)
    pricing.advance(CHEAP, 4, 0, 100, 1, sender=p)
    assert pricing.base_fee(CHEAP) == before * 875 // 1000


def test_advance_catches_up_over_elapsed_epochs(pricing, pool):
    p = impersonate(pool.address)
    pricing.advance(CHEAP, 10, 0, 100, 5, sender=p)  # five empty epochs in one call
    fee = 10_000
    for _ in range(5):
        fee = fee * 875 // 1000
    assert pricing.base_fee(CHEAP) == fee


def test_fee_has_a_ceiling_and_a_floor(pricing, pool, owner):
    p = impersonate(pool.address)
    pricing.configure(CHEAP, 1_000, 100, 5_000, sender=owner)
    for e in range(1, 40):  # sustained congestion: 39 epochs at +12.5 %
        pricing.advance(CHEAP, e, 10**30, 1, 1, sender=p)
    assert pricing.base_fee(CHEAP) == 5_000
    # 255 epochs of catch-up at the cap in one call: no overflow, stays at the ceiling
    pricing.advance(CHEAP, 300, 10**30, 1, 255, sender=p)
    assert pricing.base_fee(CHEAP) == 5_000
    pricing.advance(CHEAP, 600, 0, 1, 255, sender=p)
    assert pricing.base_fee(CHEAP) == 100


def test_no_capacity_with_demand_raises_the_fee(pricing, pool):
    """The anchor lowered the fee when there was demand but no capacity."""
    p = impersonate(pool.address)
    pricing.advance(CHEAP, 1, 5, 0, 1, sender=p)
    assert pricing.base_fee(CHEAP) == 11_250
    pricing.advance(CHEAP, 2, 0, 0, 1, sender=p)
    assert pricing.base_fee(CHEAP) == 11_250 * 875 // 1000


def test_tiny_fee_can_still_rise(pricing, pool, owner):
    p = impersonate(pool.address)
    pricing.configure(CHEAP, 1, 1, 100, sender=owner)
    pricing.advance(CHEAP, 1, 10**9, 1, 1, sender=p)
    assert pricing.base_fee(CHEAP) == 2


def test_price_rises_with_backlog_and_escrow_pressure(proto, pricing, pool, escrow, sink_a, sink_b, funder,
                                                      clock, keeper, owner):
    warm_market(proto, [sink_a, sink_b], [100, 100], clock, keeper)
    base = pricing.base_fee(CHEAP)
    assert pricing.price(CHEAP, sink_a) == base  # no backlog, no escrow
    pool.distribute(CHEAP, USDC, sender=funder)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    base = pricing.base_fee(CHEAP)
    q, c = pool.backlog_of(CHEAP, sink_a)
    pos = pool.position(CHEAP, sink_a)
    # the smoothed capacity and the backlog, not the (backlog-reduced) units
    assert q > 0 and c > 0 and (q, c) == (pos.backlog, pos.capacity) and c != pos.units
    congestion = min(10_000 * q // c, 30_000)
    assert pricing.price(CHEAP, sink_a) == base * (10_000 + congestion) // 10_000
    # escrow at 50 % of its max adds 0.8 * 0.5 = 40 %
    escrow.set_max_level(CHEAP, 4 * USDC, sender=owner)
    escrow.deposit(CHEAP, 2 * USDC, sender=funder)
    with_escrow = base * (10_000 + congestion) // 10_000 * (WAD + 8_000 * (WAD // 2) // 10_000) // WAD
    assert pricing.price(CHEAP, sink_a) == with_escrow
    # a sink that is not registered has no backlog: it is quoted the base fee (with pressure)
    assert pricing.price(CHEAP, funder) == base * (WAD + 4 * WAD // 10) // WAD


def test_congestion_multiplier_is_capped(proto, pricing, pool, sink_a, funder, clock, keeper, owner):
    warm_market(proto, [sink_a], [100], clock, keeper)
    pool.distribute(CHEAP, 5 * USDC, sender=funder)
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    q, c = pool.backlog_of(CHEAP, sink_a)
    assert 10_000 * q // c < 30_000  # under the default slope the cap does not bind...
    pricing.set_params(8_000, 1_250, 100_000, 30_000, 8_000, sender=owner)
    assert 100_000 * q // c > 30_000  # ...under a steep one it does
    pressure = proto.escrow.pressure_wad(CHEAP)  # the overflow sits in escrow
    assert pricing.price(CHEAP, sink_a) == pricing.base_fee(CHEAP) * 4 * (WAD + 8_000 * pressure // 10_000) // WAD


# ------------------------------------------------------------------ packed storage


def test_params_and_fees_round_trip_at_their_bounds(project, owner, registry, pool, escrow):
    """Fee state and parameters live in packed words: every field must come back exactly at
    the largest value its setter accepts, and setting one group must not clobber another."""
    p = owner.deploy(project.PricingCurve, registry)
    top = (10_000, 5_000, 100_000, 1_000_000, 100_000)
    p.set_params(*top, sender=owner)
    assert p.params() == top and p.pool() == "0x" + "00" * 20
    p.wire(pool, escrow, sender=owner)
    assert p.params() == top and p.pool() == pool.address and p.escrow() == escrow.address
    p.set_params(1, 1, 0, 0, 0, sender=owner)
    assert p.params() == (1, 1, 0, 0, 0) and p.pool() == pool.address
    big = 2**96 - 1
    p.configure(CHEAP, big, big - 1, big, sender=owner)
    assert p.fees(CHEAP) == (big, big - 1, big, 0) and p.base_fee(CHEAP) == big
    p.configure(PREMIUM, 3, 2, 4, sender=owner)
    assert p.fees(CHEAP) == (big, big - 1, big, 0) and p.fees(PREMIUM) == (3, 2, 4, 0)


def test_advance_keeps_the_bounds_and_records_the_epoch(pricing, pool, owner):
    pricing.configure(CHEAP, 10_000, 9_000, 11_000, sender=owner)
    pool_signer = impersonate(pool.address)
    for k in range(3):
        pricing.advance(CHEAP, 7 + k, 10, 0, 1, sender=pool_signer)  # no capacity: a full step up
    assert pricing.fees(CHEAP) == (11_000, 9_000, 11_000, 10)
    pricing.advance(CHEAP, 10, 0, 10, 1, sender=pool_signer)  # no demand: one step down
    f = pricing.fees(CHEAP)
    # one full step down at the default 12.5 %: 11_000 * 0.875, rounded down
    assert tuple(f) == (9_625, 9_000, 11_000, 11)
