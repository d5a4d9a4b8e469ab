"""The Base Sepolia rehearsal: the real `ape run deploy --network base:sepolia` command,
against a local anvil started with --chain-id 84532, with only $PURA_BASE_SEPOLIA_RPC
pointed at loopback. Same code path, same parameters file (deployments/params/base-sepolia.json),
same ape network config (required_confirmations: 1), a keyfile deployer unlocked from the
environment. Anvil mines every transaction at once and an empty block every 0.25 s, so the
confirmation wait is real and bounded.

USDC does not exist on a fresh anvil: the rehearsal places an ERC-20 with USDC's symbol and
decimals at Circle's Base Sepolia USDC address (anvil_setCode), and the deploy script
checks it exactly as it checks the real one.

The run is interrupted (SIGKILL) after the first contracts are recorded and then resumed;
everything is then checked against the chain with web3.py, independently of the scripts.
"""

from __future__ import annotations

import json
import time

import pytest
from eth_account import Account
from eth_utils import keccak

from .conftest import REPO, Anvil, Chain, Runner, abi, finish, kill, load_json, runtime_code

PARAMS_FILE = REPO / "deployments" / "params" / "base-sepolia.json"
PARAMS = json.loads(PARAMS_FILE.read_text())
USDC_ADDRESS = PARAMS["token"]
ALIAS = "pura_rehearsal"
PASSPHRASE = "rehearsal passphrase"


@pytest.fixture(scope="module")
def rehearsal(script_tmp):
    anvil = Anvil(script_tmp, "--block-time", "0.25", "--mixed-mining", chain_id=84532)
    try:
        # the stand-in USDC: an ERC-20 named like it, its code placed at Circle's address
        w3 = anvil.w3
        from ape import project

        stand_in = w3.eth.contract(abi=abi("TestToken"),
                                   bytecode=project.TestToken.contract_type.deployment_bytecode.bytecode)
        tx = stand_in.constructor("USD Coin", "USDC", 6).transact({"from": w3.eth.accounts[9]})
        addr = w3.eth.wait_for_transaction_receipt(tx).contractAddress
        anvil.rpc("anvil_setCode", [USDC_ADDRESS, "0x" + bytes(w3.eth.get_code(addr)).hex()])

        # the deployer: a fresh key in an ape keyfile, in a private ape data folder, funded
        # like a faucet would; unlocked through APE_ACCOUNTS_<alias>_PASSPHRASE
        data = script_tmp / "ape-data"
        (data / "accounts").mkdir(parents=True)
        acct = Account.create()
        (data / "accounts" / f"{ALIAS}.json").write_text(json.dumps(Account.encrypt(acct.key, PASSPHRASE)))
        anvil.rpc("anvil_setBalance", [acct.address, hex(10**18)])
        dep_dir = script_tmp / "rehearsal-deployments"
        dep_dir.mkdir()
        runner = Runner({
            "PURA_BASE_SEPOLIA_RPC": anvil.url,
            "PURA_DEPLOYMENTS_DIR": str(dep_dir),
            "APE_DATA_FOLDER": str(data),
            f"APE_ACCOUNTS_{ALIAS}_PASSPHRASE": PASSPHRASE,
        })
        yield anvil, runner, dep_dir / "base-sepolia.json", acct.address
    finally:
        anvil.stop()


DEPLOY = ("deploy", "--network", "base:sepolia", "--account", ALIAS)


def test_unset_or_empty_rpc_variable_fails_clearly(rehearsal):
    _, runner, path, _ = rehearsal
    unset, empty = runner.parallel(
        lambda: runner.run(*DEPLOY, unset=("PURA_BASE_SEPOLIA_RPC",)),
        lambda: runner.run("status", "--network", "base:sepolia", env={"PURA_BASE_SEPOLIA_RPC": "  "}),
    )
    for res in (unset, empty):
        res.failed("PURA_BASE_SEPOLIA_RPC is not set", "does not fall back to a public RPC")
    assert not path.exists()


def test_interrupted_deploy_resumes_without_redeploying(rehearsal):
    anvil, runner, path, deployer = rehearsal
    w3 = anvil.w3
    # 1. a run killed after its first contracts were recorded
    p = runner.popen(*DEPLOY)
    deadline = time.monotonic() + 180
    while True:
        if path.exists():
            try:
                rec = json.loads(path.read_text())
            except json.JSONDecodeError:  # written atomically: cannot happen; keep polling
                rec = {}
            if "pricing" in rec.get("contracts", {}):
                break
        assert p.poll() is None, f"deploy ended before it could be interrupted:\n{finish(p).text}"
        assert time.monotonic() < deadline, "deploy made no progress"
        time.sleep(0.02)
    kill(p)
    partial = load_json(path)
    assert partial["status"] == "partial"
    before = {n: e["address"] for n, e in partial["contracts"].items()}
    assert {"registry", "pricing"} <= set(before)

    # 2. the same command resumes
    res = runner.run(*DEPLOY).ok()
    assert "resuming a half-finished deployment" in res.out
    rec = load_json(path)
    assert rec["status"] == "complete"
    for name, addr in before.items():
        assert rec["contracts"][name]["address"] == addr, f"{name} was redeployed"
        assert f"ok    deploy {rec['contracts'][name]['contract']}" in res.out
    # every transaction the deployer ever sent is one recorded step: nothing was sent twice
    assert w3.eth.get_transaction_count(deployer) == len(rec["steps"])
    creations = [s for s in rec["steps"] if s.startswith("deploy:")]
    assert sorted(creations) == sorted(f"deploy:{n}" for n in rec["contracts"])


def test_written_file_matches_the_chain(rehearsal):
    anvil, runner, path, deployer = rehearsal
    rec = load_json(path)
    w3 = anvil.w3
    chain = Chain(anvil, rec)
    assert rec["format"] == "pura-deployment/1"
    assert rec["network"] == "base:sepolia" and rec["provider"] == "node"
    assert rec["chain_id"] == 84532 == w3.eth.chain_id
    assert rec["deployer"] == rec["owner"] == deployer
    assert set(rec["contracts"]) == {"registry", "pricing", "escrow", "pool", "tracker"}  # no TestToken
    tok = rec["settlement_token"]
    assert tok["address"] == USDC_ADDRESS and tok["decimals"] == 6 and tok["symbol"] == "USDC"
    assert not tok["deployed_by_script"] and "developers.circle.com" in tok["source"]
    assert rec["params"]["token"] == USDC_ADDRESS
    assert rec["params_digest"].startswith("0x") and rec["params_file"] == "deployments/params/base-sepolia.json"

    for name, e in rec["contracts"].items():
        code = bytes(w3.eth.get_code(e["address"]))
        runtime = runtime_code(e["contract"])
        assert code.startswith(runtime), f"{name}: code at {e['address']} is not this build"
        assert e["code_digest"] == "0x" + keccak(code).hex()
        assert e["runtime_digest"] == "0x" + keccak(runtime).hex()
        r = w3.eth.get_transaction_receipt(e["tx"])
        assert r.status == 1 and r.contractAddress == e["address"] and r.blockNumber == e["block"]
        assert w3.eth.get_transaction(e["tx"])["from"] == deployer
        assert chain.c[name].functions.owner().call() == deployer
        # confirmations honoured: the script saw at least one block on top of each deployment
        assert e["confirmed_at_block"] - e["block"] >= rec["required_confirmations"] == 1
    assert rec["block"] == min(e["block"] for e in rec["contracts"].values())
    for key, step in rec["steps"].items():
        r = w3.eth.get_transaction_receipt(step["tx"])
        assert r.status == 1 and r.blockNumber == step["block"], key

    a = {n: e["address"] for n, e in rec["contracts"].items()}
    args = {n: e["constructor_args"] for n, e in rec["contracts"].items()}
    assert args["registry"] == {"token": USDC_ADDRESS, "epoch_length": PARAMS["epoch_length"],
                                "alpha_wad": PARAMS["alpha_wad"], "unbonding_period": PARAMS["unbonding_period"],
                                "treasury": deployer}
    assert args["pool"]["tolerance_bps"] == PARAMS["tolerance_bps"]
    assert args["tracker"]["slash_threshold_bps"] == PARAMS["slash_threshold_bps"]
    # the wiring, read back
    assert chain.registry.TOKEN().call() == USDC_ADDRESS
    assert (chain.registry.pool().call(), chain.registry.tracker().call()) == (a["pool"], a["tracker"])
    assert chain.pool.tracker().call() == a["tracker"]
    assert (chain.pool.REGISTRY().call(), chain.pool.PRICING().call(), chain.pool.ESCROW().call()) == (
        a["registry"], a["pricing"], a["escrow"])
    assert (chain.pricing.pool().call(), chain.pricing.escrow().call()) == (a["pool"], a["escrow"])
    assert chain.escrow.pool().call() == a["pool"]
    assert (chain.tracker.REGISTRY().call(), chain.tracker.POOL().call()) == (a["registry"], a["pool"])
    assert chain.registry.EPOCH_LENGTH().call() == PARAMS["epoch_length"]
    assert rec["epoch"] == {"genesis": chain.registry.GENESIS().call(), "length": PARAMS["epoch_length"]}
    assert rec["genesis"] == rec["epoch"]["genesis"]
    for t in PARAMS["task_types"]:
        tid = keccak(text=t["name"])
        assert rec["task_types"][t["name"]] == "0x" + tid.hex()
        assert tuple(chain.registry.task_types(tid).call()) == (t["min_bond"], t["stake_per_unit"])
        assert tuple(chain.pricing.fees(tid).call())[:3] == (t["base_fee"], t["min_fee"], t["max_fee"])
        assert chain.escrow.queues(tid).call()[3] == t["escrow_max"]
    assert rec["verification"]["problems"] == [] and rec["verification"]["checks"] >= 50


def test_rerun_is_idempotent_and_status_reads_it(rehearsal, script_tmp):
    anvil, runner, path, deployer = rehearsal
    nonce = anvil.w3.eth.get_transaction_count(deployer)
    before = path.read_text()
    changed = json.loads(PARAMS_FILE.read_text())
    changed["task_types"][0]["max_fee"] += 1
    changed["epoch_length"] = 1800
    changed_file = script_tmp / "base-sepolia-changed.json"
    changed_file.write_text(json.dumps(changed))
    again, status, refused = runner.parallel(
        DEPLOY,
        ("status", "--network", "base:sepolia"),
        (*DEPLOY, "--params", str(changed_file)),
    )
    again.ok()
    assert "nothing to do" in again.out and "verified" in again.out
    assert path.read_text() == before  # not even rewritten
    status.ok()
    assert "Pura on base:sepolia (chain id 84532)" in status.out
    for t in PARAMS["task_types"]:
        assert t["name"] in status.out
    assert "USDC" in status.out
    # a live deployment is never replaced or changed without being told to
    refused.failed("cannot be brought in line", "epoch_length", "--redeploy")
    assert anvil.w3.eth.get_transaction_count(deployer) == nonce
    assert path.read_text() == before
