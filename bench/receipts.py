"""How many receipts a second the gateway can sign and queue (the work on its hot path).

    python -m bench.receipts [--n 2000]

Per answered request the gateway builds the EIP-712 receipt, signs it as the sink (keystore
providers) or checks the sink's signature (sidecar providers), signs it as the source, and
commits it to the outbox (SQLite, WAL) before the answer goes out. This measures exactly
those steps with the gateway's own code, in one process, against a temporary database; it
needs no chain. Prints a table and writes bench/out/receipts.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from eth_account import Account

from gateway.accounting.db import migrate, open_database
from gateway.chain.outbox import Outbox, OutboxRow
from gateway.chain.receipts import ReceiptTerms, sign_as_sink, sink_signature_valid

OUT = Path(__file__).resolve().parent / "out"


def terms(source: str, sink: str, nonce: int) -> ReceiptTerms:
    return ReceiptTerms(
        chain_id=84532, tracker="0x" + "11" * 20, task_type="0x" + "22" * 32, source=source, sink=sink,
        task_id="0x" + nonce.to_bytes(32, "big").hex(), nonce=nonce, deadline=2_000_000_000, decimals=6,
        input_micros_per_mtok=10_000_000, output_micros_per_mtok=40_000_000,
    )


async def run(n: int) -> dict:
    source, sink = Account.create(), Account.create()
    tmp = tempfile.TemporaryDirectory()
    db = open_database(f"sqlite:///{Path(tmp.name) / 'gw.db'}")
    migrate(db)
    outbox = Outbox(db)
    timings: dict[str, list[float]] = {"sign_sink": [], "verify_sink": [], "sign_source": [], "queue": [], "total": []}
    answer = "a" * 64
    for i in range(n):
        t0 = time.perf_counter()
        nonce = await outbox.next_nonce(source.address)
        t = terms(source.address, sink.address, nonce)
        receipt = t.receipt(3_000 + i % 100, answer)
        t1 = time.perf_counter()
        sink_sig = sign_as_sink(t, receipt, sink.key)
        t2 = time.perf_counter()
        assert sink_signature_valid(t, receipt, sink_sig)
        t3 = time.perf_counter()
        source_sig = "0x" + receipt.sign(source.key, t.chain_id, t.tracker).hex()
        t4 = time.perf_counter()
        await outbox.put(OutboxRow(
            request_id=f"req_{i}", provider="p", task_type=t.task_type, sink=t.sink, source=t.source,
            task_id=t.task_id, amount=receipt.amount, response_hash="0x" + answer, nonce=nonce,
            deadline=t.deadline, sink_sig=sink_sig, source_sig=source_sig, chain_ts=0,
        ))
        t5 = time.perf_counter()
        for key, v in (("sign_sink", t2 - t1), ("verify_sink", t3 - t2), ("sign_source", t4 - t3),
                       ("queue", t5 - t4), ("total", t5 - t0)):
            timings[key].append(v * 1e6)
    await db.close()
    tmp.cleanup()
    total_s = sum(timings["total"]) / 1e6
    return {
        "receipts": n,
        "per_second": n / total_s,
        "median_us": {k: statistics.median(v) for k, v in timings.items()},
        "p99_us": {k: sorted(v)[int(len(v) * 0.99) - 1] for k, v in timings.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2_000)
    args = ap.parse_args(argv)
    result = asyncio.run(run(args.n))
    print(f"{'step':14s} {'median us':>10s} {'p99 us':>10s}")
    for k in result["median_us"]:
        print(f"{k:14s} {result['median_us'][k]:10.1f} {result['p99_us'][k]:10.1f}")
    print(f"\n{result['receipts']} receipts: {result['per_second']:,.0f} receipts/s signed (sink + source), "
          f"verified and committed, one core")
    OUT.mkdir(exist_ok=True)
    (OUT / "receipts.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
