"""Show the state of every market: ape run status --network base:sepolia

For each task type: epoch and rebalance state, base fee and bounds, pot, escrow level and
pressure, funders, and a table of sinks (bond, declared / capped / smoothed capacity,
backlog in tasks and epochs, weight and share, quoted price, claimable balance).
Read-only: needs no account. --json prints the same data as JSON.
"""

from __future__ import annotations

import click

from scripts._common import (
    connected,
    echo,
    handle_errors,
    load_deployed,
    market_snapshot,
    network_option,
    render_market,
    short,
    task_option,
)


@click.command(short_help="Show markets, sinks, weights, prices and escrow", help=__doc__)
@network_option
@task_option
@click.option("--me", "me", default=None, metavar="ADDRESS", help="Mark this address in the sink tables.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@handle_errors
def cli(network_choice, task_names, me, as_json):
    import json

    with connected(network_choice) as net:
        d = load_deployed(net)
        markets = [market_snapshot(d, n, tid, me) for n, tid in d.select_tasks(task_names)]
        tok = d.record["settlement_token"]
        if as_json:
            echo(json.dumps({
                "network": net.label,
                "chain_id": net.provider.chain_id,
                "block": net.provider.get_block("latest").number,
                "token": tok,
                "contracts": {k: v["address"] for k, v in d.record["contracts"].items()},
                "registry": {
                    "treasury": d.proto.registry.treasury(),
                    "treasury_accrued": d.proto.registry.treasury_accrued(),
                    "total_bonded": d.proto.registry.total_bonded(),
                },
                "markets": markets,
            }, indent=2))
            return
        c = d.record["contracts"]
        echo(f"Pura on {net.label} (chain id {net.provider.chain_id}), block "
             f"{net.provider.get_block('latest').number}; token {tok.get('symbol')} {short(tok['address'])}")
        echo("contracts: " + "  ".join(f"{k} {short(v['address'])}" for k, v in c.items() if k != "token"))
        echo(f"bonded {d.fmt(d.proto.registry.total_bonded())}; slashed and not yet paid to the treasury "
             f"{d.fmt(d.proto.registry.treasury_accrued())}")
        for m in markets:
            echo("")
            echo(render_market(d, m))
