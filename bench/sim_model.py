"""Exact integer model of the Pura contracts' mechanism, for the simulations.

This is a line-by-line port of the arithmetic in

    contracts/CapacityRegistry.vy   bonds, linear cap, published targets, slashing
    contracts/BackpressurePool.vy   streams, rebalance (EWMA of the targets, split, overflow,
                                    backlog, units, relative slashing, escrow drain, fee
                                    update), credit, claim
    contracts/modules/{backpressure,ewma,fee_math}.vy
    contracts/PricingCurve.vy       base fee, EIP-1559 style with catch-up and bounds
    contracts/EscrowBuffer.vy       FIFO entries per funder, max level, release
    contracts/CompletionTracker.vy  receipt crediting bounded by funding, shortfall slashing

with every floor in the same place, so that driven with the same inputs it produces the
same integers as the chain (bench/simulate_onchain.py checks that against anvil). Money is
a Python int in token base units; a `Token` ledger holds every balance, so conservation is
checked to the unit, the way the stateful contract tests check it.

Deliberately out of scope (not exercised by the experiments, asserted where it could
matter): departing sinks (LEAVING slots), unbonding, signatures and replay (the model
takes receipts as already verified; the on-chain run exercises the real checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pura.params import TaskTypeParams

WAD = 10**18
BPS = 10_000
UNIT_DIV = 10**5  # pool units = tasks * 1e5 (pura.layout.TASK_SCALE)
TASK_SCALE = 10**5
MASK96 = 2**96 - 1
BIAS = 2**59
MAX_CAPACITY = 2**32 - 1
MAX_STEPS = 2**32 - 1
MAX_FUNDERS = 16
MAX_SINKS = 64
MAX_RELEASE = 32
MAX_CATCH_UP = 255


# ------------------------------------------------------------------ pure formulas
# (modules/ewma.vy, backpressure.vy, fee_math.vy)


def pow_wad(base_wad: int, n: int) -> int:
    """base^n in WAD by binary exponentiation, every product floored (ewma._decay)."""
    assert n < 2**32
    result, b, e = WAD, base_wad, n
    while e:
        if e & 1:
            result = result * b // WAD
        e >>= 1
        if e:
            b = b * b // WAD
    return result


def ewma_decay(epochs: int, decay_wad: int) -> int:
    if epochs == 1:
        return decay_wad
    if epochs > MAX_STEPS:
        return 0
    return pow_wad(decay_wad, epochs)


def ewma_step(s_wad: int, target_wad: int, f_wad: int) -> int:
    """target + (s - target) * f, the gap rounded toward zero."""
    if s_wad > target_wad:
        return target_wad + (s_wad - target_wad) * f_wad // WAD
    return target_wad - (target_wad - s_wad) * f_wad // WAD


def ewma_advance(s_wad: int, target_wad: int, epochs: int, decay_wad: int) -> int:
    if epochs == 0 or s_wad == target_wad:
        return s_wad
    return ewma_step(s_wad, target_wad, ewma_decay(epochs, decay_wad))


def to_tasks(amount: int, fee: int) -> int:
    return amount * TASK_SCALE // fee


def to_money(tasks: int, fee: int) -> int:
    return tasks * fee // TASK_SCALE


def backlog_cap(capacity: int, tolerance_bps: int) -> int:
    return capacity * tolerance_bps // BPS


def weight_units(capacity: int, backlog: int, tolerance_bps: int) -> int:
    """w = max(0, Cbar - Q / H), tasks * 1e5; the penalty rounds down."""
    penalty = backlog * BPS // tolerance_bps
    return 0 if capacity <= penalty else capacity - penalty


def fee_factor(demand: int, capacity_value: int, target_bps: int, step_bps: int) -> tuple[int, int]:
    step_wad = step_bps * WAD // BPS
    if capacity_value == 0:
        return (WAD + step_wad, 2**256 - 1) if demand > 0 else (WAD - step_wad, 0)
    util_bps = demand * BPS // capacity_value
    if util_bps >= target_bps:
        return WAD + min(step_wad * (util_bps - target_bps) // target_bps, step_wad), util_bps
    return WAD - min(step_wad * (target_bps - util_bps) // target_bps, step_wad), util_bps


def fee_compound(fee_in: int, min_fee: int, max_fee: int, factor_wad: int, epochs: int) -> int:
    fee = max(min_fee, min(fee_in, max_fee))
    if factor_wad == WAD:
        return fee
    for _ in range(min(epochs, MAX_CATCH_UP)):
        if factor_wad > WAD:
            fee = min((fee * factor_wad + WAD - 1) // WAD, max_fee)
            if fee == max_fee:
                break
        else:
            fee = max(fee * factor_wad // WAD, min_fee)
            if fee == min_fee:
                break
    return fee


# ------------------------------------------------------------------ token ledger


class Token:
    """Every balance in one dict; `transfer` is the only way money moves."""

    def __init__(self):
        self.bal: dict[str, int] = {}
        self.supply = 0

    def mint(self, to: str, amount: int):
        self.bal[to] = self.bal.get(to, 0) + amount
        self.supply += amount

    def transfer(self, frm: str, to: str, amount: int):
        b = self.bal.get(frm, 0)
        assert b >= amount, f"token: {frm} short by {amount - b}"
        self.bal[frm] = b - amount
        self.bal[to] = self.bal.get(to, 0) + amount

    def of(self, who: str) -> int:
        return self.bal.get(who, 0)


# ------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class ModelParams:
    """The deployment parameters the model needs (same names as pura/params.py)."""

    epoch_length: int = 3600
    alpha_wad: int = 3 * 10**17
    tolerance_bps: int = 20_000
    min_funding: int = 10**6
    slash_bps: int = 5_000
    slash_threshold_bps: int = 10_000
    drain_bps: int = BPS
    target_util_bps: int = 8_000
    max_step_bps: int = 1_250


# A market's parameters: the same record the deploy script reads from a parameters file.
TaskCfg = TaskTypeParams


# ------------------------------------------------------------------ per-market state


@dataclass
class Slot:
    sink: str
    # registry sink word and published entry
    declared: int = 0
    cap: int = 0
    cut: int = 0  # epoch + 1 of a lowered cap not yet applied by a rebalance
    hard: bool = False  # the target is also a ceiling for the pool's signal
    # pool hot word
    c: int = 0  # smoothed capacity, tasks * 1e5
    units: int = 0
    sat: bool = False  # backlog hit its cap, no verified work since: units stay 0
    mark_flag: bool = False
    xb: int = BIAS
    unclaimed: int = 0
    slash_mark: int = 0


@dataclass
class Stream:
    funder: str
    rate: int = 0
    remaining: int = 0
    last: int = 0
    contrib: int = 0


@dataclass
class Market:
    cfg: TaskCfg
    slots: list[Slot] = field(default_factory=list)
    slot_of: dict[str, int] = field(default_factory=dict)
    bonds: dict[str, int] = field(default_factory=dict)
    # pool
    last_epoch_p1: int = 0
    pending: int = 0
    total_units: int = 0
    spare: int = 0
    streams: list[Stream] = field(default_factory=list)
    stream_idx: dict[str, int] = field(default_factory=dict)
    funded: dict[str, int] = field(default_factory=dict)
    credited: dict[str, int] = field(default_factory=dict)
    # pricing
    fee: int = 0
    # escrow: FIFO of [funder, amount]
    entries: list[list] = field(default_factory=list)
    head: int = 0
    level: int = 0
    escrow_balance: dict[str, int] = field(default_factory=dict)


@dataclass
class RebalanceResult:
    """What one rebalance did (the numbers the Rebalanced event carries, plus per-sink pay)."""

    epoch: int
    inflow: int
    distributed: int
    to_escrow: int
    stalled: int
    drained: int
    fee: int  # the fee of the closed period
    new_fee: int
    paid: list[int]
    units: list[int]
    backlog: list[int]  # tasks * 1e5 after the update
    slashed: int


# ------------------------------------------------------------------ protocol


class Protocol:
    """The five contracts for any number of task types, as one exact state machine."""

    POOL, ESCROW, REGISTRY = "pool", "escrow", "registry"

    def __init__(self, params: ModelParams, genesis: int, token: Token | None = None):
        self.p = params
        self.genesis = genesis
        self.token = token or Token()
        self.decay_wad = WAD - params.alpha_wad
        self.markets: dict[str, Market] = {}
        self.total_bonded = 0
        self.treasury_accrued = 0
        self.escrow_total_held = 0

    # ---------------------------------------------------------- clock
    def epoch(self, now: int) -> int:
        return (now - self.genesis) // self.p.epoch_length

    # ---------------------------------------------------------- owner
    def create_task_type(self, tt: str, cfg: TaskCfg):
        assert tt not in self.markets
        self.markets[tt] = Market(cfg=cfg, fee=cfg.base_fee)

    # ---------------------------------------------------------- registry
    def register_sink(self, tt: str, sink: str, bond: int, capacity: int, now: int) -> int:
        m = self.markets[tt]
        assert sink not in m.slot_of and bond >= m.cfg.min_bond
        assert len(m.slots) < MAX_SINKS
        self.token.transfer(sink, self.REGISTRY, bond)
        m.bonds[sink] = m.bonds.get(sink, 0) + bond
        self.total_bonded += bond
        slot = Slot(sink=sink, declared=min(capacity, MAX_CAPACITY),
                    cap=min(m.bonds[sink] // m.cfg.stake_per_unit, MAX_CAPACITY))
        slot.hard = slot.cap <= slot.declared
        m.slot_of[sink] = len(m.slots)
        m.slots.append(slot)
        return m.slot_of[sink]

    def declare_many(self, tt: str, decls: list[tuple[str, int]], now: int):
        """Declarations at one timestamp: each is what `declare_capacity` or an accepted
        relayed attestation does (replace the declared capacity; the pool's signal steps
        toward min(declared, cap) at its next rebalance)."""
        m = self.markets[tt]
        slots, slot_of = m.slots, m.slot_of
        for sink, capacity in decls:
            sl = slots[slot_of[sink]]
            sl.declared = capacity if capacity < MAX_CAPACITY else MAX_CAPACITY
            self._publish(m, sl, may_clear=True)

    @staticmethod
    def _publish(m: Market, sl: Slot, may_clear: bool):
        """registry._declare: the target is hard while the cap binds or a lowered cap has not
        been applied by a rebalance in a later epoch (cleared only by a declaration)."""
        sl.hard = sl.cap <= sl.declared
        if sl.cut:
            if may_clear and m.last_epoch_p1 > sl.cut:
                sl.cut = 0
            else:
                sl.hard = True

    def _slash(self, tt: str, sink: str, amount: int, now: int) -> int:
        m = self.markets[tt]
        bonded = m.bonds[sink]
        taken = min(amount, bonded)  # nothing is ever unbonding in these experiments
        if taken > 0:
            m.bonds[sink] = bonded - taken
            self.total_bonded -= taken
            self.treasury_accrued += taken
            # _set_cap: recompute the cap; a lower one is a pending cut (hard target)
            sl = m.slots[m.slot_of[sink]]
            cap = min(m.bonds[sink] // m.cfg.stake_per_unit, MAX_CAPACITY)
            if cap < sl.cap:
                sl.cut = self.epoch(now) + 1
            sl.cap = cap
            self._publish(m, sl, may_clear=False)
        return taken

    # ---------------------------------------------------------- pool: funders
    def _streamed(self, st: Stream, now: int) -> int:
        return min(st.remaining, st.rate * (now - st.last))

    def _settle(self, m: Market, st: Stream, now: int):
        streamed = self._streamed(st, now)
        st.last = now
        if streamed > 0:
            st.remaining -= streamed
            st.contrib += streamed
            m.pending += streamed
            m.funded[st.funder] = m.funded.get(st.funder, 0) + streamed

    def fund(self, tt: str, funder: str, amount: int, rate: int, now: int):
        m = self.markets[tt]
        if funder not in m.stream_idx:
            assert amount >= self.p.min_funding and len(m.streams) < MAX_FUNDERS
            m.stream_idx[funder] = len(m.streams)
            m.streams.append(Stream(funder=funder, last=now))
        st = m.streams[m.stream_idx[funder]]
        self._settle(m, st, now)
        if amount > 0:
            self.token.transfer(funder, self.POOL, amount)
            st.remaining += amount
        st.rate = rate

    def funder_room(self, tt: str, funder: str, now: int) -> int:
        m = self.markets[tt]
        funded = m.funded.get(funder, 0)
        if funder in m.stream_idx:
            funded += self._streamed(m.streams[m.stream_idx[funder]], now)
        credited = m.credited.get(funder, 0)
        return max(0, funded - credited)

    # ---------------------------------------------------------- tracker + pool.credit
    def submit_receipts(self, tt: str, receipts: list[tuple[str, str, int]], now: int) -> int:
        """Verified receipts (sink, source, amount) in one batch: the tracker's funding
        check per source, then the pool's credit (settle, re-check, backlog credit)."""
        m = self.markets[tt]
        slot_of = m.slot_of
        sink_order: list[str] = []
        sink_amt: dict[str, int] = {}
        src_order: list[str] = []
        src_room: dict[str, int] = {}
        src_amt: dict[str, int] = {}
        accepted = 0
        for sink, source, amount in receipts:
            if amount == 0 or sink == source or sink not in slot_of:
                continue
            if sink not in sink_amt:
                sink_order.append(sink)
                sink_amt[sink] = 0
            if source not in src_room:
                src_order.append(source)
                src_room[source] = self.funder_room(tt, source, now)
                src_amt[source] = 0
            if amount > src_room[source]:
                continue
            src_room[source] -= amount
            src_amt[source] += amount
            sink_amt[sink] += amount
            accepted += 1
        if accepted == 0:
            return 0
        # pool.credit
        for src in src_order:
            if src in m.stream_idx:
                self._settle(m, m.streams[m.stream_idx[src]], now)
            c = m.credited.get(src, 0) + src_amt[src]
            assert c <= m.funded.get(src, 0), "pool: credit exceeds funding"
            m.credited[src] = c
        fee, slots = m.fee, m.slots
        for sink in sink_order:
            a = sink_amt[sink]
            if a == 0:
                continue
            sl = slots[slot_of[sink]]
            amount = a * TASK_SCALE // fee  # backpressure._to_tasks
            sl.xb = sl.xb - amount if sl.xb > amount else 1
            sl.sat = False  # verified work clears saturation
        return accepted

    # ---------------------------------------------------------- pool.rebalance
    def predict_pay(self, tt: str, now: int) -> list[int]:
        """What each slot will be paid by a rebalance at `now` (views only; what the driver
        computes from the chain's views to size receipts)."""
        m = self.markets[tt]
        pot = m.pending + sum(self._streamed(st, now) for st in m.streams)
        u_eff = m.total_units
        if u_eff == 0:
            return [0] * len(m.slots)
        n = max(1, min(self.epoch(now) + 1 - m.last_epoch_p1, MAX_CATCH_UP)) if m.last_epoch_p1 else 1
        to_sinks = min(pot, u_eff * m.fee * n // UNIT_DIV)
        return [to_sinks * sl.units // u_eff for sl in m.slots]

    def rebalance(self, tt: str, now: int) -> RebalanceResult:
        m = self.markets[tt]
        p = self.p
        epoch = self.epoch(now)
        assert epoch + 1 > m.last_epoch_p1, "pool: rebalance not due"
        n_epochs = 1 if m.last_epoch_p1 == 0 else min(epoch + 1 - m.last_epoch_p1, MAX_CATCH_UP)

        # 1. streams
        inflow = 0
        for st in m.streams:
            streamed = self._streamed(st, now)
            if streamed > 0:
                st.remaining -= streamed
                st.contrib += streamed
                m.pending += streamed
                m.funded[st.funder] = m.funded.get(st.funder, 0) + streamed
            st.last = now
            inflow += st.contrib

        # 2. absorbable at the period's fee
        fee = m.fee
        level_before = m.level
        u_eff = m.total_units  # no LEAVING slots in the model
        absorbable = u_eff * fee * n_epochs // UNIT_DIV
        to_sinks = min(m.pending, absorbable) if u_eff > 0 else 0

        # 3. overflow to escrow, the rest back into the funder's deposit
        overflow = min(m.pending - to_sinks, inflow)
        moved = stalled = 0
        if overflow > 0:
            room = max(0, m.cfg.escrow_max - m.level)
            e_credit: list[tuple[str, int]] = []
            for st in m.streams:
                ov = overflow * st.contrib // inflow
                if ov == 0:
                    continue
                acc = min(ov, room)
                room -= acc
                if acc > 0:
                    e_credit.append((st.funder, acc))
                    moved += acc
                if ov > acc:
                    st.remaining += ov - acc
                    stalled += ov - acc
                m.funded[st.funder] -= ov
            m.pending -= moved + stalled
            if moved > 0:
                self.token.transfer(self.POOL, self.ESCROW, moved)
                self._escrow_credit(m, e_credit)

        # 4. split, backlog, units; slashing suspects
        hh = p.tolerance_bps
        thr = p.slash_threshold_bps
        b_min = None
        distributed = new_total = 0
        suspects = []
        paid = [0] * len(m.slots)
        # the EWMA: one step per epoch since the last rebalance (the first counts from epoch 0)
        f_gap = ewma_decay(epoch + 1 - max(m.last_epoch_p1, 1), self.decay_wad)
        for i, sl in enumerate(m.slots):
            target = (sl.declared if sl.declared < sl.cap else sl.cap) * UNIT_DIV
            # one EWMA step per elapsed epoch; a hard target is also a ceiling
            c_i = sl.c
            if c_i != target:
                # a signal at 0 (a newcomer) takes one step once the market has rebalanced
                c_i = ewma_step(c_i, target, self.decay_wad if c_i == 0 and m.last_epoch_p1 else f_gap)
                if sl.hard and c_i > target:
                    c_i = target
            sl.c = c_i
            p_i = to_sinks * sl.units // u_eff if u_eff > 0 else 0
            distributed += p_i
            paid[i] = p_i
            xb = sl.xb + p_i * TASK_SCALE // fee  # backpressure._to_tasks
            q = xb - BIAS if xb > BIAS else 0
            if p_i > 0 and c_i > 0:
                r = q * WAD // c_i
                b_min = r if b_min is None else min(b_min, r)
            mark = 0
            if sl.mark_flag:
                mark = sl.slash_mark
                if q < mark:
                    mark = q
                    sl.slash_mark = q
                    if q == 0:
                        sl.mark_flag = False
            if p_i > 0 and q > c_i * thr // BPS and q > mark:
                suspects.append((i, q, c_i, mark))
            sl.unclaimed += p_i
            assert sl.unclaimed <= MASK96
            qcap = c_i * hh // BPS  # backpressure._backlog_cap
            if q >= qcap and q > 0:
                sl.sat = True
            if q > qcap:
                q = qcap
            if q > BIAS - 1:
                q = BIAS - 1
            penalty = q * BPS // hh  # backpressure._units
            sl.units = 0 if sl.sat else (c_i - penalty if c_i > penalty else 0)
            new_total += sl.units
            sl.xb = q + BIAS
        m.pending -= distributed

        slashed = 0
        if b_min is None:
            b_min = 0
        for i, q, c_i, mark in suspects:
            base = max(b_min * c_i // WAD + c_i * thr // BPS, mark)
            if q <= base:
                continue
            sl = m.slots[i]
            sl.slash_mark = q
            sl.mark_flag = True
            requested = to_money(q - base, fee) * p.slash_bps // BPS
            if requested > 0:
                slashed += self._slash(tt, sl.sink, requested, now)

        # 5. drain escrow into this period's spare capacity
        spare = absorbable - to_sinks
        drained = 0
        allowance = spare * p.drain_bps // BPS
        if allowance > 0 and level_before > 0:
            drained = self._escrow_release(m, allowance)
            m.pending += drained
        m.spare = spare - min(spare, drained)

        # 6. fee: demand (fresh inflow + queued escrow) over usable capacity (the weights in
        #    force, i.e. `absorbable`), not declared capacity
        factor, _util = fee_factor(inflow + level_before, absorbable, p.target_util_bps, p.max_step_bps)
        m.fee = fee_compound(fee, m.cfg.min_fee, m.cfg.max_fee, factor, n_epochs)

        # 7. streams: contributions consumed, closed ones compacted away
        kept = []
        for st in m.streams:
            st.contrib = 0
            if st.rate == 0 and st.remaining == 0:
                continue
            kept.append(st)
        m.streams = kept
        m.stream_idx = {st.funder: j for j, st in enumerate(kept)}
        m.last_epoch_p1 = epoch + 1
        m.total_units = new_total
        return RebalanceResult(
            epoch=epoch, inflow=inflow, distributed=distributed, to_escrow=moved, stalled=stalled,
            drained=drained, fee=fee, new_fee=m.fee, paid=paid, units=[sl.units for sl in m.slots],
            backlog=[sl.xb - BIAS for sl in m.slots], slashed=slashed,
        )

    # ---------------------------------------------------------- escrow
    def _escrow_credit(self, m: Market, credits: list[tuple[str, int]]):
        total = sum(a for _, a in credits)
        assert m.level + total <= m.cfg.escrow_max, "escrow: full"
        self.escrow_total_held += total
        for funder, amount in credits:
            if amount == 0:
                continue
            m.level += amount
            if len(m.entries) > m.head and m.entries[-1][0] == funder:
                m.entries[-1][1] += amount  # merged into the newest entry, same FIFO position
            else:
                m.entries.append([funder, amount])
            m.escrow_balance[funder] = m.escrow_balance.get(funder, 0) + amount

    def _escrow_release(self, m: Market, max_amount: int) -> int:
        left, total = max_amount, 0
        for _ in range(MAX_RELEASE):
            if m.head == len(m.entries) or left == 0:
                break
            e = m.entries[m.head]
            if e[1] == 0:
                m.head += 1
                continue
            take = min(e[1], left)
            left -= take
            total += take
            e[1] -= take
            m.escrow_balance[e[0]] -= take
            m.funded[e[0]] = m.funded.get(e[0], 0) + take
            m.level -= take
            if e[1] == 0:
                m.head += 1
        if total > 0:
            self.escrow_total_held -= total
            self.token.transfer(self.ESCROW, self.POOL, total)
        return total

    # ---------------------------------------------------------- claims
    def claim(self, tt: str, sink: str) -> int:
        m = self.markets[tt]
        sl = m.slots[m.slot_of[sink]]
        amount = sl.unclaimed
        assert amount > 0, "pool: nothing to claim"
        sl.unclaimed = 0
        self.token.transfer(self.POOL, sink, amount)
        return amount

    # ---------------------------------------------------------- invariants
    def liabilities(self, tt: str) -> int:
        m = self.markets[tt]
        return m.pending + sum(st.remaining for st in m.streams) + sum(sl.unclaimed for sl in m.slots)

    def check_conservation(self) -> dict[str, int]:
        """The contracts' invariants, as differences that must all be 0 (to the unit)."""
        t = self.token
        levels = sum(m.level for m in self.markets.values())
        live_entries = sum(e[1] for m in self.markets.values() for e in m.entries[m.head:])
        bonds = sum(sum(m.bonds.values()) for m in self.markets.values())
        return {
            "pool_balance_minus_liabilities": t.of(self.POOL) - sum(self.liabilities(tt) for tt in self.markets),
            "escrow_balance_minus_held": t.of(self.ESCROW) - self.escrow_total_held,
            "escrow_held_minus_levels": self.escrow_total_held - levels,
            "escrow_levels_minus_entries": levels - live_entries,
            "registry_balance_minus_bonds_and_treasury": t.of(self.REGISTRY) - self.total_bonded - self.treasury_accrued,
            "bonds_minus_total_bonded": bonds - self.total_bonded,
            "supply_minus_sum_of_balances": t.supply - sum(t.bal.values()),
        }
