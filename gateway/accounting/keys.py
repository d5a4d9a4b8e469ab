"""API key format: ``pura_`` + 48 lowercase hex characters (192 random bits).

Only the SHA-256 of a key is stored. An unsalted hash is enough here: keys are uniformly random
with 192 bits of entropy, so there is nothing to brute-force. The public id of a key is its
prefix (``pura_`` + first 8 hex), which is what logs, reports and ``pura keys revoke`` use.
"""

from __future__ import annotations

import hashlib
import re
import secrets

KEY_PREFIX = "pura_"
KEY_RE = re.compile(r"^pura_[0-9a-f]{48}$")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_hex(24)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def key_prefix(raw: str) -> str:
    return raw[: len(KEY_PREFIX) + 8]


def looks_like_key(raw: str) -> bool:
    return bool(KEY_RE.fullmatch(raw))
