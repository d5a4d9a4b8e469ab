"""E1 and E2 on the real contracts: the on-chain allocation against the Python model's.

    cd /work/main && PATH=.venv/bin:node_modules/.bin:$PATH ape compile   # artifacts first
    python -m bench.simulate_onchain            # 12 sinks, 60 epochs: E1, E2 stop, E2 silent
    python -m bench.simulate_onchain --quick    # 6 sinks, 20 epochs

Starts its own anvil (and stops it by PID), deploys the five contracts with web3.py from
.build/__local__.json, and plays each scenario twice, step by step: once against the chain
(streams, relayed attestation batches, dual-signed receipt batches, rebalances, claims, all
real transactions) and once against the exact integer model (bench/sim_model.py), each
driven by the same `bench.sim_ours.Driver` from its own state. After every epoch it
compares the two (each sink's pay and units, backlogs, fee, escrow flows) and checks the
contracts' money invariants on chain: token balances against the contracts' liabilities,
to the wei. Prints a table and writes bench/out/simulate_onchain.json. Measures; asserts
nothing (a failed transaction stops the run, as it would stop a keeper).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.sim_chain import Anvil, ChainBackend, artifacts_stale, ensure_artifacts
from bench.sim_env import Scenario, make_plan, paper_setup
from bench.sim_metrics import RECOVERY_HOLD, RECOVERY_LEVEL, _recovery
from bench.sim_ours import TYPE_NAMES, Driver, ModelBackend, OursConfig

OUT = Path(__file__).resolve().parent / "out"
TRACKED = ("paid", "units", "backlog")
SCALARS = ("inflow", "to_escrow", "stalled", "drained", "fee", "new_fee", "level", "distributed")


def small_setup(seed: int, n_sinks: int):
    """The paper's generator with fewer sinks and one source per task type, demand scaled to
    keep the paper's load (its 10 sources feed 50 sinks)."""
    n_sources = 3
    return paper_setup(seed, n_sinks=n_sinks, n_sources=n_sources, demand_scale=(n_sinks / 50) / (n_sources / 10))


def _shares(units: list[int]) -> np.ndarray:
    u = np.array(units, dtype=float)
    return u / u.sum() if u.sum() > 0 else u


def play(anvil: Anvil, plan, cfg: OursConfig, *, check_every: int = 1, log=None) -> dict:
    """Runs one scenario on a fresh deployment and on the model in lockstep; returns the
    comparison."""
    t0 = time.perf_counter()
    params = cfg.model_params(plan.scenario.alpha)
    chain = ChainBackend(anvil.w3, params)
    model = ModelBackend(params, genesis=chain.genesis)
    dc, dm = Driver(plan, cfg, chain), Driver(plan, cfg, model)
    dc.setup(chain.genesis)
    dm.setup(model.genesis)
    T = plan.steps
    worst_share_pp = 0.0  # max |share_chain - share_model| in percentage points
    worst_share_rel = 0.0  # max relative difference of a sink's share
    worst_pay_rel = 0.0
    worst_pay_wei = 0
    worst_int = {k: 0 for k in TRACKED + SCALARS}
    conservation = {}
    worst_cons = 0
    cons_checks = 0
    eff_c, eff_m = np.zeros(T), np.zeros(T)
    share_series = []
    for t in range(T):
        rc, rm = dc.step(t), dm.step(t)
        paid_c = deliv_c = paid_m = deliv_m = 0
        row = []
        for tt in TYPE_NAMES:
            a, b = rc[tt], rm[tt]
            for k in TRACKED:
                worst_int[k] = max(worst_int[k], max((abs(x - y) for x, y in zip(a[k], b[k])), default=0))
            for k in SCALARS:
                worst_int[k] = max(worst_int[k], abs(a[k] - b[k]))
            sc, sm = _shares(a["units"]), _shares(b["units"])
            if len(sc):
                d = np.abs(sc - sm)
                worst_share_pp = max(worst_share_pp, 100 * float(d.max()))
                rel = np.divide(d, sm, out=np.where(d > 0, np.inf, 0.0), where=sm > 0)
                worst_share_rel = max(worst_share_rel, float(rel.max()))
            for x, y in zip(a["paid"], b["paid"]):
                worst_pay_wei = max(worst_pay_wei, abs(x - y))
                if x != y:
                    worst_pay_rel = max(worst_pay_rel, abs(x - y) / max(y, 1))
            paid_c += sum(a["paid"])
            deliv_c += sum(a["delivered"])
            paid_m += sum(b["paid"])
            deliv_m += sum(b["delivered"])
            row.append([round(float(x), 6) for x in sc])
        share_series.append(row)
        eff_c[t] = deliv_c / paid_c if paid_c else np.nan
        eff_m[t] = deliv_m / paid_m if paid_m else np.nan
        if check_every and (t % check_every == 0 or t == T - 1):
            c = chain.conservation()
            cons_checks += 1
            for k, v in c.items():
                conservation[k] = max(conservation.get(k, 0), abs(v))
            worst_cons = max(worst_cons, max(abs(v) for v in c.values()))
        if log and (t + 1) % 10 == 0:
            log(f"    epoch {t + 1}/{T}: share error {worst_share_pp:.4f} pp, conservation error {worst_cons} wei")
    lc, lm = chain.ledger(), model.ledger()
    ledger_diff = {k: lc.get(k, 0) - lm.get(k, 0) for k in sorted(set(lc) | set(lm))}
    sc_ = plan.scenario
    win = slice(max(0, T - 20), T)
    out = {
        "scenario": {"steps": T, "sinks": plan.setup.n_sinks, "shock_at": sc_.shock_at, "shock_mode": sc_.shock_mode,
                     "shock_sinks": list(sc_.shock_sinks) if sc_.shock_at is not None else []},
        "transactions": chain.txs,
        "gas_used": chain.gas_used,
        "runtime_s": round(time.perf_counter() - t0, 1),
        "max_share_error_pp": worst_share_pp,
        "max_share_error_rel": worst_share_rel,
        "max_pay_error_rel": worst_pay_rel,
        "max_pay_error_wei": worst_pay_wei,
        "max_abs_diff": worst_int,
        "conservation_checks": cons_checks,
        "conservation_max_abs_error_wei": worst_cons,
        "conservation_by_invariant": conservation,
        "ledger_max_abs_diff_wei": max(abs(v) for v in ledger_diff.values()),
        "ledger_chain": {k: str(v) for k, v in lc.items()},
        "eff_chain_last20": float(np.nanmean(eff_c[win])),
        "eff_model_last20": float(np.nanmean(eff_m[win])),
        "eff_chain": [None if x != x else round(float(x), 6) for x in eff_c],
        "shares_chain": share_series,
        "treasury_accrued": lc["treasury_accrued"],
    }
    if sc_.shock_at is not None:
        s = sc_.shock_at
        out["eff_chain_before"] = float(np.nanmean(eff_c[max(0, s - 10):s]))
        hold = max(1, min(RECOVERY_HOLD, (T - s) // 2))  # short runs: hold for half of what is left
        out["recovery_hold"] = hold
        rc, rm = _recovery(eff_c, s, RECOVERY_LEVEL, hold), _recovery(eff_m, s, RECOVERY_LEVEL, hold)
        out["recovery_chain"] = None if rc != rc else rc  # null: never recovered
        out["recovery_model"] = None if rm != rm else rm
    return out


def table(rows: dict) -> str:
    head = ["scenario", "epochs", "txs", "max share err (pp)", "max pay err", "chain-model ledger",
            "conservation (wei)", "eff chain / model %", "recovery chain / model", "runtime"]
    lines = []
    for name, r in rows.items():
        rec = ""
        if "recovery_chain" in r:
            f = lambda x: "never" if x is None else f"{x:.0f}"  # noqa: E731
            rec = f"{f(r['recovery_chain'])} / {f(r['recovery_model'])}"
        lines.append([
            name, str(r["scenario"]["steps"]), str(r["transactions"]), f"{r['max_share_error_pp']:.6f}",
            f"{r['max_pay_error_wei']} wei ({100 * r['max_pay_error_rel']:.4f}%)",
            f"{r['ledger_max_abs_diff_wei']} wei", f"{r['conservation_max_abs_error_wei']} ({r['conservation_checks']} checks)",
            f"{100 * r['eff_chain_last20']:.2f} / {100 * r['eff_model_last20']:.2f}", rec or "-", f"{r['runtime_s']:.0f} s",
        ])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), "-" * (sum(widths) + 2 * len(widths))] + [fmt(x) for x in lines])


def scenarios(steps: int, n_sinks: int) -> dict[str, Scenario]:
    shock_at = steps // 2
    dead = tuple(range(max(1, round(0.25 * n_sinks))))  # the first quarter: one sink per task type or more
    return {
        "E1 steady": Scenario(name="E1", steps=steps),
        "E2 stop": Scenario(name="E2", steps=steps, shock_at=shock_at, shock_sinks=dead, shock_mode="stop"),
        "E2 silent": Scenario(name="E2", steps=steps, shock_at=shock_at, shock_sinks=dead, shock_mode="silent"),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="E1/E2 on the deployed contracts vs the Python model")
    ap.add_argument("--quick", action="store_true", help="6 sinks, 20 epochs")
    ap.add_argument("--sinks", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    n_sinks = args.sinks or (6 if args.quick else 12)
    steps = args.epochs or (20 if args.quick else 60)
    ensure_artifacts()  # compiles with ape when the sources moved on since the last build
    stale = artifacts_stale()
    plan_setup = small_setup(args.seed, n_sinks)
    rows = {}
    t0 = time.time()
    with Anvil() as anvil:
        for name, sc in scenarios(steps, n_sinks).items():
            print(f"  {name}: {n_sinks} sinks, {steps} epochs", file=sys.stderr)
            rows[name] = play(anvil, make_plan(plan_setup, sc), OursConfig(),
                              log=lambda s: print(s, file=sys.stderr))
    text = table(rows)
    print(f"On-chain vs model (seed {args.seed}; share = a sink's units / its task type's total, "
          f"the allocation of the next epoch; pay = what each sink was paid at each rebalance)")
    print(text)
    doc = {"seed": args.seed, "sinks": n_sinks, "epochs": steps, "elapsed_s": round(time.time() - t0, 1),
           "artifacts_stale": stale, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "simulate_onchain.json"
    path.write_text(json.dumps(doc, indent=1, default=float))
    print(f"\nwrote {path} ({doc['elapsed_s']:.0f} s)")
    return doc


if __name__ == "__main__":
    main()
