"""Metrics of one simulated run, the same definitions for every policy.

A run is a dict of per-step arrays in paper units (see bench/sim_env.py):
    paid (T, N)       money paid to each sink for step t
    delivered (T, N)  the paper's per-step measure min(paid, C_true * fee): money paid for
                      work the sink could do in that step
    inflow (T,)       money the sources put in during step t
    fee_ratio (T, 3)  base fee / initial fee per task type (1 for the baselines)
    stall (T, 3)      whether the task type stalled in step t
    escrow_level (T, 3)
and, for our policy, stalled money and an integer conservation check.

Work in tasks is money / fee_ratio of the sink's task type (paper capacity units).
"""

from __future__ import annotations

import math

import numpy as np

from bench.sim_env import N_TYPES, Plan

WINDOW = 100  # the paper's "last 100 steps"
RECOVERY_LEVEL = 0.98
RECOVERY_HOLD = 20  # epochs the efficiency must stay at the level to count as recovered


def efficiency_series(run: dict) -> np.ndarray:
    paid = run["paid"].sum(axis=1)
    deliv = run["delivered"].sum(axis=1)
    return np.divide(deliv, paid, out=np.full(len(paid), np.nan), where=paid > 0)


def _recovery(eff: np.ndarray, start: int, level: float, hold: int = RECOVERY_HOLD) -> float:
    """Smallest d >= 0 such that eff >= level for `hold` steps from start + d (NaN: never)."""
    ok = np.nan_to_num(eff[start:], nan=0.0) >= level
    n = len(ok)
    for d in range(0, n - hold + 1):
        if ok[d:d + hold].all():
            return float(d)
    return math.nan


def compute_metrics(plan: Plan, run: dict) -> dict:
    sc, st = plan.scenario, plan.setup
    T, N = run["paid"].shape
    w = slice(max(0, T - WINDOW), T)
    paid, deliv = run["paid"], run["delivered"]
    fee_k = run["fee_ratio"][:, st.task_type]  # (T, N)
    over_tasks = (paid - deliv) / fee_k  # work paid for that the sink could not do that step
    net_tasks = paid / fee_k - plan.c_true  # paid work minus what the sink can serve
    eff = efficiency_series(run)
    m = {
        "eff": float(np.nanmean(eff[w])),
        "eff_sd": float(np.nanstd(eff[w])),
        "eff_min": float(np.nanmin(eff[w])),
        "undelivered_pct": float(100 * (paid - deliv).sum() / max(paid.sum(), 1e-12)),
        "undelivered_per_epoch": float((paid - deliv)[w].sum(axis=1).mean()),
        "paid_per_inflow": float(paid[w].sum() / max(run["inflow"][w].sum(), 1e-12)),
        # tasks delivered per unit of money streamed in, relative to the initial price
        "tasks_per_budget": float((deliv / fee_k)[w].sum() / max(run["inflow"][w].sum(), 1e-12)),
        "stall_rate": float(run["stall"].mean()),
        "stalled_pct": float(100 * run.get("stalled", np.zeros(1)).sum() / max(run["inflow"].sum(), 1e-12)),
        "escrow_mean": float(run["escrow_level"][w].sum(axis=1).mean()),
        "fee_ratio": float(run["fee_ratio"][w].mean()),
        "fee_max": float(run["fee_ratio"].max()),
    }
    # the paper's max backlog: leaky queue q <- 0.9 q + (F - C)^+, max over sinks (its code);
    # and the virtual queue of its model, Q <- max(0, Q + F - C) (served later when there is
    # spare capacity), summed over sinks
    q = np.zeros(N)
    vq = np.zeros(N)
    qmax = np.zeros(T)
    vsum = np.zeros(T)
    for t in range(T):
        q = 0.9 * q + over_tasks[t]
        vq = np.maximum(0.0, vq + net_tasks[t])  # the paper's virtual queue, against true capacity
        qmax[t] = q.max()
        vsum[t] = vq.sum()
    m["max_backlog"] = float(qmax[w].mean())  # mean over the last 100 steps of the per-step max
    m["virtual_backlog"] = float(vsum[w].mean())
    if "conservation_max_abs_error" in run:
        m["conservation_error"] = float(run["conservation_max_abs_error"])
        m["conservation_checks"] = float(run["conservation_checks"])
    if "money_created" in run:
        m["money_created"] = float(run["money_created"])
    if "treasury" in run:
        m["slashed"] = float(run["treasury"])
    if sc.shock_at is not None:
        s = sc.shock_at
        dead = list(sc.shock_sinks)
        m["eff_pre"] = float(np.nanmean(eff[max(0, s - WINDOW):s]))
        m["eff_post"] = m["eff"]
        m["eff_min_post"] = float(np.nanmin(eff[s:]))
        m["recovery"] = _recovery(eff, s, RECOVERY_LEVEL)
        m["recovery_rel"] = _recovery(eff, s, m["eff_pre"] - 0.01)
        m["paid_dead_pct_post"] = float(100 * paid[s:, dead].sum() / max(paid[s:].sum(), 1e-12))
        m["paid_dead_per_epoch_tail"] = float(paid[w][:, dead].sum(axis=1).mean())
    if sc.liars:
        liars = list(sc.liars)
        honest = [k for k in range(N) if k not in sc.liars]
        tasks = (paid / fee_k)[w].mean(axis=0)
        ratio = tasks / st.c_true
        share = np.zeros(N)
        oracle = np.zeros(N)
        for tt in range(N_TYPES):
            mem = st.task_type == tt
            share[mem] = paid[w][:, mem].sum(axis=0) / max(paid[w][:, mem].sum(), 1e-12)
            oracle[mem] = st.c_true[mem] / st.c_true[mem].sum()
        m["liar_pay_over_cap"] = float(ratio[liars].mean())
        m["liar_pay_over_cap_max"] = float(ratio[liars].max())
        m["honest_pay_over_cap"] = float(ratio[honest].mean())
        m["liar_share_ratio"] = float((share[liars] / oracle[liars]).mean())
        m["liar_eff"] = float(deliv[w][:, liars].sum() / max(paid[w][:, liars].sum(), 1e-12))
    return m


def aggregate(per_seed: dict[int, dict]) -> dict:
    """mean / sd / min / max / n over seeds for every metric (NaN = not reached, skipped)."""
    keys = sorted({k for m in per_seed.values() for k in m})
    out = {"mean": {}, "sd": {}, "min": {}, "max": {}, "n": {}}
    for k in keys:
        v = np.array([m.get(k, math.nan) for m in per_seed.values()], dtype=float)  # None -> nan
        ok = v[~np.isnan(v)]
        out["n"][k] = int(len(ok))
        if len(ok) == 0:
            for s in ("mean", "sd", "min", "max"):
                out[s][k] = None
            continue
        out["mean"][k] = float(ok.mean())
        out["sd"][k] = float(ok.std(ddof=1)) if len(ok) > 1 else 0.0
        out["min"][k] = float(ok.min())
        out["max"][k] = float(ok.max())
    return out
