"""Gas per operation, from real transaction receipts on a local anvil (not gasleft deltas).

    ./dev shell -c 'python -m bench.gas'      (or: python -m bench.gas inside the venv)

Prints a table and writes bench/out/gas.json. Every number is `gasUsed` of a mined
transaction, so it includes the 21,000 base cost and calldata; per-item figures divide a
batch's gasUsed by its size. Calldata bytes per item are reported too: on Base the L1
data fee is charged on them. Measures, asserts nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ape import accounts, chain, networks, project

from pura.deploy import deploy_protocol
from pura.market import expected_pay
from pura.params import ProtocolParams, TaskTypeParams
from pura.signing import Attestation, Receipt, task_type_id

OUT = Path(__file__).resolve().parent / "out"
USDC = 10**6
CHEAP = task_type_id("llm.cheap")
PARAMS = ProtocolParams(
    epoch_length=3600, alpha_wad=3 * 10**17, unbonding_period=7 * 86400, tolerance_bps=20_000,
    min_funding=USDC, escrow_min_deposit=USDC, slash_bps=5_000, slash_threshold_bps=10_000,
    task_types=(TaskTypeParams("llm.cheap", 100 * USDC, USDC, 10_000, 1, 10**12, 10**6 * USDC),),
)
# The Solidity anchor's own figures (warm storage, gasleft deltas inside one test tx, no
# 21k base, no calldata), from its GAS-BENCHMARKS.md and paper; for orientation only.
ANCHOR = {
    "register sink": 174_386,
    "declare capacity": 58_287,  # commit + reveal
    "receipt (single)": 89_421,
    "rebalance, per sink": 187_832 // 10,  # 10 sinks
}


class Bench:
    def __init__(self):
        self.owner = accounts.test_accounts[0]
        self.p = deploy_protocol(project, self.owner, PARAMS)
        self.genesis = self.p.registry.GENESIS()
        self.rows: list[dict] = []

    def actor(self, tokens=10**6 * USDC):
        a = accounts.test_accounts.generate_test_account()
        chain.set_balance(a.address, 10**21)
        self.p.token.mint(a, tokens, sender=self.owner)
        for spender in (self.p.registry, self.p.pool, self.p.escrow):
            self.p.token.approve(spender, 2**256 - 1, sender=a)
        return a

    def next_epoch(self, n=1):
        e = (chain.blocks.head.timestamp - self.genesis) // 3600
        chain.pending_timestamp = self.genesis + (e + n) * 3600 + 1
        chain.mine()

    def record(self, op, tx, items=1, note=""):
        gas = tx.gas_used
        data = bytes(tx.transaction.data)
        row = {
            "operation": op,
            "items": items,
            "gas_total": gas,
            "gas_per_item": gas // items,
            "calldata_bytes_per_item": len(data) // items,
            "calldata_nonzero_per_item": sum(1 for b in data if b) // items,
            "note": note,
        }
        self.rows.append(row)
        return row


def market(b: Bench, n_sinks: int, task=CHEAP):
    """n warm sinks with capacity 100 each, one funder streaming ~80 % of capacity."""
    sinks = [b.actor() for _ in range(n_sinks)]
    for s in sinks:
        b.p.registry.register_sink(task, 100 * USDC, 100, sender=s)
    b.next_epoch(40)
    b.p.pool.rebalance(task, sender=b.owner)
    funder = b.actor()
    fee = b.p.pricing.base_fee(task)
    b.p.pool.fund(task, 10**5 * USDC, max(1, int(0.8 * n_sinks * 100 * fee) // 3600), sender=funder)
    return sinks, funder


NONCES: dict[str, int] = {}


def honest_epoch(b: Bench, tid, sinks, funder):
    """Relays, just before the epoch ends, one receipt per sink for what it will be paid
    (estimated from views), then rebalances; returns the rebalance transaction."""
    p = b.p
    e = (chain.blocks.head.timestamp - b.genesis) // 3600
    chain.pending_timestamp = b.genesis + (e + 1) * 3600 - 10
    chain.mine()
    pays = expected_pay(p.pool, p.pricing, tid, sinks, [funder], 11)
    # The funder can vouch only for what it has streamed so far (its room), which lags the
    # pay by the seconds left in the epoch: every sink gets the same fraction of its pay,
    # so no sink is starved into a backlog (handing out room first come, first served
    # would leave the last sinks short every epoch and get them slashed).
    room = p.pool.funder_room(tid, funder)
    want = sum(pays)
    args = []
    for s, pay in zip(sinks, pays):
        amount = pay if want <= room else pay * room // want
        if amount == 0:
            continue
        nonce = NONCES.get(funder.address, 0)
        NONCES[funder.address] = nonce + 1
        r = Receipt(tid, s.address, funder.address, nonce.to_bytes(32, "big"), amount, bytes(32), nonce,
                    chain.blocks.head.timestamp + 86400)
        cid, tr = chain.chain_id, p.tracker.address
        args.append(r.as_call_arg(r.sign(s.private_key, cid, tr), r.sign(funder.private_key, cid, tr)))
    for k in range(0, len(args), 64):
        p.tracker.submit_receipts(tid, args[k:k + 64], sender=b.owner)
    b.next_epoch()
    return p.pool.rebalance(tid, sender=b.owner)


def receipts(b: Bench, sinks, funder, n, start_nonce, amount=1_000):
    out = []
    for k in range(n):
        sink = sinks[k % len(sinks)]
        r = Receipt(CHEAP, sink.address, funder.address, (start_nonce + k).to_bytes(32, "big"), amount,
                    bytes(range(32)), start_nonce + k, chain.blocks.head.timestamp + 86400)
        cid, tr = chain.chain_id, b.p.tracker.address
        out.append(r.as_call_arg(r.sign(sink.private_key, cid, tr), r.sign(funder.private_key, cid, tr)))
    return out


def run() -> list[dict]:
    b = Bench()
    p = b.p
    # --- registry
    s = b.actor()
    b.record("register sink", p.registry.register_sink(CHEAP, 150 * USDC, 100, sender=s))
    b.next_epoch()
    b.record("declare capacity", p.registry.declare_capacity(CHEAP, 120, sender=s))
    b.record("add bond", p.registry.add_bond(CHEAP, 10 * USDC, sender=s))
    b.record("request unbond", p.registry.request_unbond(CHEAP, 10 * USDC, sender=s))

    # --- attestations: one per sink, relayed in batches
    att_sinks = [b.actor() for _ in range(50)]
    for a in att_sinks:
        p.registry.register_sink(CHEAP, 100 * USDC, 50, sender=a)
    b.next_epoch()
    nonce = 1
    for n in (1, 10, 50):
        batch = []
        for a in att_sinks[:n]:
            att = Attestation(CHEAP, a.address, 60 + nonce, nonce, chain.blocks.head.timestamp + 3600)
            batch.append(att.as_call_arg(att.sign(a.private_key, chain.chain_id, p.registry.address)))
        b.record("relayed attestation batch", p.registry.submit_attestations(CHEAP, batch, sender=b.owner), n,
                 "per attestation")
        nonce += 1
        b.next_epoch()

    # --- rebalance, on a fresh task type per size so state does not pile up. Steady state:
    # every sink is paid each epoch and backs its pay with receipts relayed before the epoch
    # ends (as the gateway does), so backlogs stay ~0 and nothing overflows.
    for n in (4, 16, 64):
        tid = task_type_id(f"gas.{n}")
        p.registry.create_task_type(tid, 100 * USDC, USDC, sender=b.owner)
        p.pricing.configure(tid, 10_000, 1, 10**12, sender=b.owner)
        p.escrow.set_max_level(tid, 10**6 * USDC, sender=b.owner)
        sinks = [b.actor() for _ in range(n)]
        for sk in sinks:
            p.registry.register_sink(tid, 100 * USDC, 100, sender=sk)
        b.next_epoch(40)
        p.pool.rebalance(tid, sender=b.owner)
        funder = b.actor()
        fee = p.pricing.base_fee(tid)
        p.pool.fund(tid, 10**5 * USDC, max(1, int(0.5 * n * 100 * fee) // 3600), sender=funder)
        for _ in range(3):
            tx = honest_epoch(b, tid, sinks, funder)
        b.record(f"rebalance, {n} sinks", tx, n, "per sink; all paid and verified, no overflow")
        # the same market when demand exceeds capacity: overflow to escrow every epoch
        p.pool.fund(tid, 10**5 * USDC, max(1, int(2.0 * n * 100 * fee) // 3600), sender=funder)
        for _ in range(3):
            tx = honest_epoch(b, tid, sinks, funder)
        b.record(f"rebalance, {n} sinks", tx, n, "per sink; all paid and verified, overflow to escrow")
        if n == 64:
            # the signal moving: every sink attests a lower capacity (a fall: at once), then
            # its full capacity again, so in the measured rebalance every signal rises by one
            # EWMA step
            def attest_all(capacity_of, nonce):
                batch = []
                for k, sk in enumerate(sinks):
                    att = Attestation(tid, sk.address, capacity_of(k), nonce, chain.blocks.head.timestamp + 3600)
                    batch.append(att.as_call_arg(att.sign(sk.private_key, chain.chain_id, p.registry.address)))
                p.registry.submit_attestations(tid, batch, sender=b.owner)
            attest_all(lambda k: 90 + k % 7, 1)
            b.next_epoch()
            p.pool.rebalance(tid, sender=b.owner)
            attest_all(lambda k: 100, 2)
            tx = honest_epoch(b, tid, sinks, funder)
            b.record(f"rebalance, {n} sinks", tx, n, "per sink; overflow to escrow, every capacity rising (an EWMA step each)")

    sinks, funder = market(b, 3)
    b.next_epoch()
    b.record("open stream", p.pool.fund(CHEAP, 100 * USDC, 1_000, sender=b.actor()))
    b.record("top up stream", p.pool.fund(CHEAP, 100 * USDC, 1_000, sender=funder))
    b.record("instant distribution", p.pool.distribute(CHEAP, 5 * USDC, sender=funder))
    b.next_epoch()
    p.pool.rebalance(CHEAP, sender=b.owner)
    chain.pending_timestamp = chain.blocks.head.timestamp + 1800
    chain.mine()
    nonce = 10**6
    for n in (1, 10, 50):
        batch = receipts(b, sinks, funder, n, nonce)
        nonce += n
        b.record("receipt batch", p.tracker.submit_receipts(CHEAP, batch, sender=b.owner), n,
                 "per receipt; 3 sinks, 1 source, sequential nonces")
    b.next_epoch()
    p.pool.rebalance(CHEAP, sender=b.owner)
    b.record("claim", p.pool.claim(CHEAP, sender=sinks[0]))
    b.record("close stream", p.pool.close_stream(CHEAP, sender=funder))
    depositor = b.actor()
    b.record("escrow deposit", p.escrow.deposit(CHEAP, 5 * USDC, sender=depositor))
    p.escrow.deposit(CHEAP, 5 * USDC, sender=b.actor())
    b.record("escrow withdraw", p.escrow.withdraw(CHEAP, [1], sender=p.escrow.entry(CHEAP, 1)[0] and
                                                   accounts[p.escrow.entry(CHEAP, 1)[0]]))
    b.next_epoch()
    p.pool.rebalance(CHEAP, sender=b.owner)  # drains what escrow holds into the spare capacity
    # a deposit after the rebalance waits for the permissionless drain of the leftover spare
    p.escrow.deposit(CHEAP, 1 * USDC, sender=b.actor())
    if p.pool.pools(CHEAP).spare == 0:
        raise RuntimeError("no spare capacity left after the rebalance: the drain cannot be measured")
    b.record("escrow drain (permissionless)", p.pool.drain_escrow(CHEAP, sender=b.owner))
    return b.rows


def table(rows):
    head = f"{'operation':32s} {'items':>5s} {'gas/item':>10s} {'calldata B/item':>16s}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['operation']:32s} {r['items']:5d} {r['gas_per_item']:10,d} "
                     f"{r['calldata_bytes_per_item']:16,d}  {r['note']}")
    lines.append("")
    lines.append("Solidity anchor (its own in-test gasleft figures, for orientation): " +
                 ", ".join(f"{k} {v:,}" for k, v in ANCHOR.items()))
    return "\n".join(lines)


def main(argv=None):
    with networks.parse_network_choice("ethereum:local:foundry"):
        rows = run()
    OUT.mkdir(exist_ok=True)
    (OUT / "gas.json").write_text(json.dumps({"rows": rows, "anchor": ANCHOR}, indent=2))
    print(table(rows))
    print(f"\nwrote {OUT / 'gas.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])
