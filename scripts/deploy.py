"""Deploy Pura: ape run deploy --network base:sepolia | ethereum:local:foundry

Deploys the five contracts in dependency order (plus a TestToken on local chains), wires
them, configures every task type from deployments/params/<ecosystem>-<network>.json,
reads the result back from the chain, and writes deployments/<ecosystem>-<network>.json.

Safe to re-run: every transaction is journalled in the deployment file before it is sent,
so an interrupted run resumes where it stopped without redeploying anything, and a
finished deployment is only verified (nothing is sent). A live deployment that differs
from the parameters file is never changed unless you pass --update (owner-only parameter
changes) or --redeploy (a fresh set of contracts; the old file is kept aside).
"""

from __future__ import annotations

from pathlib import Path

import click

from scripts._common import (
    Fail,
    account_option,
    connected,
    dry_run_option,
    echo,
    handle_errors,
    load_account,
    network_option,
    sender_for,
)


@click.command(short_help="Deploy, wire and verify the Pura contracts", help=__doc__)
@network_option
@account_option
@click.option("--params", "params_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Parameters file (default: deployments/params/<ecosystem>-<network>.json).")
@click.option("--redeploy", is_flag=True,
              help="Deploy a fresh set even if a live deployment exists (its file is kept aside).")
@click.option("--update", is_flag=True,
              help="Apply owner-only parameter changes (fees, escrow maxima, new task types ...) "
              "to the live deployment.")
@click.option("--confirmations", type=click.IntRange(min=0), default=None,
              help="Blocks to wait on top of each transaction (default: the network's "
              "required_confirmations from ape-config.yaml).")
@click.option("--confirmation-timeout", type=click.FloatRange(min=1), default=None,
              help="Seconds to wait for confirmations before failing (the run can be resumed).")
@dry_run_option
@handle_errors
def cli(network_choice, account_spec, params_file, redeploy, update, confirmations, confirmation_timeout, dry_run):
    import json

    from ape import accounts, project

    from pura.deploy import DeployRun, deployment_path, rel
    from pura.params import ProtocolParams, network_key, params_path

    if redeploy and update:
        raise Fail("--redeploy and --update exclude each other")
    with connected(network_choice) as net:
        key = network_key(net.ecosystem, net.name)
        params_file = params_file or params_path(key)
        if not params_file.exists():
            raise Fail(f"no parameters file for {net.label}: {rel(params_file)} (see docs/deploy.md)")
        params = ProtocolParams.load_file(params_file).validate(public=not net.local)
        token_source = json.loads(params_file.read_text()).get("_token_source")
        if params.token is None and not net.local:
            raise Fail("a TestToken is only deployed on local chains; set `token` in the parameters file")
        account = load_account(account_spec, net)
        sender = sender_for(account, net, confirmations, confirmation_timeout)
        path = deployment_path(net.ecosystem, net.name)
        run = DeployRun(
            project, net.provider, account, params,
            path=path, network_choice=network_choice, ecosystem=net.ecosystem, network=net.name,
            local=net.local, params_file=params_file, token_source=token_source, sender=sender,
            log=echo, test_accounts=list(accounts.test_accounts) if net.local else [],
        )
        echo(f"network   {net.label} (chain id {net.provider.chain_id}, {net.provider.name})")
        echo(f"deployer  {account.address} (balance {account.balance / 10**18:.6f} ETH)")
        echo(f"params    {rel(params_file)} (digest {params.digest()[:18]}…)")
        echo(f"file      {rel(path)}")
        echo(f"confirm   {sender.confirmations} block(s) per transaction")
        mode = run.prepare(redeploy=redeploy, update=update, dry_run=dry_run)
        if mode == "up-to-date":
            checks, problems = run.finish(write=False)
            if problems:
                raise Fail("the live deployment no longer reads back as recorded:\n  - " + "\n  - ".join(problems))
            echo(f"\nlive deployment in {rel(path)} matches {rel(params_file)}: verified {checks} "
                 "checks on chain; nothing to do (--update / --redeploy to change it).")
            _summary(run.record)
            return
        echo({"fresh": "\nfresh deployment", "resume": "\nresuming a half-finished deployment",
              "update": "\nupdating the live deployment"}[mode] + (" (dry run: nothing is sent)" if dry_run else ""))
        if dry_run:
            run.execute(dry_run=True)
            return
        if account.balance == 0:
            raise Fail(f"account {account.address} has no ETH to pay for gas on {net.label}")
        try:
            sent = run.execute()
        except Exception:
            echo(f"\nstopped; {rel(path)} records the progress. Fix the cause and re-run the same "
                 "command to resume.")
            raise
        checks, problems = run.finish()
        if problems:
            raise Fail("deployed, but the read-back found problems (status left 'partial'):\n  - "
                       + "\n  - ".join(problems))
        echo(f"\n{len(sent)} transaction(s) sent; verified {checks} checks on chain; wrote {rel(path)}")
        _summary(run.record)


def _summary(record: dict) -> None:
    tok = record["settlement_token"]
    echo(f"  chain id {record['chain_id']}, deployer {record['deployer']}, from block {record['block']}")
    echo(f"  settlement token {tok['address']} ({tok.get('symbol')}, {tok['decimals']} decimals"
         + (", deployed here" if tok.get("deployed_by_script") else "") + ")")
    for name, entry in record["contracts"].items():
        echo(f"  {name:9s} {entry['address']}  {entry['contract']}")
