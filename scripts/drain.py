"""Move escrowed money: drain it into the pool, or withdraw your own.

  ape run drain --task llm.cheap               drain escrow into the pool's spare capacity
  ape run drain --task llm.cheap --withdraw    withdraw your undrained escrow entries

Escrow holds money the sinks could not absorb, credited to its funder in FIFO order.
`drain` is permissionless: it moves queued money into the pool up to the spare capacity
the last rebalance left (rebalance itself drains first; this uses the rest). The pool
decides: with no spare capacity or an empty queue it refuses ("pool: no spare capacity",
"pool: escrow empty") and nothing is sent. `--withdraw` returns every undrained entry of
yours, up to 32 per transaction.
"""

from __future__ import annotations

import click

from scripts._common import (
    Fail,
    account_option,
    call,
    connected,
    dry_run_option,
    echo,
    handle_errors,
    load_account,
    load_deployed,
    network_option,
    require_gas_money,
    sender_for,
    task_option,
)

MAX_WITHDRAW = 32


@click.command(short_help="Drain escrow into the pool, or withdraw your escrow", help=__doc__)
@network_option
@account_option
@task_option
@click.option("--withdraw", is_flag=True, help="Withdraw your own undrained escrow entries instead.")
@dry_run_option
@handle_errors
def cli(network_choice, account_spec, task_names, withdraw, dry_run):
    with connected(network_choice) as net:
        d = load_deployed(net)
        name, tid = d.one_task(task_names)
        account = load_account(account_spec, net)
        me = account.address
        sender = sender_for(account, net)
        pool, escrow = d.proto.pool, d.proto.escrow
        q = escrow.queues(tid)
        if not dry_run:
            require_gas_money(account, net)
        if not withdraw:
            echo(f"{name}: escrow level {d.fmt(q.level)}, spare capacity from the last rebalance "
                 f"{d.fmt(pool.pools(tid).spare)}")
            r = call(sender, pool, "drain_escrow", tid, label=f"pool.drain_escrow({name})", dry_run=dry_run)
            if r is not None:
                ev = pool.EscrowDrained.from_receipt(r)
                echo(f"{name}: drained {d.fmt(ev[0].amount if ev else 0)} into the pool; escrow level now "
                     f"{d.fmt(escrow.level(tid))}")
            return
        mine = escrow.balance_of(tid, me)
        if mine == 0:
            raise Fail(f"{me} has no undrained escrow in {name}")
        ids = [i for i in range(q.head, q.tail) if _is_mine(escrow, tid, i, me)]
        total = 0
        for k in range(0, len(ids), MAX_WITHDRAW):
            batch = ids[k:k + MAX_WITHDRAW]
            r = call(sender, escrow, "withdraw", tid, batch,
                     label=f"escrow.withdraw({name}, {len(batch)} entries)", dry_run=dry_run)
            if r is not None:
                total += sum(e.amount for e in escrow.EscrowWithdrawn.from_receipt(r))
        if not dry_run:
            echo(f"{name}: withdrew {d.fmt(total)} from escrow")


def _is_mine(escrow, tid, i, me) -> bool:
    funder, amount = escrow.entry(tid, i)
    return amount > 0 and funder.lower() == me.lower()
