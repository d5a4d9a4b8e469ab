"""Fund a market as a source: open, top up, re-rate or close a prepaid stream.

  ape run fund --task llm.cheap --amount 100 --over 1d      open / top up; stream it all over a day
  ape run fund --task llm.cheap --amount 100 --rate 5/hour  open / top up at an explicit rate
  ape run fund --task llm.cheap --rate 2/hour               change the rate only (--rate 0 pauses)
  ape run fund --task llm.cheap --instant 10                instant distribution (next rebalance)
  ape run fund --task llm.cheap --close                     stop; refund what has not streamed

Amounts are whole tokens; a rate is AMOUNT[/s|/min|/hour|/day|/epoch] (per second without a
unit) and is floored to whole base units per second (the effective rate is printed). --over
sets the rate so that everything left in the stream plus --amount streams over that time.
Money the sinks cannot absorb at rebalance goes to escrow, credited to you and withdrawable
with `ape run drain --withdraw`.
"""

from __future__ import annotations

import click

from pura.layout import absorbable

from scripts._common import (
    Fail,
    account_option,
    call,
    connected,
    dry_run_option,
    echo,
    ensure_allowance,
    fmt_duration,
    handle_errors,
    load_account,
    load_deployed,
    network_option,
    parse_duration,
    parse_rate,
    require_gas_money,
    require_tokens,
    sender_for,
    task_option,
)


@click.command(short_help="Open, top up or close a funding stream", help=__doc__)
@network_option
@account_option
@task_option
@click.option("--amount", "amount_text", default=None, metavar="AMOUNT", help="Tokens to add to the stream.")
@click.option("--rate", "rate_text", default=None, metavar="AMOUNT[/UNIT]", help="Streaming rate.")
@click.option("--over", "over_text", default=None, metavar="DURATION",
              help="Stream the whole deposit over this long (e.g. 12h, 3d, 24epochs).")
@click.option("--instant", "instant_text", default=None, metavar="AMOUNT", help="Distribute at the next rebalance.")
@click.option("--close", is_flag=True, help="Close the stream and refund what has not streamed.")
@dry_run_option
@handle_errors
def cli(network_choice, account_spec, task_names, amount_text, rate_text, over_text, instant_text, close, dry_run):
    if rate_text and over_text:
        raise Fail("give --rate or --over, not both")
    if close and (amount_text or rate_text or over_text or instant_text):
        raise Fail("--close takes no other option")
    if instant_text and (amount_text or rate_text or over_text):
        raise Fail("--instant is a one-off distribution; open a stream in a separate call")
    if not (close or instant_text or amount_text or rate_text or over_text):
        raise Fail("nothing to do: give --amount with --rate/--over, --rate, --instant or --close")
    with connected(network_choice) as net:
        d = load_deployed(net)
        name, tid = d.one_task(task_names)
        account = load_account(account_spec, net)
        me = account.address
        pool = d.proto.pool
        sender = sender_for(account, net)
        if not dry_run:
            require_gas_money(account, net)
        epoch_len = d.record["epoch"]["length"]
        stream = pool.stream_of(tid, me)
        has_stream = stream.funder.lower() == me.lower()

        if close:
            if has_stream and stream.rate == 0 and stream.remaining == 0:
                echo(f"{name}: the stream is already closed with nothing left to refund; nothing sent")
                return
            # without a stream the pool's own check ("pool: no stream") refuses the call: it
            # is reported with that message and nothing is sent
            r = call(sender, pool, "close_stream", tid, label=f"pool.close_stream({name})", dry_run=dry_run)
            if r is not None:
                ev = pool.StreamClosed.from_receipt(r)
                echo(f"{name}: stream closed; refunded {d.fmt(ev[0].refunded if ev else 0)}")
            return

        if instant_text:
            amount = d.parse(instant_text, "--instant")
            _check_new_funder(d, pool, tid, name, has_stream, amount)
            require_tokens(d, account, amount, "--instant")
            ensure_allowance(d, account, pool, amount, sender, dry_run)
            call(sender, pool, "distribute", tid, amount, label=f"pool.distribute({name}, {d.fmt(amount)})",
                 dry_run=dry_run)
            return

        amount = d.parse(amount_text, "--amount") if amount_text else 0
        remaining = stream.remaining if has_stream else 0
        if rate_text:
            rate = parse_rate(rate_text, d.decimals, epoch_len)
        elif over_text:
            secs = parse_duration(over_text, epoch_len)
            rate = (remaining + amount) // secs
        elif has_stream:
            rate = stream.rate
        else:
            raise Fail("a new stream needs --rate or --over")
        paused = rate_text is not None and d.parse(rate_text.partition("/")[0], "--rate") == 0
        if rate == 0 and (remaining + amount) > 0 and not paused:
            raise Fail(f"the rate rounds to 0 base units per second; raise it (1 unit/s = {d.fmt(epoch_len)}/epoch), "
                       "or pass --rate 0 to pause the stream")
        if amount == 0 and not has_stream:
            raise Fail("a new stream needs --amount")
        _check_new_funder(d, pool, tid, name, has_stream, amount)
        if amount:
            require_tokens(d, account, amount, "--amount")
            ensure_allowance(d, account, pool, amount, sender, dry_run)
        verb = "top up" if has_stream else "open"
        call(sender, pool, "fund", tid, amount, rate,
             label=f"pool.fund({name}, {d.fmt(amount)}, {d.fmt(rate)}/s) [{verb}]", dry_run=dry_run)
        if dry_run:
            echo("dry run: nothing was sent")
            return
        st = pool.stream_of(tid, me)
        fee = d.proto.pricing.base_fee(tid)
        absorb = absorbable(pool.pools(tid).total_units, fee)
        runway = st.remaining / st.rate if st.rate else float("inf")
        echo(f"{name}: stream {d.fmt(st.remaining)} left at {d.fmt(st.rate)}/s = {d.fmt(st.rate * 3600)}/hour "
             f"= {d.fmt(st.rate * epoch_len)}/epoch; runs out in "
             + ("never (rate 0)" if runway == float("inf") else fmt_duration(runway)))
        echo(f"  the sinks absorb about {d.fmt(absorb)}/epoch at the current fee; more than that waits in escrow")


def _check_new_funder(d, pool, tid, name, has_stream, amount):
    """The pool's conditions for taking a funder slot, checked before any approval."""
    if has_stream:
        return
    if amount < pool.min_funding():
        raise Fail(f"a new funder of {name} must bring at least {d.fmt(pool.min_funding())}")
    if pool.stream_count(tid) >= pool.MAX_FUNDERS():
        raise Fail(f"{name} already has the maximum of {pool.MAX_FUNDERS()} funders")
