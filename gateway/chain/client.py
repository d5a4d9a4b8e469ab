"""An asyncio client for one Pura deployment: batched reads with timeouts, signed sends.

The gateway talks JSON-RPC to the chain with web3.py's AsyncWeb3 (ape is a developer tool;
the gateway is a service). Addresses come from ``deployments/<network>.json`` (written by
``ape run deploy``), ABIs from ``gateway/chain/abi``. Every call has a timeout; reads of many
values go out as one JSON-RPC batch. Transactions are signed locally with the source key
and sent one at a time under a lock (one nonce sequence per account).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_utils import keccak, to_checksum_address
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import ContractLogicError

from gateway.chain.abi import abi

log = logging.getLogger("pura.chain")

CONTRACT_ABI = {
    "registry": "CapacityRegistry",
    "pool": "BackpressurePool",
    "tracker": "CompletionTracker",
    "pricing": "PricingCurve",
    "escrow": "EscrowBuffer",
}


class ChainError(Exception):
    """The chain could not be reached, or a transaction failed."""


@dataclass(frozen=True, slots=True)
class Deployment:
    chain_id: int
    addresses: dict[str, str]
    token: str
    token_decimals: int
    epoch_length: int
    genesis: int
    task_types: dict[str, str]  # name -> 0x id

    @classmethod
    def load(cls, path: Path) -> Deployment:
        """Reads a deployment record written by scripts/deploy.py."""
        if not path.exists():
            raise FileNotFoundError(f"no deployment record at {path} (run `ape run deploy` first)")
        rec = json.loads(path.read_text())
        addresses = {k: to_checksum_address(v["address"] if isinstance(v, dict) else v)
                     for k, v in rec["contracts"].items() if k in CONTRACT_ABI}
        missing = set(CONTRACT_ABI) - set(addresses)
        if missing:
            raise ValueError(f"deployment record {path} lacks {sorted(missing)}")
        token = rec.get("settlement_token") or {}
        params = rec.get("params") or {}
        return cls(
            chain_id=int(rec["chain_id"]),
            addresses=addresses,
            token=to_checksum_address(token["address"]),
            token_decimals=int(token.get("decimals", params.get("token_decimals", 6))),
            epoch_length=int(params.get("epoch_length", 0)),
            genesis=int(rec.get("genesis", 0)),
            task_types=dict(rec.get("task_types") or {}),
        )


def task_type_id(name: str) -> str:
    return "0x" + keccak(text=name).hex()


class ChainClient:
    def __init__(self, rpc_url: str, deployment: Deployment, source_key: str | None, timeout_s: float = 2.0,
                 tx_timeout_s: float = 60.0) -> None:
        self.deployment = deployment
        self.timeout_s = timeout_s
        self.tx_timeout_s = tx_timeout_s
        self.w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url, request_kwargs={"timeout": timeout_s}))
        self.c = {name: self.w3.eth.contract(address=addr, abi=abi(CONTRACT_ABI[name]))
                  for name, addr in deployment.addresses.items()}
        self.token = self.w3.eth.contract(address=deployment.token, abi=abi("TestToken"))
        self.account = Account.from_key(source_key) if source_key else None
        self._send_lock = asyncio.Lock()
        self._nonce: int | None = None
        self.gas_used_total = 0
        self.txs_sent = 0
        self._clock: tuple[int, float] | None = None  # (latest block timestamp, monotonic when read)

    @property
    def source(self) -> str:
        if self.account is None:
            raise ChainError("no source key configured")
        return self.account.address

    async def close(self) -> None:
        try:
            await self.w3.provider.disconnect()
        except Exception:  # pragma: no cover - best effort
            pass

    # ------------------------------------------------------------------ reads

    async def read(self, fn: Any) -> Any:
        """One view call, with the client's timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await fn.call()
        except (TimeoutError, OSError) as exc:
            raise ChainError(f"read timed out or failed: {exc}") from exc
        except ContractLogicError:
            raise
        except Exception as exc:
            raise ChainError(f"read failed: {exc}") from exc

    async def read_many(self, fns: list[Any]) -> list[Any]:
        """Many view calls in one JSON-RPC batch (one round trip)."""
        if not fns:
            return []
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.w3.batch_requests() as batch:
                    for fn in fns:
                        batch.add(fn)
                    return list(await batch.async_execute())
        except (TimeoutError, OSError) as exc:
            raise ChainError(f"batched read timed out or failed: {exc}") from exc
        except Exception as exc:
            raise ChainError(f"batched read failed: {exc}") from exc

    async def block_timestamp(self) -> int:
        try:
            async with asyncio.timeout(self.timeout_s):
                ts = int((await self.w3.eth.get_block("latest"))["timestamp"])
        except Exception as exc:
            raise ChainError(f"cannot read the latest block: {exc}") from exc
        self._clock = (ts, time.monotonic())
        return ts

    def chain_now(self) -> int:
        """The chain's clock, estimated from the last block read plus the time since (the
        chain may run ahead of the wall clock: local chains jump time)."""
        if self._clock is None:
            return int(time.time())
        ts, at = self._clock
        return ts + int(time.monotonic() - at)

    # ------------------------------------------------------------------ writes

    async def send(self, fn: Any, gas: int | None = None) -> Any:
        """Signs and sends `fn` from the source account; returns the mined receipt.

        Reverts surface as ContractLogicError (from gas estimation) with the contract's
        message; a mined transaction that reverted raises ChainError."""
        if self.account is None:
            raise ChainError("no source key configured")
        async with self._send_lock:
            try:
                async with asyncio.timeout(self.timeout_s * 4):
                    if self._nonce is None:
                        self._nonce = await self.w3.eth.get_transaction_count(self.account.address, "pending")
                    params: dict[str, Any] = {
                        "from": self.account.address,
                        "nonce": self._nonce,
                        "chainId": self.deployment.chain_id,
                    }
                    if gas is None:
                        # generous: a rebalance estimated against the latest block can need twice
                        # as much by the time it is mined (a stream settled, money overflowing);
                        # unused gas is not charged
                        params["gas"] = int(await fn.estimate_gas({"from": self.account.address}) * 2) + 100_000
                    else:
                        params["gas"] = gas
                    block = await self.w3.eth.get_block("latest")
                    base = int(block.get("baseFeePerGas") or 0)
                    tip = await self.w3.eth.max_priority_fee if base else 0
                    params["maxPriorityFeePerGas"] = tip
                    params["maxFeePerGas"] = base * 2 + tip
                    tx = await fn.build_transaction(params)
                    signed = self.account.sign_transaction(tx)
                    tx_hash = await self.w3.eth.send_raw_transaction(signed.raw_transaction)
                    self._nonce += 1
            except ContractLogicError:
                raise
            except (TimeoutError, OSError) as exc:
                self._nonce = None  # re-read from the node next time
                raise ChainError(f"send failed: {exc}") from exc
            except Exception as exc:
                self._nonce = None
                raise ChainError(f"send failed: {exc}") from exc
        try:
            receipt = await self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.tx_timeout_s,
                                                                     poll_latency=0.05)
        except Exception as exc:
            raise ChainError(f"no receipt for {tx_hash.hex()}: {exc}") from exc
        self.txs_sent += 1
        self.gas_used_total += int(receipt["gasUsed"])
        if receipt["status"] != 1:
            raise ChainError(f"{getattr(fn, 'fn_name', 'transaction')} {tx_hash.hex()} reverted")
        return receipt

    async def ensure_allowance(self, spender: str, minimum: int) -> None:
        current = await self.read(self.token.functions.allowance(self.source, spender))
        if current < minimum:
            await self.send(self.token.functions.approve(spender, 2**256 - 1))
