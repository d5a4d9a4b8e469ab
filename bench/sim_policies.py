"""The baseline routing policies, in the paper's units (floats), and the paper's E5 buffer.

Every baseline pays out the whole demand of a task type each step (sum F = Lambda, as in
the paper); they differ only in the split:

    static     a plain stream: a fixed split, set once from the capacity each sink declares
               at the first step (the paper's sqrt(stake)-capped signal) and never updated
    rr         round robin: equal split over the task type's sinks
    random     Dirichlet(1) weights per task type per step
    capprop    the paper's policy: proportional to the smoothed capacity signal, where the
               raw signal is capped at sqrt(stake) (u = 1) and smoothed with EWMA alpha from
               C_bar_0 = C_true
    capprop_linear   the same rule with the sqrt cap replaced by a linear bond cap
               (cap = stake, never binding for honest sinks here): isolates how much of the
               paper's E1 gap is the sqrt cap rather than the rule

The paper's E5 buffer (its overflow model, kept as the paper ran it, including that it
double counts money): each step drain = min(B, 0.2 * base demand of the type) is added to
what is paid out; overflow = sum over the type's sinks of (F - C_true)^+ is added to B; if
that would exceed B_max the step counts as a stall and B is clamped to B_max.
"""

from __future__ import annotations

import numpy as np

from bench.sim_env import BUFFER_UNIT, N_TYPES, Plan

BASELINES = ("static", "rr", "random", "capprop")


def run_baseline(plan: Plan, policy: str, *, paper_buffer: bool = False) -> dict:
    """Runs one baseline; returns per-step arrays in paper units."""
    setup, sc = plan.setup, plan.scenario
    T, N = plan.c_true.shape
    onehot = plan.type_onehot  # (types, N)
    tt_of = setup.task_type
    demand_t = plan.type_demand()  # (T, types)
    base_t = plan.type_base_demand()
    alpha = sc.alpha

    sqrt_cap = np.sqrt(setup.stake)
    lin_cap = setup.stake  # linear bond cap at 1 stake unit per capacity unit
    cbar = setup.c_true.copy()  # the paper starts the EWMA at the true capacity
    static_w = None
    rng = setup.rng() if policy == "random" else None
    type_sizes = onehot.sum(axis=1).astype(int)
    type_members = [np.flatnonzero(tt_of == tt) for tt in range(N_TYPES)]

    paid = np.zeros((T, N))
    buf = np.zeros(N_TYPES)
    b_max = sc.escrow_frac * BUFFER_UNIT
    stalls = np.zeros((T, N_TYPES), dtype=bool)
    level = np.zeros((T, N_TYPES))
    created = 0.0  # money the paper's buffer model adds to B although it was also paid out
    for t in range(T):
        if policy in ("capprop", "capprop_linear", "static"):
            cap = sqrt_cap if policy != "capprop_linear" else lin_cap
            raw = np.minimum(plan.signal[t], cap)
            if sc.shock_at is not None and t == sc.shock_at and sc.shock_mode == "paper":
                cbar[list(sc.shock_sinks)] = 0.0  # the paper's code zeroes the signal by fiat
            cbar = alpha * raw + (1 - alpha) * cbar
            if policy == "static":
                if static_w is None:
                    static_w = raw.copy()  # what the sinks advertise when the streams open
                w = static_w
            else:
                w = cbar
        elif policy == "rr":
            w = np.ones(N)
        elif policy == "random":
            rng.standard_normal(N)  # the paper's order: the step's signal draws come first
            w = np.empty(N)
            for tt in range(N_TYPES):
                w[type_members[tt]] = rng.dirichlet(np.ones(type_sizes[tt]))
        else:
            raise ValueError(policy)

        pay_type = demand_t[t].copy()
        if paper_buffer:
            drain = np.minimum(buf, 0.2 * base_t)
            buf -= drain
            pay_type += drain
        wsum = onehot @ w
        share = np.divide(w, wsum[tt_of], out=np.zeros(N), where=wsum[tt_of] > 0)
        f = pay_type[tt_of] * share
        paid[t] = f
        if paper_buffer:
            over = onehot @ np.maximum(0.0, f - plan.c_true[t])
            for tt in range(N_TYPES):
                if over[tt] > 0:
                    if buf[tt] + over[tt] > b_max:
                        stalls[t, tt] = True
                        created += b_max - buf[tt]
                        buf[tt] = b_max
                    else:
                        created += over[tt]
                        buf[tt] += over[tt]
            level[t] = buf
    delivered = np.minimum(paid, plan.c_true)
    return {
        "paid": paid,
        "delivered": delivered,
        "inflow": demand_t.sum(axis=1),
        "stall": stalls,
        "escrow_level": level,
        "money_created": created,
        "fee_ratio": np.ones((T, N_TYPES)),
    }
