"""Our policy: the contracts' mechanism driven through a market scenario.

`Driver` plays every participant against a backend that is either the exact integer model
(`ModelBackend`, bench/sim_model.py) or the deployed contracts on anvil
(bench/simulate_onchain.py). Both get the same calls in the same order, decided by the same
code from each backend's own state, so the two runs can be compared step by step.

Time and units (the modelling decisions, also in docs/simulation.md):
- One paper step = one protocol epoch (EPOCH_LENGTH seconds). All of an epoch's
  transactions land in one block at GENESIS + e * EPOCH_LENGTH + 1, in this order:
  claims (every CLAIM_EVERY epochs), receipts for the closing epoch's work, `rebalance`
  of every task type, stream rate changes, capacity declarations for later epochs.
- 1 paper capacity unit = SCALE tasks per epoch (declared capacity is an integer number of
  tasks); 1 paper money unit = SCALE * FEE0 token base units (FEE0 = the initial base fee,
  money per task). Sources stream their paper flow rate at FEE0: a fixed money budget per
  epoch, so when the fee moves the same money buys a different number of tasks.
- Bonds: the paper's stake, in paper money, with stake_per_unit = FEE0, so the linear cap
  is `stake` paper capacity units (the paper's sqrt(stake) cap is replaced by the
  registry's linear one). The `sqrt_cap` variant instead feeds the registry the paper's
  sqrt-capped signal, to compare under the paper's own signal.
- Warm-up: sinks register at epoch 0 declaring their true capacity and the clock jumps
  WARMUP epochs (the signal converges exactly as the lazy EWMA says), mirroring the paper's
  C_bar_0 = C_true. Step 0's raw signal is declared in epoch WARMUP - 1, the first
  rebalance is at epoch WARMUP and the streams open right after it.
- Receipts: each sink is paid at the rebalance p_k = floor(to_sinks * u_k / U) for the
  epoch that closes. It keeps a FIFO of owed work (paid for, not yet served); in the epoch
  it serves as much of (owed + this epoch's paid work) as its true capacity allows and
  gets a receipt for the value served, min(owed * fee + p_k, C_true_k * fee). A dead sink
  serves nothing. Receipts are relayed (dual-signed, batched) in the same
  block, just before the rebalance (the "relay before the epoch closes" timing of
  docs/design.md), sized from the views exactly as a gateway would size them. A sink
  splits its receipts over its task type's sources in order, within each source's funding
  room.
- Declarations: every sink declares every epoch (a relayed attestation on chain), so the
  EWMA advances exactly one step per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.sim_env import BUFFER_UNIT, N_TYPES, Plan
from bench.sim_model import TASK_SCALE, ModelParams, Protocol, TaskCfg, Token

SCALE = 1000  # tasks per epoch per paper capacity unit
FEE0 = 10_000  # initial base fee, token base units per task (0.01 of a 6-decimal token)
MONEY = SCALE * FEE0  # token base units per paper money unit
EPOCH = 3600
WARMUP = 40
FIRST_EPOCH = 1  # epoch 0 is the deployment's
CLAIM_EVERY = 10
TYPE_NAMES = tuple(f"sim.type{t}" for t in range(N_TYPES))


@dataclass(frozen=True)
class OursConfig:
    """Our policy's knobs (deployment parameters) for one run."""

    tolerance_bps: int = 20_000  # H = 2 epochs
    slash_bps: int = 5_000
    slash_threshold_bps: int = 10_000
    fee_controller: bool = True  # False: min_fee = max_fee = FEE0 (a fixed price, as in the paper)
    sqrt_cap: bool = False  # feed the paper's sqrt(stake)-capped signal instead of the raw one
    target_util_bps: int = 9_500  # the fee controller's utilisation target, as deployed (params files)

    def model_params(self, alpha: float) -> ModelParams:
        return ModelParams(
            epoch_length=EPOCH,
            alpha_wad=int(round(alpha * 10**18)),
            tolerance_bps=self.tolerance_bps,
            min_funding=10**6,
            slash_bps=self.slash_bps,
            slash_threshold_bps=self.slash_threshold_bps,
            target_util_bps=self.target_util_bps,
        )

    def task_cfg(self, escrow_frac: float) -> TaskCfg:
        lo, hi = (1, 10**12) if self.fee_controller else (FEE0, FEE0)
        return TaskCfg(
            name="sim",
            min_bond=10 * MONEY,
            stake_per_unit=FEE0,
            base_fee=FEE0,
            min_fee=lo,
            max_fee=hi,
            escrow_max=int(round(escrow_frac * BUFFER_UNIT * MONEY)),
        )


def sink_name(k: int) -> str:
    return f"sink{k}"


def source_name(s: int) -> str:
    return f"source{s}"


class ModelBackend:
    """The exact integer model as a backend (same call surface as the chain backend)."""

    def __init__(self, params: ModelParams, genesis: int = 1_000_000):
        self.proto = Protocol(params, genesis=genesis, token=Token())
        self.genesis = genesis
        self.now = genesis
        self._results = {}

    # clock / blocks
    def begin_block(self, timestamp: int):
        assert timestamp > self.now, "blocks move forward"
        self.now = timestamp
        self._results = {}

    def end_block(self) -> dict:
        return self._results

    # setup
    def create_task_type(self, tt: str, cfg: TaskCfg):
        self.proto.create_task_type(tt, cfg)

    def mint(self, who: str, amount: int):
        self.proto.token.mint(who, amount)

    def register_sink(self, tt: str, sink: str, bond: int, capacity: int):
        self.proto.register_sink(tt, sink, bond, capacity, self.now)

    # per epoch
    def declare(self, tt: str, decls: list[tuple[str, int]]):
        self.proto.declare_many(tt, decls, self.now)

    def fund(self, tt: str, funder: str, amount: int, rate: int):
        self.proto.fund(tt, funder, amount, rate, self.now)

    def predict_pay(self, tt: str) -> list[int]:
        return self.proto.predict_pay(tt, self.now)

    def funder_room(self, tt: str, funder: str) -> int:
        return self.proto.funder_room(tt, funder, self.now)

    def fee(self, tt: str) -> int:
        return self.proto.markets[tt].fee

    def submit_receipts(self, tt: str, receipts: list[tuple[str, str, int]]):
        for k in range(0, len(receipts), 64):
            self.proto.submit_receipts(tt, receipts[k:k + 64], self.now)

    def rebalance(self, tt: str):
        r = self.proto.rebalance(tt, self.now)
        m = self.proto.markets[tt]
        self._results[tt] = {
            "paid": r.paid, "units": r.units, "backlog": r.backlog, "inflow": r.inflow,
            "to_escrow": r.to_escrow, "stalled": r.stalled, "drained": r.drained,
            "fee": r.fee, "new_fee": r.new_fee, "level": m.level, "distributed": r.distributed,
        }

    def unclaimed(self, tt: str, sink: str) -> int:
        m = self.proto.markets[tt]
        return m.slots[m.slot_of[sink]].unclaimed

    def claim(self, tt: str, sink: str):
        self.proto.claim(tt, sink)

    def conservation(self) -> dict[str, int]:
        return self.proto.check_conservation()

    def ledger(self) -> dict[str, int]:
        """Per-holder balances and per-market liabilities, keyed like ChainBackend.ledger."""
        pr = self.proto
        t = pr.token
        out = {f"balance:{who}": bal for who, bal in t.bal.items() if who not in (pr.POOL, pr.ESCROW, pr.REGISTRY)}
        out["balance:pool"] = t.of(pr.POOL)
        out["balance:escrow"] = t.of(pr.ESCROW)
        out["balance:registry"] = t.of(pr.REGISTRY)
        for tt, m in pr.markets.items():
            out[f"liabilities:{tt}"] = pr.liabilities(tt)
            out[f"escrow_level:{tt}"] = m.level
        out["total_bonded"] = pr.total_bonded
        out["treasury_accrued"] = pr.treasury_accrued
        return out

    def bonds(self) -> dict:
        return {"total_bonded": self.proto.total_bonded, "treasury_accrued": self.proto.treasury_accrued}


class Driver:
    """Plays the sinks, sources, relayer and keeper of one scenario against a backend."""

    def __init__(self, plan: Plan, cfg: OursConfig, backend, *, claims: bool = True):
        self.plan, self.cfg, self.b = plan, cfg, backend
        self.claims = claims
        st = plan.setup
        self.tt_of = [TYPE_NAMES[t] for t in st.task_type]
        self.members = {tt: [k for k in range(st.n_sinks) if self.tt_of[k] == tt] for tt in TYPE_NAMES}
        self.sources = {tt: [s for s in range(st.n_sources) if TYPE_NAMES[st.src_type[s]] == tt] for tt in TYPE_NAMES}
        # integer inputs, identical for every backend
        sig = plan.signal
        if cfg.sqrt_cap:
            sig = np.minimum(sig, np.sqrt(st.stake)[None, :])
        self.declared = np.rint(sig * SCALE).astype(np.int64)  # (T, N) tasks per epoch
        self.capacity = np.rint(plan.c_true * SCALE).astype(np.int64)  # (T, N) tasks per epoch
        self.rates = np.rint(plan.src_demand * MONEY / EPOCH).astype(np.int64)  # (T, S) per second
        self.bond = [int(round(x * MONEY)) for x in st.stake]
        self.genesis = None
        # plain Python ints for the per-step loop (numpy scalars are slow to convert)
        self._decl = self.declared.tolist()
        self._cap = self.capacity.tolist()
        self._rates = self.rates.tolist()
        self._sink = [sink_name(k) for k in range(st.n_sinks)]
        self._src = [source_name(s) for s in range(st.n_sources)]
        self.owed = [0] * st.n_sinks  # per sink: work paid for and not yet served, tasks * TASK_SCALE

    def _block(self, epoch: int) -> int:
        return self.genesis + (FIRST_EPOCH + epoch) * EPOCH + 1

    def setup(self, genesis: int):
        """Registers the sinks, warms the signal up, opens the streams (protocol epochs
        FIRST_EPOCH .. FIRST_EPOCH + WARMUP; the contracts are deployed in epoch 0)."""
        self.genesis = genesis
        b, plan, st = self.b, self.plan, self.plan.setup
        tcfg = self.cfg.task_cfg(plan.scenario.escrow_frac)
        b.begin_block(self._block(0))
        for tt in TYPE_NAMES:
            b.create_task_type(tt, tcfg)
        for k in range(st.n_sinks):
            b.mint(sink_name(k), self.bond[k])
            b.register_sink(self.tt_of[k], sink_name(k), self.bond[k], int(self.capacity[0, k]))
        T = plan.steps
        deposits = {}
        for s in range(st.n_sources):
            deposits[s] = int(self.rates[:, s].max()) * EPOCH * (T + 10)
            b.mint(source_name(s), deposits[s])
        b.end_block()
        # step 0's signal, declared the epoch before the first rebalance
        b.begin_block(self._block(WARMUP - 1))
        self._declare(0)
        b.end_block()
        b.begin_block(self._block(WARMUP))
        for tt in TYPE_NAMES:
            b.rebalance(tt)  # first rebalance: sets units, nothing to split yet
        for s in range(st.n_sources):
            b.fund(TYPE_NAMES[st.src_type[s]], source_name(s), deposits[s], int(self.rates[0, s]))
        if plan.steps > 1:
            self._declare(1)
        b.end_block()

    def _declare(self, t: int):
        row, names = self._decl[t], self._sink
        for tt in TYPE_NAMES:
            self.b.declare(tt, [(names[k], row[k]) for k in self.members[tt]])

    def receipts_for(self, tt: str, t: int) -> tuple[list[tuple[str, str, int]], list[int], list[int], int]:
        """Receipts for the work served in step t in task type tt.

        Each sink keeps a FIFO of owed work (tasks it was paid for and has not served, in
        tasks * TASK_SCALE). In step t it is owed that plus this epoch's pay, serves as much as its
        true capacity allows (oldest first) and gets a receipt for the value served at the
        current fee. Returns (receipts, pay, delivered, fee) where `delivered` is the
        paper's per-step measure min(pay, capacity * fee), used for efficiency."""
        b = self.b
        pay = b.predict_pay(tt)
        fee = b.fee(tt)
        mem = self.members[tt]
        cap = self._cap[t]
        owed = self.owed
        delivered = []
        served = []
        for p, k in zip(pay, mem):
            limit = cap[k] * fee
            delivered.append(p if p < limit else limit)
            v = owed[k] * fee // TASK_SCALE + p
            if v > limit:
                v = limit
            o = owed[k] + p * TASK_SCALE // fee - v * TASK_SCALE // fee
            owed[k] = o if o > 0 else 0
            served.append(v)
        src, names, srcs = self._src, self._sink, self.sources[tt]
        rooms = [b.funder_room(tt, src[s]) for s in srcs]
        receipts = []
        for v, k in zip(served, mem):
            left = v
            for j, s in enumerate(srcs):
                if left == 0:
                    break
                take = left if left < rooms[j] else rooms[j]
                if take > 0:
                    rooms[j] -= take
                    left -= take
                    receipts.append((names[k], src[s], take))
        return receipts, pay, delivered, fee

    def step(self, t: int) -> dict:
        """Closes step t (epoch WARMUP + t) and prepares the next ones; returns the block's
        per task type results plus the delivered amounts."""
        b, plan, st = self.b, self.plan, self.plan.setup
        b.begin_block(self._block(WARMUP + t + 1))
        if self.claims and t % CLAIM_EVERY == 0 and t > 0:
            # claims first, decided from the state the previous block left
            for k in range(st.n_sinks):
                if b.unclaimed(self.tt_of[k], self._sink[k]) > 0:
                    b.claim(self.tt_of[k], self._sink[k])
        delivered = {}
        for tt in TYPE_NAMES:
            receipts, pay, deliv, fee = self.receipts_for(tt, t)
            delivered[tt] = deliv
            if receipts:
                b.submit_receipts(tt, receipts)
        for tt in TYPE_NAMES:
            b.rebalance(tt)
        if t + 1 < plan.steps:
            nxt, cur = self._rates[t + 1], self._rates[t]
            for s in range(st.n_sources):
                if nxt[s] != cur[s]:
                    b.fund(TYPE_NAMES[st.src_type[s]], self._src[s], 0, nxt[s])
        if t + 2 < plan.steps:
            self._declare(t + 2)
        res = b.end_block()
        for tt in TYPE_NAMES:
            res[tt]["delivered"] = delivered[tt]
        return res


def run_ours(plan: Plan, cfg: OursConfig = OursConfig(), *, check_every: int = 1) -> dict:
    """Runs our policy on the exact model; per-step arrays in paper units plus integer
    conservation checks."""
    T, N = plan.c_true.shape
    backend = ModelBackend(cfg.model_params(plan.scenario.alpha))
    d = Driver(plan, cfg, backend)
    d.setup(backend.genesis)
    slots = [d.members[tt] for tt in TYPE_NAMES]
    order = [k for mem in slots for k in mem]  # results come per type, in slot order
    inv = np.argsort(order)
    rows = {key: [] for key in ("paid", "delivered", "units", "backlog")}
    per_type = {key: [] for key in ("fee", "level", "stalled", "to_escrow", "drained", "inflow", "tasks")}
    worst = 0
    checks = 0
    for t in range(T):
        res = d.step(t)
        for key in rows:
            rows[key].append([x for tt in TYPE_NAMES for x in res[tt][key]])
        per_type["fee"].append([res[tt]["fee"] for tt in TYPE_NAMES])
        per_type["level"].append([res[tt]["level"] for tt in TYPE_NAMES])
        per_type["stalled"].append([res[tt]["stalled"] for tt in TYPE_NAMES])
        per_type["to_escrow"].append([res[tt]["to_escrow"] for tt in TYPE_NAMES])
        per_type["drained"].append([res[tt]["drained"] for tt in TYPE_NAMES])
        per_type["inflow"].append([res[tt]["inflow"] for tt in TYPE_NAMES])
        per_type["tasks"].append([sum(res[tt]["delivered"]) / res[tt]["fee"] for tt in TYPE_NAMES])
        if check_every and (t % check_every == 0 or t == T - 1):
            c = backend.conservation()
            worst = max(worst, max(abs(v) for v in c.values()))
            checks += 1
    arr = {k: np.array(v, dtype=float)[:, inv] for k, v in rows.items()}
    pt = {k: np.array(v, dtype=float) for k, v in per_type.items()}
    paid = arr["paid"] / MONEY
    delivered = arr["delivered"] / MONEY
    units = arr["units"] / (TASK_SCALE * SCALE)
    backlog = arr["backlog"] / (TASK_SCALE * SCALE)
    fee_ratio = pt["fee"] / FEE0
    level = pt["level"] / MONEY
    stalled = pt["stalled"] / MONEY
    to_escrow = pt["to_escrow"] / MONEY
    drained = pt["drained"] / MONEY
    inflow = pt["inflow"].sum(axis=1) / MONEY
    delivered_tasks = pt["tasks"].sum(axis=1) / SCALE
    return {
        "paid": paid,
        "delivered": delivered,
        "inflow": inflow,
        "units": units,
        "backlog": backlog,
        "fee_ratio": fee_ratio,
        "escrow_level": level,
        "stalled": stalled,
        "to_escrow": to_escrow,
        "drained": drained,
        "stall": stalled > 0,
        "delivered_tasks": delivered_tasks,
        "conservation_max_abs_error": worst,
        "conservation_checks": checks,
        "treasury": backend.proto.treasury_accrued / MONEY,
    }
