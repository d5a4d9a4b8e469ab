"""Cascade answer scoring: is this answer good enough, or do we escalate a tier?

score = 0.30 x refusal + 0.30 x completeness + 0.25 x hedging + 0.15 x length   (weights are data,
:class:`gateway.config.CascadePolicy`), accepted at >= 0.7.

Hard triggers override the weighted sum: a **refusal** or an **empty answer** scores 0 and always
escalates. (In the seed every single degraded signal, including a refusal or an empty answer,
still scored >= 0.7 and was accepted.) An answer that is a tool call is accepted as is: text
heuristics do not apply to it.

Signals, each in [0, 1]:

* refusal: 0 if a refusal pattern matches ("I can't help with ...", "as an AI ...", policy
  language), else 1. Curly apostrophes are normalised first.
* completeness: with at most one question in the last user turn, 1 for an answer longer than 20
  characters, 0.5 for a shorter one, 0.3 for a hedging answer under 80 characters; with q > 1 questions, the share of questions covered by answer segments
  (paragraphs or list items), floored at 0.2. A ``finish_reason`` of ``length`` (truncated)
  halves it.
* hedging: distinct hedge phrases found; 0 -> 1.0, 1 -> 0.6, 2 -> 0.3, 3+ -> 0.0. The refusal
  phrases are not counted again here (the seed counted "I cannot" twice).
* length: sqrt(min(1, len(answer) / expected)), ``expected`` by tier (cheap 16, mid 80,
  premium 240 characters) and at least 10 % of the prompt length, capped at 600.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from gateway.config import CascadePolicy

_REFUSAL = [
    re.compile(p)
    for p in (
        r"\bi (?:cannot|can't|can not|am unable to|won't|will not|am not able to)"
        r" (?:help|assist|provide|generate|create|comply|answer|do that|fulfil|fulfill)",
        r"\bi'm (?:unable|not able) to (?:help|assist|provide|answer|comply)",
        r"\bas an ai\b",
        r"\bi (?:must|have to) (?:decline|refuse)\b",
        r"\bi don't have (?:access|the ability)\b",
        r"\bviolates? (?:my|our|the) (?:guidelines|policies|policy|terms)\b",
        r"\bcontent policy\b",
        r"\bi'm sorry, but i can't\b",
    )
]

_HEDGES = [
    re.compile(p)
    for p in (
        r"\bi'?m not (?:sure|certain)\b",
        r"\bit depends\b",
        r"\bthis is a complex (?:topic|question)\b",
        r"\bi don't have enough\b",
        r"\bgenerally speaking\b",
        r"\bthere'?s no (?:simple|easy|definitive|single) answer\b",
        r"\bit'?s (?:hard|difficult) to say\b",
        r"\bi would need more (?:context|information|details)\b",
        r"\bi think\b",
        r"\bpossibly\b",
        r"\bperhaps\b",
        r"\bmight or might not\b",
    )
]

_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+", re.M)
_HEDGE_VALUES = (1.0, 0.6, 0.3, 0.0)
_EXPECTED_CHARS = {"cheap": 16, "mid": 80, "premium": 240}


@dataclass(frozen=True, slots=True)
class AnswerScore:
    score: float
    accepted: bool
    hard_reason: str | None = None  # refusal | empty when a hard trigger fired
    refusal: float = 1.0
    completeness: float = 1.0
    hedging: float = 1.0
    length: float = 1.0
    hedges: tuple[str, ...] = field(default_factory=tuple)


def _normalise(text: str) -> str:
    return text.lower().replace("\u2019", "'").replace("\u2018", "'")


def is_refusal(answer: str) -> bool:
    text = _normalise(answer)
    return any(p.search(text) for p in _REFUSAL)


def hedges_in(answer: str) -> tuple[str, ...]:
    text = _normalise(answer)
    return tuple(p.pattern for p in _HEDGES if p.search(text))


def completeness(question: str, answer: str, truncated: bool, hedged: bool = False) -> float:
    q = question.count("?")
    stripped = answer.strip()
    if q <= 1:
        if len(stripped) <= 20:
            value = 0.5
        elif hedged and len(stripped) < 80:
            value = 0.3  # a short answer that mostly hedges says nothing
        else:
            value = 1.0
    else:
        paragraphs = sum(1 for p in re.split(r"\n\s*\n", stripped) if len(p.strip()) > 10)
        items = len(_LIST_ITEM.findall(stripped))
        value = max(0.2, min(1.0, max(paragraphs, items) / q))
    return value * (0.5 if truncated else 1.0)


def length_signal(tier: str, prompt_chars: int, answer: str) -> float:
    expected = max(_EXPECTED_CHARS.get(tier, 80), min(600, prompt_chars // 10))
    return math.sqrt(min(1.0, len(answer.strip()) / expected))


def score_answer(
    answer: str,
    *,
    question: str,
    prompt_chars: int,
    tier: str,
    policy: CascadePolicy,
    threshold: float | None = None,
    finish_reason: str | None = None,
    has_tool_calls: bool = False,
) -> AnswerScore:
    """Score one answer; ``question`` is the last user turn, ``tier`` the tier that answered."""
    accept_at = policy.accept_threshold if threshold is None else threshold
    if has_tool_calls:
        return AnswerScore(score=1.0, accepted=True)
    if not answer.strip():
        return AnswerScore(score=0.0, accepted=False, hard_reason="empty", length=0.0)
    if is_refusal(answer):
        return AnswerScore(score=0.0, accepted=False, hard_reason="refusal", refusal=0.0)
    found = hedges_in(answer)
    hedging = _HEDGE_VALUES[min(len(found), len(_HEDGE_VALUES) - 1)]
    complete = completeness(
        question, answer, truncated=finish_reason == "length", hedged=bool(found)
    )
    length = length_signal(tier, prompt_chars, answer)
    total = (
        policy.w_refusal * 1.0
        + policy.w_completeness * complete
        + policy.w_hedging * hedging
        + policy.w_length * length
    )
    total = round(total, 6)
    return AnswerScore(
        score=total,
        accepted=total >= accept_at,
        completeness=complete,
        hedging=hedging,
        length=length,
        hedges=found,
    )
