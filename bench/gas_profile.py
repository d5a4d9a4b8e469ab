"""Where a rebalance's gas goes: an opcode-level account of the steady-state rebalance.

    ./dev shell -c 'python -m bench.gas_profile'            (16 and 64 sinks)
    ./dev shell -c 'python -m bench.gas_profile 4 64'       (any two or more sizes)

Runs bench.gas's steady-state market (every sink paid and verified each epoch) for each size,
traces the last rebalance with anvil's `debug_traceTransaction` and charges every opcode's gas
to the contract executing it (a call's own cost to the caller, the callee's work to the
callee). Prints, per size, the total and a per-contract table split into storage reads,
storage writes, logs, calls and computation, then the marginal cost per sink between the two
largest sizes and the fixed part. Writes bench/out/gas_profile.json. Measures, asserts
nothing; docs/design.md section 11 reads these numbers.
"""

from __future__ import annotations

import collections
import json
import sys

from ape import chain, networks

from bench import gas as G
from pura.signing import task_type_id

CLASSES = {"SLOAD": "storage read", "SSTORE": "storage write"}
CALLS = ("CALL", "STATICCALL", "DELEGATECALL")


def _class(op: str) -> str:
    if op in CLASSES:
        return CLASSES[op]
    if op.startswith("LOG"):
        return "log"
    if op in CALLS:
        return "call"
    return "computation"


def trace(tx_hash, names: dict[int, str]) -> dict[str, collections.Counter]:
    """Gas per (contract, class) of one mined transaction (the 21k base and calldata are not
    opcodes: they are the difference between gasUsed and the sum)."""
    res = chain.provider.web3.provider.make_request(
        "debug_traceTransaction", [tx_hash, {"disableStorage": True, "disableMemory": True}]
    )["result"]
    logs = res["structLogs"]
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    at_depth = {1: "pool"}
    for i, step in enumerate(logs):
        op, depth, cost = step["op"], step["depth"], step["gasCost"]
        if op in CALLS and i + 1 < len(logs) and logs[i + 1]["depth"] == depth + 1:
            target = int(step["stack"][-2], 16)
            at_depth[depth + 1] = names.get(target, "precompile" if target < 0x100 else hex(target))
            cost -= logs[i + 1]["gas"]  # what the callee was given is charged inside it
        out[at_depth.get(depth, "?")][_class(op)] += cost
    return out


def run(sizes: list[int]) -> dict:
    b = G.Bench()
    p = b.p
    names = {int(c.address, 16): n for n, c in [
        ("registry", p.registry), ("pool", p.pool), ("tracker", p.tracker), ("pricing", p.pricing),
        ("escrow", p.escrow), ("token", p.token)]}
    result = {}
    for n in sizes:
        tid = task_type_id(f"profile.{n}")
        p.registry.create_task_type(tid, 100 * G.USDC, G.USDC, sender=b.owner)
        p.pricing.configure(tid, 10_000, 1, 10**12, sender=b.owner)
        p.escrow.set_max_level(tid, 10**6 * G.USDC, sender=b.owner)
        sinks = [b.actor() for _ in range(n)]
        for sk in sinks:
            p.registry.register_sink(tid, 100 * G.USDC, 100, sender=sk)
        b.next_epoch(40)
        p.pool.rebalance(tid, sender=b.owner)
        funder = b.actor()
        fee = p.pricing.base_fee(tid)
        p.pool.fund(tid, 10**5 * G.USDC, max(1, int(0.5 * n * 100 * fee) // 3600), sender=funder)
        for _ in range(3):
            tx = G.honest_epoch(b, tid, sinks, funder)
        by = trace(tx.txn_hash, names)
        opcodes = sum(sum(c.values()) for c in by.values())
        result[n] = {
            "gas_used": tx.gas_used,
            "per_sink": tx.gas_used // n,
            "base_and_calldata": tx.gas_used - opcodes,
            "by_contract": {who: dict(c) for who, c in by.items()},
        }
    return result


def table(result: dict) -> str:
    classes = ["storage read", "storage write", "log", "call", "computation"]
    lines = []
    for n, r in result.items():
        lines.append(f"rebalance, {n} sinks: {r['gas_used']:,} gas ({r['per_sink']:,} per sink); "
                     f"base tx + calldata {r['base_and_calldata']:,}")
        head = f"  {'contract':10s}" + "".join(f"{c:>15s}" for c in classes) + f"{'total':>11s}{'per sink':>10s}"
        lines.append(head)
        for who, c in sorted(r["by_contract"].items(), key=lambda kv: -sum(kv[1].values())):
            tot = sum(c.values())
            lines.append(f"  {who:10s}" + "".join(f"{c.get(k, 0):>15,d}" for k in classes)
                         + f"{tot:>11,d}{tot // n:>10,d}")
        lines.append("")
    if len(result) >= 2:
        (n1, r1), (n2, r2) = sorted(result.items())[-2:]
        marginal = (r2["gas_used"] - r1["gas_used"]) / (n2 - n1)
        fixed = r2["gas_used"] - marginal * n2
        lines.append(f"marginal cost per sink ({n1} -> {n2} sinks): {marginal:,.0f} gas; fixed part: {fixed:,.0f} gas")
        for who in sorted(set(r1["by_contract"]) | set(r2["by_contract"])):
            c1, c2 = r1["by_contract"].get(who, {}), r2["by_contract"].get(who, {})
            parts = {k: (c2.get(k, 0) - c1.get(k, 0)) / (n2 - n1) for k in classes}
            if sum(parts.values()) > 50:
                lines.append(f"  {who:10s} per sink: " + ", ".join(f"{k} {v:,.0f}" for k, v in parts.items() if abs(v) >= 5))
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    sizes = sorted({int(a) for a in argv}) or [16, 64]
    with networks.parse_network_choice("ethereum:local:foundry"):
        result = run(sizes)
    G.OUT.mkdir(exist_ok=True)
    (G.OUT / "gas_profile.json").write_text(json.dumps({str(k): v for k, v in result.items()}, indent=2))
    print(table(result))
    print(f"\nwrote {G.OUT / 'gas_profile.json'}")


if __name__ == "__main__":
    main()
