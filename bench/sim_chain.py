"""The deployed contracts on a local anvil as a simulation backend (web3.py, no ape provider).

`Anvil` starts and stops our own anvil process (by PID). `ChainBackend` deploys the five
contracts from the artifacts `ape compile` writes to .build/__local__.json, in the order and
with the constructor arguments of pura/deploy.py, and then offers the same call surface as
`bench.sim_ours.ModelBackend`, so `bench.sim_ours.Driver` can play one scenario on both:

- every call is a real transaction: streams (`fund`), relayed attestation batches
  (`submit_attestations`, EIP-712 signed by the sinks), dual-signed receipt batches
  (`submit_receipts`, signed by the sink and the source with pura/signing.py), `rebalance`
  and `claim`;
- anvil runs with `--no-mining --order fifo`: a block's transactions are queued in order and
  mined together at the block's timestamp by `evm_mine`, so the chain's clock is exactly
  the driver's;
- the views the driver needs to size receipts (what each sink will be paid, each source's
  funding room) are computed from the contracts' raw views at the coming block's timestamp,
  as a gateway would;
- rebalance results come from the `Rebalanced` / `Allocations` events.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from eth_account import Account
from eth_utils import keccak
from web3 import Web3
from web3.logs import DISCARD

from bench.sim_model import TaskCfg
from pura.layout import absorbable, decode_hot
from pura.signing import Attestation, Receipt, task_type_id

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / ".build" / "__local__.json"
ANVIL = REPO / "node_modules" / ".bin" / "anvil"
GAS = 15_000_000
DEPLOYER = Web3.to_checksum_address("0x" + "d0" * 20)
TREASURY = Web3.to_checksum_address("0x" + "7e" * 20)


def artifacts_stale() -> list[str]:
    """Contract sources whose text differs from what the last `ape compile` built (the
    artifacts keep each source's content); empty when the artifacts are current."""
    if not ARTIFACTS.exists():
        return ["(no .build/__local__.json: run `ape compile`)"]
    built = json.loads(ARTIFACTS.read_text()).get("sources", {})
    out = []
    for path in sorted((REPO / "contracts").rglob("*.vy*")):
        rel = str(path.relative_to(REPO))
        if rel not in built or built[rel].get("content") != path.read_text():
            out.append(rel)
    return out


def ensure_artifacts() -> None:
    """Compile with ape when the artifacts are missing or older than the sources (a clean
    clone has no .build/ yet); raise if they are still stale afterwards."""
    if not artifacts_stale():
        return
    ape = Path(sys.executable).with_name("ape")
    subprocess.run([str(ape) if ape.exists() else "ape", "compile"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    stale = artifacts_stale()
    if stale:
        raise RuntimeError(f"`ape compile` left stale artifacts for {stale}")


PROTOCOL = ("TestToken", "CapacityRegistry", "PricingCurve", "EscrowBuffer", "BackpressurePool", "CompletionTracker")


def load_artifacts(names: tuple[str, ...] = PROTOCOL) -> dict:
    """ABI and deployment bytecode per contract, from `ape compile`'s output."""
    d = json.loads(ARTIFACTS.read_text())["contractTypes"]
    out = {}
    for name in names:
        c = d[name]
        out[name] = {"abi": c["abi"], "bytecode": c["deploymentBytecode"]["bytecode"]}
    return out


class Anvil:
    """Our own anvil process on a free port; stopped by its PID."""

    def __init__(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.proc = subprocess.Popen(
            [str(ANVIL), "--port", str(self.port), "--silent", "--no-mining", "--order", "fifo",
             "--auto-impersonate", "--hardfork", "prague", "--gas-limit", "2000000000", "--chain-id", "31337"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.w3 = Web3(Web3.HTTPProvider(self.url, request_kwargs={"timeout": 120}))
        # a local dev chain: no ENS lookups, and no chain-id round trip before every call
        for name in ("validation", "ens_name_to_address", "gas_price_strategy", "gas_estimate"):
            self.w3.middleware_onion.remove(name)
        for _ in range(400):
            try:
                self.w3.eth.block_number
                break
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError("anvil exited")
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError("anvil did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def deploy_now(w3: Web3, artifact: dict, *args):
    """Deploys one contract from DEPLOYER and mines it at once (for helpers and tests)."""
    w3.provider.make_request("anvil_setBalance", [DEPLOYER, hex(10**24)])
    c = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    h = c.constructor(*args).transact({"from": DEPLOYER, "gas": GAS})
    r = w3.provider.make_request("evm_mine", [])
    assert "error" not in r, r
    rc = w3.eth.get_transaction_receipt(h)
    assert rc.status == 1
    return w3.eth.contract(address=rc.contractAddress, abi=artifact["abi"])


def actor_key(name: str) -> str:
    """A deterministic private key per simulated actor (sinks and sources sign EIP-712)."""
    return "0x" + keccak(text=f"pura-sim/{name}").hex()


class ChainBackend:
    """The deployed protocol as a Driver backend."""

    def __init__(self, w3: Web3, params, *, start_time: int | None = None, unbonding_period: int = 7 * 86400,
                 escrow_min_deposit: int = 10**6):
        self.w3 = w3
        self.p = params
        self.art = load_artifacts()
        self.chain_id = w3.eth.chain_id
        self.addr: dict[str, str] = {}
        self.keys: dict[str, str] = {}
        self.tids: dict[str, bytes] = {}
        self.nonce_src: dict[str, int] = {}
        self.nonce_att: dict[str, int] = {}
        self.slots: dict[str, list[str]] = {}
        self.sources: dict[str, list[str]] = {}
        self._pending: list[tuple[str, bytes]] = []
        self._rebalances: list[tuple[str, bytes, dict]] = []
        self._claimed: set[tuple[str, str]] = set()
        self.txs = 0
        self.gas_used = 0
        now = start_time or (w3.eth.get_block("latest").timestamp + 1000)
        self._fund_eth(DEPLOYER)
        self.ts = now
        self.token = self._deploy("TestToken", "Pura Sim USD", "pSIM", 6)
        self.registry = self._deploy("CapacityRegistry", self.token.address, params.epoch_length, params.alpha_wad,
                                     unbonding_period, TREASURY)
        self.genesis = self.registry.functions.GENESIS().call()
        self.pricing = self._deploy("PricingCurve", self.registry.address)
        self.escrow = self._deploy("EscrowBuffer", self.registry.address, escrow_min_deposit)
        self.pool = self._deploy("BackpressurePool", self.registry.address, self.pricing.address,
                                 self.escrow.address, params.tolerance_bps, params.min_funding)
        self.tracker = self._deploy("CompletionTracker", self.registry.address, self.pool.address,
                                    params.slash_bps, params.slash_threshold_bps)
        self._block_now(
            self.registry.functions.wire(self.pool.address, self.tracker.address),
            self.pool.functions.wire(self.tracker.address),
            self.pricing.functions.wire(self.pool.address, self.escrow.address),
            self.escrow.functions.wire(self.pool.address),
        )
        if (params.target_util_bps, params.max_step_bps) != (8_000, 1_250):  # the constructor's defaults
            self._block_now(self.pricing.functions.set_params(params.target_util_bps, params.max_step_bps,
                                                              10_000, 30_000, 8_000))
        if params.drain_bps != 10_000:
            self._block_now(self.pool.functions.set_params(params.tolerance_bps, params.min_funding, params.drain_bps))
        self.now = self.ts

    # ---------------------------------------------------------- plumbing
    def _fund_eth(self, who: str):
        self.w3.provider.make_request("anvil_setBalance", [who, hex(10**24)])

    def _deploy(self, name: str, *args):
        c = self.w3.eth.contract(abi=self.art[name]["abi"], bytecode=self.art[name]["bytecode"])
        h = c.constructor(*args).transact({"from": DEPLOYER, "gas": GAS})
        self._mine(self.ts)
        self.ts += 1
        r = self.w3.eth.get_transaction_receipt(h)
        assert r.status == 1, f"deploy {name} failed"
        return self.w3.eth.contract(address=r.contractAddress, abi=self.art[name]["abi"])

    def _block_now(self, *calls):
        hs = [c.transact({"from": DEPLOYER, "gas": GAS}) for c in calls]
        self._mine(self.ts)
        self.ts += 1
        for h in hs:
            assert self.w3.eth.get_transaction_receipt(h).status == 1

    def _mine(self, ts: int):
        r = self.w3.provider.make_request("evm_mine", [ts])
        if "error" in r:
            raise RuntimeError(r["error"])

    def _send(self, what: str, call, sender: str):
        h = call.transact({"from": sender, "gas": GAS})
        self._pending.append((what, h))
        return h

    def _who(self, name: str) -> str:
        if name not in self.addr:
            key = actor_key(name)
            self.keys[name] = key
            self.addr[name] = Account.from_key(key).address
            self._fund_eth(self.addr[name])
        return self.addr[name]

    # ---------------------------------------------------------- blocks
    def begin_block(self, timestamp: int):
        assert timestamp > self.now, "blocks move forward"
        self.now = timestamp
        self._pending, self._rebalances, self._claimed = [], [], set()

    def end_block(self) -> dict:
        self._mine(self.now)
        block = self.w3.eth.get_block("latest")
        assert block.timestamp == self.now
        failed = []
        for what, h in self._pending:
            r = self.w3.eth.get_transaction_receipt(h)
            self.txs += 1
            self.gas_used += r.gasUsed
            if r.status != 1:
                failed.append(what)
            if r.blockNumber != block.number:
                failed.append(f"{what}: not mined in the block at {self.now}")
        if failed:
            raise RuntimeError(f"transactions failed in block at {self.now}: {failed}")
        out = {}
        for tt, h, before in self._rebalances:
            r = self.w3.eth.get_transaction_receipt(h)
            ev = self.pool.events.Rebalanced().process_receipt(r, errors=DISCARD)[0]["args"]
            words = self.pool.events.Allocations().process_receipt(r, errors=DISCARD)[0]["args"]["words"]
            tid = self.tids[tt]
            out[tt] = {
                "paid": [(w >> 160) - before[i] for i, w in enumerate(words)],
                "units": [decode_hot(w).units for w in words],
                "backlog": [decode_hot(w).x for w in words],
                "inflow": ev["inflow"], "to_escrow": ev["to_escrow"], "stalled": ev["stalled"],
                "drained": ev["drained"], "fee": ev["fee"], "distributed": ev["distributed"],
                "new_fee": self.pricing.functions.base_fee(tid).call(),
                "level": self.escrow.functions.level(tid).call(),
            }
        return out

    # ---------------------------------------------------------- setup
    def create_task_type(self, tt: str, cfg: TaskCfg):
        tid = task_type_id(tt)
        self.tids[tt] = tid
        self.slots[tt] = []
        self.sources[tt] = []
        self._send("create_task_type", self.registry.functions.create_task_type(tid, cfg.min_bond, cfg.stake_per_unit),
                   DEPLOYER)
        self._send("configure", self.pricing.functions.configure(tid, cfg.base_fee, cfg.min_fee, cfg.max_fee), DEPLOYER)
        self._send("set_max_level", self.escrow.functions.set_max_level(tid, cfg.escrow_max), DEPLOYER)

    def mint(self, who: str, amount: int):
        a = self._who(who)
        self._send("mint", self.token.functions.mint(a, amount), DEPLOYER)
        for spender in (self.registry, self.pool, self.escrow):
            self._send("approve", self.token.functions.approve(spender.address, 2**256 - 1), a)

    def register_sink(self, tt: str, sink: str, bond: int, capacity: int):
        self.slots[tt].append(sink)
        self._send("register_sink", self.registry.functions.register_sink(self.tids[tt], bond, capacity),
                   self._who(sink))

    # ---------------------------------------------------------- per epoch
    def declare(self, tt: str, decls: list[tuple[str, int]]):
        tid = self.tids[tt]
        entries = []
        for sink, cap in decls:
            n = self.nonce_att.get(sink, 0) + 1
            self.nonce_att[sink] = n
            a = Attestation(tid, self._who(sink), cap, n, self.now + 3600)
            entries.append(a.as_call_arg(a.sign(self.keys[sink], self.chain_id, self.registry.address)))
        for k in range(0, len(entries), 64):
            self._send("submit_attestations", self.registry.functions.submit_attestations(tid, entries[k:k + 64]),
                       DEPLOYER)

    def fund(self, tt: str, funder: str, amount: int, rate: int):
        a = self._who(funder)
        if funder not in self.sources[tt]:
            self.sources[tt].append(funder)
        self._send("fund", self.pool.functions.fund(self.tids[tt], amount, rate), a)

    def _streams(self, tid: bytes) -> list[tuple]:
        n = self.pool.functions.stream_count(tid).call()
        return [self.pool.functions.streams(tid, j).call() for j in range(n)]

    def predict_pay(self, tt: str) -> list[int]:
        tid = self.tids[tt]
        last_p1, pending, total_units, _spare, _fee = self.pool.functions.pools(tid).call()
        if total_units == 0:
            return [0] * len(self.slots[tt])
        now = self.now
        pot = pending + sum(min(rem, rate * (now - last)) for _f, rate, rem, last, _c in self._streams(tid))
        epoch = (now - self.genesis) // self.p.epoch_length
        n = min(epoch + 1 - last_p1, 255) if last_p1 else 1
        fee = self.pricing.functions.base_fee(tid).call()
        to_sinks = min(pot, absorbable(total_units, fee, n))
        units = [decode_hot(self.pool.functions.hot_word(tid, i).call()).units for i in range(len(self.slots[tt]))]
        return [to_sinks * u // total_units for u in units]

    def funder_room(self, tt: str, funder: str) -> int:
        tid = self.tids[tt]
        a = self._who(funder)
        funded, credited = self.pool.functions.credit_of(tid, a).call()
        for f, rate, rem, last, _c in self._streams(tid):
            if f == a:
                funded += min(rem, rate * (self.now - last))
        return max(0, funded - credited)

    def fee(self, tt: str) -> int:
        return self.pricing.functions.base_fee(self.tids[tt]).call()

    def submit_receipts(self, tt: str, receipts: list[tuple[str, str, int]]):
        tid = self.tids[tt]
        tracker = self.tracker.address
        args = []
        for sink, source, amount in receipts:
            nonce = self.nonce_src.get(source, 0)
            self.nonce_src[source] = nonce + 1
            r = Receipt(tid, self._who(sink), self._who(source), nonce.to_bytes(32, "big"), amount,
                        keccak(text=f"{sink}/{nonce}"), nonce, self.now + 86400)
            args.append(r.as_call_arg(r.sign(self.keys[sink], self.chain_id, tracker),
                                      r.sign(self.keys[source], self.chain_id, tracker)))
        for k in range(0, len(args), 64):
            self._send("submit_receipts", self.tracker.functions.submit_receipts(tid, args[k:k + 64]), DEPLOYER)

    def rebalance(self, tt: str):
        tid = self.tids[tt]
        before = []
        for i, sink in enumerate(self.slots[tt]):
            u = self.pool.functions.hot_word(tid, i).call() >> 160
            before.append(0 if (tt, sink) in self._claimed else u)
        h = self._send("rebalance", self.pool.functions.rebalance(tid), DEPLOYER)
        self._rebalances.append((tt, h, before))

    def unclaimed(self, tt: str, sink: str) -> int:
        return self.pool.functions.hot_word(self.tids[tt], self.slots[tt].index(sink)).call() >> 160

    def claim(self, tt: str, sink: str):
        self._claimed.add((tt, sink))
        self._send("claim", self.pool.functions.claim(self.tids[tt]), self._who(sink))

    # ---------------------------------------------------------- invariants
    def conservation(self) -> dict[str, int]:
        """The contracts' money invariants on chain, as differences that must be 0."""
        bal = lambda a: self.token.functions.balanceOf(a).call()  # noqa: E731
        tids = list(self.tids.values())
        liab = sum(self.pool.functions.liabilities(t).call() for t in tids)
        held = self.escrow.functions.total_held().call()
        levels = sum(self.escrow.functions.level(t).call() for t in tids)
        bonded = self.registry.functions.total_bonded().call()
        treasury = self.registry.functions.treasury_accrued().call()
        holders = [DEPLOYER, TREASURY, self.pool.address, self.escrow.address, self.registry.address,
                   *self.addr.values()]
        return {
            "pool_balance_minus_liabilities": bal(self.pool.address) - liab,
            "escrow_balance_minus_held": bal(self.escrow.address) - held,
            "escrow_held_minus_levels": held - levels,
            "registry_balance_minus_bonds_and_treasury": bal(self.registry.address) - bonded - treasury,
            "supply_minus_sum_of_balances": self.token.functions.totalSupply().call() - sum(bal(h) for h in holders),
        }

    def ledger(self) -> dict[str, int]:
        """Per-holder token balances and per-market liabilities (compared with the model's)."""
        bal = lambda a: self.token.functions.balanceOf(a).call()  # noqa: E731
        out = {f"balance:{name}": bal(a) for name, a in self.addr.items()}
        out["balance:pool"] = bal(self.pool.address)
        out["balance:escrow"] = bal(self.escrow.address)
        out["balance:registry"] = bal(self.registry.address)
        for tt, tid in self.tids.items():
            out[f"liabilities:{tt}"] = self.pool.functions.liabilities(tid).call()
            out[f"escrow_level:{tt}"] = self.escrow.functions.level(tid).call()
        out["total_bonded"] = self.registry.functions.total_bonded().call()
        out["treasury_accrued"] = self.registry.functions.treasury_accrued().call()
        return out
