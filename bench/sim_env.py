"""The simulated market: the BPE paper's generative setup and the experiment scenarios.

Setup (the paper's, re-derived from its description): with `numpy.random.default_rng(seed)`
draw, for each sink i in order, its true capacity U[10, 100] and then its stake
U[100, 1000]; then, for each source, its flow rate U[50, 200]. Task type = id mod 3 for
sinks and sources alike. Per step, each sink's raw signal is max(0, C_true + N(0, 0.05
C_true)), drawn from the same generator after the setup draws, step by step, sink by sink
(the paper drew these from numpy's unseeded global generator; seeding them is the only
change, and it makes every run reproducible).

Everything here is in the paper's units ("paper units": capacity and money per step at a
price of 1). `Plan` turns a scenario into per-step arrays that every policy consumes, so
all policies of one seed see the same capacities, declarations and demand.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

N_TYPES = 3
# The paper's E5 buffer unit: 2 * base_flow * 10 with base_flow = (10 sources / 3 types) * 125
BUFFER_UNIT = 2.0 * (10 / 3) * 125.0 * 10.0  # 8333.33 paper units


@dataclass(frozen=True)
class Setup:
    seed: int
    task_type: np.ndarray  # per sink
    c_true: np.ndarray  # per sink, paper units per step
    stake: np.ndarray  # per sink
    src_type: np.ndarray  # per source
    src_rate: np.ndarray  # per source, paper money per step
    state: dict  # generator state right after the setup draws (to replay the per-step draws)

    @property
    def n_sinks(self) -> int:
        return len(self.c_true)

    @property
    def n_sources(self) -> int:
        return len(self.src_rate)

    def rng(self) -> np.random.Generator:
        """A generator positioned right after the setup draws."""
        g = np.random.default_rng()
        g.bit_generator.state = self.state
        return g


def paper_setup(seed: int, n_sinks: int = 50, n_sources: int = 10, demand_scale: float = 1.0) -> Setup:
    """The paper's setup. `demand_scale` multiplies the source rates (the small on-chain
    markets use it to keep the paper's load with fewer sinks and sources)."""
    rng = np.random.default_rng(seed)
    c_true = np.empty(n_sinks)
    stake = np.empty(n_sinks)
    for i in range(n_sinks):  # interleaved, as in the paper: capacity then stake, per sink
        c_true[i] = rng.uniform(10, 100)
        stake[i] = rng.uniform(100, 1000)
    rates = np.array([rng.uniform(50, 200) for _ in range(n_sources)]) * demand_scale
    return Setup(
        seed=seed,
        task_type=np.arange(n_sinks) % N_TYPES,
        c_true=c_true,
        stake=stake,
        src_type=np.arange(n_sources) % N_TYPES,
        src_rate=rates,
        state=rng.bit_generator.state,
    )


@dataclass(frozen=True)
class Scenario:
    """One experiment's environment. Steps are epochs (see docs/simulation.md)."""

    name: str = "E1"
    steps: int = 1000
    alpha: float = 0.3
    noise: float = 0.05
    # E2: sinks die at `shock_at`. mode "stop": capacity 0 and they declare 0 from then on
    # ("stop and say so"); "silent": capacity 0 but they keep declaring as before.
    shock_at: int | None = None
    shock_sinks: tuple[int, ...] = tuple(range(10))
    shock_mode: str = "stop"
    # E3: these sinks declare `liar_factor` times their (noisy) capacity
    liars: tuple[int, ...] = ()
    liar_factor: float = 1.0
    # E5: demand x burst_mult when step % burst_period < burst_len
    burst_mult: float = 1.0
    burst_len: int = 10
    burst_period: int = 50
    # E6: scale each task type's demand to rho x its true capacity (None: the paper's demand)
    rho: float | None = None
    # escrow maximum per task type, in BUFFER_UNITs (our policy; the paper's E5 buffer too)
    escrow_frac: float = 1.0

    def with_(self, **kw) -> "Scenario":
        return replace(self, **kw)


@dataclass
class Plan:
    """Per-step inputs shared by every policy (paper units)."""

    setup: Setup
    scenario: Scenario
    c_true: np.ndarray  # (T, N) true capacity during step t
    signal: np.ndarray  # (T, N) what each sink declares for step t, before any cap
    src_demand: np.ndarray  # (T, S) money each source pays in step t
    base_demand: np.ndarray  # (S,) per source, without bursts
    type_onehot: np.ndarray = field(repr=False, default=None)  # (N_TYPES, N)

    @property
    def steps(self) -> int:
        return self.scenario.steps

    def type_demand(self) -> np.ndarray:
        """(T, N_TYPES) money entering each task type per step."""
        out = np.zeros((self.steps, N_TYPES))
        for s, tt in enumerate(self.setup.src_type):
            out[:, tt] += self.src_demand[:, s]
        return out

    def type_base_demand(self) -> np.ndarray:
        out = np.zeros(N_TYPES)
        for s, tt in enumerate(self.setup.src_type):
            out[tt] += self.base_demand[s]
        return out


def make_plan(setup: Setup, sc: Scenario) -> Plan:
    T, N = sc.steps, setup.n_sinks
    rng = setup.rng()
    z = rng.standard_normal((T, N))  # step by step, sink by sink: the paper's order
    c = np.broadcast_to(setup.c_true, (T, N)).copy()
    signal = np.maximum(0.0, c + z * (sc.noise * setup.c_true))
    if sc.liars:
        signal[:, list(sc.liars)] *= sc.liar_factor
    if sc.shock_at is not None:
        dead = list(sc.shock_sinks)
        c[sc.shock_at:, dead] = 0.0
        if sc.shock_mode in ("stop", "paper"):
            signal[sc.shock_at:, dead] = 0.0
        elif sc.shock_mode != "silent":
            raise ValueError(sc.shock_mode)
    base = setup.src_rate.copy()
    if sc.rho is not None:
        for tt in range(N_TYPES):
            cap = setup.c_true[setup.task_type == tt].sum()
            dem = base[setup.src_type == tt].sum()
            base[setup.src_type == tt] *= sc.rho * cap / dem
    mult = np.ones(T)
    if sc.burst_mult != 1.0:
        mult[(np.arange(T) % sc.burst_period) < sc.burst_len] = sc.burst_mult
    onehot = np.zeros((N_TYPES, N))
    onehot[setup.task_type, np.arange(N)] = 1.0
    return Plan(setup, sc, c, signal, mult[:, None] * base[None, :], base, onehot)
