"""A contract-only lifecycle on a local anvil chain (`python -m pura.lifecycle`).

Deploys the five contracts on the embedded local parameters, registers three sinks, has a
funder stream into the pool and co-sign receipts for the work the sinks deliver, lets one
sink stop delivering, rebalances every epoch, and prints a table per epoch: smoothed
capacity, backlog (epochs), weight share, quoted price, paid, verified, escrow level.
The failed sink's share falls to ~0 within a few epochs and the money goes to the others;
then it comes back, works off its backlog and regains its share. Ends with claims and a
to-the-wei conservation check.

Until the gateway drives the chain (a later issue), the funder is this script: it signs a
receipt for exactly the work each sink delivered in the epoch.
"""

from __future__ import annotations

import argparse
import sys

from ape import accounts, chain, networks, project

from pura.deploy import deploy_protocol
from pura.layout import TASK_SCALE
from pura.market import expected_pay
from pura.params import ProtocolParams, TaskTypeParams
from pura.signing import Receipt, task_type_id

USDC = 10**6
TASK = "llm.cheap"
EPOCH = 3600
PARAMS = ProtocolParams(
    epoch_length=EPOCH,
    alpha_wad=3 * 10**17,
    unbonding_period=7 * 86400,
    tolerance_bps=20_000,
    min_funding=USDC,
    escrow_min_deposit=USDC,
    slash_bps=5_000,
    slash_threshold_bps=10_000,
    task_types=(TaskTypeParams(TASK, 100 * USDC, USDC, 10_000, 100, 10**9, 1_000 * USDC),),
)
NAMES = ["sink-a", "sink-b", "sink-c"]
CAPACITIES = [120, 100, 80]


class Demo:
    def __init__(self, fail_at: int, recover_at: int, epochs: int):
        self.fail_at, self.recover_at, self.epochs = fail_at, recover_at, epochs
        self.owner, self.keeper = accounts.test_accounts[0], accounts.test_accounts[7]
        self.funder = accounts.test_accounts[5]
        self.sinks = [accounts.test_accounts[2 + i] for i in range(3)]
        self.task = task_type_id(TASK)
        self.p = deploy_protocol(project, self.owner, PARAMS, treasury=accounts.test_accounts[1].address)
        self.genesis = self.p.registry.GENESIS()
        self.nonce = 0
        for a in self.sinks + [self.funder]:
            self.p.token.mint(a, 100_000 * USDC, sender=self.owner)
            for spender in (self.p.registry, self.p.pool, self.p.escrow):
                self.p.token.approve(spender, 2**256 - 1, sender=a)

    def epoch(self) -> int:
        return (chain.blocks.head.timestamp - self.genesis) // EPOCH

    def at(self, epoch: int, offset: int):
        chain.pending_timestamp = self.genesis + epoch * EPOCH + offset
        chain.mine()

    def setup(self):
        reg = self.p.registry
        for sink, cap in zip(self.sinks, CAPACITIES):
            reg.register_sink(self.task, max(cap, 100) * USDC, cap, sender=sink)
        self.at(self.epoch() + 15, 1)  # the smoothed signal ramps to ~99 % of the declarations
        self.p.pool.rebalance(self.task, sender=self.keeper)
        fee = self.p.pricing.base_fee(self.task)
        per_epoch = int(0.7 * sum(CAPACITIES) * fee)  # demand at 70 % of capacity
        self.p.pool.fund(self.task, 10_000 * USDC, per_epoch // EPOCH, sender=self.funder)

    def run_epoch(self, k: int) -> dict:
        """The sinks work through epoch k; receipts are relayed 10 s before it closes."""
        p, task = self.p, self.task
        working = [not (i == 1 and self.fail_at <= k < self.recover_at) for i in range(3)]
        self.at(self.epoch() + 1, -10)
        pay = expected_pay(p.pool, p.pricing, task, self.sinks, [self.funder], 11)
        room = p.pool.funder_room(task, self.funder)
        receipts, delivered = [], [0, 0, 0]
        for i, (sink, amount) in enumerate(zip(self.sinks, pay)):
            if not working[i] or amount == 0:
                continue
            # a recovering sink also works off what it was paid and did not deliver
            backlog_money = p.pool.position(task, sink).backlog * p.pricing.base_fee(task) // TASK_SCALE
            amount = min(amount + backlog_money, room)
            room -= amount
            delivered[i] = amount
            r = Receipt(task, sink.address, self.funder.address, self.nonce.to_bytes(32, "big"), amount,
                        bytes(32), self.nonce, chain.blocks.head.timestamp + 3 * EPOCH)
            self.nonce += 1
            cid, tr = chain.chain_id, p.tracker.address
            receipts.append(r.as_call_arg(r.sign(sink.private_key, cid, tr), r.sign(self.funder.private_key, cid, tr)))
        if receipts:
            p.tracker.submit_receipts(task, receipts, sender=self.keeper)
        self.at(self.epoch() + 1, 1)
        before = [p.pool.position(task, s).unclaimed for s in self.sinks]
        tx = p.pool.rebalance(task, sender=self.keeper)
        ev = p.pool.Rebalanced.from_receipt(tx)[0]
        slashed = {e.sink: e.taken for e in p.tracker.ShortfallSlashed.from_receipt(tx)}
        rows = []
        units = [p.pool.position(task, s).units for s in self.sinks]
        for i, sink in enumerate(self.sinks):
            pos = p.pool.position(task, sink)
            cap = pos.capacity
            rows.append({
                "sink": NAMES[i],
                "working": working[i],
                "capacity": round(cap / TASK_SCALE),
                "backlog_epochs": pos.backlog / cap if cap else 0.0,
                "share": units[i] / sum(units) if sum(units) else 0.0,
                "price": p.pricing.price(task, sink),
                "paid": pos.unclaimed - before[i],
                "verified": delivered[i],
                "slashed": slashed.get(sink.address, 0),
            })
        return {"epoch": k, "fee": ev.fee, "inflow": ev.inflow, "to_escrow": ev.to_escrow,
                "escrow": p.escrow.level(task), "rows": rows}

    def conservation(self) -> list[str]:
        p, t = self.p, self.p.token
        checks = [
            ("pool", t.balanceOf(p.pool), p.pool.liabilities(self.task)),
            ("escrow", t.balanceOf(p.escrow), p.escrow.total_held()),
            ("registry", t.balanceOf(p.registry), p.registry.total_bonded() + p.registry.treasury_accrued()),
        ]
        out = []
        for name, held, owed in checks:
            out.append(f"  {name:9s} holds {held:>14,} owes {owed:>14,}  {'exact' if held == owed else 'MISMATCH'}")
            assert held == owed, f"{name}: holds {held}, owes {owed}"
        return out


def money(x: int) -> str:
    return f"{x / USDC:9.4f}"


def render(ep: dict) -> str:
    head = (f"epoch {ep['epoch']:2d}   base fee {ep['fee'] / USDC:.6f}/task   inflow {money(ep['inflow'])}   "
            f"to escrow {money(ep['to_escrow'])}   escrow level {money(ep['escrow'])}")
    lines = [head, f"  {'sink':8s} {'state':8s} {'capacity':>8s} {'backlog':>8s} {'share':>7s} {'price':>9s} "
                   f"{'paid':>9s} {'verified':>9s} {'slashed':>9s}"]
    for r in ep["rows"]:
        lines.append(f"  {r['sink']:8s} {'working' if r['working'] else 'FAILED':8s} {r['capacity']:8d} "
                     f"{r['backlog_epochs']:8.2f} {r['share'] * 100:6.1f}% {r['price'] / USDC:9.6f} "
                     f"{money(r['paid'])} {money(r['verified'])} {money(r['slashed'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--fail-at", type=int, default=3, help="epoch at which sink-b stops delivering")
    ap.add_argument("--recover-at", type=int, default=9, help="epoch at which sink-b works again")
    args = ap.parse_args(argv)
    with networks.parse_network_choice("ethereum:local:foundry"):
        demo = Demo(args.fail_at, args.recover_at, args.epochs)
        print("Pura lifecycle on a local anvil chain: 3 sinks, one funder streaming ~70 % of capacity.")
        print(f"sink-b stops delivering at epoch {args.fail_at} and works again at epoch {args.recover_at}.\n")
        demo.setup()
        history = []
        for k in range(args.epochs):
            ep = demo.run_epoch(k)
            history.append(ep)
            print(render(ep) + "\n")
        print("sink-b's weight share by epoch: " + " ".join(f"{ep['rows'][1]['share'] * 100:.1f}%" for ep in history))
        for s, name in zip(demo.sinks, NAMES):
            got = demo.p.pool.claim(demo.task, sender=s)
            print(f"{name} claimed {money(demo.p.pool.Claimed.from_receipt(got)[0].amount)}")
        demo.p.pool.close_stream(demo.task, sender=demo.funder)
        print("conservation to the wei:")
        print("\n".join(demo.conservation()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
