"""Register a sink (provider) in a market, or change its bond or declared capacity.

  ape run register --task llm.cheap --capacity 120 [--bond 150]     bond + register + declare
  ape run register --task llm.cheap --capacity 90                    (registered) declare
  ape run register --task llm.cheap --add-bond 50                    (registered) bond more
  ape run register --task llm.cheap --deregister                     leave; the bond unbonds

Capacity is tasks per epoch. The bond caps it linearly: cap = bond // stake_per_unit (the
market's parameter); --bond defaults to what --capacity needs, at least the market's
minimum bond. Amounts are in whole tokens (e.g. 12.5). Everything is checked before the
first transaction, so a refused registration leaves no stray token approval behind.
"""

from __future__ import annotations

import click

from pura.layout import TASK_SCALE

from scripts._common import (
    Fail,
    account_option,
    call,
    connected,
    dry_run_option,
    echo,
    ensure_allowance,
    fmt_time,
    handle_errors,
    load_account,
    load_deployed,
    network_option,
    require_gas_money,
    require_tokens,
    sender_for,
    task_option,
)


@click.command(short_help="Bond, register and declare capacity as a sink", help=__doc__)
@network_option
@account_option
@task_option
@click.option("--capacity", type=click.IntRange(min=0), default=None, help="Declared capacity, tasks per epoch.")
@click.option("--bond", "bond_text", default=None, metavar="AMOUNT", help="Bond to post when registering.")
@click.option("--add-bond", "add_text", default=None, metavar="AMOUNT", help="Add to the bond of a registered sink.")
@click.option("--deregister", is_flag=True, help="Leave the market (capacity drops to 0; the bond starts unbonding).")
@dry_run_option
@handle_errors
def cli(network_choice, account_spec, task_names, capacity, bond_text, add_text, deregister, dry_run):
    if deregister and (capacity is not None or bond_text or add_text):
        raise Fail("--deregister takes no other change")
    with connected(network_choice) as net:
        d = load_deployed(net)
        name, tid = d.one_task(task_names)
        account = load_account(account_spec, net)
        me = account.address
        reg = d.proto.registry
        tt = reg.task_types(tid)
        registered = reg.slot_of(tid, me) != 0
        sender = sender_for(account, net)
        if not dry_run:
            require_gas_money(account, net)

        def send(contract, method, *args, label):
            return call(sender, contract, method, *args, label=label, dry_run=dry_run)

        if deregister:
            if not registered:
                raise Fail(f"{me} is not registered in {name}")
            send(reg, "deregister_sink", tid, label=f"registry.deregister_sink({name})")
        elif not registered:
            if add_text:
                raise Fail(f"{me} is not registered in {name}: register with --bond/--capacity first")
            if capacity is None:
                raise Fail("registering needs --capacity (tasks per epoch)")
            bond = d.parse(bond_text, "--bond") if bond_text else max(tt.min_bond, capacity * tt.stake_per_unit)
            # the registry's own conditions, checked before the approval is sent
            if bond < tt.min_bond:
                raise Fail(f"bond {d.fmt(bond)} is below {name}'s minimum bond {d.fmt(tt.min_bond)}")
            n, occupied = reg.slot_count(tid), reg.occupied(tid)
            if n >= reg.MAX_SINKS() and occupied == (1 << n) - 1:
                raise Fail(f"{name} already has the maximum of {n} sinks")
            require_tokens(d, account, bond, "the bond")
            cap = bond // tt.stake_per_unit
            if capacity > cap:
                echo(f"note: a bond of {d.fmt(bond)} caps capacity at {cap}; the declaration {capacity} is clamped")
            echo(f"registering {me} in {name}: bond {d.fmt(bond)}, capacity {capacity} tasks/epoch")
            ensure_allowance(d, account, reg, bond, sender, dry_run)
            send(reg, "register_sink", tid, bond, capacity,
                 label=f"registry.register_sink({name}, {d.fmt(bond)}, {capacity})")
        else:
            if bond_text:
                raise Fail(f"{me} is already registered in {name}: use --add-bond to bond more")
            if capacity is None and not add_text:
                raise Fail(f"{me} is registered in {name}; say what to change (--capacity, --add-bond, --deregister)")
            if add_text:
                add = d.parse(add_text, "--add-bond")
                if add == 0:
                    raise Fail("--add-bond must be positive")
                require_tokens(d, account, add, "--add-bond")
                ensure_allowance(d, account, reg, add, sender, dry_run)
                send(reg, "add_bond", tid, add, label=f"registry.add_bond({name}, {d.fmt(add)})")
            if capacity is not None:
                if reg.sink_state(tid, me).declared == capacity:
                    echo(f"{name}: capacity {capacity} is already declared; nothing to send")
                else:
                    send(reg, "declare_capacity", tid, capacity,
                         label=f"registry.declare_capacity({name}, {capacity})")
        if dry_run:
            echo("dry run: nothing was sent")
            return
        _show(d, name, tid, me)


def _show(d, name, tid, me):
    reg = d.proto.registry
    sp1 = reg.slot_of(tid, me)
    b = reg.bonds(tid, me)
    if sp1 == 0:
        echo(f"{name}: {me} is not registered; unbonding {d.fmt(b.unbonding)}"
             + (f" (withdrawable from {fmt_time(b.release)} with `ape run claim --unbonded`)" if b.unbonding else ""))
        return
    ss = reg.sink_state(tid, me)
    smoothed = d.proto.pool.position(tid, me).capacity / TASK_SCALE
    echo(f"{name}: {me} slot {sp1 - 1}, bond {d.fmt(b.bonded)}"
         + (f" (+{d.fmt(b.unbonding)} unbonding)" if b.unbonding else "")
         + f", declared {ss.declared}, cap {ss.cap}, smoothed {smoothed:.2f} as of the last rebalance "
         "(the pool moves it toward min(declared, cap) one EWMA step per epoch)")
