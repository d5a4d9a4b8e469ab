"""Experiments E1-E6: the BPE paper's simulations, reproduced, with our mechanism beside them.

    python -m bench.simulate            # everything, 20 seeds (42..61), ~6 min on 2 idle cores
    python -m bench.simulate --quick    # 3 seeds and a subset of sweeps, ~1.5 min

Prints one table per experiment, writes bench/out/simulate.json (every metric, per seed and
aggregated) and PNG plots to bench/out/. Measures; asserts nothing.

Policies (bench/sim_policies.py, bench/sim_ours.py):
    static, rr, random, capprop     the paper's baselines and its own policy (capacity-
                                    proportional with the sqrt(stake) cap), in floats
    capprop_linear                  the paper's rule with a linear cap (isolates the cap)
    ours                            the contracts' mechanism as an exact integer model:
                                    backpressure weight from receipts, fee controller
                                    (utilisation target 0.95, as deployed), escrow with
                                    FIFO drain and stalls, slashing
    ours_fixedfee                   ours with the fee pinned (min = max = initial fee)
    ours_sqrtcap                    ours fed the paper's sqrt(stake)-capped signal
    ours_u80                        ours with utilisation target 0.8 (the contract
                                    constructor's default; E3 and E5)
Experiments (bench/sim_env.py scenarios; one step = one epoch):
    E1 steady state; E2 shock (sinks 0-9 die at step 500: "stop" = they declare 0,
    "silent" = they keep declaring and deliver nothing, "paper" = the paper's code, which
    zeroes the smoothed signal by fiat); E3 sinks 0-9 over-declare 2x / 5x (also at a
    saturating demand, rho = 1.3); E4 alpha sweep on the E2 "stop" shock; E5 demand x3 for
    10 of every 50 steps with escrow / buffer 0, 0.1, 0.5, 1.0 x 8333; E6 load sweep rho.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from bench.sim_env import Scenario, make_plan, paper_setup
from bench.sim_metrics import RECOVERY_LEVEL, aggregate, compute_metrics, efficiency_series
from bench.sim_ours import OursConfig, run_ours
from bench.sim_policies import run_baseline

OUT = Path(__file__).resolve().parent / "out"
BASE = ("static", "rr", "random", "capprop")
OURS = {
    "ours": OursConfig(),
    "ours_fixedfee": OursConfig(fee_controller=False),
    "ours_sqrtcap": OursConfig(sqrt_cap=True),
    "ours_u80": OursConfig(target_util_bps=8_000),
}
LABELS = {
    "static": "static split",
    "rr": "round robin",
    "random": "random Dirichlet(1)",
    "capprop": "capacity-prop. (paper)",
    "capprop_linear": "capacity-prop., linear cap",
    "ours": "ours",
    "ours_fixedfee": "ours, fee pinned",
    "ours_sqrtcap": "ours, sqrt-capped signal",
    "ours_u80": "ours, target utilisation 0.8",
}
# The paper's numbers (its figures; re-run values of its code in seed-paper.md §2)
PAPER = {
    "E1": {"capprop": 0.957, "rr": 0.935, "random": 0.797},
    "E1_max_backlog": {"capprop": 196.0, "rr": 282.0, "random": 340.0},
    "E2": {"capprop": {"pre": 0.958, "post": 0.906, "recovery": "never"}},
    "E4": {"capprop": 0.9573},
    "E5_stall": {0.0: 0.7333, 0.1: 0.1727, 0.5: 0.0930, 1.0: 0.0857},
    "E5_eff": {0.0: 0.886, 0.1: 0.870, 0.5: 0.863, 1.0: 0.863},
}


def experiments(quick: bool) -> list[tuple[str, str, dict, tuple[str, ...]]]:
    """(experiment, scenario label, Scenario kwargs, policies)."""
    all_pol = BASE + ("capprop_linear", "ours", "ours_fixedfee")
    shock = dict(shock_at=500)
    out = [("E1", "steady", {}, all_pol + ("ours_sqrtcap",))]
    for mode in ("stop", "silent"):
        out.append(("E2", mode, dict(shock, shock_mode=mode), all_pol))
    out.append(("E2", "paper", dict(shock, shock_mode="paper"), ("capprop",)))
    for f in (2, 5):
        liars = dict(liars=tuple(range(10)), liar_factor=float(f))
        out.append(("E3", f"{f}x", liars, all_pol + ("ours_u80",)))
        out.append(("E3", f"{f}x, rho=1.3", dict(liars, rho=1.3), all_pol + ("ours_u80",)))
    for a in ((0.1, 0.3, 0.8) if quick else (0.1, 0.2, 0.3, 0.5, 0.8)):
        out.append(("E4", f"alpha={a}", dict(shock, shock_mode="stop", alpha=a), ("capprop", "capprop_linear", "ours")))
    for frac in (0.0, 0.1, 0.5, 1.0):
        out.append(("E5", f"buffer={frac}", dict(burst_mult=3.0, escrow_frac=frac),
                    BASE + ("capprop_linear", "ours", "ours_fixedfee", "ours_u80")))
    rhos = (0.5, 0.9, 1.0, 1.2) if quick else (0.5, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2)
    for rho in rhos:
        out.append(("E6", f"rho={rho}", dict(rho=rho), all_pol))
    return out


@lru_cache(maxsize=64)
def _setup(seed: int):
    return paper_setup(seed)


def run_task(task: tuple) -> tuple:
    exp, label, kwargs, policy, seed, keep_series = task
    sc = Scenario(name=exp, **kwargs)
    plan = make_plan(_setup(seed), sc)
    t0 = time.perf_counter()
    if policy in OURS:
        run = run_ours(plan, OURS[policy], check_every=1)
    else:
        run = run_baseline(plan, policy, paper_buffer=(exp == "E5"))
    metrics = compute_metrics(plan, run)
    metrics["runtime_s"] = time.perf_counter() - t0
    # 7 significant digits; NaN ("never recovered") as null so the JSON is standard
    metrics = {k: (None if v != v else float(f"{v:.7g}")) for k, v in metrics.items()}
    series = None
    if keep_series:
        series = {"eff": np.round(efficiency_series(run), 5).tolist()}
        if policy in OURS:
            series["fee_ratio"] = np.round(run["fee_ratio"].mean(axis=1), 4).tolist()
            series["escrow_level"] = np.round(run["escrow_level"].sum(axis=1), 2).tolist()
    return exp, label, policy, seed, metrics, series


# ------------------------------------------------------------------ tables


def _fmt(agg: dict, key: str, scale: float = 1.0, digits: int = 2, sd: bool = True) -> str:
    mu = agg["mean"].get(key)
    if mu is None:
        return "never" if key.startswith("recovery") else "-"
    s = f"{mu * scale:.{digits}f}"
    if sd and agg["n"].get(key, 0) > 1:
        s += f" ±{agg['sd'][key] * scale:.{digits}f}"
    return s


def _recov(agg: dict, key: str = "recovery") -> str:
    n_all = max(agg["n"].get("eff", 0), 1)
    n = agg["n"].get(key, 0)
    if n == 0:
        return "never"
    s = f"{agg['mean'][key]:.1f} (max {agg['max'][key]:.0f})"
    return s if n == n_all else s + f", {n}/{n_all} seeds"


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [title, line(header), "-" * (sum(widths) + 2 * len(widths))]
    out += [line(r) for r in rows]
    return "\n".join(out)


def tables(res: dict, seeds: list[int]) -> str:
    s42 = seeds[0]
    out = []
    e1 = res["E1"]["steady"]
    rows = []
    for pol, a in e1.items():
        ps = a["per_seed"][str(s42)]
        paper = PAPER["E1"].get(pol)
        rows.append([
            LABELS[pol], _fmt(a, "eff", 100, 2), f"{100 * ps['eff']:.2f}",
            f"{100 * paper:.1f}" if paper else "-", _fmt(a, "undelivered_pct", 1, 2),
            _fmt(a, "max_backlog", 1, 0), f"{ps['max_backlog']:.0f}",
            _fmt(a, "fee_ratio", 1, 2, sd=False), _fmt(a, "tasks_per_budget", 1, 3),
            _fmt(a, "escrow_mean", 1, 0, sd=False),
        ])
    out.append(_table(
        f"E1 steady state ({len(seeds)} seeds, mean ±sd; efficiency = mean of the last 100 steps, %)",
        ["policy", "efficiency", f"seed {s42}", "paper", "undelivered %", "max backlog", f"seed {s42}",
         "fee/fee0", "tasks/budget", "escrow"], rows))

    rows = []
    for mode in ("stop", "silent", "paper"):
        for pol, a in res["E2"].get(mode, {}).items():
            rows.append([
                mode, LABELS[pol], _fmt(a, "eff_pre", 100, 2), _fmt(a, "eff_post", 100, 2),
                _fmt(a, "eff_min_post", 100, 1), _recov(a), _fmt(a, "paid_dead_pct_post", 1, 2),
                _fmt(a, "paid_dead_per_epoch_tail", 1, 2), _fmt(a, "undelivered_pct", 1, 2),
            ])
    out.append(_table(
        f"E2 shock: sinks 0-9 die at step 500 (recovery = epochs until efficiency stays >= "
        f"{100 * RECOVERY_LEVEL:.0f}% for 20 epochs)",
        ["mode", "policy", "eff before %", "eff last 100 %", "min after %", "recovery (epochs)",
         "paid to dead after %", "to dead/epoch, tail", "undelivered %"], rows))

    rows = []
    for label, pols in res["E3"].items():
        for pol, a in pols.items():
            rows.append([
                label, LABELS[pol], _fmt(a, "eff", 100, 2), _fmt(a, "liar_pay_over_cap", 1, 3),
                _fmt(a, "liar_pay_over_cap_max", 1, 2, sd=False), _fmt(a, "liar_share_ratio", 1, 3),
                _fmt(a, "honest_pay_over_cap", 1, 3), _fmt(a, "liar_eff", 100, 1),
                _fmt(a, "escrow_mean", 1, 0, sd=False), _fmt(a, "fee_ratio", 1, 2, sd=False),
            ])
    out.append(_table(
        "E3 over-declaring sinks 0-9 (last 100 steps; pay/cap = tasks paid per epoch / true capacity; "
        "share ratio = share of the type's pay / C_true share)",
        ["scenario", "policy", "efficiency %", "liar pay/cap", "max", "liar share ratio",
         "honest pay/cap", "liar eff %", "escrow", "fee/fee0"], rows))

    rows = []
    for label, pols in res["E4"].items():
        for pol, a in pols.items():
            rows.append([
                label, LABELS[pol], _fmt(a, "eff_pre", 100, 3), _fmt(a, "eff_sd", 100, 3, sd=False),
                _fmt(a, "eff_post", 100, 2), _recov(a), _recov(a, "recovery_rel"),
            ])
    out.append(_table(
        f"E4 EWMA alpha sweep (E2 'stop' shock; paper: {100 * PAPER['E4']['capprop']:.2f}% for every alpha, "
        "no capacity change)",
        ["alpha", "policy", "eff before %", "sd of eff %", "eff last 100 %", "recovery to 98%",
         "recovery to pre-1pt"], rows))

    rows = []
    for label, pols in res["E5"].items():
        frac = float(label.split("=")[1])
        ref = pols["capprop"]["per_seed"]
        for pol, a in pols.items():
            ours = pol.startswith("ours")
            wins = sum(a["per_seed"][sd]["stall_rate"] < ref[sd]["stall_rate"] for sd in ref)
            rows.append([
                label, LABELS[pol], _fmt(a, "stall_rate", 1, 4),
                f"{PAPER['E5_stall'][frac]:.4f}" if pol == "capprop" else f"{wins}/{len(ref)}",
                _fmt(a, "eff", 100, 2), f"{100 * PAPER['E5_eff'][frac]:.1f}" if pol == "capprop" else "",
                _fmt(a, "stalled_pct", 1, 2) if ours else "-", _fmt(a, "tasks_per_budget", 1, 3),
                _fmt(a, "escrow_mean", 1, 0, sd=False),
                (("exact (max err " + _fmt(a, "conservation_error", 1, 0, sd=False) + ")") if ours
                 else "+" + _fmt(a, "money_created", 1, 0, sd=False) + " created"),
            ])
    out.append(_table(
        "E5 bursts x3 for 10 of every 50 steps; buffer/escrow = frac x 8333 per task type. Baselines use the "
        "paper's buffer model; 'seeds below' = seeds where the stall rate is below the paper's policy's.",
        ["buffer", "policy", "stall rate", "paper / seeds below", "efficiency %", "paper", "money stalled %",
         "tasks/budget", "escrow", "money"], rows))

    rows = []
    for label, pols in res["E6"].items():
        for pol, a in pols.items():
            rows.append([
                label, LABELS[pol], _fmt(a, "eff", 100, 2), _fmt(a, "virtual_backlog", 1, 1),
                _fmt(a, "escrow_mean", 1, 0, sd=False), _fmt(a, "stall_rate", 1, 3, sd=False),
                _fmt(a, "stalled_pct", 1, 1, sd=False), _fmt(a, "fee_ratio", 1, 2, sd=False),
                _fmt(a, "tasks_per_budget", 1, 3, sd=False),
            ])
    out.append(_table(
        "E6 load sweep: demand = rho x true capacity in every task type (backlog = unserved paid work, "
        "mean of the last 100 steps, paper units)",
        ["rho", "policy", "efficiency %", "backlog", "escrow", "stall rate", "stalled %", "fee/fee0",
         "tasks/budget"], rows))
    checks = worst = runs = 0
    for exp in res.values():
        for pols in exp.values():
            for pol, a in pols.items():
                for m in a["per_seed"].values():
                    if "conservation_checks" in m:
                        runs += 1
                        checks += int(m["conservation_checks"])
                        worst = max(worst, m["conservation_error"])
    out.append(f"Money, our policy: the contracts' invariants (every holder's balance, pool balance = liabilities, "
               f"escrow = entries, registry = bonds + treasury) checked after every epoch of {runs} runs "
               f"({checks} checks): largest error {worst:.0f} token base units.")
    return "\n\n".join(out)


# ------------------------------------------------------------------ plots


def plots(res: dict, series: dict, seeds: list[int], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    colors = {"static": "#999999", "rr": "#8c564b", "random": "#bcbd22", "capprop": "#1f77b4",
              "capprop_linear": "#17becf", "ours": "#d62728", "ours_fixedfee": "#ff7f0e",
              "ours_sqrtcap": "#9467bd", "ours_u80": "#e377c2"}

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(str(out / name))

    styles = {"ours": "-", "ours_fixedfee": "--", "ours_sqrtcap": ":", "capprop_linear": "-.", "ours_u80": ":"}

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for pol, s in series.get(("E1", "steady"), {}).items():
        ax.plot(s["eff"], label=LABELS[pol], color=colors[pol], lw=2 if pol in styles else 1,
                ls=styles.get(pol, "-"))
    ax.set(xlabel="step (epoch)", ylabel="allocation efficiency", ylim=(0.7, 1.005),
           title=f"E1 steady state, seed {seeds[0]}")
    ax.legend(fontsize=8, loc="lower right")
    save(fig, "simulate_e1.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, mode in zip(axes, ("stop", "silent")):
        for pol, s in series.get(("E2", mode), {}).items():
            ax.plot(range(470, 560), s["eff"][470:560], label=LABELS[pol], color=colors[pol],
                    lw=2 if pol in styles else 1.2, ls=styles.get(pol, "-"))
        ax.axvline(500, color="k", lw=0.5, ls=":")
        ax.axhline(RECOVERY_LEVEL, color="k", lw=0.5, ls="--")
        ax.set(xlabel="step (epoch)", title=f"E2 '{mode}' (sinks 0-9 die at 500), seed {seeds[0]}",
               ylim=(0.6, 1.005))
    axes[0].set_ylabel("allocation efficiency")
    axes[1].legend(fontsize=8, loc="lower right")
    save(fig, "simulate_e2.png")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = list(res["E3"].keys())
    pols = [p for p in ("static", "capprop", "capprop_linear", "ours", "ours_u80", "ours_fixedfee")
            if all(p in res["E3"][lb] for lb in labels)]
    x = np.arange(len(labels))
    width = 0.8 / len(pols)
    for j, pol in enumerate(pols):
        mu = [res["E3"][lb][pol]["mean"]["liar_pay_over_cap"] / res["E3"][lb][pol]["mean"]["honest_pay_over_cap"]
              for lb in labels]
        ax.bar(x + (j - (len(pols) - 1) / 2) * width, mu, width, label=LABELS[pol], color=colors[pol])
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks(x, labels)
    ax.set(ylabel="liar pay/cap ÷ honest pay/cap", title="E3 over-declarers: 1.0 = paid like an honest sink")
    ax.legend(fontsize=8)
    save(fig, "simulate_e3.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    alphas = [float(lb.split("=")[1]) for lb in res["E4"]]
    for pol in ("capprop_linear", "ours"):
        ax.plot(alphas, [res["E4"][lb][pol]["mean"].get("recovery") or math.nan for lb in res["E4"]],
                "o-", label=LABELS[pol] + " (to 98%)", color=colors[pol])
    ax.set(xlabel="EWMA alpha", ylabel="epochs to recover", title="E4 alpha vs recovery after the 'stop' shock")
    ax.legend(fontsize=8)
    save(fig, "simulate_e4.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fr = [float(lb.split("=")[1]) for lb in res["E5"]]
    for pol in ("capprop", "rr", "ours", "ours_u80", "ours_fixedfee"):
        if not all(pol in res["E5"][lb] for lb in res["E5"]):
            continue
        ax.plot(fr, [res["E5"][lb][pol]["mean"]["stall_rate"] for lb in res["E5"]], marker="o", label=LABELS[pol],
                color=colors[pol], ls=styles.get(pol, "-"))
    ax.plot(fr, [PAPER["E5_stall"][f] for f in fr], "k*", ms=10, label="paper's figure")
    ax.set(xlabel="buffer / escrow size (x 8333)", ylabel="stall rate (task type x step)",
           title="E5 demand bursts")
    ax.legend(fontsize=8)
    save(fig, "simulate_e5.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    rhos = [float(lb.split("=")[1]) for lb in res["E6"]]
    for pol in ("rr", "capprop", "capprop_linear", "ours", "ours_fixedfee"):
        axes[0].plot(rhos, [res["E6"][lb][pol]["mean"]["virtual_backlog"] for lb in res["E6"]], "o-",
                     label=LABELS[pol], color=colors[pol])
    axes[0].set_yscale("symlog", linthresh=1.0)
    axes[0].set(xlabel="rho = demand / true capacity", ylabel="unserved paid work (paper units)",
                title="E6 backlog vs load")
    axes[0].legend(fontsize=8)
    for pol in ("ours", "ours_fixedfee"):
        axes[1].plot(rhos, [res["E6"][lb][pol]["mean"]["escrow_mean"] for lb in res["E6"]], "o-",
                     label=LABELS[pol] + ": escrow", color=colors[pol])
    ax2 = axes[1].twinx()
    ax2.plot(rhos, [res["E6"][lb]["ours"]["mean"]["fee_ratio"] for lb in res["E6"]], "s--", color="k",
             label="ours: fee / fee0")
    axes[1].set(xlabel="rho", ylabel="escrow level (paper units)", title="E6 escrow and fee vs load")
    ax2.set_ylabel("fee / initial fee")
    axes[1].legend(fontsize=8, loc="upper left")
    ax2.legend(fontsize=8, loc="lower right")
    save(fig, "simulate_e6.png")
    return files


# ------------------------------------------------------------------ main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 seeds and smaller sweeps")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds, starting at 42 (default 20)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--from-json", type=Path, default=None,
                    help="print the tables and redraw the plots of a previous run's simulate.json")
    args = ap.parse_args(argv)
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
        series = {tuple(k.split("/", 1)): v for k, v in doc["series"].items()}
        print(tables(doc["results"], doc["config"]["seeds"]))
        args.out.mkdir(parents=True, exist_ok=True)
        plots(doc["results"], series, doc["config"]["seeds"], args.out)
        return doc
    n_seeds = args.seeds or (3 if args.quick else 20)
    seeds = list(range(42, 42 + n_seeds))
    exps = experiments(args.quick)
    tasks = [(exp, label, kw, pol, seed, seed == seeds[0])
             for exp, label, kw, pols in exps for pol in pols for seed in seeds]
    tasks.sort(key=lambda t: not t[3].startswith("ours"))  # long ones first
    t0 = time.time()
    results: list[tuple] = []
    if args.jobs > 1:
        with get_context("fork").Pool(args.jobs) as pool:
            for i, r in enumerate(pool.imap_unordered(run_task, tasks, chunksize=1)):
                results.append(r)
                if (i + 1) % 100 == 0:
                    print(f"  {i + 1}/{len(tasks)} runs, {time.time() - t0:.0f} s", file=sys.stderr)
    else:
        results = [run_task(t) for t in tasks]
    elapsed = time.time() - t0

    per_seed: dict = {}
    series: dict = {}
    for exp, label, pol, seed, m, s in results:
        per_seed.setdefault(exp, {}).setdefault(label, {}).setdefault(pol, {})[seed] = m
        if s is not None:
            series.setdefault((exp, label), {})[pol] = s
    res: dict = {}
    for exp, label, kw, pols in exps:
        for pol in pols:
            runs = dict(sorted(per_seed[exp][label][pol].items()))
            agg = aggregate(runs)
            agg["per_seed"] = {str(k): v for k, v in runs.items()}
            res.setdefault(exp, {}).setdefault(label, {})[pol] = agg
    text = tables(res, seeds)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    files = plots(res, series, seeds, args.out)
    doc = {
        "config": {
            "seeds": seeds, "quick": args.quick, "runs": len(tasks), "elapsed_s": round(elapsed, 1),
            "jobs": args.jobs, "scenarios": [{"experiment": e, "label": lb, "scenario": kw, "policies": list(p)}
                                              for e, lb, kw, p in exps],
        },
        "paper": {k: {str(kk): vv for kk, vv in v.items()} for k, v in PAPER.items()},
        "results": res,
        "series_seed": seeds[0],
        "series": {f"{e}/{lb}": v for (e, lb), v in series.items()},
    }
    path = args.out / "simulate.json"
    path.write_text(json.dumps(doc, separators=(",", ":"), default=float))
    print(f"\n{len(tasks)} runs in {elapsed:.0f} s on {args.jobs} processes; wrote {path} and {len(files)} plots")
    return doc


if __name__ == "__main__":
    main()
