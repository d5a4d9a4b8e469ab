"""Which upstream answers: the route catalogue, hint filters, weighted choice, exploration and
fallback order.

Choice within a tier is *proportional*: a route is drawn with probability proportional to
``weight(provider) x quality(route)`` (x2 for the ``prefer``-ed provider), chosen by smooth
weighted round-robin, so traffic splits the way the weights (the on-chain pool units) say, and a degrading route loses share smoothly. If
every eligible route has weight 0 (for example a chain with no registered sinks) the draw is
uniform instead of falling back to a fixed order (the seed sent everything to openai then).

Exploration: with probability ``exploration_rate`` (doubled while any route is degraded: more
than 20 % errors or more than 5 s average latency over the window) the draw is replaced by a
pick among the *other* eligible routes of the tier, weighted toward the least measured, so routes that the weights starve
still get measured and can recover. Exploration obeys the hints.

Hints filter strictly: ``excludeProviders`` removes providers, ``maxCost`` (USD per 1K tokens,
compared with the route's higher price) and ``maxLatency`` (ms, compared with the route's window
average; unmeasured routes pass) remove routes. If nothing survives, the request gets a 503
rather than the unfiltered set.

Fallback order after the first choice: the rest of the tier by score, then higher tiers, then
lower tiers, all filtered by the same hints, at most ``max_attempts`` in total.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from decimal import Decimal

from gateway.accounting.money import Price
from gateway.config import TIERS, ModelConfig, ProviderConfig, RoutingConfig, SelectionPolicy, Tier
from gateway.routing.quality import HealthBook
from gateway.routing.weights import WeightSource


@dataclass(frozen=True, slots=True)
class Route:
    """One (provider, model) pair that can answer."""

    provider: ProviderConfig
    model: ModelConfig
    price: Price
    order: int  # position in the routing file, the tie-breaker
    # "provider/model": computed once, as every request looks it up a dozen times
    key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.provider.name}/{self.model.id}")

    @property
    def provider_name(self) -> str:
        return self.provider.name

    @property
    def tier(self) -> Tier:
        return self.model.tier


class Catalogue:
    """Every route of the routing file, indexed by tier and by model id."""

    def __init__(self, config: RoutingConfig) -> None:
        self.routes: list[Route] = []
        for provider in config.providers:
            for model in provider.models:
                price = Price.from_usd_per_mtok(model.input_usd_per_mtok, model.output_usd_per_mtok)
                self.routes.append(Route(provider, model, price, len(self.routes)))
        self.by_tier: dict[str, list[Route]] = {t: [] for t in TIERS}
        self.by_model: dict[str, list[Route]] = {}
        for route in self.routes:
            self.by_tier[route.tier].append(route)
            self.by_model.setdefault(route.model.id, []).append(route)
        self.provider_names = [p.name for p in config.providers]
        self.premium_reference = self._premium_reference(config)

    def _premium_reference(self, config: RoutingConfig) -> Price | None:
        wanted = config.accounting.premium_reference_model
        if wanted:
            routes = self.by_model.get(wanted)
            if not routes:
                raise ValueError(f"premium_reference_model {wanted!r} is not in the catalogue")
            return routes[0].price
        pool = self.by_tier["premium"] or self.routes
        if not pool:
            return None
        return max(
            pool, key=lambda r: (r.price.output_micros_per_mtok, r.price.input_micros_per_mtok)
        ).price

    def model_ids(self) -> list[str]:
        return sorted(self.by_model)


@dataclass(frozen=True, slots=True)
class Hints:
    """Validated routing hints (see gateway.schemas.RoutingHints for the wire format)."""

    quality: str | None = None
    prefer: str | None = None
    max_cost_usd_per_1k: Decimal | None = None
    max_latency_ms: float | None = None
    exclude_providers: frozenset[str] = frozenset()


@dataclass(slots=True)
class Plan:
    """The ordered routes to try for one answer."""

    tier: Tier
    routes: list[Route]
    explored: bool = False
    scores: dict[str, float] = field(default_factory=dict)


class NoEligibleRoute(Exception):
    """Nothing survives the hints (or nothing is configured)."""


class Router:
    def __init__(
        self,
        catalogue: Catalogue,
        weights: WeightSource,
        health: HealthBook,
        policy: SelectionPolicy,
        rng: random.Random,
    ) -> None:
        self.catalogue = catalogue
        self.weights = weights
        self.health = health
        self.policy = policy
        self.rng = rng
        # smooth weighted round-robin credit per route (see _pick)
        self._credit: dict[str, float] = {}

    # ---- filters and scores

    def passes(self, route: Route, hints: Hints) -> bool:
        if route.provider_name in hints.exclude_providers:
            return False
        if hints.max_cost_usd_per_1k is not None:
            # micro-USD per million tokens -> USD per 1K tokens is a division by 1e9
            if Decimal(route.price.max_micros_per_mtok) > hints.max_cost_usd_per_1k * 1_000_000_000:
                return False
        if hints.max_latency_ms is not None:
            stats = self.health.stats(route.key)
            if stats.requests and stats.avg_latency_ms > hints.max_latency_ms:
                return False
        return True

    def score(self, route: Route, hints: Hints, snapshot_weight: float) -> float:
        value = snapshot_weight * self.health.quality(route.key)
        if hints.prefer and route.provider_name == hints.prefer:
            value *= 2.0
        return value

    def exploration_rate(self) -> float:
        rate = self.policy.exploration_rate
        return min(1.0, rate * 2) if self.health.any_degraded() else rate

    # ---- choice

    def _draw(self, candidates: list[Route], scores: dict[str, float]) -> Route:
        """A random draw proportional to the scores (exploration)."""
        total = sum(scores[r.key] for r in candidates)
        if total <= 0:
            return self.rng.choice(candidates)
        point = self.rng.random() * total
        for route in candidates:
            point -= scores[route.key]
            if point < 0:
                return route
        return candidates[-1]

    def _pick(self, candidates: list[Route], scores: dict[str, float]) -> Route:
        """Smooth weighted round-robin: each candidate gains its score in credit, the richest
        is picked and pays the total. Over any run of requests each route gets its share of
        traffic to within one request, instead of a binomial scatter around it. That matters
        on chain: the pool pays each sink exactly its share, so traffic that randomly falls
        short of the share looks like undelivered work (backlog) and traffic above it is
        credit that expires at the epoch boundary."""
        total = sum(scores[r.key] for r in candidates)
        if total <= 0:
            return self.rng.choice(candidates)
        best: Route | None = None
        for route in candidates:
            credit = self._credit.get(route.key, 0.0) + scores[route.key]
            self._credit[route.key] = credit
            if best is None or credit > self._credit[best.key]:
                best = route
        assert best is not None
        self._credit[best.key] -= total
        # keep credits bounded when candidate sets change between requests
        if abs(self._credit[best.key]) > 1e6 * total:
            self._credit.clear()
        return best

    def _ranked(self, routes: list[Route], scores: dict[str, float]) -> list[Route]:
        # ties (equal weights) go to the route the round-robin owes most traffic, so the
        # fallback traffic of a failing provider spreads the way the weights say
        return sorted(routes, key=lambda r: (-scores[r.key], -self._credit.get(r.key, 0.0), r.order))

    def plan(
        self,
        tier: Tier,
        hints: Hints,
        pinned_model: str | None = None,
        same_tier_only: bool = False,
        avoid: frozenset[str] = frozenset(),
    ) -> Plan:
        """First choice plus fallbacks for one answer.

        ``pinned_model`` restricts routes to that model id (any provider serving it).
        ``same_tier_only`` keeps fallbacks inside ``tier`` (used by the cascade, which escalates
        between tiers itself). ``avoid`` removes route keys already tried.
        """
        snapshot = self.weights.snapshot()
        if pinned_model is not None:
            pool = [r for r in self.catalogue.by_model.get(pinned_model, []) if self.passes(r, hints)]
            tiers_in_order: list[list[Route]] = [pool]
        else:
            index = TIERS.index(tier)
            order = [TIERS[index]]
            if not same_tier_only:
                order += list(TIERS[index + 1 :]) + list(reversed(TIERS[:index]))
            tiers_in_order = [
                [r for r in self.catalogue.by_tier[t] if self.passes(r, hints)] for t in order
            ]
        tiers_in_order = [[r for r in group if r.key not in avoid] for group in tiers_in_order]
        scores = {
            r.key: self.score(r, hints, snapshot.get(r.provider_name, r.tier))
            for group in tiers_in_order
            for r in group
        }
        first_group = next((g for g in tiers_in_order if g), None)
        if first_group is None:
            raise NoEligibleRoute("no upstream satisfies the model and routing constraints")
        chosen = self._pick(first_group, scores)
        explored = False
        if len(first_group) > 1 and self.rng.random() < self.exploration_rate():
            # explore where we know least: among the other routes, proportional to
            # 1 / (1 + requests seen in the window), so a route the weights starve (a
            # provider coming back after a failure) gets most of the exploration
            others = [r for r in first_group if r.key != chosen.key]
            chosen = self._draw(others, {r.key: 1.0 / (1 + self.health.stats(r.key).requests) for r in others})
            explored = True
        ordered = [chosen]
        for group in tiers_in_order:
            ordered += [r for r in self._ranked(group, scores) if r.key != chosen.key]
        return Plan(
            tier=chosen.tier,
            routes=ordered[: self.policy.max_attempts],
            explored=explored,
            scores=scores,
        )
