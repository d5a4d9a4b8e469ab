"""Contract ABIs the gateway uses, shipped as package data (``gateway/chain/abi/*.json``).

They are exported from the compiled contracts with ``python -m gateway.chain.abi`` (after
ape compiles them); ``tests/chain/test_gateway_chain.py`` fails if they drift from the contracts.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

CONTRACTS = ("CapacityRegistry", "BackpressurePool", "CompletionTracker", "PricingCurve", "EscrowBuffer", "TestToken")
HERE = Path(__file__).resolve().parent / "abi"


@cache
def abi(name: str) -> list[dict]:
    return json.loads((HERE / f"{name}.json").read_text())


def compiled() -> dict[str, list[dict]]:
    """ABIs of the contracts as ape compiles them now (the source of truth).

    Goes through ape's project so a clean clone compiles on demand instead of depending on a
    ``.build/`` left behind by an earlier run.
    """
    from ape import project  # imported here: the gateway itself never needs ape

    return {
        name: json.loads(getattr(project, name).contract_type.model_dump_json(by_alias=True, exclude_none=True))["abi"]
        for name in CONTRACTS
    }


def export() -> None:
    HERE.mkdir(exist_ok=True)
    for name, entries in compiled().items():
        (HERE / f"{name}.json").write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
        print(f"wrote {HERE / f'{name}.json'}")


if __name__ == "__main__":
    export()
    sys.exit(0)
