"""Permissionless keeper: close each market's epoch with pool.rebalance(task).

  ape run rebalance                         every market, once
  ape run rebalance --task llm.cheap        one market
  ape run rebalance --loop                  keep going: wake at every epoch boundary
  ape run rebalance --dry-run               show what a rebalance would do; send nothing

A transaction is sent only for a market whose rebalance is due (the pool's
rebalance_due(task) view: at most once per epoch). Several keepers can run at once: when
another keeper's rebalance lands first, the pool refuses ours with "pool: rebalance not
due" (cheaply, before any work) and this script counts that as success. Once-mode exits
non-zero if any market failed for another reason; --loop logs such failures and retries
at the next wake-up. The loop reads time from the chain's latest block and polls at most
every --poll seconds.
"""

from __future__ import annotations

import signal

import click

from pura.layout import TASK_SCALE

from scripts._common import (
    account_option,
    connected,
    dry_run_option,
    echo,
    fmt_duration,
    handle_errors,
    load_account,
    load_deployed,
    network_option,
    require_gas_money,
    sender_for,
    sleep,
    task_option,
)

NOT_DUE = "pool: rebalance not due"


@click.command(short_help="Keeper: rebalance markets whose epoch is due", help=__doc__)
@network_option
@account_option
@task_option
@click.option("--loop", is_flag=True, help="Run until interrupted, rebalancing every epoch.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="With --loop: stop after this many epochs have been handled.")
@click.option("--poll", type=click.FloatRange(min=0.05), default=30.0, show_default=True,
              help="With --loop: longest sleep between checks, in seconds.")
@dry_run_option
@handle_errors
def cli(network_choice, account_spec, task_names, loop, epochs, poll, dry_run):
    if epochs and not loop:
        raise click.UsageError("--epochs only makes sense with --loop")
    with connected(network_choice) as net:
        d = load_deployed(net)
        tasks = d.select_tasks(task_names)
        account = load_account(account_spec, net, required=not dry_run)
        sender = sender_for(account, net) if account else None
        if account and not dry_run:
            require_gas_money(account, net)
        keeper = Keeper(d, sender, dry_run)
        if not loop:
            failed = [n for n, tid in tasks if keeper.handle(n, tid) == "failed"]
            if failed:
                raise click.ClickException(f"rebalance failed for {', '.join(failed)} (see above)")
            return

        stop = {"flag": False}

        def on_signal(signum, _frame):
            echo(f"signal {signum}: stopping after this round")
            stop["flag"] = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        handled_epochs, last_handled = 0, None
        echo(f"keeper on {net.label} for {', '.join(n for n, _ in tasks)}"
             + (f" as {account.address}" if account else "") + (" (dry run)" if dry_run else ""))
        while not stop["flag"]:
            try:
                epoch, _, to_next = d.epoch_info()
                outcomes = [keeper.handle(n, tid, quiet=True) for n, tid in tasks]
            except Exception as err:  # noqa: BLE001 - a keeper survives RPC hiccups and retries
                echo(f"error: {type(err).__name__}: {err}; retrying in {poll:g}s")
                sleep(poll)
                continue
            if "failed" not in outcomes and epoch != last_handled:
                last_handled, handled_epochs = epoch, handled_epochs + 1
                echo(f"epoch {epoch} handled ({handled_epochs}); next epoch in {fmt_duration(to_next)}")
                if epochs and handled_epochs >= epochs:
                    break
            slept, target = 0.0, min(poll, max(0.2, to_next + 1.0))
            while slept < target and not stop["flag"]:
                step = min(0.2, target - slept)
                sleep(step)
                slept += step


class Keeper:
    def __init__(self, d, sender, dry_run: bool):
        self.d, self.sender, self.dry_run = d, sender, dry_run

    def handle(self, name: str, tid: bytes, quiet: bool = False) -> str:
        """One market: 'rebalanced' | 'not-due' | 'raced' | 'would' | 'failed'."""
        from pura.deploy import DeploymentError, TxFailed, method_tx, revert_reason

        pool = self.d.proto.pool
        epoch, _, to_next = self.d.epoch_info()
        ps = pool.pools(tid)
        if not pool.rebalance_due(tid):
            if not quiet:
                echo(f"{name}: epoch {epoch} is already rebalanced; next due in {fmt_duration(to_next)} — nothing sent")
            return "not-due"
        behind = epoch + 1 - ps.last_epoch_p1 if ps.last_epoch_p1 else None
        if self.dry_run:
            try:
                units = pool.rebalance.call(tid)
                gas = pool.rebalance.estimate_gas_cost(tid, sender=self.sender.account) if self.sender else None
            except Exception as err:  # noqa: BLE001 - report what the pool would say
                echo(f"{name}: a rebalance now would revert: {revert_reason(err)}")
                return "failed"
            echo(f"{name}: would rebalance epoch {epoch}"
                 + (f" ({behind} epoch(s) since the last)" if behind else " (first rebalance)")
                 + f": pot {self.d.fmt(ps.pending)}, new total weight {units / TASK_SCALE:.2f} tasks/epoch"
                 + (f", ~{gas:,} gas" if gas else ""))
            return "would"
        try:
            receipt = self.sender.send(method_tx(pool, "rebalance", tid, sender=self.sender.account),
                                       f"pool.rebalance({name})")
        except TxFailed as err:
            if NOT_DUE in err.reason:
                echo(f"{name}: another keeper rebalanced epoch {epoch} first (the pool refused ours: "
                     f"{err.reason}) — fine")
                return "raced"
            echo(f"{name}: {err}")
            return "failed"
        except DeploymentError as err:
            echo(f"{name}: {err}")
            return "failed"
        ev = pool.Rebalanced.from_receipt(receipt)
        if ev:
            e = ev[0]
            echo(f"{name}: rebalanced epoch {e.epoch} (tx {receipt.txn_hash}, gas {receipt.gas_used:,}): "
                 f"inflow {self.d.fmt(e.inflow)}, to sinks {self.d.fmt(e.distributed)}, to escrow "
                 f"{self.d.fmt(e.to_escrow)}, drained {self.d.fmt(e.drained)}, fee {self.d.fmt(e.fee)}/task, "
                 f"total weight {e.total_units / TASK_SCALE:.2f}")
        else:
            echo(f"{name}: rebalanced (tx {receipt.txn_hash})")
        return "rebalanced"
