"""Cascade: answer scoring on crafted answers, and escalation end to end."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway.config import CascadePolicy
from gateway.routing.cascade import hedges_in, is_refusal, score_answer

POLICY = CascadePolicy()


def score(answer: str, question: str = "What is a pool?", tier: str = "cheap", **kw):
    return score_answer(answer, question=question, prompt_chars=len(question), tier=tier,
                        policy=POLICY, **kw)


THOROUGH = ("A pool holds funds from payers and streams them to providers in proportion to "
            "their units; the units follow verified capacity, so a provider that stops working "
            "loses its share within a few epochs.")


def test_thorough_answer_is_accepted() -> None:
    verdict = score(THOROUGH)
    assert verdict.accepted and verdict.score == pytest.approx(1.0)


@pytest.mark.parametrize("answer", [
    "I'm sorry, but I can't help with that request.",
    "I can\u2019t assist with that.",  # curly apostrophe
    "As an AI, I have no opinion on pools, but here is a long and thorough text about them anyway.",
    "That would violate our policies.",
])
def test_refusal_always_escalates(answer: str) -> None:
    verdict = score(answer)
    assert is_refusal(answer)
    assert not verdict.accepted and verdict.hard_reason == "refusal" and verdict.score == 0.0


@pytest.mark.parametrize("answer", ["", "   ", "\n\n"])
def test_empty_answer_always_escalates(answer: str) -> None:
    verdict = score(answer)
    assert not verdict.accepted and verdict.hard_reason == "empty"


def test_weights_are_30_30_25_15() -> None:
    # one hedge (0.6), full completeness, full length: 0.30 + 0.30 + 0.25*0.6 + 0.15
    verdict = score("It depends on the pool, but " + THOROUGH)
    assert verdict.hedging == 0.6
    assert verdict.score == pytest.approx(0.30 + 0.30 + 0.25 * 0.6 + 0.15)
    assert verdict.accepted


def test_short_hedging_non_answer_escalates() -> None:
    verdict = score("I'm not sure, it depends.")
    assert verdict.hedges and verdict.completeness == 0.3
    assert verdict.score == pytest.approx(0.30 + 0.30 * 0.3 + 0.25 * 0.3 + 0.15 * 1.0)
    assert not verdict.accepted


def test_hedging_is_counted_once_per_phrase_and_not_for_refusals() -> None:
    assert len(hedges_in("It depends. It depends. Perhaps.")) == 2
    assert hedges_in("I cannot help with that") == ()


def test_incomplete_multi_question_answer_escalates() -> None:
    question = "What is a pool? What is a sink? What is a source? What is an epoch?"
    verdict = score("A pool pays sinks.", question=question, tier="mid")
    assert verdict.completeness == pytest.approx(0.25)  # 1 segment for 4 questions
    assert not verdict.accepted
    full = score("\n".join(f"{i}. answer number {i} with some detail" for i in range(1, 5)),
                 question=question, tier="mid")
    assert full.completeness == 1.0 and full.accepted


def test_truncated_answer_loses_completeness() -> None:
    assert score(THOROUGH, finish_reason="length").completeness == 0.5


def test_length_ratio_by_tier() -> None:
    short = "Pools pay sinks by units."
    assert score(short, tier="cheap").length == 1.0
    assert score(short, tier="premium").length < 0.5


def test_tool_call_answers_are_accepted() -> None:
    assert score("", has_tool_calls=True).accepted


def test_threshold_override() -> None:
    assert not score("It depends on the pool, but " + THOROUGH, threshold=0.95).accepted
    assert score("I'm not sure, it depends.", threshold=0.5).accepted


def test_policy_weights_must_sum_to_one() -> None:
    with pytest.raises(ValueError):
        CascadePolicy(w_refusal=0.5)


# ---------------------------------------------------------------- end to end

CHEAP_Q = [{"role": "user", "content": "What is a pool?"}]


def _cascade(client: openai.OpenAI, **routing):
    return client.chat.completions.with_raw_response.create(
        model="auto", messages=CHEAP_Q, extra_body={"routing": routing} if routing else None
    )


def test_good_cheap_answer_stops_at_depth_one(client: openai.OpenAI) -> None:
    raw = _cascade(client)
    assert raw.headers["x-pura-tier"] == "cheap"
    assert raw.headers["x-pura-cascade-depth"] == "1"
    assert float(raw.headers["x-pura-confidence"]) >= 0.7


def test_refusing_cheap_tier_escalates_and_costs_accumulate(stack, client: openai.OpenAI, api_key) -> None:
    for name in ("cheap-a", "cheap-b"):
        stack.providers[name].configure(refusal_rate=1.0)
    raw = _cascade(client)
    assert raw.headers["x-pura-tier"] == "mid" and raw.headers["x-pura-provider"] == "mid-a"
    assert raw.headers["x-pura-cascade-depth"] == "2"
    assert "can't help" not in raw.parse().choices[0].message.content
    # the header cost is the sum of both attempts (the refused cheap answer was billed upstream)
    report = httpx.get(stack.gateway.url + "/api/income", headers={"Authorization": f"Bearer {api_key}"}).json()
    per_provider = report["costs"]["per_provider"]
    cheap_cost = sum(per_provider[p]["cost"]["micros"] for p in per_provider if p.startswith("cheap"))
    mid_cost = per_provider["mid-a"]["cost"]["micros"]
    assert cheap_cost > 0 and mid_cost > 0
    total = int(round(float(raw.headers["x-pura-cost"]) * 1_000_000))
    assert total == cheap_cost + mid_cost
    assert report["cascade"]["resolved_at_depth"] == {"2": 1}


def test_empty_answers_escalate_to_premium(stack, client: openai.OpenAI) -> None:
    for name in ("cheap-a", "cheap-b", "mid-a"):
        stack.providers[name].configure(fixed_answer="")
    raw = _cascade(client)
    assert raw.headers["x-pura-tier"] == "premium" and raw.headers["x-pura-cascade-depth"] == "3"
    assert raw.parse().choices[0].message.content.startswith("(local stand-in stand-in-large)")


def test_escalation_is_bounded(stack, client: openai.OpenAI) -> None:
    for name in TIER_PROVIDERS:
        stack.providers[name].configure(quality=0.1)
    raw = _cascade(client, cascadeMaxEscalations=1)
    assert raw.headers["x-pura-cascade-depth"] == "2"
    assert raw.headers["x-pura-cascade-stopped"] == "max_escalations"
    assert float(raw.headers["x-pura-confidence"]) < 0.7
    raw = _cascade(client)  # default: at most 3 escalations, 4 attempts
    assert int(raw.headers["x-pura-cascade-depth"]) <= 4


TIER_PROVIDERS = ("cheap-a", "cheap-b", "mid-a", "prem-a")


def test_cascade_streams_the_accepted_answer(stack, client: openai.OpenAI) -> None:
    for name in ("cheap-a", "cheap-b"):
        stack.providers[name].configure(refusal_rate=1.0)
    with client.chat.completions.with_streaming_response.create(
        model="auto", messages=CHEAP_Q, stream=True, stream_options={"include_usage": True}
    ) as response:
        assert response.headers["x-pura-cascade-depth"] == "2"
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("(local stand-in stand-in-medium)")
    assert chunks[-1].usage is not None
    assert chunks[-1].model_extra["pura"]["cascade_depth"] == 2


def test_cascade_off_and_pinned_model_do_not_cascade(client: openai.OpenAI) -> None:
    raw = _cascade(client, cascade=False)
    assert "x-pura-cascade-depth" not in raw.headers
    pinned = client.chat.completions.with_raw_response.create(model="stand-in-small", messages=CHEAP_Q)
    assert "x-pura-cascade-depth" not in pinned.headers


def test_budget_stops_escalation(stack) -> None:
    for name in ("cheap-a", "cheap-b", "mid-a"):
        stack.providers[name].configure(refusal_rate=1.0)
    # enough for a cheap attempt's reservation, not for the premium tier's
    key = stack.create_key(daily_budget_usd="0.003", rate_limit_per_min=100)
    client = openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    raw = _cascade(client)
    assert raw.headers["x-pura-cascade-stopped"] == "budget"
    assert raw.headers["x-pura-tier"] in ("cheap", "mid")


def test_all_tiers_failing_is_502_not_an_empty_200(stack, client: openai.OpenAI) -> None:
    for name in TIER_PROVIDERS:
        stack.providers[name].configure(failure_rate=1.0)
    with pytest.raises(openai.InternalServerError) as info:
        _cascade(client)
    assert info.value.status_code == 502
