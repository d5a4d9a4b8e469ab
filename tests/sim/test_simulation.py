"""The simulation's model of our policy is the contracts' arithmetic, it conserves money to
the unit, the paper's baselines reproduce the paper's numbers, and on a real chain the
deployed contracts allocate exactly as the model does.

    ape test tests/sim          (or: .venv/bin/python -m pytest tests/sim)
"""

import random

import pytest

from bench.sim_env import Scenario, make_plan, paper_setup
from bench.sim_model import (
    TASK_SCALE,
    WAD,
    ModelParams,
    Protocol,
    TaskCfg,
    Token,
    backlog_cap,
    ewma_advance,
    fee_compound,
    fee_factor,
    pow_wad,
    to_tasks,
    weight_units,
)
from bench.sim_ours import OursConfig, run_ours
from bench.sim_policies import run_baseline

H_BPS = 20_000  # tolerance H = 2 epochs
DECAY = 7 * 10**17  # 1 - alpha, alpha = 0.3


# ---------------------------------------------------------------- formulas, by hand


def test_weight_is_capacity_minus_backlog_over_h_floored_at_zero():
    cap = 100 * TASK_SCALE  # 100 tasks, in pool units
    assert weight_units(cap, 0, H_BPS) == cap
    assert weight_units(cap, 50 * TASK_SCALE, H_BPS) == 75 * TASK_SCALE  # 100 - 50/2
    assert weight_units(cap, 200 * TASK_SCALE, H_BPS) == 0  # b = H: weight gone
    assert weight_units(cap, 250 * TASK_SCALE, H_BPS) == 0  # floored, never negative
    assert weight_units(cap, 3, H_BPS) == cap - 1  # the penalty rounds down (3 / 2 = 1)
    assert backlog_cap(cap, H_BPS) == 200 * TASK_SCALE  # backlog is capped at H epochs


def test_money_to_tasks_rounds_down_at_the_fee():
    assert to_tasks(12_345, 10_000) == 123_450  # 1.2345 tasks
    assert to_tasks(1, 3) == 33_333


def test_ewma_steps_once_per_epoch_rounds_toward_the_target_and_reaches_it():
    target = 100 * WAD
    assert pow_wad(DECAY, 3) == 343 * 10**15  # 0.7^3 exactly
    assert ewma_advance(0, target, 1, DECAY) == 30 * WAD  # 0 + 0.3 * 100
    assert ewma_advance(0, target, 2, DECAY) == 51 * WAD  # 100 - 100 * 0.49
    assert ewma_advance(200 * WAD, target, 1, DECAY) == 170 * WAD  # from above
    # a gap of 1 wei is rounded toward zero: the signal lands on the target, never past it
    assert ewma_advance(target - 1, target, 1, DECAY) == target
    assert ewma_advance(target + 1, target, 1, DECAY) == target
    s = 0
    for _ in range(200):
        s = ewma_advance(s, 37 * WAD, 1, DECAY)
    assert s == 37 * WAD


def test_fee_moves_toward_80_percent_utilisation_in_bounded_steps():
    assert fee_factor(80, 100, 8_000, 1_250) == (WAD, 8_000)  # at target: no change
    assert fee_factor(100, 100, 8_000, 1_250) == (1_031_250_000_000_000_000, 10_000)  # +12.5% * 0.25
    assert fee_factor(300, 100, 8_000, 1_250)[0] == 1_125 * 10**15  # clamped at +12.5%
    assert fee_factor(0, 100, 8_000, 1_250)[0] == 875 * 10**15  # clamped at -12.5%
    assert fee_factor(5, 0, 8_000, 1_250)[0] == 1_125 * 10**15  # demand, no capacity: up
    # upward steps round up, once per elapsed epoch, and stop at the ceiling
    assert fee_compound(10_000, 1, 10**12, 1_125 * 10**15, 2) == 12_657  # 10000 -> 11250 -> 12656.25
    assert fee_compound(10_000, 1, 11_000, 1_125 * 10**15, 5) == 11_000
    assert fee_compound(10_000, 9_000, 10**12, 875 * 10**15, 3) == 9_000  # floor


def _two_sink_market():
    """Sinks A (100 tasks/epoch) and B (300), warmed up; one stream of 1000 tokens/s."""
    p = ModelParams(epoch_length=3600, min_funding=1)
    proto = Protocol(p, genesis=0, token=Token())
    proto.create_task_type("t", TaskCfg(name="t", min_bond=100, stake_per_unit=1, base_fee=10_000, min_fee=1,
                                        max_fee=10**12, escrow_max=10**9))
    for sink, cap in (("A", 100), ("B", 300)):
        proto.token.mint(sink, 1_000)
        proto.register_sink("t", sink, 1_000, cap, now=1)
    now = 200 * 3600 + 1  # (1 - alpha)^200 is 0 in WAD: the signals sit on their targets
    first = proto.rebalance("t", now)  # sets units; no units in force yet, nothing to split
    assert first.units == [100 * TASK_SCALE, 300 * TASK_SCALE]
    assert first.new_fee == 8_750  # no demand: one full step down
    proto.token.mint("F", 10**9)
    proto.fund("t", "F", 10**8, 1_000, now)
    return proto, now


def test_one_rebalance_by_hand_split_overflow_backlog_weight_fee():
    proto, now = _two_sink_market()
    now += 3600
    # B delivers all it is paid (2,625,000 = 3,500,000 * 300/400), A delivers nothing
    proto.submit_receipts("t", [("B", "F", 2_625_000)], now)
    r = proto.rebalance("t", now)
    # inflow 3,600,000; absorbable = 400 tasks * 8750 = 3,500,000; 100,000 overflows to escrow
    assert r.inflow == 3_600_000
    assert r.paid == [875_000, 2_625_000]
    assert r.to_escrow == 100_000 and r.stalled == 0
    # A: backlog 875,000 / 8750 = 100 tasks -> weight 100 - 100/2 = 50; B: no backlog
    assert r.backlog == [100 * TASK_SCALE, 0]
    assert r.units == [50 * TASK_SCALE, 300 * TASK_SCALE]
    # utilisation 3.6M / 3.5M = 10285 bps -> factor 1 + 0.125 * 2285/8000, rounded up
    assert r.new_fee == 9_063
    assert proto.markets["t"].level == 100_000
    assert proto.markets["t"].pending == 0
    assert all(v == 0 for v in proto.check_conservation().values())


def test_an_idle_unpaid_sink_keeps_its_weight_and_a_dead_one_is_slashed_relative_to_the_best():
    proto, now = _two_sink_market()
    for _ in range(4):  # A never delivers, B always does
        now += 3600
        pay = proto.predict_pay("t", now)
        proto.submit_receipts("t", [("B", "F", pay[1])], now)
        r = proto.rebalance("t", now)
    assert r.units[0] == 0 and r.units[1] == 300 * TASK_SCALE
    assert proto.treasury_accrued > 0  # A's backlog beyond 1 epoch past B's (0) was slashed
    bonds = proto.markets["t"].bonds
    assert bonds["B"] == 1_000 and bonds["A"] < 1_000
    assert all(v == 0 for v in proto.check_conservation().values())


# ---------------------------------------------------------------- the paper's numbers


def test_paper_e1_reproduced_on_seed_42():
    plan = make_plan(paper_setup(42), Scenario())

    def eff(policy):
        r = run_baseline(plan, policy)
        return float((r["delivered"][-100:].sum(1) / r["paid"][-100:].sum(1)).mean())

    assert eff("capprop") == pytest.approx(0.957, abs=0.001)  # the paper's 95.7%
    assert eff("rr") == pytest.approx(0.935, abs=0.001)  # the paper's 93.5%


def test_paper_e2_reproduced_on_seed_42_no_recovery():
    plan = make_plan(paper_setup(42), Scenario(shock_at=500, shock_mode="paper"))
    r = run_baseline(plan, "capprop")
    e = r["delivered"].sum(1) / r["paid"].sum(1)
    assert e[400:500].mean() == pytest.approx(0.958, abs=0.001)
    assert e[900:].mean() == pytest.approx(0.906, abs=0.001)  # 0.958 -> 0.906, permanently


# ---------------------------------------------------------------- our policy, end to end


def test_our_policy_conserves_money_exactly_through_overflow_stalls_drains_and_slashes():
    setup = paper_setup(7, n_sinks=12, n_sources=3, demand_scale=0.8)
    sc = Scenario(steps=150, burst_mult=3.0, escrow_frac=0.05, shock_at=75, shock_sinks=(0, 1, 2),
                  shock_mode="silent")
    run = run_ours(make_plan(setup, sc), OursConfig(), check_every=1)
    # every money path was exercised ...
    assert run["to_escrow"].sum() > 0 and run["stalled"].sum() > 0 and run["drained"].sum() > 0
    assert run["treasury"] > 0
    # ... and after every one of the 150 epochs every holder's balance added up to the unit
    assert run["conservation_checks"] == 150
    assert run["conservation_max_abs_error"] == 0


def test_our_policy_takes_a_dead_sink_out_within_a_few_epochs():
    setup = paper_setup(42)
    sc = Scenario(steps=560, shock_at=500, shock_mode="silent")
    run = run_ours(make_plan(setup, sc), OursConfig(), check_every=0)
    e = run["delivered"].sum(1) / run["paid"].sum(1)
    assert e[:500].min() > 0.995
    assert (e[510:] > 0.98).all()  # back above 98% within 10 epochs, and it stays there
    dead_share = run["paid"][505:, :10].sum(1) / run["paid"][505:].sum(1)
    assert dead_share.max() < 0.02


# ---------------------------------------------------------------- the real contracts


@pytest.fixture(scope="module")
def anvil():
    from bench.sim_chain import Anvil, ensure_artifacts

    ensure_artifacts()  # a clean clone has no .build/ until something compiles
    a = Anvil()
    yield a
    a.stop()


def test_model_formulas_equal_the_formula_harness_on_random_inputs(anvil):
    from bench.sim_chain import deploy_now, load_artifacts

    h = deploy_now(anvil.w3, load_artifacts(("FormulaHarness",))["FormulaHarness"]).functions
    rnd = random.Random(6)
    for _ in range(40):
        cap, q = rnd.randrange(1, 2**62), rnd.randrange(0, 2**63)
        hb = rnd.choice([1_000, 10_000, 20_000, 35_000, 100_000])
        assert h.units(cap, q, hb).call() == weight_units(cap, q, hb)
        assert h.backlog_cap(cap, hb).call() == backlog_cap(cap, hb)
        amount, fee = rnd.randrange(0, 2**96), rnd.randrange(1, 2**64)
        assert h.to_tasks(amount, fee).call() == to_tasks(amount, fee)
        s, t = rnd.randrange(0, 2**32) * WAD + rnd.randrange(WAD), rnd.randrange(0, 2**32) * WAD
        e, d = rnd.choice([0, 1, 2, 7, 40, 300]), rnd.randrange(1, WAD)
        assert h.ewma_advance(s, t, e, d).call() == ewma_advance(s, t, e, d)
        dem, cv = rnd.randrange(0, 2**100), rnd.choice([0, rnd.randrange(1, 2**100)])
        assert tuple(h.fee_factor(dem, cv, 8_000, 1_250).call()) == fee_factor(dem, cv, 8_000, 1_250)
        f0, lo, ep = rnd.randrange(1, 2**64), rnd.randrange(1, 1_000), rnd.randrange(1, 300)
        fac = rnd.randrange(875 * 10**15, 1_125 * 10**15 + 1)
        assert h.fee_compound(f0, lo, 2**96 - 1, fac, ep).call() == fee_compound(f0, lo, 2**96 - 1, fac, ep)
        base, n = rnd.randrange(0, WAD + 1), rnd.randrange(0, 2**20)  # decays (the only use), any exponent
        assert h.pow_wad(base, n).call() == pow_wad(base, n)


def test_a_tiny_market_on_chain_tracks_the_model_and_conserves_to_the_wei(anvil):
    from bench.simulate_onchain import play, small_setup

    sc = Scenario(steps=8, shock_at=3, shock_sinks=(0,), shock_mode="silent", rho=0.9)
    r = play(anvil, make_plan(small_setup(42, 4), sc), OursConfig())
    assert r["transactions"] > 50  # streams, attestations, receipts, rebalances, claims all ran
    assert r["max_share_error_rel"] <= 0.01  # the bar: within 1% ...
    assert r["max_pay_error_rel"] <= 0.01
    assert r["max_pay_error_wei"] == 0  # ... and in fact identical
    assert r["conservation_max_abs_error_wei"] == 0  # token balances == liabilities, every epoch
    assert r["ledger_max_abs_diff_wei"] == 0  # every holder's balance equals the model's
    assert r["treasury_accrued"] > 0  # the dead sink was slashed on chain as in the model
