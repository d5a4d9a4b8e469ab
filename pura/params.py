"""Deployment parameters: one reviewed file per network under deployments/params/.

`deployments/params/<ecosystem>-<network>.json` (e.g. `base-sepolia.json`,
`ethereum-local.json`) holds every number a deployment is made with; the deploy script
reads it through `ProtocolParams.load`, validates it against the contracts' own bounds
before sending anything, and records it (with its digest) in the deployment file.

Amounts are integers in the settlement token's base units (so the same file shape works
for 6- and 18-decimal tokens); fixed-point values name their scale (`_wad`, `_bps`). Keys
starting with `_` are comments (e.g. `_comment`, `_token_source`) and are ignored; any
other unknown key is an error, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from eth_utils import is_checksum_address, is_hex_address, keccak, to_checksum_address

REPO = Path(__file__).resolve().parent.parent
PARAMS_DIR = REPO / "deployments" / "params"

WAD = 10**18
MAX_AMOUNT = 2**96 - 1  # token_io.MAX_AMOUNT: money fields are packed into 96 bits
MAX_FEE = 2**96 - 1  # PricingCurve.MAX_FEE


class ParamsError(ValueError):
    """A parameters file that cannot be deployed; the message lists every problem."""


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
class PricingParams:
    """PricingCurve.set_params; the defaults are the contract's constructor defaults, so a
    file that leaves them out costs no transaction."""

    target_util_bps: int = 8_000
    max_step_bps: int = 1_250
    congestion_bps: int = 10_000
    max_congestion_bps: int = 30_000
    escrow_bps: int = 8_000


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
    # Checked against the token's symbol() when set (guards against a wrong address).
    token_symbol: str | None = None
    treasury: str | None = None
    # BackpressurePool.set_params' third value (share of spare capacity drained from
    # escrow at each rebalance); 10_000 is the contract's default.
    drain_bps: int = 10_000
    pricing: PricingParams = field(default_factory=PricingParams)
    # Local chains only (a deployed TestToken): mint this much to each of the first
    # `test_mint_accounts` test accounts so the operating scripts work out of the box.
    test_mint: int = 0
    test_mint_accounts: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["task_types"] = [asdict(t) for t in self.task_types]
        return d

    def digest(self) -> str:
        """keccak256 of the canonical JSON of these parameters (recorded in deployments)."""
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return "0x" + keccak(text=canonical).hex()

    def task_type(self, name: str) -> TaskTypeParams:
        for t in self.task_types:
            if t.name == name:
                return t
        raise KeyError(name)

    @classmethod
    def from_json(cls, d: dict) -> "ProtocolParams":
        problems: list[str] = []
        d = _strip_comments(d, cls, "parameters", problems)
        tts = []
        for i, t in enumerate(d.pop("task_types", []) or []):
            t = _strip_comments(t, TaskTypeParams, f"task_types[{i}]", problems)
            try:
                tts.append(TaskTypeParams(**t))
            except TypeError as err:
                problems.append(f"task_types[{i}]: {err}")
        if "pricing" in d:
            p = _strip_comments(d.pop("pricing") or {}, PricingParams, "pricing", problems)
            d["pricing"] = PricingParams(**p)
        if problems:
            raise ParamsError("; ".join(problems))
        try:
            return cls(task_types=tuple(tts), **d)
        except TypeError as err:
            raise ParamsError(f"parameters: {err}") from err

    @classmethod
    def load_file(cls, path: str | Path) -> "ProtocolParams":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no parameters file: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ParamsError(f"{path}: not valid JSON ({err})") from err
        try:
            return cls.from_json(raw)
        except ParamsError as err:
            raise ParamsError(f"{path}: {err}") from err

    @classmethod
    def load(cls, network_key: str) -> "ProtocolParams":
        path = params_path(network_key)
        if not path.exists():
            raise FileNotFoundError(f"no parameters file for network {network_key!r}: {path}")
        return cls.load_file(path)

    # ------------------------------------------------------------------ validation

    def problems(self, public: bool) -> list[str]:
        """Everything the contracts (or a public deployment) would reject, found before
        any transaction is sent. `public`: a public network (a token address is required)."""
        out: list[str] = []

        def need(cond: bool, msg: str):
            if not cond:
                out.append(msg)

        ints = {f.name: getattr(self, f.name) for f in fields(self)
                if f.type in ("int", int)}
        for name, v in ints.items():
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be a non-negative integer (got {v!r})")
        if out:
            return out
        need(self.epoch_length > 0, "epoch_length must be > 0 seconds")
        need(0 < self.alpha_wad <= WAD, "alpha_wad must be in (0, 1e18]")
        need(1_000 <= self.tolerance_bps <= 100_000, "tolerance_bps must be in [1000, 100000]")
        need(self.min_funding > 0, "min_funding must be > 0")
        need(self.escrow_min_deposit > 0, "escrow_min_deposit must be > 0")
        need(self.slash_bps <= 10_000, "slash_bps must be <= 10000")
        need(5_000 <= self.slash_threshold_bps <= 100_000, "slash_threshold_bps must be in [5000, 100000]")
        need(self.drain_bps <= 10_000, "drain_bps must be <= 10000")
        need(0 <= self.token_decimals <= 36, "token_decimals must be in [0, 36]")
        p = self.pricing
        need(0 < p.target_util_bps <= 10_000, "pricing.target_util_bps must be in (0, 10000]")
        need(0 < p.max_step_bps <= 5_000, "pricing.max_step_bps must be in (0, 5000]")
        need(p.congestion_bps <= 100_000, "pricing.congestion_bps must be <= 100000")
        need(p.max_congestion_bps <= 1_000_000, "pricing.max_congestion_bps must be <= 1000000")
        need(p.escrow_bps <= 100_000, "pricing.escrow_bps must be <= 100000")
        for label, addr in (("token", self.token), ("treasury", self.treasury)):
            if addr is None:
                continue
            need(isinstance(addr, str) and is_hex_address(addr), f"{label} is not an address: {addr!r}")
            if isinstance(addr, str) and is_hex_address(addr) and addr != addr.lower():
                need(is_checksum_address(addr), f"{label} has a bad checksum: {addr} (expected {to_checksum_address(addr)})")
            need(not (isinstance(addr, str) and int(addr, 16) == 0), f"{label} is the zero address")
        if public:
            need(self.token is not None, "token: a public network needs the settlement token's address")
            need(self.test_mint == 0 and self.test_mint_accounts == 0,
                 "test_mint/test_mint_accounts are for local chains only")
        need(len(self.task_types) > 0, "task_types: at least one task type is needed")
        names = [t.name for t in self.task_types]
        need(len(set(names)) == len(names), "task_types: duplicate names")
        for t in self.task_types:
            pre = f"task type {t.name!r}"
            vals = asdict(t)
            bad = [k for k, v in vals.items() if k != "name" and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0)]
            if bad:
                out.append(f"{pre}: {', '.join(bad)} must be non-negative integers")
                continue
            need(isinstance(t.name, str) and 0 < len(t.name) <= 64, f"{pre}: name must be 1..64 characters")
            need(t.stake_per_unit > 0, f"{pre}: stake_per_unit must be > 0")
            need(t.min_bond >= t.stake_per_unit, f"{pre}: min_bond must be >= stake_per_unit")
            need(t.min_bond <= MAX_AMOUNT, f"{pre}: min_bond must be < 2**96")
            need(t.min_fee > 0, f"{pre}: min_fee must be > 0")
            need(t.min_fee <= t.base_fee <= t.max_fee, f"{pre}: need min_fee <= base_fee <= max_fee")
            need(t.max_fee <= MAX_FEE, f"{pre}: max_fee must be < 2**96")
            need(t.escrow_max <= MAX_AMOUNT, f"{pre}: escrow_max must be < 2**96")
        return out

    def validate(self, public: bool) -> "ProtocolParams":
        errs = self.problems(public)
        if errs:
            raise ParamsError("invalid parameters: " + "; ".join(errs))
        return self


def params_path(network_key: str) -> Path:
    return PARAMS_DIR / f"{network_key}.json"


def network_key(ecosystem: str, network: str) -> str:
    """The file stem for a network: `base:sepolia` -> `base-sepolia`."""
    return f"{ecosystem}-{network}".replace(":", "-").replace("/", "-")


def _strip_comments(d: dict, cls, where: str, problems: list[str]) -> dict:
    if not isinstance(d, dict):
        problems.append(f"{where}: expected an object")
        return {}
    known = {f.name for f in fields(cls)}
    out = {}
    for k, v in d.items():
        if k.startswith("_"):
            continue
        if k not in known:
            problems.append(f"{where}: unknown key {k!r}")
            continue
        out[k] = v
    return out
