"""Plumbing shared by the `ape run` scripts (ape skips files whose name starts with `_`).

Every script:
* takes `--network` (default `ethereum:local:foundry`) and connects itself, so that a
  missing RPC variable is reported clearly *before* ape could fall back to anything;
* reads addresses from `deployments/<ecosystem>-<network>.json` (or `$PURA_DEPLOYMENTS_DIR`)
  and refuses a file that is missing, for another chain, unfinished, or stale;
* signs with `--account` (an ape keyfile alias unlocked by `APE_ACCOUNTS_<alias>_PASSPHRASE`,
  or `TEST::<n>` on local chains), else `PURA_PRIVATE_KEY`, else `TEST::0` on local chains;
* sends through `pura.deploy.Sender`: a call that would revert is reported with the
  contract's own message and nothing is sent; exits non-zero with one clear line on failure.

Imports of ape stay inside functions: `ape run` imports every script to list them.
"""

from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

import click

from pura.layout import TASK_SCALE, decode_hot

DEFAULT_NETWORK = "ethereum:local:foundry"
KEY_ENV = "PURA_PRIVATE_KEY"
ACCOUNT_ENV = "PURA_ACCOUNT"
# Public networks and the environment variable their RPC URI comes from (ape-config.yaml
# maps the same variable). Any other non-local network needs an explicit URI.
RPC_ENV = {("base", "sepolia"): "PURA_BASE_SEPOLIA_RPC"}


class Fail(click.ClickException):
    """One clear line on stderr, exit status 1."""


# ====================================================================== options


def network_option(f):
    return click.option(
        "--network",
        "network_choice",
        default=DEFAULT_NETWORK,
        show_default=True,
        metavar="ECOSYSTEM:NETWORK[:PROVIDER]",
        help="Ape network choice, e.g. base:sepolia (RPC from $PURA_BASE_SEPOLIA_RPC) or "
        "ethereum:local:foundry (set APE_FOUNDRY_HOST to use an anvil you started).",
    )(f)


def account_option(f):
    return click.option(
        "--account",
        "account_spec",
        default=None,
        metavar="ALIAS|TEST::N",
        help=f"Signer: an ape keyfile account alias (unlocked by APE_ACCOUNTS_<alias>_PASSPHRASE) or "
        f"TEST::<n> on local chains. Default: ${ACCOUNT_ENV}, else the key in ${KEY_ENV}, "
        "else TEST::0 on local chains.",
    )(f)


def dry_run_option(f):
    return click.option("--dry-run", is_flag=True, help="Show what would be sent; send nothing.")(f)


def task_option(f, help_text="Task type (market) name, e.g. llm.cheap. Default: every task type of the deployment."):
    return click.option("--task", "task_names", multiple=True, metavar="NAME", help=help_text)(f)


def handle_errors(fn):
    """Turns every expected failure into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ape.exceptions import ApeException

        from pura.deploy import DeploymentError
        from pura.params import ParamsError

        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (DeploymentError, ParamsError) as err:
            raise Fail(str(err)) from None
        except FileNotFoundError as err:
            raise Fail(str(err)) from None
        except ApeException as err:
            raise Fail(f"{type(err).__name__}: {err}") from None

    return wrapper


# ====================================================================== network


@dataclass
class Network:
    choice: str
    ecosystem: str
    name: str
    provider: Any
    local: bool

    @property
    def label(self) -> str:
        return f"{self.ecosystem}:{self.name}"


def _split_choice(choice: str) -> tuple[str, str, str | None]:
    parts = choice.split(":", 2)
    eco = parts[0] or "ethereum"
    net = parts[1] if len(parts) > 1 and parts[1] else "local"
    prov = parts[2] if len(parts) > 2 and parts[2] else None
    return eco, net, prov


def check_rpc_env(choice: str) -> None:
    """Public networks need an explicit RPC: from their environment variable, or a URI in
    the network choice. Never a random public endpoint."""
    eco, net, prov = _split_choice(choice)
    if net == "local":
        return
    explicit = prov is not None and re.match(r"^(https?|wss?)://", prov)
    if explicit:
        return
    var = RPC_ENV.get((eco, net))
    if var is None:
        raise Fail(
            f"no RPC configured for {eco}:{net}: pass it explicitly as --network {eco}:{net}:https://... "
            "(Pura never lets ape pick a public RPC for you)"
        )
    value = os.environ.get(var, "").strip()
    if not value:
        raise Fail(
            f"{var} is not set: export the HTTPS URL of your {eco}:{net} RPC endpoint "
            f"(e.g. export {var}=https://base-sepolia.example/v2/KEY). Pura does not fall back to a "
            "public RPC. See docs/deploy.md."
        )
    if not re.match(r"^(https?|wss?)://\S+$", value):
        raise Fail(f"{var}={value!r} is not an http(s):// or ws(s):// URL")


class connected:
    """`with connected(choice) as net:` — checks the RPC variable, connects through ape,
    and turns connection failures (unreachable RPC, wrong chain id) into clear errors."""

    def __init__(self, choice: str):
        self.choice = choice
        self._ctx = None

    def __enter__(self) -> Network:
        from ape import networks
        from ape.exceptions import ApeException, NetworkMismatchError

        check_rpc_env(self.choice)
        eco, net, _ = _split_choice(self.choice)
        try:
            self._ctx = networks.parse_network_choice(self.choice)
            provider = self._ctx.__enter__()
        except NetworkMismatchError as err:
            raise Fail(f"wrong network: {err} Check the RPC URL for {eco}:{net}.") from None
        except ApeException as err:
            raise Fail(f"cannot connect to {self.choice}: {type(err).__name__}: {err}") from None
        except Exception as err:  # noqa: BLE001 - connection errors from web3/requests
            raise Fail(f"cannot connect to {self.choice}: {err}") from None
        eco, net = provider.network.ecosystem.name, provider.network.name
        _quiet_foundry_reverts()
        return Network(self.choice, eco, net, provider, local=(net == "local"))

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False


def _quiet_foundry_reverts() -> None:
    """ape-foundry prints a full call trace for every revert, including the reverts our
    simulations are *meant* to catch (and it takes ~0.7 s to build). The scripts report the
    revert message themselves; the trace is shown only with `-v DEBUG`."""
    try:
        from ape.exceptions import ContractLogicError, TransactionError
        from ape.logging import LogLevel, logger
        from ape_foundry.provider import FoundryProvider
    except ImportError:
        return
    if getattr(FoundryProvider, "_pura_quiet", False):
        return
    original = FoundryProvider._handle_execution_reverted

    def handle(self, exception, revert_message=None, **kwargs):
        if logger.level <= LogLevel.DEBUG:
            return original(self, exception, revert_message, **kwargs)
        if not revert_message or revert_message == "0x":
            revert_message = TransactionError.DEFAULT_MESSAGE
        if revert_message.startswith("revert: "):
            revert_message = revert_message[8:]
        kwargs.pop("trace", None)
        kwargs["set_ape_traceback"] = False
        return ContractLogicError(base_err=exception, revert_message=revert_message, **kwargs)

    FoundryProvider._handle_execution_reverted = handle
    FoundryProvider._pura_quiet = True


# ====================================================================== accounts


def load_account(spec: str | None, net: Network, *, required: bool = True):
    """The signer, non-interactively (see module docstring)."""
    from ape import accounts

    spec = spec or os.environ.get(ACCOUNT_ENV) or None
    if spec:
        m = re.fullmatch(r"(?i)test::(\d+)", spec.strip())
        if m:
            if not net.local:
                raise Fail(
                    f"{spec} is a local test account; on {net.label} use an ape keyfile alias "
                    f"(--account ALIAS) or ${KEY_ENV}"
                )
            i = int(m.group(1))
            if i >= len(accounts.test_accounts):
                raise Fail(f"there are only {len(accounts.test_accounts)} test accounts")
            return accounts.test_accounts[i]
        return _keyfile_account(spec)
    key = os.environ.get(KEY_ENV, "").strip()
    if key:
        return _key_account(key)
    if net.local:
        return accounts.test_accounts[0]
    if not required:
        return None
    raise Fail(
        f"no account for {net.label}: pass --account ALIAS (an ape keyfile account, unlocked by "
        f"APE_ACCOUNTS_<ALIAS>_PASSPHRASE) or set {KEY_ENV}"
    )


def _keyfile_account(alias: str):
    from ape import accounts
    from ape.exceptions import AccountsError

    try:
        acct = accounts.load(alias)
    except (IndexError, KeyError, AccountsError):
        known = ", ".join(sorted(a.alias for a in accounts if getattr(a, "alias", None))) or "none"
        raise Fail(
            f"no ape account named {alias!r} (known: {known}). Create it with "
            f"`ape accounts import {alias}` or `ape accounts generate {alias}`."
        ) from None
    var = f"APE_ACCOUNTS_{alias}_PASSPHRASE"
    passphrase = os.environ.get(var)
    if not passphrase:
        how = (f"export {var}=..." if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var)
               else f"env '{var}=...' ape run ... (the alias is not a valid shell variable name; "
                    "an alias of letters, digits and _ is easier)")
        raise Fail(f"{var} is not set: the scripts unlock keyfile accounts non-interactively ({how})")
    try:
        acct.set_autosign(True, passphrase=passphrase)
    except Exception:  # noqa: BLE001 - InvalidPasswordError and friends
        raise Fail(f"{var} does not unlock the account {alias!r}") from None
    return acct


def _key_account(key: str):
    from ape_accounts.accounts import ApeSigner
    from eth_account import Account

    key = key if key.startswith("0x") else "0x" + key
    try:
        Account.from_key(key)
    except Exception:  # noqa: BLE001
        raise Fail(f"{KEY_ENV} does not hold a valid private key") from None
    return ApeSigner(private_key=key)


def sender_for(account, net: Network, confirmations: int | None = None, timeout: float | None = None):
    from pura.deploy import Sender

    conf = net.provider.network.required_confirmations if confirmations is None else confirmations
    block_time = net.provider.network.block_time or 0
    if timeout is None:
        timeout = max(60.0, 30.0 * max(block_time, 1) * max(conf, 1))
    return Sender(account, net.provider, confirmations=conf, timeout=timeout,
                  poll=max(0.1, min(1.0, block_time / 8 if block_time else 0.25)))


def require_gas_money(account, net: Network):
    bal = account.balance
    if bal == 0:
        raise Fail(f"account {account.address} has no ETH to pay for gas on {net.label}")


# ====================================================================== the deployment


@dataclass
class Deployed:
    net: Network
    path: Any
    record: dict
    proto: Any  # pura.deploy.Protocol
    tasks: dict[str, bytes]  # name -> id
    decimals: int
    symbol: str

    def fmt(self, amount: int) -> str:
        return fmt_amount(amount, self.decimals, self.symbol)

    def parse(self, text: str, what: str) -> int:
        return parse_amount(text, self.decimals, what)

    def select_tasks(self, names) -> list[tuple[str, bytes]]:
        if not names:
            return list(self.tasks.items())
        out = []
        for n in names:
            if n not in self.tasks:
                raise Fail(f"unknown task type {n!r}; this deployment has: {', '.join(self.tasks)}")
            out.append((n, self.tasks[n]))
        return out

    def one_task(self, names) -> tuple[str, bytes]:
        if len(names) != 1:
            if not names and len(self.tasks) == 1:
                return next(iter(self.tasks.items()))
            raise Fail(f"name one task type with --task ({', '.join(self.tasks)})")
        return self.select_tasks(names)[0]

    def epoch_info(self) -> tuple[int, int, int]:
        """(current epoch, chain time, seconds until the next epoch) from the latest block."""
        e = self.record["epoch"]
        now = self.net.provider.get_block("latest").timestamp
        epoch = (now - e["genesis"]) // e["length"]
        return epoch, now, e["genesis"] + (epoch + 1) * e["length"] - now


def load_deployed(net: Network, *, check_code: bool = True) -> Deployed:
    from ape import project

    from pura.deploy import code_problems, deployment_path, load_deployment, protocol_at, rel

    path = deployment_path(net.ecosystem, net.name)
    if not path.exists():
        raise Fail(
            f"no deployment for {net.label}: {rel(path)} does not exist. Deploy first with "
            f"`ape run deploy --network {net.choice}`."
        )
    record = load_deployment(path)
    if record.get("chain_id") != net.provider.chain_id:
        raise Fail(
            f"wrong network: {rel(path)} is for chain id {record.get('chain_id')}, but {net.choice} "
            f"is chain id {net.provider.chain_id}"
        )
    if record.get("status") != "complete":
        raise Fail(
            f"the deployment in {rel(path)} is unfinished (status {record.get('status')!r}); finish it "
            f"with `ape run deploy --network {net.choice}`"
        )
    if check_code:
        problems = []
        for name, entry in record["contracts"].items():
            problems += code_problems(project, net.provider, name, entry)
        hard = [p for p in problems if "changed since this deployment" not in p]
        if hard and len(hard) == len(record["contracts"]) and all("no code at" in p for p in hard):
            hint = ("the local chain was restarted: re-run `ape run deploy`" if net.local
                    else f"is the RPC for {net.label} the chain you deployed to?")
            raise Fail(f"none of the contracts recorded in {rel(path)} exist on this chain ({hint})")
        if hard:
            raise Fail(f"{rel(path)} does not match the chain: " + "; ".join(hard))
        for p in problems:
            click.echo(f"warning: {p}; using the current ABI", err=True)
    proto = protocol_at(project, record)
    tasks = {n: bytes.fromhex(h[2:]) for n, h in record["task_types"].items()}
    tok = record["settlement_token"]
    return Deployed(net, path, record, proto, tasks, tok["decimals"], tok.get("symbol") or "tokens")


# ====================================================================== amounts, time


def parse_amount(text: str, decimals: int, what: str = "amount") -> int:
    """'12.5' tokens -> base units; refuses more precision than the token has."""
    t = str(text).strip().replace("_", "").replace(",", "")
    try:
        d = Decimal(t)
    except InvalidOperation:
        raise Fail(f"{what}: {text!r} is not a number") from None
    if d < 0 or not d.is_finite():
        raise Fail(f"{what} must be a non-negative number")
    units = d * (Decimal(10) ** decimals)
    if units != units.to_integral_value():
        raise Fail(f"{what}: {text} has more than {decimals} decimals")
    return int(units)


def fmt_amount(amount: int, decimals: int, symbol: str = "") -> str:
    q = Decimal(amount) / (Decimal(10) ** decimals)
    s = f"{q:,.{decimals}f}"
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return f"{s} {symbol}".strip()


UNITS = {"": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
         "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
         "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600,
         "d": 86400, "day": 86400, "days": 86400}
EPOCH_UNITS = ("e", "epoch", "epochs")


def parse_duration(text: str, epoch_length: int) -> int:
    """'90s', '30m', '12h', '2d', '3epochs' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if not m:
        raise Fail(f"duration {text!r}: use e.g. 90s, 30m, 12h, 2d or 3epochs")
    n, unit = Decimal(m.group(1)), m.group(2)
    if unit in EPOCH_UNITS:
        sec = n * epoch_length
    elif unit in UNITS:
        sec = n * UNITS[unit]
    else:
        raise Fail(f"duration {text!r}: unknown unit {unit!r}")
    if sec <= 0:
        raise Fail("duration must be positive")
    return int(sec)


def parse_rate(text: str, decimals: int, epoch_length: int) -> int:
    """'0.5/hour' -> base units per second (floored; the scripts print the effective rate)."""
    amount, _, unit = text.partition("/")
    per = parse_duration("1" + (unit or "s"), epoch_length) if unit else 1
    units = parse_amount(amount, decimals, "rate")
    return units // per


def fmt_duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def fmt_time(ts: int) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def short(addr: str) -> str:
    return f"{addr[:6]}…{addr[-4:]}"


def echo(msg: str = "") -> None:
    click.echo(msg)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


# ====================================================================== reading a market


def market_snapshot(d: Deployed, name: str, tid: bytes, me: str | None = None) -> dict:
    """Everything `status` shows for one task type, read from the chain (plain JSON)."""
    p = d.proto
    reg, pool, pricing, escrow = p.registry, p.pool, p.pricing, p.escrow
    epoch, now, to_next = d.epoch_info()
    ps = pool.pools(tid)
    tt = reg.task_types(tid)
    fees = pricing.fees(tid)
    q = escrow.queues(tid)
    out: dict[str, Any] = {
        "task": name,
        "id": "0x" + tid.hex(),
        "epoch": epoch,
        "chain_time": now,
        "next_epoch_in": to_next,
        "last_rebalanced_epoch": ps.last_epoch_p1 - 1 if ps.last_epoch_p1 else None,
        "rebalance_due": bool(pool.rebalance_due(tid)),
        "min_bond": tt.min_bond,
        "stake_per_unit": tt.stake_per_unit,
        "base_fee": fees.base_fee,
        "min_fee": fees.min_fee,
        "max_fee": fees.max_fee,
        "pot": ps.pending,
        "spare": ps.spare,
        "total_units": ps.total_units,
        "escrow": {
            "level": q.level,
            "max_level": q.max_level,
            "pressure": escrow.pressure_wad(tid) / 10**18,
            "queue_slots": q.tail - q.head,  # entries not yet passed by the head (some may be empty)
        },
        "funders": [],
        "sinks": [],
    }
    for j in range(pool.stream_count(tid)):
        raw = pool.streams(tid, j)
        st = pool.stream_of(tid, raw.funder)
        out["funders"].append({
            "funder": raw.funder,
            "rate_per_second": st.rate,
            "remaining": st.remaining,
            "streamed_this_period": st.contrib,
            "escrowed": escrow.balance_of(tid, raw.funder),
        })
    units_total = 0
    rows = []
    for slot in range(reg.slot_count(tid)):
        sink = reg.member_at(tid, slot)
        tg = reg.target_of(tid, slot)
        if tg.status == 0:
            continue
        b = reg.bonds(tid, sink)
        status = {1: "active", 2: "leaving"}.get(tg.status, str(tg.status))
        # a sink that left has no declaration in this slot (it may hold another slot by now)
        declared, cap = (reg.sink_state(tid, sink)[1:3]) if status == "active" else (0, 0)
        hw = decode_hot(pool.hot_word(tid, slot))
        units, unclaimed = hw.units, hw.unclaimed
        if status == "active":
            backlog, smoothed_units = hw.backlog, hw.capacity
            price = pricing.price(tid, sink)
        else:
            backlog, smoothed_units, price = 0, 0, 0
        owed = pool.owed(tid, sink)
        units_total += units
        smoothed = smoothed_units / TASK_SCALE
        rows.append({
            "slot": slot,
            "sink": sink,
            "you": bool(me and me.lower() == sink.lower()),
            "status": status,
            "bond": b.bonded,
            "unbonding": b.unbonding,
            "unbond_release": b.release,
            "declared": declared,
            "cap": cap,
            "smoothed_capacity": smoothed,
            "backlog_tasks": backlog / TASK_SCALE,
            "backlog_epochs": (backlog / TASK_SCALE) / smoothed if smoothed else 0.0,
            "weight_units": units,
            "weight_tasks": units / TASK_SCALE,
            "price": price,
            "claimable": unclaimed + owed,
        })
    for r in rows:
        r["share"] = r["weight_units"] / units_total if units_total else 0.0
    out["sinks"] = rows
    return out


def render_market(d: Deployed, m: dict) -> str:
    f = d.fmt
    last = m["last_rebalanced_epoch"]
    due = ("rebalance DUE" if m["rebalance_due"] else f"rebalanced; next in {fmt_duration(m['next_epoch_in'])}")
    lines = [
        f"{m['task']}  ({m['id'][:10]}…)  epoch {m['epoch']}  last rebalanced "
        f"{'never' if last is None else last}  {due}",
        f"  base fee {f(m['base_fee'])}/task  (bounds {f(m['min_fee'])} .. {f(m['max_fee'])})   bond: min "
        f"{f(m['min_bond'])}, {f(m['stake_per_unit'])} per task/epoch of capacity",
    ]
    e = m["escrow"]
    funded = sum(x["remaining"] for x in m["funders"])
    rate = sum(x["rate_per_second"] for x in m["funders"])
    lines.append(
        f"  pot {f(m['pot'])}   escrow {f(e['level'])} / {f(e['max_level'])} (pressure {e['pressure'] * 100:.1f}%)"
        f"   funders {len(m['funders'])}: {f(funded)} unstreamed, streaming {f(rate * 3600)}/h"
    )
    if not m["sinks"]:
        lines.append("  no sinks registered")
        return "\n".join(lines)
    head = (f"  {'sink':13s} {'slot':>4s} {'status':7s} {'bond':>14s} {'declared':>8s} {'cap':>6s} "
            f"{'smoothed':>9s} {'backlog':>9s} {'(epochs)':>8s} {'weight':>9s} {'share':>6s} {'price':>12s} "
            f"{'claimable':>14s}")
    lines.append(head)
    for r in m["sinks"]:
        who = short(r["sink"]) + ("*" if r["you"] else " ")
        bond = f(r["bond"]) + (f" (+{f(r['unbonding'])} unbonding)" if r["unbonding"] else "")
        lines.append(
            f"  {who:13s} {r['slot']:>4d} {r['status']:7s} {bond:>14s} {r['declared']:>8d} {r['cap']:>6d} "
            f"{r['smoothed_capacity']:>9.2f} {r['backlog_tasks']:>9.2f} {r['backlog_epochs']:>8.2f} "
            f"{r['weight_tasks']:>9.2f} {r['share'] * 100:>5.1f}% {f(r['price']):>12s} {f(r['claimable']):>14s}"
        )
    return "\n".join(lines)


def call(sender, contract, method: str, *args, label: str, dry_run: bool = False):
    """Sends `contract.method(*args)` (simulated first: a revert is reported with the
    contract's message and nothing is sent); in a dry run only says what it would send."""
    from pura.deploy import method_tx

    if dry_run:
        echo(f"  would send {label}")
        return None
    receipt = sender.send(method_tx(contract, method, *args, sender=sender.account), label)
    echo(f"  sent {label}: tx {receipt.txn_hash} (block {receipt.block_number})")
    return receipt


def ensure_allowance(d: Deployed, account, spender, amount: int, sender, dry_run: bool) -> None:
    """Approves exactly `amount` for `spender` when the current allowance is short."""
    have = d.proto.token.allowance(account.address, spender.address)
    if have >= amount:
        return
    call(sender, d.proto.token, "approve", spender.address, amount,
         label=f"token.approve({short(spender.address)}, {d.fmt(amount)})", dry_run=dry_run)


def require_tokens(d: Deployed, account, amount: int, what: str) -> None:
    bal = d.proto.token.balanceOf(account.address)
    if bal < amount:
        raise Fail(f"account {account.address} holds {d.fmt(bal)}, {what} needs {d.fmt(amount)}")
