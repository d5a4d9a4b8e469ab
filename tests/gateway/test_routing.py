"""Every routing rule: complexity tiers, hint filters, weighted choice, exploration, fallback,
sliding windows and the quality score."""

from __future__ import annotations

import random
from collections import Counter
from decimal import Decimal

import openai
import pytest

from gateway.config import ComplexityRules, ModelConfig, ProviderConfig, RoutingConfig, SelectionPolicy
from gateway.routing.complexity import base_tier, classify, extract_features, shift_tier
from gateway.routing.quality import HealthBook, SlidingWindow, latency_score, quality_score
from gateway.routing.selection import Catalogue, Hints, NoEligibleRoute, Router
from gateway.routing.weights import StaticWeightSource

RULES = ComplexityRules()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


# ---------------------------------------------------------------- complexity: one test per rule


def test_long_system_prompt_is_premium() -> None:
    messages = [{"role": "system", "content": "s" * 501}, user("hi")]
    assert base_tier(extract_features(messages), RULES) == ("premium", "long_system_prompt")
    messages[0]["content"] = "s" * 500
    assert base_tier(extract_features(messages), RULES)[1] != "long_system_prompt"


def test_long_request_is_premium() -> None:
    assert base_tier(extract_features([user("word " * 1201)]), RULES) == ("premium", "long_request")


@pytest.mark.parametrize(
    "text",
    ["Please think step by step.", "Analyse this", "Explain why  the sky is blue",
     "What are the trade-offs?", "debug this function", "Prove that 2 is prime"],
)
def test_reasoning_cues_are_premium(text: str) -> None:
    assert base_tier(extract_features([user(text)]), RULES) == ("premium", "reasoning_cue")


@pytest.mark.parametrize("text", ["the derived value", "an analyzer tool", "derivative"])
def test_reasoning_cues_match_whole_words_only(text: str) -> None:
    assert base_tier(extract_features([user(text)]), RULES)[1] != "reasoning_cue"


def test_many_turns_are_premium() -> None:
    turns = [user("hi") if i % 2 == 0 else {"role": "assistant", "content": "ok"} for i in range(11)]
    assert base_tier(extract_features(turns), RULES) == ("premium", "many_turns")


def test_code_is_mid_even_when_short() -> None:
    assert base_tier(extract_features([user("```py\nx=1\n```")]), RULES) == ("mid", "code")
    assert base_tier(extract_features([user("```py\nunclosed")]), RULES) == ("mid", "code")


def test_short_simple_request_is_cheap() -> None:
    assert base_tier(extract_features([user("What is 2+2?")]), RULES) == ("cheap", "short")


def test_short_but_many_turns_is_mid() -> None:
    turns = [user("a"), {"role": "assistant", "content": "b"}, user("c"), {"role": "assistant", "content": "d"}]
    assert base_tier(extract_features(turns), RULES) == ("mid", "default")


def test_medium_length_is_mid() -> None:
    assert base_tier(extract_features([user("x " * 150)]), RULES) == ("mid", "default")


def test_thresholds_are_data() -> None:
    rules = ComplexityRules(cheap_max_chars=5, reasoning_cues=["ponder"])
    assert base_tier(extract_features([user("What is 2+2?")]), rules) == ("mid", "default")
    assert base_tier(extract_features([user("ponder this")]), rules) == ("premium", "reasoning_cue")
    assert base_tier(extract_features([user("think step by step")]), rules)[1] != "reasoning_cue"


def test_quality_hint_shifts_one_tier_with_bounds() -> None:
    assert shift_tier("cheap", "high") == "mid"
    assert shift_tier("premium", "high") == "premium"
    assert shift_tier("mid", "low") == "cheap"
    assert shift_tier("cheap", "low") == "cheap"
    assert shift_tier("mid", "balanced") == "mid"
    assert classify([user("hi")], RULES, "high") == ("mid", "short")


# ---------------------------------------------------------------- selection


def _config(*providers: tuple[str, str, str, str, float]) -> RoutingConfig:
    return RoutingConfig(providers=[
        ProviderConfig(
            name=name, base_url=f"http://127.0.0.1:1/{name}", weight=weight,
            models=[ModelConfig(id=model, tier=tier, input_usd_per_mtok=Decimal(price),
                                output_usd_per_mtok=Decimal(price))],
        )
        for name, model, tier, price, weight in providers
    ])


def _router(config: RoutingConfig, weights: dict[str, float] | None = None, seed: int = 7,
            exploration: float = 0.0, health: HealthBook | None = None) -> Router:
    source = StaticWeightSource(weights or {p.name: p.weight for p in config.providers})
    return Router(Catalogue(config), source, health or HealthBook(), SelectionPolicy(exploration_rate=exploration),
                  random.Random(seed))


THREE_CHEAP = _config(
    ("a", "m1", "cheap", "0.1", 1.0), ("b", "m2", "cheap", "0.2", 3.0),
    ("c", "m3", "mid", "1", 1.0), ("d", "m4", "premium", "5", 1.0),
)


def _picks(router: Router, n: int = 4000, hints: Hints = Hints(), tier: str = "cheap") -> Counter:
    return Counter(router.plan(tier, hints).routes[0].provider_name for _ in range(n))


def test_choice_is_proportional_to_weight() -> None:
    picks = _picks(_router(THREE_CHEAP))
    assert set(picks) == {"a", "b"}  # never leaves the tier without a reason
    assert 0.70 < picks["b"] / 4000 < 0.80  # 3:1


def test_prefer_doubles_a_weight() -> None:
    picks = _picks(_router(THREE_CHEAP), hints=Hints(prefer="a"))
    assert 0.35 < picks["a"] / 4000 < 0.45  # 2:3


def test_weights_are_one_input_and_can_change_at_run_time() -> None:
    source = StaticWeightSource({"a": 1, "b": 0, "c": 1, "d": 1})
    router = Router(Catalogue(THREE_CHEAP), source, HealthBook(), SelectionPolicy(exploration_rate=0),
                    random.Random(1))
    assert {router.plan("cheap", Hints()).routes[0].provider_name for _ in range(200)} == {"a"}
    source.set({"a": 0, "b": 1, "c": 1, "d": 1})
    assert {router.plan("cheap", Hints()).routes[0].provider_name for _ in range(200)} == {"b"}


def test_all_zero_weights_route_uniformly_not_to_a_fixed_provider() -> None:
    picks = _picks(_router(THREE_CHEAP, weights={"a": 0, "b": 0, "c": 0, "d": 0}))
    assert 0.4 < picks["a"] / 4000 < 0.6


def test_quality_multiplies_weight() -> None:
    health = HealthBook()
    for _ in range(50):
        health.record("b/m2", False, 100)  # b fails everything: quality 0.6*(1/51)+0.4
    picks = _picks(_router(THREE_CHEAP, health=health))
    # weights 1 vs 3*0.41: a now wins more often than its 25 % weight share
    assert picks["a"] / 4000 > 0.40


def test_exclude_providers_is_strict() -> None:
    router = _router(THREE_CHEAP)
    plan = router.plan("cheap", Hints(exclude_providers=frozenset({"a"})))
    assert all(r.provider_name != "a" for r in plan.routes)
    with pytest.raises(NoEligibleRoute):
        router.plan("cheap", Hints(exclude_providers=frozenset({"a", "b", "c", "d"})))


def test_excluding_a_whole_tier_moves_up_first() -> None:
    plan = _router(THREE_CHEAP).plan("cheap", Hints(exclude_providers=frozenset({"a", "b"})))
    assert [r.provider_name for r in plan.routes] == ["c", "d"]


def test_max_cost_filters_by_price_per_1k_tokens() -> None:
    router = _router(THREE_CHEAP)
    # 0.1 USD/M = 0.0001 USD/1K; 0.2 USD/M = 0.0002 USD/1K
    plan = router.plan("cheap", Hints(max_cost_usd_per_1k=Decimal("0.00015")))
    assert [r.provider_name for r in plan.routes] == ["a"]
    with pytest.raises(NoEligibleRoute):
        router.plan("cheap", Hints(max_cost_usd_per_1k=Decimal("0.00001")))


def test_max_latency_filters_measured_routes_only() -> None:
    health = HealthBook()
    for _ in range(5):
        health.record("b/m2", True, 900)
    router = _router(THREE_CHEAP, health=health)
    plan = router.plan("cheap", Hints(max_latency_ms=500))
    assert "b" not in [r.provider_name for r in plan.routes]
    assert "a" in [r.provider_name for r in plan.routes]  # unmeasured passes


def test_fallback_order_same_tier_then_higher_then_lower() -> None:
    router = _router(THREE_CHEAP)
    router.policy = SelectionPolicy(exploration_rate=0, max_attempts=10)
    plan = router.plan("mid", Hints())
    assert [r.provider_name for r in plan.routes] == ["c", "d", "b", "a"]
    cheap = router.plan("cheap", Hints())
    assert [r.provider_name for r in cheap.routes][2:] == ["c", "d"]


def test_max_attempts_bounds_the_fallback_list() -> None:
    assert len(_router(THREE_CHEAP).plan("cheap", Hints()).routes) == 3


def test_pinned_model_only_uses_providers_serving_it() -> None:
    config = _config(("a", "same", "cheap", "0.1", 1.0), ("b", "same", "cheap", "0.3", 1.0),
                     ("c", "other", "cheap", "0.1", 1.0))
    plan = _router(config).plan("cheap", Hints(), pinned_model="same")
    assert {r.provider_name for r in plan.routes} == {"a", "b"}


def test_exploration_rate_is_about_five_percent_and_doubles_when_degraded() -> None:
    health = HealthBook()
    router = _router(THREE_CHEAP, exploration=0.05, health=health, weights={"a": 1, "b": 1000, "c": 1, "d": 1})
    explored = sum(router.plan("cheap", Hints()).explored for _ in range(10_000))
    assert 400 < explored < 600
    for _ in range(10):
        health.record("c/m3", False, 100)  # any route over 20 % errors: degraded
    assert router.exploration_rate() == pytest.approx(0.10)
    explored = sum(router.plan("cheap", Hints()).explored for _ in range(10_000))
    assert 850 < explored < 1150


def test_exploration_respects_hints_and_picks_another_route() -> None:
    router = _router(THREE_CHEAP, exploration=0.5, weights={"a": 1, "b": 1000, "c": 1, "d": 1})
    for _ in range(300):
        plan = router.plan("cheap", Hints(exclude_providers=frozenset({"a"})))
        assert plan.routes[0].provider_name == "b" and not plan.explored  # nothing else to explore
    explored = [p for p in (router.plan("cheap", Hints()) for _ in range(300)) if p.explored]
    # exploration replaces the weighted draw (almost always b) by another route of the tier
    assert explored and all(p.routes[0].tier == "cheap" for p in explored)
    assert sum(p.routes[0].provider_name == "a" for p in explored) >= len(explored) - 2


def test_exploration_favours_the_least_measured_route() -> None:
    """A route the weights starve (say a provider back from a failure) gets most of the
    exploration, so it is measured again quickly."""
    config = _config(("a", "m1", "cheap", "0.1", 1.0), ("b", "m2", "cheap", "0.1", 1.0),
                     ("c", "m3", "cheap", "0.1", 1.0))
    router = _router(config, exploration=0.5, weights={"a": 1000, "b": 1, "c": 1})
    for _ in range(200):  # b has been measured a lot, c not at all
        router.health.record("b/m2", True, 100)
    explored = [p.routes[0].provider_name for p in (router.plan("cheap", Hints()) for _ in range(600)) if p.explored]
    counts = Counter(explored)
    assert counts["c"] > 10 * max(1, counts["b"])


# ---------------------------------------------------------------- windows and quality


def test_sliding_window_really_slides() -> None:
    window = SlidingWindow(10)
    for t in range(10):
        window.record(ok=t % 2 == 0, latency_ms=100, now=1000 + t)
    assert window.stats(now=1009).requests == 10
    assert window.stats(now=1014).requests == 5  # 5 oldest seconds slid out
    assert window.stats(now=1014).failures == 3  # t = 5, 7, 9
    assert window.stats(now=1019).requests == 0
    window.record(ok=True, latency_ms=50, now=1020)  # reusing a stale bucket resets it
    assert window.stats(now=1020).requests == 1


def test_quality_score_and_degradation() -> None:
    assert latency_score(400) == 1.0 and latency_score(10_000) == 0.0
    health = HealthBook(window_s=300, min_samples=5)
    assert health.quality("x") == 1.0
    for _ in range(8):
        health.record("x", True, 300, now=10)
    for _ in range(2):
        health.record("x", False, 300, now=10)
    stats = health.stats("x", now=10)
    assert stats.error_rate == pytest.approx(0.2)
    assert not health.is_degraded("x", now=10)  # exactly 20 % is not "more than"
    health.record("x", False, 300, now=10)
    assert health.is_degraded("x", now=10)
    assert health.is_degraded("x", now=309) and not health.is_degraded("x", now=310)
    slow = HealthBook(min_samples=1)
    slow.record("y", True, 5_500, now=0)
    assert slow.is_degraded("y", now=0)
    assert quality_score(slow.stats("y", now=0)) == pytest.approx(0.6 + 0.4 * latency_score(5500))


# ---------------------------------------------------------------- end to end through the gateway


def test_auto_routes_by_complexity(client: openai.OpenAI) -> None:
    cases = {
        "cheap": [user("What is 2+2?")],
        "mid": [user("```python\nprint(1)\n```\nwhat does this print")],
        "premium": [user("Think step by step about the tradeoffs of pools.")],
    }
    for tier, messages in cases.items():
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=messages, extra_body={"routing": {"cascade": False}}
        )
        assert raw.headers["x-pura-tier"] == tier


def test_quality_hint_and_experimental_header(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        messages=[user("What is 2+2?")],
        model="auto",
        extra_body={"routing": {"quality": "high", "cascade": False, "maxLatency": 60000,
                                "excludeProviders": ["prem-a"]}},
    )
    assert raw.headers["x-pura-tier"] == "mid"
    assert raw.headers["x-pura-experimental"] == "maxLatency, excludeProviders"


def test_absent_model_means_auto(stack, api_key) -> None:
    import httpx

    response = httpx.post(
        stack.base_url + "/chat/completions",
        json={"messages": [user("What is 2+2?")]},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert response.status_code == 200 and response.headers["x-pura-tier"] == "cheap"


def test_exploration_header_end_to_end(stack, client: openai.OpenAI) -> None:
    stack.services.router.policy = SelectionPolicy(exploration_rate=0.5)
    seen = Counter(
        client.chat.completions.with_raw_response.create(
            model="stand-in-small", messages=[user("hi")]
        ).headers["x-pura-explored"]
        for _ in range(40)
    )
    assert seen["true"] > 5 and seen["false"] > 5
