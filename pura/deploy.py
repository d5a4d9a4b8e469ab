"""Deploy and wire the five Pura contracts (ape-based; used by scripts, tests, demos).

Order: [TestToken] -> CapacityRegistry -> PricingCurve -> EscrowBuffer -> BackpressurePool
-> CompletionTracker, then one-time wiring (registry <- pool, tracker; pool <- tracker;
pricing <- pool, escrow; escrow <- pool) and per task type configuration.

Two entry points:

* `deploy_protocol(project, deployer, params, token=None, treasury=None)`: the in-process
  deployment the test suites, benchmarks and the demo use (ape's own senders, no files).
* `DeployRun`: what `ape run deploy` drives. The same order, but every step is a
  *checked* step (it reads the chain to see whether it is already done), each transaction
  is journalled in `deployments/<ecosystem>-<network>.json` before it is broadcast and
  recorded once confirmed, so a run that stops anywhere (a failed transaction, no gas
  money, a killed process) resumes without redeploying what exists, and a re-run of a
  finished deployment sends nothing. The run ends by reading every address, role and
  parameter back from the chain (`verify_deployment`).

The deployment file (format `pura-deployment/1`) is the one place the operating scripts
and the gateway read addresses from; `docs/deploy.md` documents its fields.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from eth_utils import keccak, to_checksum_address

from pura.params import REPO, PricingParams, ProtocolParams, TaskTypeParams
from pura.signing import task_type_id

FORMAT = "pura-deployment/1"
ZERO = "0x0000000000000000000000000000000000000000"

# name in the deployment file -> contract type, in deployment order
CONTRACT_TYPES: dict[str, str] = {
    "token": "TestToken",
    "registry": "CapacityRegistry",
    "pricing": "PricingCurve",
    "escrow": "EscrowBuffer",
    "pool": "BackpressurePool",
    "tracker": "CompletionTracker",
}
PROTOCOL_CONTRACTS = ("registry", "pricing", "escrow", "pool", "tracker")
TEST_TOKEN_NAME, TEST_TOKEN_SYMBOL = "Pura Test USD", "pUSD"


# ====================================================================== in-process API


@dataclass
class Protocol:
    token: Any
    registry: Any
    pricing: Any
    escrow: Any
    pool: Any
    tracker: Any

    def contracts(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "registry": self.registry,
            "pricing": self.pricing,
            "escrow": self.escrow,
            "pool": self.pool,
            "tracker": self.tracker,
        }


def deploy_protocol(project, deployer, params: ProtocolParams, token=None, treasury: str | None = None) -> Protocol:
    """Deploys everything in dependency order, wires it and configures the task types."""
    if token is None:
        token = deployer.deploy(project.TestToken, TEST_TOKEN_NAME, TEST_TOKEN_SYMBOL, params.token_decimals)
    treasury = treasury or params.treasury or deployer.address
    registry = deployer.deploy(
        project.CapacityRegistry,
        token,
        params.epoch_length,
        params.alpha_wad,
        params.unbonding_period,
        treasury,
    )
    pricing = deployer.deploy(project.PricingCurve, registry)
    escrow = deployer.deploy(project.EscrowBuffer, registry, params.escrow_min_deposit)
    pool = deployer.deploy(
        project.BackpressurePool, registry, pricing, escrow, params.tolerance_bps, params.min_funding
    )
    tracker = deployer.deploy(
        project.CompletionTracker, registry, pool, params.slash_bps, params.slash_threshold_bps
    )
    registry.wire(pool, tracker, sender=deployer)
    pool.wire(tracker, sender=deployer)
    pricing.wire(pool, escrow, sender=deployer)
    escrow.wire(pool, sender=deployer)
    if params.drain_bps != 10_000:
        pool.set_params(params.tolerance_bps, params.min_funding, params.drain_bps, sender=deployer)
    if params.pricing != PricingParams():
        pricing.set_params(*_pricing_tuple(params.pricing), sender=deployer)
    proto = Protocol(token, registry, pricing, escrow, pool, tracker)
    for tt in params.task_types:
        configure_task_type(proto, deployer, tt)
    return proto


def configure_task_type(proto: Protocol, owner, tt) -> bytes:
    tid = task_type_id(tt.name)
    proto.registry.create_task_type(tid, tt.min_bond, tt.stake_per_unit, sender=owner)
    proto.pricing.configure(tid, tt.base_fee, tt.min_fee, tt.max_fee, sender=owner)
    proto.escrow.set_max_level(tid, tt.escrow_max, sender=owner)
    return tid


def _pricing_tuple(p: PricingParams) -> tuple[int, int, int, int, int]:
    return (p.target_util_bps, p.max_step_bps, p.congestion_bps, p.max_congestion_bps, p.escrow_bps)


# ====================================================================== errors


class DeploymentError(Exception):
    """A failure the user can act on; the message says what happened and what to do."""


class TxFailed(DeploymentError):
    """A transaction reverted (before or after broadcast) or could not be paid for."""

    def __init__(self, label: str, reason: str, *, tx: str | None = None, broadcast: bool = False):
        self.label, self.reason, self.tx, self.broadcast = label, reason, tx, broadcast
        where = f" (tx {tx}, mined and reverted)" if broadcast else " (nothing was sent)"
        super().__init__(f"{label} reverted: {reason}{where}")


class InsufficientFunds(DeploymentError):
    pass


class ConfirmationTimeout(DeploymentError):
    pass


# ====================================================================== files


def deployments_dir() -> Path:
    """`deployments/` of the repository, or `$PURA_DEPLOYMENTS_DIR` (tests, other checkouts)."""
    override = os.environ.get("PURA_DEPLOYMENTS_DIR")
    return Path(override) if override else REPO / "deployments"


def deployment_path(ecosystem: str, network: str, directory: Path | None = None) -> Path:
    from pura.params import network_key

    return (directory or deployments_dir()) / f"{network_key(ecosystem, network)}.json"


def load_deployment(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except json.JSONDecodeError as err:
        raise DeploymentError(f"{path} is not valid JSON ({err}); restore it from version control or move it away") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DeploymentError(f"{path} is not a Pura deployment file (expected format {FORMAT!r})")
    return data


def save_deployment(path: Path, data: dict) -> None:
    """Atomic write: a crash never leaves a truncated deployment file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def archive_deployment(path: Path) -> Path:
    """Moves a replaced deployment file aside (never deletes it: it holds live addresses)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.stem}.replaced-{stamp}.json")
    os.replace(path, target)
    return target


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


# ====================================================================== digests, reading


def hex32(b: bytes) -> str:
    return "0x" + bytes(b).hex()


def digest(data: bytes) -> str:
    return hex32(keccak(bytes(data)))


def runtime_code(container) -> bytes:
    """The compiled runtime bytecode of a contract type (without Vyper's immutables, which
    the deployed code appends)."""
    code = container.contract_type.runtime_bytecode.bytecode or "0x"
    return bytes.fromhex(code[2:] if code.startswith("0x") else code)


def abi_digest(container) -> str:
    abi = [a.model_dump(mode="json", by_alias=True) for a in container.contract_type.abi]
    return hex32(keccak(text=json.dumps(abi, sort_keys=True, separators=(",", ":"))))


def chain_code(provider, address: str) -> bytes:
    return bytes(provider.get_code(address))


def code_problems(project, provider, name: str, entry: dict) -> list[str]:
    """Whether the recorded contract is on this chain, unchanged, and built from the
    current sources."""
    address = entry["address"]
    code = chain_code(provider, address)
    if not code:
        return [f"{name}: no code at {address}"]
    out = []
    if digest(code) != entry.get("code_digest"):
        out.append(f"{name}: the code at {address} differs from the recorded code_digest")
    container = getattr(project, entry.get("contract") or CONTRACT_TYPES[name])
    runtime = runtime_code(container)
    if digest(runtime) != entry.get("runtime_digest"):
        out.append(
            f"{name}: contracts/{entry.get('contract')}.vy changed since this deployment "
            f"(build {digest(runtime)[:10]}, deployed {str(entry.get('runtime_digest'))[:10]})"
        )
    elif not code.startswith(runtime):
        out.append(f"{name}: the code at {address} is not the recorded build")
    return out


def protocol_at(project, record: dict) -> Protocol:
    """ContractInstances at a deployment's recorded addresses (token: the settlement token,
    with the TestToken ABI, which is a plain snekmate ERC-20)."""
    c = record["contracts"]
    return Protocol(
        token=project.TestToken.at(record["settlement_token"]["address"]),
        registry=project.CapacityRegistry.at(c["registry"]["address"]),
        pricing=project.PricingCurve.at(c["pricing"]["address"]),
        escrow=project.EscrowBuffer.at(c["escrow"]["address"]),
        pool=project.BackpressurePool.at(c["pool"]["address"]),
        tracker=project.CompletionTracker.at(c["tracker"]["address"]),
    )


def verify_deployment(project, provider, record: dict, params: ProtocolParams | None = None) -> tuple[int, list[str]]:
    """Reads every address, role and parameter of a deployment back from the chain.
    Returns (number of checks, problems). `params` defaults to the recorded ones."""
    params = params or ProtocolParams.from_json(record["params"])
    problems: list[str] = []
    checks = 0

    def eq(label: str, actual, expected):
        nonlocal checks
        checks += 1
        if isinstance(actual, str) and isinstance(expected, str):
            ok = actual.lower() == expected.lower()
        else:
            ok = actual == expected
        if not ok:
            problems.append(f"{label}: chain has {actual!r}, expected {expected!r}")

    eq("chain id", provider.chain_id, record["chain_id"])
    for name, entry in record["contracts"].items():
        checks += 1
        problems += code_problems(project, provider, name, entry)
    if problems:
        return checks, problems
    p = protocol_at(project, record)
    a = {k: v["address"] for k, v in record["contracts"].items()}
    token = record["settlement_token"]["address"]
    owner = record["owner"]
    treasury = params.treasury or record["deployer"]

    eq("registry.TOKEN", p.registry.TOKEN(), token)
    eq("pool.TOKEN", p.pool.TOKEN(), token)
    eq("escrow.TOKEN", p.escrow.TOKEN(), token)
    eq("registry.pool", p.registry.pool(), a["pool"])
    eq("registry.tracker", p.registry.tracker(), a["tracker"])
    eq("pool.REGISTRY", p.pool.REGISTRY(), a["registry"])
    eq("pool.PRICING", p.pool.PRICING(), a["pricing"])
    eq("pool.ESCROW", p.pool.ESCROW(), a["escrow"])
    eq("pool.tracker", p.pool.tracker(), a["tracker"])
    eq("pricing.REGISTRY", p.pricing.REGISTRY(), a["registry"])
    eq("pricing.pool", p.pricing.pool(), a["pool"])
    eq("pricing.escrow", p.pricing.escrow(), a["escrow"])
    eq("escrow.REGISTRY", p.escrow.REGISTRY(), a["registry"])
    eq("escrow.pool", p.escrow.pool(), a["pool"])
    eq("tracker.REGISTRY", p.tracker.REGISTRY(), a["registry"])
    eq("tracker.POOL", p.tracker.POOL(), a["pool"])
    for name in PROTOCOL_CONTRACTS:
        eq(f"{name}.owner", getattr(p, name).owner(), owner)
    eq("registry.EPOCH_LENGTH", p.registry.EPOCH_LENGTH(), params.epoch_length)
    eq("pool.EPOCH_LENGTH", p.pool.EPOCH_LENGTH(), params.epoch_length)
    eq("pool.GENESIS", p.pool.GENESIS(), p.registry.GENESIS())
    eq("registry.ALPHA_WAD", p.registry.ALPHA_WAD(), params.alpha_wad)
    eq("registry.UNBONDING_PERIOD", p.registry.UNBONDING_PERIOD(), params.unbonding_period)
    eq("registry.treasury", p.registry.treasury(), treasury)
    eq("pool.tolerance_bps", p.pool.tolerance_bps(), params.tolerance_bps)
    eq("pool.min_funding", p.pool.min_funding(), params.min_funding)
    eq("pool.drain_bps", p.pool.drain_bps(), params.drain_bps)
    eq("escrow.min_deposit", p.escrow.min_deposit(), params.escrow_min_deposit)
    eq("tracker.slash_bps", p.tracker.slash_bps(), params.slash_bps)
    eq("tracker.slash_threshold_bps", p.tracker.slash_threshold_bps(), params.slash_threshold_bps)
    eq("pricing.params", tuple(p.pricing.params()), _pricing_tuple(params.pricing))
    eq("token.decimals", p.token.decimals(), params.token_decimals)
    if params.token_symbol:
        eq("token.symbol", p.token.symbol(), params.token_symbol)
    for tt in params.task_types:
        tid = task_type_id(tt.name)
        eq(f"task {tt.name} id", record["task_types"].get(tt.name), hex32(tid))
        t = p.registry.task_types(tid)
        eq(f"task {tt.name} registry (min_bond, stake_per_unit)", (t.min_bond, t.stake_per_unit), (tt.min_bond, tt.stake_per_unit))
        f = p.pricing.fees(tid)
        eq(f"task {tt.name} pricing (min_fee, max_fee)", (f.min_fee, f.max_fee), (tt.min_fee, tt.max_fee))
        eq(f"task {tt.name} escrow max_level", p.escrow.queues(tid).max_level, tt.escrow_max)
    return checks, problems


# ====================================================================== sending


@dataclass
class Sender:
    """Sends one transaction at a time: simulate (gas estimate: a revert is reported with
    the contract's message and nothing is sent), sign, journal the hash, broadcast, wait for
    the receipt and for `confirmations` further blocks (bounded by `timeout` seconds)."""

    account: Any
    provider: Any
    confirmations: int = 0
    timeout: float = 120.0
    poll: float = 0.25
    # Gas limit = estimate * margin + headroom. Estimates run against the latest block, but
    # time-dependent work (a stream that has started flowing by the time the transaction
    # is mined, an overflow to escrow) can double a rebalance's cost. An unused limit costs
    # nothing on EIP-1559 chains; running out of gas costs the whole attempt.
    gas_margin: float = 2.0
    gas_headroom: int = 100_000

    def __post_init__(self):
        # tx hash -> chain head when its confirmations were seen (recorded by the deploy run)
        self.confirmed_at: dict[str, int] = {}

    def send(self, txn, label: str, journal: Callable[[str, int], None] | None = None):
        from ape.exceptions import AccountsError, ContractLogicError, TransactionError
        from eth_utils import to_hex

        txn.sender = self.account.address
        txn.required_confirmations = 0  # we wait for confirmations ourselves, with a timeout
        try:
            gas = self.provider.estimate_gas_cost(txn)
        except (ContractLogicError, TransactionError) as err:
            reason = revert_reason(err)
            if "insufficient funds" in reason.lower():
                raise InsufficientFunds(
                    f"{label}: account {self.account.address} cannot pay for gas (balance "
                    f"{fmt_eth(self.account.balance)} ETH)"
                ) from None
            raise TxFailed(label, reason) from None
        txn.gas_limit = min(int(gas * self.gas_margin) + self.gas_headroom, self.provider.max_gas)
        try:
            txn = self.account.prepare_transaction(txn)
        except AccountsError as err:
            if "balance" in str(err):
                cost = (txn.max_fee or txn.gas_price or 0) * (txn.gas_limit or 0)
                raise InsufficientFunds(
                    f"{label}: account {self.account.address} cannot pay for gas: balance "
                    f"{fmt_eth(self.account.balance)} ETH, this transaction may cost up to "
                    f"{fmt_eth(cost)} ETH"
                ) from None
            raise DeploymentError(f"{label}: {err}") from None
        signed = self.account.sign_transaction(txn)
        if signed is None:
            raise DeploymentError(f"{label}: the account did not sign the transaction")
        tx_hash = to_hex(signed.txn_hash)
        if journal:
            journal(tx_hash, signed.nonce)
        try:
            receipt = self.provider.send_transaction(signed)
        except TransactionError as err:  # ContractLogicError included: mined and reverted
            raise TxFailed(label, self._mined_reason(err, tx_hash, txn), tx=tx_hash, broadcast=True) from None
        if receipt.block_number is None or receipt.block_number < 0:
            # ape does not wait when the node mines on an interval or on demand (anvil
            # --block-time / --no-mining): wait for the real receipt here
            receipt = self._await_mined(tx_hash, label)
        if receipt.failed:
            raise TxFailed(label, self._mined_reason(None, tx_hash, txn), tx=tx_hash, broadcast=True)
        self.confirm(receipt, label)
        return receipt

    def _await_mined(self, tx_hash: str, label: str):
        from web3.exceptions import TimeExhausted

        try:
            self.provider.web3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=self.timeout, poll_latency=min(self.poll, 0.5))
        except TimeExhausted:
            raise ConfirmationTimeout(
                f"{label}: tx {tx_hash} was not mined within {self.timeout:.0f} s; it may still be "
                "pending (re-run to resume)"
            ) from None
        return self.provider.get_receipt(tx_hash, required_confirmations=0)

    def _mined_reason(self, err, tx_hash: str, txn) -> str:
        """Why a mined transaction failed: out of gas, or the revert message of a replay
        (eth_call of the same call on the state its block left)."""
        w3 = self.provider.web3
        try:
            r = w3.eth.get_transaction_receipt(tx_hash)
        except Exception:  # noqa: BLE001
            r = None
        if r is not None and txn.gas_limit and r["gasUsed"] >= txn.gas_limit:
            return f"out of gas (used all of the {txn.gas_limit:,} gas limit)"
        known = revert_reason(err) if err is not None else ""
        if known and known not in ("Transaction failed.", "transaction failed"):
            return known
        if r is not None:
            call = {"from": self.account.address, "to": txn.receiver, "data": to_hex_bytes(txn.data),
                    "value": txn.value or 0, "gas": txn.gas_limit}
            try:
                w3.eth.call(call, block_identifier=r["blockNumber"])
            except Exception as replay:  # noqa: BLE001 - web3's ContractLogicError & co.
                msg = getattr(replay, "message", None) or str(replay)
                msg = msg.removeprefix("execution reverted: ").removeprefix("execution reverted")
                if msg.strip():
                    return msg.strip()
        return known or "transaction reverted (no reason given)"

    def confirm(self, receipt, label: str = "transaction") -> int:
        """Waits until `confirmations` blocks sit on top of the receipt's block; returns the
        head block number seen. Fails (never hangs) after `timeout` seconds."""
        need = self.confirmations
        if need <= 0:
            self.confirmed_at[receipt.txn_hash] = receipt.block_number
            return receipt.block_number
        deadline = time.monotonic() + self.timeout
        while True:
            head = self.provider.get_block("latest").number
            if head - receipt.block_number >= need:
                break
            if time.monotonic() > deadline:
                raise ConfirmationTimeout(
                    f"{label}: tx {receipt.txn_hash} is in block {receipt.block_number} but the "
                    f"chain head is still {head} after {self.timeout:.0f} s ({need} confirmation(s) "
                    "required). Is the node producing blocks?"
                )
            time.sleep(self.poll)
        # the receipt must still be canonical after the confirmations (no reorg dropped it)
        again = self.provider.web3.eth.get_transaction_receipt(receipt.txn_hash)
        if again is None or again["blockNumber"] != receipt.block_number:
            raise DeploymentError(f"{label}: tx {receipt.txn_hash} was reorganised out; re-run to resume")
        self.confirmed_at[receipt.txn_hash] = head
        return head


def revert_reason(err) -> str:
    msg = getattr(err, "revert_message", None) or str(err) or type(err).__name__
    msg = msg.strip()
    if msg.startswith("revert: "):
        msg = msg[8:]
    return msg.splitlines()[0] if msg else type(err).__name__


def to_hex_bytes(data) -> str:
    return "0x" + bytes(data or b"").hex()


def fmt_eth(wei: int) -> str:
    return f"{wei / 10**18:.6f}"


def method_tx(contract, method: str, *args, sender):
    """An unsigned, unprepared transaction calling `contract.method(*args)`."""
    handler = getattr(contract, method)
    return handler._as_transaction(*args).serialize_transaction(*args, sender=sender.address)


# ====================================================================== the deploy run


DONE, TODO, UPDATE, CONFLICT, BLOCKED = "done", "todo", "update", "conflict", "blocked"


@dataclass
class Step:
    key: str
    kind: str  # "deploy" | "wire" | "config" | "mint"
    describe: str
    status: Callable[[], tuple[str, str]]  # (state, detail)
    build: Callable[[], Any]  # -> unsigned transaction
    record: Callable[[Any], None]  # called with the confirmed receipt


class DeployRun:
    """One `ape run deploy`: plans checked steps against the chain and the deployment file,
    decides whether it may proceed (fresh, resume, up to date, update, or refuse), and
    executes the missing steps with a journal. See `docs/deploy.md`."""

    def __init__(
        self,
        project,
        provider,
        account,
        params: ProtocolParams,
        *,
        path: Path,
        network_choice: str,
        ecosystem: str,
        network: str,
        local: bool,
        params_file: Path,
        token_source: str | None,
        sender: Sender,
        log: Callable[[str], None] = print,
        test_accounts: list | None = None,
    ):
        self.project, self.provider, self.account = project, provider, account
        self.params = params
        self.path = Path(path)
        self.local = local
        self.sender = sender
        self.log = log
        self.test_accounts = test_accounts or []
        self.params_file = params_file
        self.token_source = token_source
        self.network_choice, self.ecosystem, self.network = network_choice, ecosystem, network
        self.record: dict = {}
        self.archived: Path | None = None
        self.dry_run = False
        self._instances: dict[str, Any] = {}

    # ------------------------------------------------------------------ record

    def _new_record(self) -> dict:
        from importlib.metadata import version

        p = self.params
        return {
            "format": FORMAT,
            "status": "partial",
            "network": f"{self.ecosystem}:{self.network}",
            "ecosystem": self.ecosystem,
            "network_name": self.network,
            "provider": self.provider.name,
            "chain_id": self.provider.chain_id,
            "deployer": self.account.address,
            "owner": self.account.address,
            "block": None,
            "completed_block": None,
            "started_at": _now(),
            "completed_at": None,
            "required_confirmations": self.sender.confirmations,
            "settlement_token": None,
            "params_file": rel(self.params_file),
            "params_digest": p.digest(),
            "params": p.to_json(),
            "epoch": None,
            "genesis": None,
            "task_types": {t.name: hex32(task_type_id(t.name)) for t in p.task_types},
            "contracts": {},
            "steps": {},
            "pending": None,
            "verification": None,
            "toolchain": {
                "eth-ape": version("eth-ape"),
                "vyper": version("vyper"),
                "ape-vyper": version("ape-vyper"),
            },
        }

    def save(self):
        if not self.dry_run:
            save_deployment(self.path, self.record)

    def _archive(self, why: str) -> None:
        if self.dry_run:
            self.log(f"{why}; a real run would keep {rel(self.path)} aside and deploy afresh")
            return
        self.archived = archive_deployment(self.path)
        self.log(f"{why}; {rel(self.path)} kept as {rel(self.archived)}")

    # ------------------------------------------------------------------ contracts

    def container(self, name: str):
        return getattr(self.project, CONTRACT_TYPES[name])

    def address(self, name: str) -> str | None:
        if name == "token":
            tok = self.record.get("settlement_token") or {}
            if tok.get("address"):
                return tok["address"]
            e = self.record["contracts"].get("token")
            return e["address"] if e else None
        e = self.record["contracts"].get(name)
        return e["address"] if e else None

    def instance(self, name: str):
        addr = self.address(name)
        if addr is None:
            return None
        key = (name, addr)
        if key not in self._instances:
            self._instances[key] = self.container(name).at(addr)
        return self._instances[key]

    def treasury(self) -> str:
        return self.params.treasury or self.record["deployer"]

    def constructor_args(self, name: str) -> list | None:
        """Positional constructor arguments, or None while a dependency is not deployed."""
        p, a = self.params, self.address
        deps = {
            "token": [],
            "registry": ["token"],
            "pricing": ["registry"],
            "escrow": ["registry"],
            "pool": ["registry", "pricing", "escrow"],
            "tracker": ["registry", "pool"],
        }[name]
        if any(a(d) is None for d in deps):
            return None
        return {
            "token": lambda: [TEST_TOKEN_NAME, TEST_TOKEN_SYMBOL, p.token_decimals],
            "registry": lambda: [a("token"), p.epoch_length, p.alpha_wad, p.unbonding_period, self.treasury()],
            "pricing": lambda: [a("registry")],
            "escrow": lambda: [a("registry"), p.escrow_min_deposit],
            "pool": lambda: [a("registry"), a("pricing"), a("escrow"), p.tolerance_bps, p.min_funding],
            "tracker": lambda: [a("registry"), a("pool"), p.slash_bps, p.slash_threshold_bps],
        }[name]()

    # values fixed at construction that no setter can change: a difference needs --redeploy
    IMMUTABLE_ARGS = {
        "token": ("name_", "symbol_", "decimals_"),
        "registry": ("token", "epoch_length", "alpha_wad", "unbonding_period"),
        "pricing": ("registry",),
        "escrow": ("registry",),
        "pool": ("registry", "pricing", "escrow"),
        "tracker": ("registry", "pool"),
    }

    def named_args(self, name: str, args: list) -> dict:
        inputs = self.container(name).contract_type.constructor.inputs
        return {i.name: _jsonable(v) for i, v in zip(inputs, args)}

    # ------------------------------------------------------------------ steps

    def steps(self) -> list[Step]:
        s: list[Step] = []
        if self.params.token is None:
            s.append(self._deploy_step("token"))
        for name in PROTOCOL_CONTRACTS:
            s.append(self._deploy_step(name))
        s += self._wire_steps()
        s += self._param_steps()
        for tt in self.params.task_types:
            s += self._task_steps(tt)
        if self.params.token is None and self.params.test_mint > 0:
            for i in range(min(self.params.test_mint_accounts, len(self.test_accounts))):
                s.append(self._mint_step(i))
        return s

    def _deploy_step(self, name: str) -> Step:
        def status():
            args = self.constructor_args(name)
            if args is None:
                return BLOCKED, "waits for its dependencies"
            entry = self.record["contracts"].get(name)
            if entry is None:
                return TODO, ""
            probs = code_problems(self.project, self.provider, name, entry)
            if probs:
                return CONFLICT, "; ".join(probs)
            want = self.named_args(name, args)
            for k in self.IMMUTABLE_ARGS[name]:
                have = entry["constructor_args"].get(k)
                if str(have).lower() != str(want[k]).lower():
                    return CONFLICT, f"{name} was deployed with {k}={have}, the parameters now say {want[k]}"
            return DONE, entry["address"]

        def build():
            return self.container(name)(*self.constructor_args(name), sender=self.account.address)

        def record(receipt):
            args = self.constructor_args(name)
            address = to_checksum_address(receipt.contract_address)
            code = chain_code(self.provider, address)
            container = self.container(name)
            self.record["contracts"][name] = {
                "contract": CONTRACT_TYPES[name],
                "address": address,
                "tx": receipt.txn_hash,
                "block": receipt.block_number,
                "confirmed_at_block": self.sender.confirmed_at.get(receipt.txn_hash, receipt.block_number),
                "constructor_args": self.named_args(name, args),
                "runtime_digest": digest(runtime_code(container)),
                "code_digest": digest(code),
                "abi_digest": abi_digest(container),
            }
            if self.record["block"] is None:
                self.record["block"] = receipt.block_number
            if name == "token":
                self._set_token(address, deployed=True)
            if name == "registry":
                self._set_epoch()

        return Step(f"deploy:{name}", "deploy", f"deploy {CONTRACT_TYPES[name]}", status, build, record)

    def _wire_steps(self) -> list[Step]:
        a = self.address

        def wire(name: str, getters: dict[str, str], args: Callable[[], list]) -> Step:
            def status():
                c = self.instance(name)
                if c is None or any(a(x) is None for x in getters.values()):
                    return BLOCKED, "waits for deployments"
                have = {g: getattr(c, g)() for g in getters}
                if all(v == ZERO for v in have.values()):
                    return TODO, ""
                want = {g: a(x) for g, x in getters.items()}
                if all(have[g].lower() == want[g].lower() for g in getters):
                    return DONE, ""
                return CONFLICT, f"{name} is already wired to {have}, expected {want}"

            return Step(
                f"wire:{name}", "wire", f"{name}.wire({', '.join(getters.values())})",
                status,
                lambda: method_tx(self.instance(name), "wire", *args(), sender=self.account),
                lambda r: None,
            )

        return [
            wire("registry", {"pool": "pool", "tracker": "tracker"}, lambda: [a("pool"), a("tracker")]),
            wire("pool", {"tracker": "tracker"}, lambda: [a("tracker")]),
            wire("pricing", {"pool": "pool", "escrow": "escrow"}, lambda: [a("pool"), a("escrow")]),
            wire("escrow", {"pool": "pool"}, lambda: [a("pool")]),
        ]

    def _setter(self, key: str, describe: str, contract: str, read: Callable[[Any], Any],
                want: Callable[[], Any], method: str, args: Callable[[], list]) -> Step:
        def status():
            c = self.instance(contract)
            if c is None:
                return BLOCKED, "waits for deployment"
            have, w = read(c), want()
            if have == w:
                return DONE, ""
            return UPDATE, f"chain has {have}, parameters say {w}"

        return Step(key, "config", describe, status,
                    lambda: method_tx(self.instance(contract), method, *args(), sender=self.account),
                    lambda r: None)

    def _param_steps(self) -> list[Step]:
        p = self.params
        return [
            self._setter("config:treasury", "registry.set_treasury", "registry",
                         lambda c: c.treasury().lower(), lambda: self.treasury().lower(),
                         "set_treasury", lambda: [self.treasury()]),
            self._setter("config:pool", "pool.set_params(tolerance, min_funding, drain)", "pool",
                         lambda c: (c.tolerance_bps(), c.min_funding(), c.drain_bps()),
                         lambda: (p.tolerance_bps, p.min_funding, p.drain_bps),
                         "set_params", lambda: [p.tolerance_bps, p.min_funding, p.drain_bps]),
            self._setter("config:escrow", "escrow.set_min_deposit", "escrow",
                         lambda c: c.min_deposit(), lambda: p.escrow_min_deposit,
                         "set_min_deposit", lambda: [p.escrow_min_deposit]),
            self._setter("config:tracker", "tracker.set_slash_params", "tracker",
                         lambda c: (c.slash_bps(), c.slash_threshold_bps()),
                         lambda: (p.slash_bps, p.slash_threshold_bps),
                         "set_slash_params", lambda: [p.slash_bps, p.slash_threshold_bps]),
            self._setter("config:pricing", "pricing.set_params", "pricing",
                         lambda c: tuple(c.params()), lambda: _pricing_tuple(p.pricing),
                         "set_params", lambda: list(_pricing_tuple(p.pricing))),
        ]

    def _task_steps(self, tt: TaskTypeParams) -> list[Step]:
        tid = task_type_id(tt.name)

        def create_status():
            reg = self.instance("registry")
            if reg is None:
                return BLOCKED, "waits for the registry"
            t = reg.task_types(tid)
            if t.stake_per_unit == 0:
                return TODO, ""
            if (t.min_bond, t.stake_per_unit) == (tt.min_bond, tt.stake_per_unit):
                return DONE, ""
            return CONFLICT, (f"task type {tt.name} exists with min_bond={t.min_bond}, stake_per_unit="
                              f"{t.stake_per_unit} (fixed for its lifetime); the parameters say "
                              f"{tt.min_bond}, {tt.stake_per_unit}")

        def fee_target() -> list:
            f = self.instance("pricing").fees(tid)
            base = tt.base_fee
            if f.last_epoch_p1 > 0:  # the fee has moved since: keep it, within the new bounds
                base = min(max(f.base_fee, tt.min_fee), tt.max_fee)
            return [tid, base, tt.min_fee, tt.max_fee]

        def fee_status():
            pr = self.instance("pricing")
            if pr is None or create_status()[0] in (TODO, BLOCKED):
                return BLOCKED, "waits for the task type"
            f = pr.fees(tid)
            if f.max_fee == 0:
                return TODO, ""
            ok = (f.min_fee, f.max_fee) == (tt.min_fee, tt.max_fee)
            if f.last_epoch_p1 == 0:
                ok = ok and f.base_fee == tt.base_fee
            if ok:
                return DONE, ""
            return UPDATE, f"fees (base, min, max) on chain {(f.base_fee, f.min_fee, f.max_fee)}"

        key_escrow = f"task:{tt.name}:escrow"

        def escrow_status():
            es = self.instance("escrow")
            if es is None or create_status()[0] in (TODO, BLOCKED):
                return BLOCKED, "waits for the task type"
            have = es.queues(tid).max_level
            if have == tt.escrow_max:
                return DONE, ""
            if key_escrow in self.record["steps"]:
                return UPDATE, f"escrow max level on chain {have}"
            return TODO, ""

        return [
            Step(f"task:{tt.name}:create", "config", f"registry.create_task_type({tt.name})", create_status,
                 lambda: method_tx(self.instance("registry"), "create_task_type", tid, tt.min_bond,
                                   tt.stake_per_unit, sender=self.account),
                 lambda r: None),
            Step(f"task:{tt.name}:fees", "config", f"pricing.configure({tt.name})", fee_status,
                 lambda: method_tx(self.instance("pricing"), "configure", *fee_target(), sender=self.account),
                 lambda r: None),
            Step(key_escrow, "config", f"escrow.set_max_level({tt.name})", escrow_status,
                 lambda: method_tx(self.instance("escrow"), "set_max_level", tid, tt.escrow_max,
                                   sender=self.account),
                 lambda r: None),
        ]

    def _mint_step(self, i: int) -> Step:
        key = f"mint:TEST::{i}"
        who = self.test_accounts[i].address

        def status():
            if self.instance("token") is None:
                return BLOCKED, "waits for the test token"
            return (DONE, "") if key in self.record["steps"] else (TODO, "")

        return Step(key, "mint", f"token.mint(TEST::{i}, {self.params.test_mint})", status,
                    lambda: method_tx(self.instance("token"), "mint", who, self.params.test_mint,
                                      sender=self.account),
                    lambda r: None)

    def _set_epoch(self):
        reg = self.instance("registry")
        genesis = reg.GENESIS()
        self.record["epoch"] = {"genesis": genesis, "length": reg.EPOCH_LENGTH()}
        self.record["genesis"] = genesis  # top-level copy: gateway/chain/client.py reads it

    # ------------------------------------------------------------------ token

    def _set_token(self, address: str, deployed: bool):
        tok = self.project.TestToken.at(address)
        entry = {
            "address": to_checksum_address(address),
            "symbol": _safe(tok.symbol),
            "name": _safe(tok.name),
            "decimals": tok.decimals(),
            "deployed_by_script": deployed,
        }
        if self.token_source and not deployed:
            entry["source"] = self.token_source
        self.record["settlement_token"] = entry

    def check_external_token(self):
        """An existing ERC-20 by address: it must have code and the decimals (and symbol)
        the parameters name."""
        addr = to_checksum_address(self.params.token)
        if not chain_code(self.provider, addr):
            raise DeploymentError(
                f"settlement token {addr} has no code on chain {self.provider.chain_id}: wrong "
                f"address in {rel(self.params_file)}, or the RPC is not the network you think"
            )
        tok = self.project.TestToken.at(addr)
        try:
            decimals = tok.decimals()
        except Exception as err:  # noqa: BLE001 - any failure means: not an ERC-20 we can use
            raise DeploymentError(f"settlement token {addr}: decimals() failed ({err}); is it an ERC-20?") from None
        if decimals != self.params.token_decimals:
            raise DeploymentError(
                f"settlement token {addr} has {decimals} decimals, the parameters say {self.params.token_decimals}"
            )
        if self.params.token_symbol:
            sym = _safe(tok.symbol)
            if sym != self.params.token_symbol:
                raise DeploymentError(
                    f"settlement token {addr} has symbol {sym!r}, the parameters say {self.params.token_symbol!r}"
                )
        return addr

    # ------------------------------------------------------------------ run

    def prepare(self, *, redeploy: bool, update: bool, dry_run: bool = False) -> str:
        """Loads/creates the record and decides what this run is. Returns the mode:
        'fresh', 'resume', 'up-to-date' or 'update'. Raises DeploymentError to refuse.
        `dry_run`: decide and plan without writing or moving any file."""
        self.dry_run = dry_run
        existing = None
        if self.path.exists():
            existing = load_deployment(self.path)
        if existing is not None:
            if existing.get("chain_id") != self.provider.chain_id:
                raise DeploymentError(
                    f"{rel(self.path)} records chain id {existing.get('chain_id')}, but the RPC for "
                    f"{self.network_choice} reports chain id {self.provider.chain_id}. Point the RPC at "
                    "the right network, or move the file away if that chain is gone."
                )
            live = [n for n, e in existing.get("contracts", {}).items() if chain_code(self.provider, e["address"])]
            if existing.get("contracts") and not live and not redeploy:
                # nothing recorded exists on this chain
                if not self.local:
                    raise DeploymentError(
                        f"none of the contracts recorded in {rel(self.path)} exist on the chain behind "
                        f"this RPC (chain id {self.provider.chain_id}). Wrong RPC endpoint? If that "
                        "deployment is really gone, pass --redeploy (the file is kept aside)."
                    )
                self._archive("the recorded contracts are not on this chain (a restarted local chain)")
                existing = None
            elif not existing.get("contracts") and existing.get("pending") is None and not redeploy:
                existing = None  # a run that stopped before its first transaction
            elif redeploy:
                self._archive("--redeploy")
                existing = None
        if existing is None:
            self.record = self._new_record()
            mode = "fresh"
        else:
            self.record = existing
            if existing.get("deployer", "").lower() != self.account.address.lower():
                raise DeploymentError(
                    f"{rel(self.path)} was deployed by {existing.get('deployer')}; only that account "
                    f"can finish or update it (you are {self.account.address}). Use that account, or "
                    "pass --redeploy for a fresh deployment owned by you."
                )
            mode = "resume" if existing.get("status") != "complete" else "check"
            if mode == "resume" and existing.get("params_digest") != self.params.digest():
                raise DeploymentError(
                    f"{rel(self.path)} is a half-finished deployment started with other parameters "
                    f"(digest {existing.get('params_digest')}, now {self.params.digest()}). Restore the "
                    "parameters it was started with to resume it, or pass --redeploy to start over."
                )
        if self.params.token is not None and not (self.record.get("settlement_token") or {}).get("address"):
            self._set_token(self.check_external_token(), deployed=False)
        elif self.params.token is not None:
            recorded = self.record["settlement_token"]["address"]
            if recorded.lower() != self.params.token.lower():
                raise DeploymentError(
                    f"{rel(self.path)} uses settlement token {recorded}; the parameters now say "
                    f"{self.params.token}. The token is fixed at deployment: pass --redeploy."
                )
        self._resolve_pending()
        plan = self.plan()
        conflicts = [(s, d) for s, st, d in plan if st == CONFLICT]
        if conflicts:
            lines = "\n".join(f"  - {s.describe}: {d}" for s, d in conflicts)
            raise DeploymentError(
                f"the deployment in {rel(self.path)} cannot be brought in line with "
                f"{rel(self.params_file)} without replacing contracts:\n{lines}\n"
                "Pass --redeploy to deploy a fresh set (the current file is kept aside)."
            )
        pending = [(s, st, d) for s, st, d in plan if st != DONE]
        if mode == "check":
            if not pending:
                return "up-to-date"
            if not update:
                lines = "\n".join(f"  - {s.describe}" + (f": {d}" if d else "") for s, st, d in pending)
                raise DeploymentError(
                    f"a live deployment exists in {rel(self.path)} and differs from "
                    f"{rel(self.params_file)}:\n{lines}\nRefusing to change it. Pass --update to apply "
                    "these owner-only changes to the live contracts, or --redeploy to replace them."
                )
            self.record["status"] = "partial"
            self.record["params_digest"] = self.params.digest()
            self.record["params"] = self.params.to_json()
            self.record["params_file"] = rel(self.params_file)
            return "update"
        return mode

    def plan(self) -> list[tuple[Step, str, str]]:
        out = []
        for s in self.steps():
            st, detail = s.status()
            out.append((s, st, detail))
        return out

    def _resolve_pending(self):
        """A transaction journalled before a crash: adopt it if it was mined, forget it if
        it never was (the step's own check then decides whether to redo it)."""
        pend = self.record.get("pending")
        if not pend:
            return
        w3 = self.provider.web3
        receipt = None
        try:
            receipt = w3.eth.get_transaction_receipt(pend["tx"])
        except Exception:  # noqa: BLE001 - TransactionNotFound and friends
            receipt = None
        if receipt is None:
            try:
                known = w3.eth.get_transaction(pend["tx"])
            except Exception:  # noqa: BLE001
                known = None
            if known is not None:
                self.log(f"waiting for {pend['step']} tx {pend['tx']} from the interrupted run")
                receipt = w3.eth.wait_for_transaction_receipt(pend["tx"], timeout=self.sender.timeout)
        if receipt is None:
            self.log(f"the interrupted run's {pend['step']} tx {pend['tx']} never reached the chain; redoing the step")
        elif receipt["status"] != 1:
            self.log(f"the interrupted run's {pend['step']} tx {pend['tx']} reverted; redoing the step")
        else:
            rec = self.provider.get_receipt(pend["tx"])
            self.sender.confirm(rec, pend["step"])
            step = next((s for s in self.steps() if s.key == pend["step"]), None)
            if step is not None:
                self.log(f"adopting {pend['step']} from the interrupted run (tx {pend['tx']})")
                step.record(rec)
                self.record["steps"][step.key] = {"tx": pend["tx"], "block": rec.block_number}
        self.record["pending"] = None
        self.save()

    def execute(self, *, dry_run: bool = False) -> list[str]:
        """Runs every step not yet done, in order, journalling each. Returns the keys of the
        steps it sent a transaction for."""
        sent: list[str] = []
        if not dry_run:
            self.save()
        for step in self.steps():
            st, detail = step.status()
            if st == DONE:
                self.log(f"  ok    {step.describe}" + (f"  {detail}" if detail and step.kind == "deploy" else ""))
                continue
            if st == CONFLICT:  # cannot happen after prepare(); re-checked for safety
                raise DeploymentError(f"{step.describe}: {detail}")
            if dry_run:
                self.log(f"  would {step.describe}" + (f"  ({detail})" if detail and st != BLOCKED else ""))
                continue
            if st == BLOCKED:
                raise DeploymentError(f"{step.describe}: {detail}")

            def journal(tx_hash: str, nonce: int, _step=step):
                self.record["pending"] = {"step": _step.key, "tx": tx_hash, "nonce": nonce, "at": _now()}
                self.save()

            self.log(f"  send  {step.describe}")
            try:
                receipt = self.sender.send(step.build(), step.describe, journal=journal)
            except TxFailed as err:
                if err.broadcast:  # mined and reverted: the outcome is known, nothing to adopt
                    self.record["pending"] = None
                    self.save()
                raise
            step.record(receipt)
            self.record["steps"][step.key] = {"tx": receipt.txn_hash, "block": receipt.block_number}
            if self.record["block"] is None:
                self.record["block"] = receipt.block_number
            self.record["pending"] = None
            self.save()
            sent.append(step.key)
            self.log(f"        tx {receipt.txn_hash} block {receipt.block_number}"
                     + (f" -> {self.record['contracts'][step.key[7:]]['address']}" if step.kind == "deploy" else ""))
        return sent

    def finish(self, *, write: bool = True) -> tuple[int, list[str]]:
        """Reads everything back; marks the record complete only if nothing is off.
        `write=False` (an up-to-date re-run) verifies without touching the file."""
        checks, problems = verify_deployment(self.project, self.provider, self.record, self.params)
        if not write:
            return checks, problems
        head = self.provider.get_block("latest").number
        self.record["verification"] = {"block": head, "checks": checks, "problems": problems, "at": _now()}
        if not problems:
            self.record["status"] = "complete"
            if self.record.get("completed_block") is None or self.record.get("completed_at") is None:
                self.record["completed_block"] = head
                self.record["completed_at"] = _now()
            if self.record.get("epoch") is None or self.record.get("genesis") is None:
                self._set_epoch()
        self.save()
        return checks, problems


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _safe(fn) -> str | None:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - optional ERC-20 metadata
        return None


def _jsonable(v):
    if isinstance(v, (bytes, bytearray)):
        return hex32(v)
    if hasattr(v, "address"):
        return v.address
    return v
