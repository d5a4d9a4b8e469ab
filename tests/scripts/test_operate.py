"""The operating scripts, end to end on a local chain, run the way a user runs them
(`ape run <script> --network ethereum:local:foundry ...` in a subprocess, ape-foundry
attached to this suite's anvil through APE_FOUNDRY_HOST).

One shared deployment (the `local` fixture); the tests below are one lifecycle in order:
deploy -> failure modes -> sinks register -> a source funds -> keepers rebalance (once, not
due, dry run, two at once, in a loop) -> claims and escrow withdrawals -> drain -> status
-> parameter update -> redeploy. Every effect is checked on the chain with web3.py.
Test accounts: TEST::0 deployer, ::2 ::3 sinks, ::5 funder, ::6 escrow
depositor, ::7 ::8 keepers, ::9 an account with nothing to claim.
"""

from __future__ import annotations

import json
import time

from eth_account import Account
from eth_utils import keccak

from .conftest import EPOCH, USDC, Chain, finish, load_json, runtime_code
from pura.layout import TASK_SCALE

CHEAP = keccak(text="llm.cheap")
PREMIUM = keccak(text="llm.premium")
LOCAL = ("--network", "ethereum:local:foundry")


def acct(local, i: int) -> str:
    return local.anvil.w3.eth.accounts[i]


def transact(local, contract: str, fn: str, *args, sender: int = 0):
    w3 = local.anvil.w3
    tx = getattr(local.chain.c[contract].functions, fn)(*args).transact({"from": acct(local, sender)})
    r = w3.eth.wait_for_transaction_receipt(tx)
    assert r.status == 1, f"{contract}.{fn} failed"
    return r


def rebalanced(local, task: bytes, from_block: int = 0) -> list:
    return [e for e in local.chain.events("pool", "Rebalanced", from_block) if e.args.task_type == task]


# ---------------------------------------------------------------------------- deploy


def test_local_deploy_wrote_a_verified_file(local):
    rec, w3, chain = local.record, local.anvil.w3, local.chain
    assert local.path.name == "ethereum-local.json"
    assert rec["status"] == "complete" and rec["network"] == "ethereum:local" and rec["provider"] == "foundry"
    assert rec["chain_id"] == 31337 == w3.eth.chain_id
    assert rec["deployer"] == acct(local, 0) and rec["required_confirmations"] == 0
    tok = rec["settlement_token"]
    assert tok["deployed_by_script"] and tok["symbol"] == "pUSD" and tok["decimals"] == 6
    assert tok["address"] == rec["contracts"]["token"]["address"]
    for name, e in rec["contracts"].items():
        code = bytes(w3.eth.get_code(e["address"]))
        assert code.startswith(runtime_code(e["contract"])), name
        assert e["code_digest"] == "0x" + keccak(code).hex()
        assert w3.eth.get_transaction_receipt(e["tx"]).contractAddress == e["address"]
    a = {n: e["address"] for n, e in rec["contracts"].items()}
    assert chain.registry.pool().call() == a["pool"] and chain.pool.tracker().call() == a["tracker"]
    assert chain.escrow.pool().call() == a["pool"] and chain.pricing.escrow().call() == a["escrow"]
    # test tokens for TEST::0..9, as the local parameters ask
    for i in range(10):
        assert chain.token.balanceOf(acct(local, i)).call() == 1_000_000 * USDC
    # one transaction per recorded step, nothing else
    assert w3.eth.get_transaction_count(acct(local, 0)) == len(rec["steps"])
    assert f"{len(rec['steps'])} transaction(s) sent" in local.deploy.out
    assert rec["verification"]["problems"] == []
    # the gateway's reader takes the file as written
    from gateway.chain.client import Deployment

    dep = Deployment.load(local.path)
    assert dep.chain_id == 31337 and dep.genesis == rec["epoch"]["genesis"] and dep.epoch_length == EPOCH
    assert dep.addresses == {n: e["address"] for n, e in rec["contracts"].items() if n != "token"}
    assert dep.token == tok["address"] and dep.task_types == rec["task_types"]


def test_every_script_has_help(local):
    scripts = {
        "deploy": ["--redeploy", "--update", "--params", "--confirmations"],
        "register": ["--capacity", "--bond", "--add-bond", "--deregister"],
        "fund": ["--amount", "--rate", "--over", "--close", "--instant"],
        "rebalance": ["--loop", "--epochs", "--dry-run", "rebalance not due"],
        "claim": ["--unbonded", "--treasury"],
        "drain": ["--withdraw", "spare capacity"],
        "status": ["--json", "backlog"],
    }
    results = local.runner.parallel(*[(s, "--help") for s in scripts])
    for (script, words), res in zip(scripts.items(), results):
        res.ok()
        assert f"Usage: ape run {script}" in res.out
        for w in ["--network", *words]:
            assert w in res.out, f"{script} --help lacks {w}"


# ---------------------------------------------------------------------------- failures


def test_failure_modes_are_clear_and_change_nothing(local, script_tmp):
    w3, chain = local.anvil.w3, local.chain
    empty = script_tmp / "no-deployments"
    empty.mkdir()
    unfunded = Account.create()
    no_tokens = Account.create()
    local.anvil.rpc("anvil_setBalance", [no_tokens.address, hex(10**18)])
    nonces = {i: w3.eth.get_transaction_count(acct(local, i)) for i in (6, 8)}
    run = local.runner.run
    missing, wrong_net, no_eth, short, reverts, below_min = local.runner.parallel(
        lambda: run("status", *LOCAL, env={"PURA_DEPLOYMENTS_DIR": str(empty)}),
        lambda: run("status", "--network", "base:sepolia", env={"PURA_BASE_SEPOLIA_RPC": local.anvil.url}),
        lambda: run("register", *LOCAL, "--task", "llm.cheap", "--capacity", "10",
                    env={"PURA_PRIVATE_KEY": unfunded.key.hex()}),
        lambda: run("fund", *LOCAL, "--task", "llm.cheap", "--amount", "10", "--rate", "1/hour",
                    env={"PURA_PRIVATE_KEY": no_tokens.key.hex()}),
        lambda: run("fund", *LOCAL, "--task", "llm.cheap", "--close", "--account", "TEST::8"),
        lambda: run("register", *LOCAL, "--task", "llm.cheap", "--capacity", "50", "--bond", "5",
                    "--account", "TEST::6"),
    )
    missing.failed("no deployment for ethereum:local", "ethereum-local.json does not exist",
                   "ape run deploy --network ethereum:local:foundry")
    wrong_net.failed("wrong network", "31337", "84532")
    no_eth.failed(f"account {unfunded.address} has no ETH to pay for gas")
    short.failed(f"account {no_tokens.address} holds 0 pUSD, --amount needs 10 pUSD")
    # a call the contract refuses: its own message, the call named, nothing sent
    reverts.failed("pool.close_stream(llm.cheap) reverted: pool: no stream (nothing was sent)")
    below_min.failed("bond 5 pUSD is below llm.cheap's minimum bond 100 pUSD")
    for res in (missing, wrong_net, no_eth, short, reverts, below_min):
        assert "Traceback" not in res.text, res.text
        assert res.err.strip().splitlines()[-1].startswith("Error: ")
    # nothing half-done: no transaction, no approval, no registration
    for i, n in nonces.items():
        assert w3.eth.get_transaction_count(acct(local, i)) == n
    assert w3.eth.get_transaction_count(unfunded.address) == 0
    assert w3.eth.get_transaction_count(no_tokens.address) == 0
    assert chain.token.allowance(acct(local, 6), chain.record["contracts"]["registry"]["address"]).call() == 0
    assert chain.registry.slot_of(CHEAP, acct(local, 6)).call() == 0


# ---------------------------------------------------------------------------- lifecycle


def test_sinks_register_bond_and_declare(local):
    chain = local.chain
    reg_addr = local.record["contracts"]["registry"]["address"]
    a, b = local.runner.parallel(
        ("register", *LOCAL, "--task", "llm.cheap", "--capacity", "120", "--account", "TEST::2"),
        ("register", *LOCAL, "--task", "llm.cheap", "--capacity", "80", "--bond", "100", "--account", "TEST::3"),
    )
    a.ok(), b.ok()
    assert "bond 120 pUSD, capacity 120" in a.out  # bond defaulted to capacity * stake_per_unit
    assert "sent token.approve" in a.out and "sent registry.register_sink(llm.cheap, 120 pUSD, 120)" in a.out
    for i, bond, declared in ((2, 120, 120), (3, 100, 80)):
        who = acct(local, i)
        assert chain.registry.slot_of(CHEAP, who).call() > 0
        assert chain.registry.bonds(CHEAP, who).call()[0] == bond * USDC
        assert chain.registry.sink_state(CHEAP, who).call()[1] == declared
        assert chain.token.allowance(who, reg_addr).call() == 0  # exactly what was needed
        assert chain.token.balanceOf(who).call() == 1_000_000 * USDC - bond * USDC


def test_source_funds_and_keeper_rebalances_only_when_due(local):
    w3, chain = local.anvil.w3, local.chain
    e0 = chain.epoch()
    start = w3.eth.block_number + 1  # events after this point
    fund, keep = local.runner.parallel(
        ("fund", *LOCAL, "--task", "llm.cheap", "--amount", "500", "--over", "5epochs", "--account", "TEST::5"),
        ("rebalance", *LOCAL, "--account", "TEST::7"),
    )
    fund.ok(), keep.ok()
    st = chain.pool.stream_of(CHEAP, acct(local, 5)).call()
    assert st[1] == 500 * USDC // (5 * EPOCH)  # rate, base units per second
    assert "pool.fund(llm.cheap, 500 pUSD" in fund.out and "[open]" in fund.out
    for task in (CHEAP, PREMIUM):
        assert [e.args.epoch for e in rebalanced(local, task, start)] == [e0]
    assert keep.out.count("rebalanced epoch") == 2
    # nothing changes until the next epoch: the keeper sends nothing
    n7 = w3.eth.get_transaction_count(acct(local, 7))
    again = local.runner.run("rebalance", *LOCAL, "--account", "TEST::7").ok()
    assert again.out.count("nothing sent") == 2
    assert w3.eth.get_transaction_count(acct(local, 7)) == n7


def test_keeper_dry_run_then_two_keepers_at_once(local):
    anvil, w3, chain = local.anvil, local.anvil.w3, local.chain
    e1 = chain.next_epoch()
    start = w3.eth.block_number + 1  # events after this point
    dry = local.runner.run("rebalance", *LOCAL, "--dry-run").ok()
    assert f"llm.cheap: would rebalance epoch {e1} (1 epoch(s) since the last)" in dry.out
    assert "gas" in dry.out and not rebalanced(local, CHEAP, start)

    # Two keepers for the same epoch, both sure it is due: hold mining until both
    # transactions are in the mempool, then mine them in one block.
    anvil.rpc("evm_setAutomine", [False])
    try:
        k1 = local.runner.popen("rebalance", *LOCAL, "--task", "llm.cheap", "--account", "TEST::7")
        k2 = local.runner.popen("rebalance", *LOCAL, "--task", "llm.cheap", "--account", "TEST::8")
        deadline = time.monotonic() + 120
        while int(anvil.rpc("txpool_status")["pending"], 16) < 2:
            assert k1.poll() is None and k2.poll() is None, finish(k1).text + finish(k2).text
            assert time.monotonic() < deadline, "keepers did not both send"
            time.sleep(0.05)
        anvil.rpc("evm_mine")
    finally:
        anvil.rpc("evm_setAutomine", [True])
    r1, r2 = finish(k1), finish(k2)
    r1.ok(), r2.ok()  # both succeed
    outs = [r1.out, r2.out]
    won = [o for o in outs if f"llm.cheap: rebalanced epoch {e1} (tx" in o]
    lost = [o for o in outs if f"llm.cheap: another keeper rebalanced epoch {e1} first" in o]
    assert len(won) == 1 and len(lost) == 1, outs
    assert "pool: rebalance not due" in lost[0]
    assert [e.args.epoch for e in rebalanced(local, CHEAP, start)] == [e1]
    block = w3.eth.get_block(w3.eth.block_number, full_transactions=True)
    statuses = sorted(w3.eth.get_transaction_receipt(t.hash).status for t in block.transactions)
    assert statuses == [0, 1]  # the second was refused by the pool, cheaply
    refused = next(w3.eth.get_transaction_receipt(t.hash) for t in block.transactions
                   if w3.eth.get_transaction_receipt(t.hash).status == 0)
    assert refused.gasUsed < 40_000


def test_keeper_loop_rebalances_every_epoch(local):
    w3, chain = local.anvil.w3, local.chain
    e1 = chain.epoch()
    start = w3.eth.block_number + 1  # events after this point
    p = local.runner.popen("rebalance", *LOCAL, "--loop", "--epochs", "2", "--poll", "0.3", "--account", "TEST::7")
    deadline = time.monotonic() + 120
    while chain.pool.pools(PREMIUM).call()[0] != e1 + 1:  # round 1: premium was still due
        assert p.poll() is None, finish(p).text
        assert time.monotonic() < deadline
        time.sleep(0.1)
    chain.next_epoch()
    res = finish(p, timeout=120).ok()
    assert f"epoch {e1} handled (1)" in res.out and f"epoch {e1 + 1} handled (2)" in res.out
    assert [e.args.epoch for e in rebalanced(local, PREMIUM, start)] == [e1, e1 + 1]
    assert [e.args.epoch for e in rebalanced(local, CHEAP, start)] == [e1 + 1]
    paid = rebalanced(local, CHEAP, start)[0].args
    assert paid.distributed > 0 and paid.to_escrow > 0  # sinks paid; the excess went to escrow


def test_claims_withdrawals_and_capacity_changes(local):
    w3, chain = local.anvil.w3, local.chain
    sink, funder, idle = acct(local, 2), acct(local, 5), acct(local, 9)
    owed = chain.pool.position(CHEAP, sink).call()[4]  # unclaimed
    escrowed = chain.escrow.balance_of(CHEAP, funder).call()
    assert owed > 0 and escrowed > 0
    bal_sink, bal_funder = chain.token.balanceOf(sink).call(), chain.token.balanceOf(funder).call()
    n_idle = w3.eth.get_transaction_count(idle)
    claim, nothing, withdraw, declare = local.runner.parallel(
        ("claim", *LOCAL, "--account", "TEST::2"),
        ("claim", *LOCAL, "--account", "TEST::9"),
        ("drain", *LOCAL, "--task", "llm.cheap", "--withdraw", "--account", "TEST::5"),
        ("register", *LOCAL, "--task", "llm.cheap", "--capacity", "100", "--add-bond", "20", "--account", "TEST::3"),
    )
    claim.ok(), nothing.ok(), withdraw.ok(), declare.ok()
    assert chain.token.balanceOf(sink).call() == bal_sink + owed
    assert chain.pool.position(CHEAP, sink).call()[4] == 0
    assert "nothing to claim; no transaction sent" in nothing.out
    assert w3.eth.get_transaction_count(idle) == n_idle
    assert chain.escrow.balance_of(CHEAP, funder).call() == 0
    assert chain.token.balanceOf(funder).call() == bal_funder + escrowed
    b = acct(local, 3)
    assert chain.registry.bonds(CHEAP, b).call()[0] == 120 * USDC
    assert chain.registry.sink_state(CHEAP, b).call()[1] == 100


def test_close_stream_and_status(local):
    w3, chain = local.anvil.w3, local.chain
    funder = acct(local, 5)
    before = chain.token.balanceOf(funder).call()
    close, table = local.runner.parallel(
        ("fund", *LOCAL, "--task", "llm.cheap", "--close", "--account", "TEST::5"),
        ("status", *LOCAL),
    )
    close.ok(), table.ok()
    st = chain.pool.stream_of(CHEAP, funder).call()
    assert st[1] == 0 and st[2] == 0  # rate, remaining
    assert chain.token.balanceOf(funder).call() > before and "refunded" in close.out
    n5 = w3.eth.get_transaction_count(funder)
    closed_again, js = local.runner.parallel(
        ("fund", *LOCAL, "--task", "llm.cheap", "--close", "--account", "TEST::5"),
        ("status", *LOCAL, "--json", "--me", acct(local, 2)),
    )
    closed_again.ok(), js.ok()
    assert "already closed" in closed_again.out and w3.eth.get_transaction_count(funder) == n5

    for word in ("llm.cheap", "llm.premium", "base fee", "escrow", "smoothed", "backlog", "share", "claimable"):
        assert word in table.out
    for i in (2, 3):
        a = acct(local, i)
        assert f"{a[:6]}…{a[-4:]}" in table.out
    data = json.loads(js.out)
    assert data["chain_id"] == 31337 and data["token"]["symbol"] == "pUSD"
    m = next(x for x in data["markets"] if x["task"] == "llm.cheap")
    assert m["base_fee"] == chain.pricing.base_fee(CHEAP).call()
    assert m["escrow"]["level"] == chain.escrow.level(CHEAP).call()
    assert m["escrow"]["max_level"] == 10_000 * USDC
    assert m["last_rebalanced_epoch"] == chain.pool.pools(CHEAP).call()[0] - 1
    assert [f["funder"] for f in m["funders"]] == [funder] and m["funders"][0]["remaining"] == 0
    rows = {r["sink"]: r for r in m["sinks"]}
    assert set(rows) == {acct(local, 2), acct(local, 3)} and rows[acct(local, 2)]["you"]
    total_units = 0
    for who, r in rows.items():
        pos = chain.pool.position(CHEAP, who).call()
        assert r["bond"] == chain.registry.bonds(CHEAP, who).call()[0]
        # Position = (slot, capacity, units, backlog, unclaimed, owed)
        assert r["weight_units"] == pos[2] and r["claimable"] == pos[4] + pos[5]
        assert r["price"] == chain.pricing.price(CHEAP, who).call()
        assert r["smoothed_capacity"] == pos[1] / TASK_SCALE
        total_units += pos[2]
    assert total_units > 0 and abs(sum(r["share"] for r in rows.values()) - 1) < 1e-9


def test_drain_escrow_into_spare_capacity_and_update_parameters(local, script_tmp):
    w3, chain = local.anvil.w3, local.chain
    # two quiet epochs: the last streamed money is settled, then the sinks have spare capacity
    for _ in range(2):
        chain.next_epoch()
        transact(local, "pool", "rebalance", CHEAP, sender=0)
    spare = chain.pool.pools(CHEAP).call()[3]
    assert spare > 0
    escrow_addr = local.record["contracts"]["escrow"]["address"]
    transact(local, "token", "approve", escrow_addr, 2 * USDC, sender=6)
    transact(local, "escrow", "deposit", CHEAP, 2 * USDC, sender=6)
    level = chain.escrow.level(CHEAP).call()
    changed = json.loads(_params_path().read_text())
    changed["task_types"][0]["max_fee"] = 2 * 10**12
    changed["task_types"][0]["escrow_max"] = 20_000 * USDC
    changed_file = script_tmp / "ethereum-local-changed.json"
    changed_file.write_text(json.dumps(changed))
    nonce = w3.eth.get_transaction_count(acct(local, 0))
    drain, refused = local.runner.parallel(
        ("drain", *LOCAL, "--task", "llm.cheap", "--account", "TEST::7"),
        ("deploy", *LOCAL, "--params", str(changed_file)),
    )
    drain.ok()
    moved = min(spare, level)
    assert chain.escrow.level(CHEAP).call() == level - moved
    exact = f"{moved / USDC:.6f}".rstrip("0").rstrip(".")  # the script prints every decimal
    assert f"drained {exact} pUSD" in drain.out.replace(",", "")
    # the deploy script refuses to change a live deployment without --update ...
    refused.failed("differs from", "pricing.configure(llm.cheap)", "escrow.set_max_level(llm.cheap)", "--update")
    assert chain.pricing.fees(CHEAP).call()[2] == 10**12
    assert w3.eth.get_transaction_count(acct(local, 0)) == nonce
    # ... and applies exactly those changes with it
    upd = local.runner.run("deploy", *LOCAL, "--params", str(changed_file), "--update").ok()
    assert "updating the live deployment" in upd.out and "2 transaction(s) sent" in upd.out
    assert w3.eth.get_transaction_count(acct(local, 0)) == nonce + 2
    assert chain.pricing.fees(CHEAP).call()[2] == 2 * 10**12
    assert chain.escrow.queues(CHEAP).call()[3] == 20_000 * USDC
    rec = load_json(local.path)
    assert rec["status"] == "complete" and rec["params"]["task_types"][0]["max_fee"] == 2 * 10**12


def test_redeploy_replaces_the_set_and_keeps_the_old_file(local):
    old = load_json(local.path)
    res = local.runner.run("deploy", *LOCAL, "--redeploy").ok()
    assert "fresh deployment" in res.out
    new = load_json(local.path)
    assert new["status"] == "complete"
    assert all(new["contracts"][n]["address"] != old["contracts"][n]["address"] for n in old["contracts"])
    kept = list(local.dep_dir.glob("ethereum-local.replaced-*.json"))
    assert len(kept) == 1 and load_json(kept[0])["contracts"] == old["contracts"]
    chain = Chain(local.anvil, new)
    assert chain.registry.pool().call() == new["contracts"]["pool"]["address"]
    # the old contracts are still there (a redeploy never touches them)
    assert bytes(local.anvil.w3.eth.get_code(old["contracts"]["pool"]["address"]))


def _params_path():
    from .conftest import REPO

    return REPO / "deployments" / "params" / "ethereum-local.json"
