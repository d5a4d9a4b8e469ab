"""Collect what you are owed (pull payments).

  ape run claim                       your earnings as a sink, in every market
  ape run claim --task llm.cheap      one market
  ape run claim --unbonded            also withdraw bonds whose unbonding period has passed
  ape run claim --treasury            send slashed bonds to the treasury (anyone may call)

A market with nothing to claim costs no transaction; finding nothing anywhere is not an
error (the script says so and exits 0).
"""

from __future__ import annotations

import click

from pura.layout import decode_hot

from scripts._common import (
    account_option,
    call,
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
    task_option,
)


@click.command(short_help="Claim earnings, unbonded stake or treasury payouts", help=__doc__)
@network_option
@account_option
@task_option
@click.option("--unbonded", is_flag=True, help="Also withdraw released unbonding stake.")
@click.option("--treasury", is_flag=True, help="Also pay accrued slashes out to the treasury.")
@dry_run_option
@handle_errors
def cli(network_choice, account_spec, task_names, unbonded, treasury, dry_run):
    with connected(network_choice) as net:
        d = load_deployed(net)
        account = load_account(account_spec, net)
        me = account.address
        sender = sender_for(account, net)
        pool, reg = d.proto.pool, d.proto.registry
        _, now, _ = d.epoch_info()
        todo = []  # (label, contract, method, args)
        for name, tid in d.select_tasks(task_names):
            pos = pool.position(tid, me)
            amount = pos.unclaimed + pos.owed
            if amount > 0:
                todo.append((f"pool.claim({name}) = {d.fmt(amount)}", pool, "claim", (tid,)))
            else:
                settling = _leaving_balance(reg, pool, tid, me) if pos.slot == 0 else 0
                echo(f"{name}: nothing to claim"
                     + (f" yet: {d.fmt(settling)} earned before you left becomes claimable once the next "
                        "rebalance settles your departure" if settling else ""))
            if unbonded:
                b = reg.bonds(tid, me)
                if b.unbonding == 0:
                    echo(f"{name}: nothing unbonding")
                elif b.release > now:
                    echo(f"{name}: {d.fmt(b.unbonding)} unbonding, withdrawable in {fmt_duration(b.release - now)}")
                else:
                    todo.append((f"registry.withdraw_unbonded({name}) = {d.fmt(b.unbonding)}", reg,
                                 "withdraw_unbonded", (tid,)))
        if treasury:
            accrued = reg.treasury_accrued()
            if accrued:
                todo.append((f"registry.pay_treasury() = {d.fmt(accrued)} to {reg.treasury()}", reg,
                             "pay_treasury", ()))
            else:
                echo("treasury: nothing accrued")
        if not todo:
            echo("nothing to claim; no transaction sent")
            return
        if not dry_run:
            require_gas_money(account, net)
        before = d.proto.token.balanceOf(me)
        for label, contract, method, args in todo:
            call(sender, contract, method, *args, label=label, dry_run=dry_run)
        if not dry_run:
            echo(f"balance of {me}: {d.fmt(before)} -> {d.fmt(d.proto.token.balanceOf(me))}")


def _leaving_balance(reg, pool, tid, me) -> int:
    """Unclaimed balance still in a slot this account is leaving (settled at rebalance)."""
    for slot in range(reg.slot_count(tid)):
        if reg.member_at(tid, slot).lower() == me.lower() and reg.target_of(tid, slot).status == 2:
            return decode_hot(pool.hot_word(tid, slot)).unclaimed
    return 0
