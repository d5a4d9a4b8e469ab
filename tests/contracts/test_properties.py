"""Property tests (hypothesis), one family per formula. The pure formulas run on the
deployed arithmetic through FormulaHarness (cheap view calls, many examples); the
properties that need state run on the real contracts with fewer examples."""

from fractions import Fraction

import pytest
from ape import chain
from hypothesis import assume, example, given, settings, strategies as st

from .conftest import CHEAP, USDC, WAD, hot, split, warm_market
from pura import layout
from pura.layout import TASK_SCALE

BPS = 10_000


@pytest.fixture(scope="module")
def harness(project, accounts):
    return accounts[0].deploy(project.FormulaHarness)


# ------------------------------------------------------------------ fixed point


@given(base=st.integers(0, WAD), n=st.integers(0, 400))
def test_pow_wad_rounds_down_within_one_wei_per_multiplication(harness, base, n):
    got = harness.pow_wad(base, n)
    exact = Fraction(base, WAD) ** n * WAD
    assert got <= exact
    assert exact - got <= 2 * n.bit_length() + 1


def test_decay_is_zero_beyond_32_bits_and_refuses_a_base_above_one(harness):
    import ape
    assert harness.pow_wad(WAD // 2, 2**32 - 1) == 0  # rounds to 0 long before
    assert harness.pow_wad(WAD, 2**32 - 1) == WAD
    assert harness.pow_wad(WAD, 2**32) == 0  # beyond uint32: the signal is at its target
    with ape.reverts("ewma: decay above one"):
        harness.pow_wad(WAD + 1, 2)


# ------------------------------------------------------------------ EWMA

alphas = st.integers(10**15, WAD)  # alpha from 0.001 to 1
signal = st.integers(0, (2**32 - 1) * WAD)


@given(s=signal, t=signal, alpha=alphas)
def test_ewma_one_step_moves_alpha_of_the_gap_toward_the_target(harness, s, t, alpha):
    got = harness.ewma_advance(s, t, 1, WAD - alpha)
    ideal = Fraction(alpha, WAD) * t + Fraction(WAD - alpha, WAD) * s
    assert min(s, t) <= got <= max(s, t)          # never overshoots
    assert abs(got - ideal) <= 1                   # one EWMA step, to the wei
    assert abs(got - s) <= Fraction(alpha, WAD) * abs(t - s) + 1


@given(s=signal, t=signal, alpha=alphas, n1=st.integers(0, 60), n2=st.integers(0, 60))
def test_ewma_steps_compose(harness, s, t, alpha, n1, n2):
    """Advancing n1 then n2 epochs equals advancing n1 + n2 (up to rounding), so a lazy
    evaluation gives the same signal however often it is materialised."""
    d = WAD - alpha
    two = harness.ewma_advance(harness.ewma_advance(s, t, n1, d), t, n2, d)
    one = harness.ewma_advance(s, t, n1 + n2, d)
    assert abs(two - one) <= 2 * (n1 + n2).bit_length() + 2 + abs(t - s) // 10**12


@given(s=signal, t=signal, alpha=st.integers(10**16, WAD))
def test_ewma_reaches_the_target_exactly(harness, s, t, alpha):
    d = WAD - alpha
    gap = abs(t - s)
    # (1 - alpha)^n * gap < 1 wei once n > log(gap) / -log(1 - alpha); a generous bound
    n = 1
    while Fraction(d, WAD) ** n * gap >= 1 and n < 100_000:
        n *= 2
    assert harness.ewma_advance(s, t, n + 64, d) == t


def test_ewma_no_time_no_change(harness):
    assert harness.ewma_advance(5 * WAD, 100 * WAD, 0, 7 * 10**17) == 5 * WAD


# ------------------------------------------------------------------ backpressure weight

cap_units = st.integers(0, (2**32 - 1) * TASK_SCALE)
tolerance = st.integers(1_000, 100_000)


@given(c=cap_units, tol=tolerance)
def test_no_backlog_means_full_weight(harness, c, tol):
    """Property 2 at the formula: an unpaid (never backlogged) sink keeps its capacity."""
    assert harness.units(c, 0, tol) == c


@given(c=cap_units, q1=st.integers(0, 2**95), q2=st.integers(0, 2**95), tol=tolerance)
def test_weight_falls_monotonically_with_backlog(harness, c, q1, q2, tol):
    lo, hi = sorted((q1, q2))
    assert harness.units(c, hi, tol) <= harness.units(c, lo, tol) <= c


@given(c=cap_units, tol=tolerance)
def test_weight_is_zero_at_the_backlog_cap(harness, c, tol):
    """At H epochs of backlog the weight is exactly 0 (within the cap's rounding)."""
    cap = harness.backlog_cap(c, tol)
    # the cap rounds down, so at most BPS / tol + 1 units (1e-5 task each) remain
    assert harness.units(c, cap, tol) <= BPS // tol + 2
    assert harness.units(c, cap + tol // BPS + 2, tol) == 0


@given(c=st.integers(1, (2**32 - 1) * TASK_SCALE), q=st.integers(0, 2**95), tol=tolerance)
def test_weight_formula(harness, c, q, tol):
    """w = Cbar * max(0, 1 - (Q / Cbar) / H) = max(0, Cbar - Q / H), to one unit."""
    ideal = max(Fraction(0), c - Fraction(q * BPS, tol))
    assert abs(harness.units(c, q, tol) - ideal) <= 1


@given(amount=st.integers(0, 2**96 - 1), fee=st.integers(1, 2**96 - 1))
def test_money_to_tasks_rounds_down(harness, amount, fee):
    got = harness.to_tasks(amount, fee)
    assert got == amount * TASK_SCALE // fee


# ------------------------------------------------------------------ fee controller


@given(demand=st.integers(0, 2**100), cap=st.integers(0, 2**100), target=st.integers(1, BPS),
       step=st.integers(1, 5_000))
def test_fee_factor_is_bounded_and_monotone_in_demand(harness, demand, cap, target, step):
    f, util = harness.fee_factor(demand, cap, target, step)
    s = step * WAD // BPS
    assert WAD - s <= f <= WAD + s
    f2, _ = harness.fee_factor(demand + 1 + demand // 3, cap, target, step)
    assert f2 >= f


@given(fee=st.integers(1, 2**96 - 1), lo=st.integers(1, 2**96 - 1), hi=st.integers(1, 2**96 - 1),
       up=st.booleans(), size=st.integers(1, 5_000), n=st.integers(0, 255))
@example(fee=2**96 - 1, lo=1, hi=2**96 - 1, up=True, size=5_000, n=255)
def test_fee_stays_in_bounds_and_never_overflows(harness, fee, lo, hi, up, size, n):
    lo, hi = min(lo, hi), max(lo, hi)
    factor = WAD + size * WAD // BPS if up else WAD - size * WAD // BPS
    got = harness.fee_compound(fee, lo, hi, factor, n)
    assert lo <= got <= hi
    start = max(lo, min(fee, hi))
    assert (got >= start) if up else (got <= start)


@given(fee=st.integers(1_000, 10**15), n=st.integers(1, 30), up=st.booleans())
def test_fee_catch_up_equals_repeated_single_steps(harness, fee, n, up):
    factor = WAD + WAD // 8 if up else WAD - WAD // 8
    once = harness.fee_compound(fee, 1, 2**96 - 1, factor, n)
    step = fee
    for _ in range(n):
        step = harness.fee_compound(step, 1, 2**96 - 1, factor, 1)
    assert once == step


# ------------------------------------------------------------------ on the real contracts


@settings(max_examples=10)
@given(bond=st.integers(100, 10**7), spu=st.integers(1, 100), declared=st.integers(0, 2**40))
def test_stake_cap_is_linear_in_the_bond(proto, owner, accounts, bond, spu, declared):
    from pura.signing import task_type_id
    reg = proto.registry
    tid = task_type_id("cap")
    with chain.isolate():  # every example starts from the module's deployment
        reg.create_task_type(tid, spu, spu, sender=owner)
        sink = accounts[12]
        reg.register_sink(tid, bond * spu + spu - 1, declared, sender=sink)
        st_ = reg.sink_state(tid, sink)
        tg = reg.target_of(tid, 0)
    assert st_.cap == min(bond, 2**32 - 1)
    assert st_.declared == min(declared, 2**32 - 1)
    assert tg.target == min(st_.cap, st_.declared) and tg.status == 1
    # splitting the bond across k identities never yields more total cap
    for k in (2, 3, 7):
        parts = [(bond * spu) // k] * (k - 1) + [bond * spu - (bond * spu) // k * (k - 1)]
        assert sum(p // spu for p in parts) <= (bond * spu) // spu


@settings(max_examples=12)
@given(caps=st.lists(st.integers(1, 500), min_size=1, max_size=4),
       amount=st.integers(USDC, 40 * USDC), rate=st.integers(0, 2_000), seconds=st.integers(1, 3_000))
def test_split_is_exact_for_any_amounts_rates_and_units(proto, clock, keeper, accounts, caps, amount, rate,
                                                        seconds):
    """Index accrual exactness: whatever the amounts, stream rates and unit split, each sink
    gets floor(pot * units / total), the remainder stays in the pot, nothing else moves."""
    with chain.isolate():  # every example starts from the module's deployment
        _check_split(proto, clock, keeper, accounts, caps, amount, rate, seconds)


def _check_split(proto, clock, keeper, accounts, caps, amount, rate, seconds):
    sinks = [accounts[2 + i] for i in range(len(caps))]
    funder, funder_b = accounts[5], accounts[6]
    warm_market(proto, sinks, caps, clock, keeper)
    units = [hot(proto.pool, CHEAP, i)["units"] for i in range(len(caps))]
    if rate:
        proto.pool.fund(CHEAP, 100 * USDC, rate, sender=funder_b)
    proto.pool.distribute(CHEAP, amount, sender=funder)
    clock.sleep(seconds)
    carry = proto.pool.pools(CHEAP).pending - amount - (proto.pool.stream_of(CHEAP, funder_b).contrib if rate else 0)
    absorbable = layout.absorbable(sum(units), proto.pricing.base_fee(CHEAP))
    clock.next_epoch()
    tx = proto.pool.rebalance(CHEAP, sender=keeper)
    ev = proto.pool.Rebalanced.from_receipt(tx)[0]
    pot = carry + ev.inflow
    to_sinks = min(pot, absorbable)
    paid, dust = split(to_sinks, units)
    assert [hot(proto.pool, CHEAP, i)["unclaimed"] for i in range(len(caps))] == paid
    assert ev.distributed == sum(paid)
    assert ev.to_escrow + ev.stalled == min(pot - to_sinks, ev.inflow)
    assert proto.pool.pools(CHEAP).pending == pot - sum(paid) - ev.to_escrow - ev.stalled
    assert proto.token.balanceOf(proto.pool) == proto.pool.liabilities(CHEAP) + proto.pool.liabilities(
        b"\x00" * 32)


# ------------------------------------------------------------------ signatures

SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@given(key=st.integers(1, SECP256K1_N - 1), digest=st.binary(min_size=32, max_size=32),
       flip_v=st.booleans(), twin=st.booleans())
@settings(max_examples=30)
def test_the_65_byte_and_compact_rules_agree(harness, key, digest, flip_v, twin):
    """Receipts use the 65-byte form, attestations the EIP-2098 form: the same signature
    is accepted or refused alike in both, and the malleable twin (n - s, other v) never."""
    from eth_keys import keys
    sk = keys.PrivateKey(key.to_bytes(32, "big"))
    sig = sk.sign_msg_hash(digest)
    r, s, v = sig.r, sig.s, sig.v + 27
    if twin:
        s, v = SECP256K1_N - s, 55 - v
    if flip_v:
        v = 55 - v
    sig65 = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])
    vs = ((v - 27) << 255) | s if s < 2**255 else None
    got65 = harness.recover(digest, sig65)
    if vs is not None:
        assert harness.recover_compact(digest, r, vs) == got65
    expected = sk.public_key.to_checksum_address() if not (twin or flip_v) else None
    if expected:
        assert got65 == expected
    else:
        assert got65 != sk.public_key.to_checksum_address()
