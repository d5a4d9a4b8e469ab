"""Contract ABIs the gateway uses, shipped as package data (``gateway/chain/abi/*.json``).

They are exported from the compiled contracts with ``python -m gateway.chain.abi`` (after
``ape compile``); ``tests/chain/test_abi.py`` fails if they drift from the contracts.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

CONTRACTS = ("CapacityRegistry", "BackpressurePool", "CompletionTracker", "PricingCurve", "EscrowBuffer", "TestToken")
HERE = Path(__file__).resolve().parent / "abi"
BUILD = Path(__file__).resolve().parents[2] / ".build" / "__local__.json"


@cache
def abi(name: str) -> list[dict]:
    return json.loads((HERE / f"{name}.json").read_text())


def compiled() -> dict[str, list[dict]]:
    """ABIs from ape's build manifest (the source of truth)."""
    types = json.loads(BUILD.read_text())["contractTypes"]
    return {name: types[name]["abi"] for name in CONTRACTS}


def export() -> None:
    HERE.mkdir(exist_ok=True)
    for name, entries in compiled().items():
        (HERE / f"{name}.json").write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        print(f"wrote {HERE / f'{name}.json'}")


if __name__ == "__main__":
    export()
    sys.exit(0)
