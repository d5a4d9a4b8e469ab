"""Where provider weights come from: one input of the router.

The router reads a :class:`WeightSnapshot` synchronously on every request and never waits for
its source. A source refreshes itself in the background (the app's lifespan calls
:meth:`WeightSource.refresh` every ``refresh_interval_s``); if a refresh fails, the previous
snapshot stays in force. That is the contract the on-chain source of issue 5 implements
(pool units read with a timeout, cached with a TTL, last-known weights when the chain is
unreachable). Until then :class:`ConfigWeightSource` serves the weights of the routing file.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gateway.config import RoutingConfig


@dataclass(frozen=True, slots=True)
class WeightSnapshot:
    """Non-negative weight per provider name, with where and when it came from.

    ``by_tier`` (optional) overrides ``weights`` per tier: on chain a provider has one weight
    per task type, and each tier is a task type. ``stale`` says the source could not refresh
    for a while and this is its last-known state.
    """

    weights: Mapping[str, float]
    source: str
    as_of: float = field(default_factory=time.time)
    by_tier: Mapping[str, Mapping[str, float]] | None = None
    stale: bool = False

    def get(self, provider: str, tier: str | None = None) -> float:
        if self.by_tier is not None and tier is not None and tier in self.by_tier:
            return float(self.by_tier[tier].get(provider, 0.0))
        return float(self.weights.get(provider, 0.0))

    def age_s(self) -> float:
        return max(0.0, time.time() - self.as_of)


class WeightSource(Protocol):
    refresh_interval_s: float

    def snapshot(self) -> WeightSnapshot: ...

    async def refresh(self) -> None: ...


class ConfigWeightSource:
    """Weights written in the routing file (``[[providers]] weight = ...``)."""

    refresh_interval_s = 0.0  # static: nothing to refresh

    def __init__(self, config: RoutingConfig) -> None:
        self._snapshot = WeightSnapshot(
            weights={p.name: p.weight for p in config.providers}, source="config"
        )

    def snapshot(self) -> WeightSnapshot:
        return self._snapshot

    async def refresh(self) -> None:
        return None


class StaticWeightSource:
    """Weights given in code (tests, simulations)."""

    refresh_interval_s = 0.0

    def __init__(self, weights: Mapping[str, float], source: str = "static") -> None:
        self._snapshot = WeightSnapshot(weights=dict(weights), source=source)

    def snapshot(self) -> WeightSnapshot:
        return self._snapshot

    def set(self, weights: Mapping[str, float]) -> None:
        self._snapshot = WeightSnapshot(weights=dict(weights), source=self._snapshot.source)

    async def refresh(self) -> None:
        return None
