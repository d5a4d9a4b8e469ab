"""Deployment parameters: one reviewed file per network under deployments/params/.

Amounts are integers in the settlement token's base units (so the same file shape works
for 6- and 18-decimal tokens); fixed-point values name their scale (`_wad`, `_bps`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARAMS_DIR = REPO / "deployments" / "params"


@dataclass(frozen=True)
class TaskTypeParams:
    name: str
    min_bond: int
    stake_per_unit: int
    base_fee: int
    min_fee: int
    max_fee: int
    escrow_max: int


@dataclass(frozen=True)
class ProtocolParams:
    epoch_length: int
    alpha_wad: int
    unbonding_period: int
    tolerance_bps: int
    min_funding: int
    escrow_min_deposit: int
    slash_bps: int
    slash_threshold_bps: int
    task_types: tuple[TaskTypeParams, ...] = field(default_factory=tuple)
    # Settlement token: an address on public networks; on local chains the deploy script
    # creates a TestToken with these decimals when `token` is null.
    token: str | None = None
    token_decimals: int = 6
    treasury: str | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["task_types"] = [asdict(t) for t in self.task_types]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ProtocolParams":
        d = dict(d)
        d.pop("_comment", None)
        tts = tuple(TaskTypeParams(**{k: v for k, v in t.items() if not k.startswith("_")}) for t in d.pop("task_types", []))
        return cls(task_types=tts, **{k: v for k, v in d.items() if not k.startswith("_")})

    @classmethod
    def load(cls, network_key: str) -> "ProtocolParams":
        path = PARAMS_DIR / f"{network_key}.json"
        if not path.exists():
            raise FileNotFoundError(f"no parameters file for network {network_key!r}: {path}")
        return cls.from_json(json.loads(path.read_text()))
