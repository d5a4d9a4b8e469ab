"""Micro-USD arithmetic, price tables and token estimates.

No floats touch stored money: prices are parsed from decimal strings into integer micro-USD per
million tokens, and a request's cost is computed in integers and rounded **up** to the next whole
micro-USD (the gateway never under-charges by rounding).

Token estimates (used only when an upstream reports no ``usage``) avoid tiktoken, which downloads
its tables at run time. Two functions, with different jobs:

* :func:`estimate_tokens` - a point estimate (words and punctuation marks; a word counts one
  token per started six characters), used for billing when no usage is reported;
* :func:`token_upper_bound` - a bound that byte-level BPE tokenizers cannot exceed (every token
  covers at least one UTF-8 byte), used for budget reservations so a reservation always covers
  the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per million tokens
PER_MESSAGE_OVERHEAD_TOKENS = 4

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def usd_to_micros(usd: Decimal | str | int) -> int:
    """Exact conversion of a USD amount to integer micro-USD, rounding up sub-micro remainders."""
    value = Decimal(str(usd)) * MICROS_PER_USD
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def format_usd(micros: int) -> str:
    """Render micro-USD as a USD decimal string with 6 places (``150`` -> ``"0.000150"``)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


@dataclass(frozen=True, slots=True)
class Price:
    """Integer micro-USD per million tokens, split by direction."""

    input_micros_per_mtok: int
    output_micros_per_mtok: int

    @classmethod
    def from_usd_per_mtok(cls, input_usd: Decimal, output_usd: Decimal) -> Price:
        return cls(usd_to_micros(input_usd), usd_to_micros(output_usd))

    def cost_micros(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Cost of one call in micro-USD, rounded up; exact integer arithmetic."""
        numerator = (
            prompt_tokens * self.input_micros_per_mtok
            + completion_tokens * self.output_micros_per_mtok
        )
        return -(-numerator // TOKENS_PER_PRICE_UNIT)

    @property
    def max_micros_per_mtok(self) -> int:
        return max(self.input_micros_per_mtok, self.output_micros_per_mtok)


def estimate_tokens(text: str) -> int:
    """Point estimate of the token count of ``text`` (no tokenizer tables needed)."""
    if not text:
        return 0
    total = 0
    for match in _TOKEN_RE.finditer(text):
        total += 1 + (len(match.group()) - 1) // 6
    return total


def token_upper_bound(text: str) -> int:
    """A bound no byte-level BPE tokenizer exceeds: the UTF-8 byte length."""
    return len(text.encode("utf-8"))


def message_text(message: dict) -> str:
    """The text of one chat message (string content, text parts, tool call arguments)."""
    parts: list[str] = []
    content = message.get("content")
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict):
            fn = call.get("function") or {}
            parts.append(str(fn.get("name", "")))
            parts.append(str(fn.get("arguments", "")))
    return "\n".join(parts)


def prompt_token_estimate(messages: list[dict]) -> int:
    return sum(
        estimate_tokens(message_text(m)) + PER_MESSAGE_OVERHEAD_TOKENS for m in messages
    )


def prompt_token_bound(messages: list[dict], tools: object = None) -> int:
    bound = sum(token_upper_bound(message_text(m)) + PER_MESSAGE_OVERHEAD_TOKENS for m in messages)
    if tools is not None:
        import json

        bound += token_upper_bound(json.dumps(tools, separators=(",", ":")))
    return bound
