"""The main job (`./dev demo`): the full local stack, on the embedded defaults.

A local anvil chain with the five contracts; three LOCAL STAND-IN providers registered as
sinks with their own keys (one signs its receipts through the Pura sidecar, two through the
gateway's keystore); the gateway in front of them, on chain: it reads its routing weights from
the pool, queues a dual-signed receipt for every answer, submits them in batches, keeps its
pool funded and rebalances when an epoch is due. A workload of chat requests goes through the
official `openai` client. Midway one provider starts failing its chat requests (while still
answering health checks); later it recovers. Per epoch the run prints each provider's routed
requests, receipts verified on chain, backlog, weight share and paid share; at the end the
gateway's income statement, and a chart of the shares (bench/out/demo_shares.png).

Chain time is moved through each epoch as the requests go (an epoch is an hour of chain time,
a few seconds of wall time), so streams accrue as answers are served, as they would live.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from ape import accounts, chain, networks, project

from pura.signing import task_type_id
from pura.stack import (
    STACK_PRICES,
    chain_config,
    deploy_stack,
    fund_source,
    gateway_status,
    register_sinks,
    run_epoch,
    warm,
)

OUT = Path(__file__).resolve().parent.parent / "bench" / "out"
CHEAP = task_type_id("llm.cheap")
NAMES = ["p1", "p2", "p3"]
PROMPTS = [
    "What is a capacity signal?", "Name a fruit.", "Say hello in French.", "What is 2 + 2?",
    "Give me a synonym for fast.", "What colour is the sky?", "Translate cat to Spanish.",
    "What day comes after Monday?",
]


def build(workdir: Path, requests_per_epoch: int):
    from gateway.config import ModelConfig, RoutingConfig
    from gateway.devstack import start_local_stack
    from gateway.upstreams.local_provider import StandInBehaviour

    acc = accounts.test_accounts
    st = deploy_stack(project, acc, workdir)
    # capacity sized to the workload: an answer is ~0.75 task at the starting fee, so each of
    # the three sinks declaring a third of the requests is ~75 % utilised
    capacity = max(1, requests_per_epoch // 3)
    register_sinks(st, {n: (acc[2 + i], capacity, ["cheap"]) for i, n in enumerate(NAMES)})
    fund_source(st)
    warm(st)
    os.environ["PURA_DEMO_SINK_P2"] = acc[3].private_key
    os.environ["PURA_DEMO_SINK_P3"] = acc[4].private_key
    models = [ModelConfig(id="stand-in-small", tier="cheap", **STACK_PRICES)]
    stand_ins = {
        "p1": (StandInBehaviour(models=["stand-in-small"], sink_key=acc[2].private_key), models),
        "p2": (StandInBehaviour(models=["stand-in-small"]), models),
        "p3": (StandInBehaviour(models=["stand-in-small"]), models),
    }
    extras = {
        "p1": {"sink": acc[2].address, "sink_signer": "sidecar"},
        "p2": {"sink": acc[3].address, "sink_key_env": "PURA_DEMO_SINK_P2"},
        "p3": {"sink": acc[4].address, "sink_key_env": "PURA_DEMO_SINK_P3"},
    }
    routing = RoutingConfig.model_validate({"chain": chain_config(st)})
    gw = start_local_stack(stand_ins=stand_ins, routing=routing, provider_extras=extras,
                           rate_limit_per_min=1_000_000, daily_budget_usd="100000", routing_seed=7)
    return st, gw, {n: acc[2 + i].address for i, n in enumerate(NAMES)}


def epoch_row(st, gw, sinks: dict[str, str], routed: dict[str, int], first_block: int, paid_before: dict) -> dict:
    p = st.proto
    verified = dict.fromkeys(NAMES, 0)
    by_sink = {v: k for k, v in sinks.items()}
    for ev in p.tracker.ReceiptRecorded.range(first_block, chain.blocks.head.number + 1):
        if ev.task_type == CHEAP:
            verified[by_sink[ev.sink]] += 1
    views = {v.provider: v for v in gw.services.chain.weights.state.sinks}
    units_total = sum(v.units for v in views.values()) or 1
    paid = {n: p.pool.position(CHEAP, sinks[n]).unclaimed for n in NAMES}  # nobody claims during the run
    paid_epoch = {n: paid[n] - paid_before.get(n, 0) for n in NAMES}
    total_paid = sum(paid_epoch.values()) or 1
    return {
        "routed": routed,
        "receipts": verified,
        "backlog_epochs": {n: (views[n].backlog / views[n].capacity if views[n].capacity else 0.0) for n in NAMES},
        "weight_share": {n: views[n].units / units_total for n in NAMES},
        "paid_share": {n: paid_epoch[n] / total_paid for n in NAMES},
        "paid_total": paid,
    }


def render(k: int, state: str, row: dict, fee: int) -> str:
    lines = [f"epoch {k:2d}  [{state}]  base fee {fee} base units/task"]
    lines.append(f"  {'provider':8s} {'routed':>6s} {'receipts':>8s} {'backlog':>8s} {'weight':>7s} {'paid':>7s}")
    for n in NAMES:
        lines.append(f"  {n:8s} {row['routed'][n]:6d} {row['receipts'][n]:8d} {row['backlog_epochs'][n]:8.2f} "
                     f"{row['weight_share'][n] * 100:6.1f}% {row['paid_share'][n] * 100:6.1f}%")
    return "\n".join(lines)


def chart(history: list[dict], fail_at: int, recover_at: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = list(range(len(history)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for n in NAMES:
        axes[0].plot(epochs, [h["weight_share"][n] * 100 for h in history], marker="o", label=n)
        routed_total = [sum(h["routed"].values()) or 1 for h in history]
        axes[1].plot(epochs, [h["routed"][n] * 100 / t for h, t in zip(history, routed_total)], marker="o", label=n)
    for ax, title in zip(axes, ("on-chain weight share (pool units)", "routed traffic share (gateway)")):
        ax.axvspan(fail_at - 0.5, recover_at - 0.5, color="red", alpha=0.08, label="p2 failing")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("%")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Pura full local stack: chain, contracts, gateway, providers.")
    ap.add_argument("--epochs", type=int, default=17)
    ap.add_argument("--fail-at", type=int, default=3, help="epoch at which p2 starts failing")
    ap.add_argument("--recover-at", type=int, default=9, help="epoch at which p2 works again")
    ap.add_argument("--requests", type=int, default=30, help="requests per epoch")
    args = ap.parse_args(argv)
    import openai

    started = time.monotonic()
    with networks.parse_network_choice("ethereum:local:foundry"):
        workdir = Path(tempfile.mkdtemp(prefix="pura-demo-"))
        print("Starting: anvil, the five contracts, three LOCAL STAND-IN providers as sinks, the gateway...")
        st, gw, sinks = build(workdir, args.requests)
        try:
            client = openai.OpenAI(base_url=gw.base_url, api_key=gw.api_key)
            print(f"gateway {gw.base_url}  chain {st.rpc_url}  (epoch = {st.epoch_length} s of chain time)\n")
            history: list[dict] = []
            paid_before: dict = {}
            below_5_at = None

            def ask(tag: str) -> None:
                prompt = PROMPTS[hash(tag) % len(PROMPTS)] + f" ({tag})"
                stream = hash(tag) % 3 == 0
                r = client.chat.completions.with_raw_response.create(
                    model="auto", messages=[{"role": "user", "content": prompt}], stream=stream)
                if stream:
                    for _ in r.parse():
                        pass

            for k in range(args.epochs):
                failing = args.fail_at <= k < args.recover_at
                gw.providers["p2"].configure(failure_rate=1.0 if failing else 0.0)
                before = {n: gw.providers[n].stats()["requests"] for n in NAMES}
                first_block = chain.blocks.head.number + 1
                fee = st.proto.pricing.base_fee(CHEAP)
                run_epoch(st, gw, ask, args.requests)
                routed = {n: gw.providers[n].stats()["requests"] - before[n] for n in NAMES}
                row = epoch_row(st, gw, sinks, routed, first_block, paid_before)
                paid_before = dict(row["paid_total"])
                history.append(row)
                state = "p2 FAILING" if failing else ("p2 recovering" if k >= args.recover_at else "healthy")
                print(render(k, state, row, fee) + "\n")
                if failing and below_5_at is None and row["weight_share"]["p2"] < 0.05:
                    below_5_at = k
            s = gateway_status(gw.base_url)["chain"]
            print("p2 weight share by epoch: " + " ".join(f"{h['weight_share']['p2'] * 100:.1f}%" for h in history))
            if below_5_at is not None:
                lag = below_5_at - args.fail_at + 1
                print(f"p2 fell below 5 % of the weight {lag} epoch(s) after it started failing "
                      f"({lag * st.epoch_length} s of chain time)")
            print(f"receipts: {s['batcher']['confirmed']} confirmed on chain in {s['batcher']['batches_sent']} "
                  f"batches, {s['batcher']['gas_used'] // max(1, s['batcher']['confirmed']):,} gas per receipt; "
                  f"{s['rejected_sink_signatures']} refused for a bad sink signature")
            import httpx

            income = httpx.get(gw.base_url.removesuffix("/v1") + "/api/income",
                               headers={"Authorization": f"Bearer {gw.api_key}", "Accept": "text/plain"}, timeout=10)
            print("\n" + income.text)
            OUT.mkdir(parents=True, exist_ok=True)
            chart(history, args.fail_at, args.recover_at, OUT / "demo_shares.png")
            (OUT / "demo.json").write_text(json.dumps({"history": history, "below_5_at": below_5_at,
                                                       "status": s}, indent=1, default=str))
            print(f"chart: {OUT / 'demo_shares.png'}   data: {OUT / 'demo.json'}   "
                  f"({time.monotonic() - started:.0f} s)")
        finally:
            gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
