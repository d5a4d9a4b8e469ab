"""Dual-signed completion receipts: what the gateway signs, and the sidecar protocol.

A receipt (``pura.signing.Receipt``, verified by CompletionTracker) says: source (the
gateway) paid ``amount`` (settlement-token base units) to sink (the provider) for task
``task_id`` (keccak256 of the gateway's request id) whose answer hashes to ``response_hash``
(the SHA-256 of the answer text, as in the accounting record), under the source's ``nonce``,
valid until ``deadline``.

The sink's signature comes from one of two places (``[[providers]] sink_signer``):

* **keystore**: the operator holds the sink's key (plain upstreams such as OpenAI cannot
  sign anything); the gateway signs for it.
* **sidecar**: the provider runs the Pura sidecar (the local stand-in provider does). The
  gateway sends the receipt's terms with the request, in the ``X-Pura-Receipt-Request``
  header (:class:`ReceiptTerms`: everything but the amount and the answer hash, plus the
  price per million tokens it will charge). The provider computes the amount from the usage
  it reports and the hash from the answer it served, signs, and returns the signature: in the
  ``X-Pura-Sink-Signature`` response header, or in the final stream chunk as
  ``"pura_sink_signature"``. The gateway rebuilds the same receipt from what it received and
  checks that the signature recovers to the provider's sink address; a missing, forged or
  mismatched signature means no receipt (the provider did not confirm what the gateway saw).
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass

from eth_utils import keccak, to_checksum_address

from pura.signing import Receipt, recover

REQUEST_HEADER = "X-Pura-Receipt-Request"
SIGNATURE_HEADER = "X-Pura-Sink-Signature"
STREAM_FIELD = "pura_sink_signature"
SECP256K1_HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def task_id_for(request_id: str) -> bytes:
    """The receipt's task id: keccak256 of the gateway's request id."""
    return keccak(text=request_id)


def amount_for(cost_micros: int, decimals: int) -> int:
    """Micro-USD -> settlement-token base units (1:1 for 6-decimal USDC), rounding down."""
    if decimals >= 6:
        return cost_micros * 10 ** (decimals - 6)
    return cost_micros // 10 ** (6 - decimals)


def cost_micros(prompt_tokens: int, completion_tokens: int, input_per_mtok: int, output_per_mtok: int) -> int:
    """The gateway's price rule (gateway.accounting.money.Price), restated for sidecars."""
    numerator = prompt_tokens * input_per_mtok + completion_tokens * output_per_mtok
    return -(-numerator // 1_000_000)


@dataclass(frozen=True, slots=True)
class ReceiptTerms:
    """Everything a receipt needs except the amount and the answer hash."""

    chain_id: int
    tracker: str
    task_type: str  # 0x-hex bytes32
    source: str
    sink: str
    task_id: str  # 0x-hex bytes32
    nonce: int
    deadline: int
    decimals: int
    input_micros_per_mtok: int
    output_micros_per_mtok: int

    def encode(self) -> str:
        return base64.b64encode(json.dumps(asdict(self), separators=(",", ":")).encode()).decode()

    @classmethod
    def decode(cls, value: str) -> ReceiptTerms:
        return cls(**json.loads(base64.b64decode(value)))

    def receipt(self, cost: int, response_sha256_hex: str) -> Receipt:
        return Receipt(
            task_type=bytes.fromhex(self.task_type.removeprefix("0x")),
            sink=to_checksum_address(self.sink),
            source=to_checksum_address(self.source),
            task_id=bytes.fromhex(self.task_id.removeprefix("0x")),
            amount=amount_for(cost, self.decimals),
            response_hash=bytes.fromhex(response_sha256_hex),
            nonce=self.nonce,
            deadline=self.deadline,
        )

    def receipt_for_usage(self, prompt_tokens: int, completion_tokens: int, response_sha256_hex: str) -> Receipt:
        """What a sidecar signs: the amount from its own usage at the stated prices."""
        cost = cost_micros(prompt_tokens, completion_tokens, self.input_micros_per_mtok, self.output_micros_per_mtok)
        return self.receipt(cost, response_sha256_hex)

    def digest(self, receipt: Receipt) -> bytes:
        return receipt.digest(self.chain_id, self.tracker)


def sign_as_sink(terms: ReceiptTerms, receipt: Receipt, sink_key: str | bytes) -> str:
    return "0x" + receipt.sign(sink_key, terms.chain_id, terms.tracker).hex()


def sink_signature_valid(terms: ReceiptTerms, receipt: Receipt, signature: str | None) -> bool:
    """True when `signature` is the sink's 65-byte signature of exactly this receipt."""
    if not signature:
        return False
    try:
        raw = bytes.fromhex(signature.removeprefix("0x"))
        # the tracker's rules: 65 bytes, v in {27, 28}, low s (no malleable twin)
        if len(raw) != 65 or raw[64] not in (27, 28) or int.from_bytes(raw[32:64], "big") > SECP256K1_HALF_N:
            return False
        return recover(terms.digest(receipt), raw) == to_checksum_address(terms.sink)
    except Exception:
        return False
