"""Configuration: process settings (``PURA_*`` environment) and the routing/upstream file.

Two layers, on purpose:

* :class:`GatewaySettings` - how this process runs (listen address, database URL, log level,
  path of the routing file). pydantic-settings, ``PURA_`` prefix.
* :class:`RoutingConfig` - what the gateway routes to (upstreams, models, prices, tiers, weights,
  complexity rules, cascade policy). A TOML file, because it is data that operators review and
  version; every field has a default so an empty file is valid.

Money in this file is written as decimal strings in USD (``"0.15"`` per million tokens) and
converted once, at load time, to integer micro-USD (see :mod:`gateway.accounting.money`).
"""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Tier = Literal["cheap", "mid", "premium"]
TIERS: tuple[Tier, ...] = ("cheap", "mid", "premium")


class GatewaySettings(BaseSettings):
    """Process settings, read from ``PURA_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="PURA_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8600
    config: Path | None = Field(default=None, description="routing/upstream TOML file")
    database_url: str = "sqlite:///.pura/gateway.db"
    log_level: str = "INFO"
    log_requests: bool = True
    cors_origins: list[str] = ["*"]
    routing_seed: int | None = Field(
        default=None, description="seed for exploration/weighted choice (tests, replays)"
    )
    reservation_ttl_s: int = Field(
        default=900, description="reservations older than this are released by the sweeper"
    )
    sweep_interval_s: float = 60.0
    budget_lease_factor: int = Field(
        default=16, ge=0,
        description="a budget lease grows by up to this many times the reservation that grows"
        " it (see accounting.leases); 0 holds exactly the requests in flight",
    )
    settle_delay_ms: float = Field(
        default=5.0, ge=0, description="group-commit window of settlements (see accounting.settlement)"
    )
    settlement_retry_ms: float = Field(
        default=50.0, gt=0, allow_inf_nan=False,
        description="first backoff after a settlement failed to commit, doubled after each failure",
    )
    settlement_retry_max_ms: float = Field(
        default=10_000.0, gt=0, allow_inf_nan=False, description="the longest backoff between retries"
    )
    settlement_max_failures: int = Field(
        default=20, ge=1, description="failed tries before a settlement is dead-lettered"
    )
    settlement_dead_letter: Path | None = Field(
        default=None,
        description="the dead-letter file (default: settlement-dead-letter.jsonl next to the SQLite"
        " file, in the working directory with PostgreSQL); see accounting.settlement",
    )
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    key_cache_ttl_s: float = Field(
        default=1.0, ge=0,
        description="how long a key's rate limit is cached, and how often other processes'"
        " rate-limit counts are read back (see accounting.ratelimit); 0 reads both every request",
    )

    @model_validator(mode="after")
    def _backoff_grows(self) -> GatewaySettings:
        """The settlement backoff doubles from the first to the longest, so a longest below the
        first is a mistake. The error names the variables: an operator meets it at start-up."""
        if self.settlement_retry_max_ms < self.settlement_retry_ms:
            raise ValueError(
                f"PURA_SETTLEMENT_RETRY_MAX_MS ({self.settlement_retry_max_ms:g}) must be >="
                f" PURA_SETTLEMENT_RETRY_MS ({self.settlement_retry_ms:g})"
            )
        return self


class ModelConfig(BaseModel):
    """One model an upstream serves, with its tier and price."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="model id clients see and pin")
    upstream_id: str | None = Field(default=None, description="id sent upstream (default: id)")
    tier: Tier
    input_usd_per_mtok: Decimal = Decimal("0")
    output_usd_per_mtok: Decimal = Decimal("0")

    @field_validator("input_usd_per_mtok", "output_usd_per_mtok")
    @classmethod
    def _non_negative(cls, v: Decimal) -> Decimal:
        if v < 0:
            raise ValueError("prices must be >= 0")
        return v

    @property
    def send_as(self) -> str:
        return self.upstream_id or self.id


class ProviderConfig(BaseModel):
    """An OpenAI-compatible upstream: URL, key, models, timeouts and routing weight."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    base_url: str = Field(description="OpenAI-compatible base URL, ending before /chat/completions")
    api_key: str | None = Field(default=None, description="literal key (prefer api_key_env)")
    api_key_env: str | None = Field(default=None, description="environment variable holding the key")
    extra_headers: dict[str, str] = Field(default_factory=dict)
    weight: float = Field(default=1.0, ge=0, description="configured weight (until on-chain weights)")
    models: list[ModelConfig] = Field(min_length=1)
    stream_usage: bool = Field(
        default=True, description="ask for usage in streams (stream_options.include_usage)"
    )
    connect_timeout_s: float = Field(default=3.0, gt=0)
    first_byte_timeout_s: float = Field(default=30.0, gt=0)
    total_timeout_s: float = Field(default=300.0, gt=0)
    stream_idle_timeout_s: float = Field(default=60.0, gt=0)
    local_stand_in: bool = Field(
        default=False, description="true for Pura's local stand-in provider servers"
    )
    # On-chain identity (used when [chain] is enabled): the provider's sink address, and who
    # signs its side of each receipt: the provider itself through the Pura sidecar protocol
    # ("sidecar", see gateway.chain.receipts), or the operator with a key it holds ("keystore",
    # the key read from the environment variable `sink_key_env`).
    sink: str | None = Field(default=None, pattern=r"^0x[0-9a-fA-F]{40}$")
    sink_signer: Literal["keystore", "sidecar"] = "keystore"
    sink_key_env: str | None = None

    def resolved_api_key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or self.api_key
        return self.api_key


class ComplexityRules(BaseModel):
    """Features and thresholds of the complexity tiering (all data; see routing.complexity)."""

    model_config = ConfigDict(extra="forbid")

    premium_system_chars: int = 500
    premium_total_chars: int = 6000
    premium_turns: int = 10
    cheap_max_chars: int = 200
    cheap_max_turns: int = 3
    code_is_mid: bool = True
    reasoning_cues: list[str] = Field(
        default_factory=lambda: [
            "step by step",
            "think through",
            "analyze",
            "analyse",
            "compare and contrast",
            "explain why",
            "prove that",
            "derive",
            "what are the tradeoffs",
            "what are the trade-offs",
            "debug this",
            "review this code",
        ]
    )


class CascadePolicy(BaseModel):
    """Answer scoring weights and escalation limits of the cascade."""

    model_config = ConfigDict(extra="forbid")

    enabled_for_auto: bool = True
    accept_threshold: float = Field(default=0.7, ge=0, le=1)
    max_escalations: int = Field(default=3, ge=0, le=3)
    w_refusal: float = 0.30
    w_completeness: float = 0.30
    w_hedging: float = 0.25
    w_length: float = 0.15

    @model_validator(mode="after")
    def _weights_sum_to_one(self) -> CascadePolicy:
        total = self.w_refusal + self.w_completeness + self.w_hedging + self.w_length
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"cascade weights must sum to 1 (got {total})")
        return self


class SelectionPolicy(BaseModel):
    """Provider choice within a tier."""

    model_config = ConfigDict(extra="forbid")

    exploration_rate: float = Field(default=0.05, ge=0, le=0.5)
    degraded_error_rate: float = Field(default=0.20, ge=0, le=1)
    degraded_latency_ms: float = Field(default=5000, gt=0)
    window_s: int = Field(default=300, ge=10, description="sliding window of the quality score")
    min_samples: int = Field(default=5, ge=1, description="samples before degradation counts")
    max_attempts: int = Field(default=3, ge=1, le=10, description="upstreams tried per answer")


class AccountingPolicy(BaseModel):
    """Defaults for new keys and for reservations."""

    model_config = ConfigDict(extra="forbid")

    default_daily_budget_usd: Decimal = Decimal("10")
    default_rate_limit_per_min: int = Field(default=30, ge=1)
    default_max_completion_tokens: int = Field(
        default=1024, ge=1, description="reservation bound when the request sets no max_tokens"
    )
    premium_reference_model: str | None = Field(
        default=None, description="model priced for 'savings vs premium' (default: priciest premium)"
    )


class ChainConfig(BaseModel):
    """The on-chain half (issue 5): which deployment, which account, how often."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    deployment: Path = Field(description="deployments/<ecosystem>-<network>.json written by `ape run deploy`")
    rpc_url: str | None = Field(default=None, description="literal RPC URL (prefer rpc_url_env)")
    rpc_url_env: str = "PURA_CHAIN_RPC"
    source_key_env: str = Field(
        default="PURA_CHAIN_SOURCE_KEY", description="env var with the gateway's (source's) private key"
    )
    task_types: dict[str, str] = Field(
        default_factory=lambda: {"cheap": "llm.cheap", "mid": "llm.mid", "premium": "llm.premium"},
        description="tier -> task type name (keccak256 of the name is the on-chain id)",
    )
    read_timeout_s: float = Field(default=2.0, gt=0)
    refresh_interval_s: float = Field(default=5.0, gt=0, description="weight refresh period")
    stale_after_s: float = Field(default=30.0, gt=0, description="weights older than this are reported stale")
    batch_size: int = Field(default=50, ge=1, le=64, description="receipts per CompletionTracker batch")
    batch_interval_s: float = Field(default=2.0, gt=0, description="max age of a queued receipt before a batch goes")
    tx_timeout_s: float = Field(default=60.0, gt=0)
    receipt_ttl_s: int = Field(default=86_400, ge=60, description="receipt deadline after the request")
    keeper_interval_s: float = Field(default=2.0, gt=0)
    rebalance: bool = Field(default=True, description="call rebalance when an epoch is due")
    fund: bool = Field(default=True, description="keep a stream per task type sized to spend")
    funding_margin: float = Field(
        default=0.9, gt=0, le=2.0,
        description="stream rate = measured spend x margin; below 1 on purpose: instant top-ups add "
                    "exactly what waiting receipts need, so the pool never pays out money nobody vouches for",
    )
    funding_runway_epochs: float = Field(default=3.0, gt=0, description="top up to this many epochs of streaming")
    spill_pressure: float = Field(
        default=0.8, gt=0, le=1.0,
        description="when a tier's escrow is this full (its sinks cannot absorb the money), auto-routed "
                    "requests go to the next tier up instead of adding to the backlog",
    )
    min_stream_rate: int = Field(
        default=20, ge=1,
        description="base units per second below which the gateway does not stream (a rate rounds to "
                    "whole units per second, so a tiny spend would be over-paid); it then pays by "
                    "instant top-ups only, which match receipts exactly",
    )
    funding_window_epochs: float = Field(default=1.0, gt=0, description="spend is measured over this window")

    def resolved_rpc_url(self) -> str:
        url = os.environ.get(self.rpc_url_env) or self.rpc_url
        if not url:
            raise ValueError(f"no RPC URL: set {self.rpc_url_env} (or chain.rpc_url in the routing file)")
        return url


class RoutingConfig(BaseModel):
    """The routing file: upstreams and every routing/accounting policy knob."""

    model_config = ConfigDict(extra="forbid")

    providers: list[ProviderConfig] = Field(default_factory=list)
    chain: ChainConfig | None = None
    complexity: ComplexityRules = Field(default_factory=ComplexityRules)
    cascade: CascadePolicy = Field(default_factory=CascadePolicy)
    selection: SelectionPolicy = Field(default_factory=SelectionPolicy)
    accounting: AccountingPolicy = Field(default_factory=AccountingPolicy)

    @model_validator(mode="after")
    def _unique_names(self) -> RoutingConfig:
        names = [p.name for p in self.providers]
        if len(names) != len(set(names)):
            raise ValueError("provider names must be unique")
        return self

    @classmethod
    def load(cls, path: Path | str) -> RoutingConfig:
        with open(path, "rb") as fh:
            return cls.model_validate(tomllib.load(fh))
