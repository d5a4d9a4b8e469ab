"""Complexity tier (cheap / mid / premium) from features of the request.

Features are extracted once (:class:`Features`) and the rules are data
(:class:`gateway.config.ComplexityRules`), evaluated in a fixed, documented order:

1. premium if the system prompt is longer than ``premium_system_chars``;
2. premium if all message text is longer than ``premium_total_chars``;
3. premium if the last user message contains a reasoning cue (whole words, case-insensitive,
   curly apostrophes normalised; the seed matched substrings so "derived" counted as "derive");
4. premium if there are more than ``premium_turns`` messages;
5. mid if the text contains code (a fenced block, even an unclosed one) and ``code_is_mid``;
6. cheap if the text is shorter than ``cheap_max_chars`` and there are at most
   ``cheap_max_turns`` messages;
7. otherwise mid.

The ``quality`` hint then shifts the tier: ``high`` one up, ``low`` one down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from gateway.accounting.money import message_text
from gateway.config import TIERS, ComplexityRules, Tier

_FENCE = re.compile(r"```")
_CODE_HINT = re.compile(r"^\s*(def |class |import |#include|function |SELECT |public static )", re.M)


@dataclass(frozen=True, slots=True)
class Features:
    total_chars: int
    system_chars: int
    turns: int
    has_code: bool
    last_user: str
    questions: int


def extract_features(messages: list[dict]) -> Features:
    texts = [message_text(m) for m in messages]
    total = "\n".join(texts)
    system = next(
        (t for m, t in zip(messages, texts) if m.get("role") in ("system", "developer")), ""
    )
    last_user = next(
        (t for m, t in zip(reversed(messages), reversed(texts)) if m.get("role") == "user"), ""
    )
    return Features(
        total_chars=len(total),
        system_chars=len(system),
        turns=len(messages),
        has_code=bool(_FENCE.search(total) or _CODE_HINT.search(total)),
        last_user=last_user,
        questions=last_user.count("?"),
    )


@lru_cache(maxsize=32)
def _cue_pattern(cues: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(c.lower()).replace(r"\ ", r"\s+") for c in cues)
    return re.compile(rf"\b(?:{alternatives})\b")


def has_reasoning_cue(text: str, rules: ComplexityRules) -> bool:
    if not rules.reasoning_cues:
        return False
    normalised = text.lower().replace("\u2019", "'")
    return bool(_cue_pattern(tuple(rules.reasoning_cues)).search(normalised))


def base_tier(features: Features, rules: ComplexityRules) -> tuple[Tier, str]:
    """The tier before the quality hint, and the name of the rule that decided it."""
    if features.system_chars > rules.premium_system_chars:
        return "premium", "long_system_prompt"
    if features.total_chars > rules.premium_total_chars:
        return "premium", "long_request"
    if has_reasoning_cue(features.last_user, rules):
        return "premium", "reasoning_cue"
    if features.turns > rules.premium_turns:
        return "premium", "many_turns"
    if features.has_code and rules.code_is_mid:
        return "mid", "code"
    if features.total_chars < rules.cheap_max_chars and features.turns <= rules.cheap_max_turns:
        return "cheap", "short"
    return "mid", "default"


def shift_tier(tier: Tier, quality: str | None) -> Tier:
    index = TIERS.index(tier)
    if quality == "high":
        index = min(index + 1, len(TIERS) - 1)
    elif quality == "low":
        index = max(index - 1, 0)
    return TIERS[index]


def classify(messages: list[dict], rules: ComplexityRules, quality: str | None) -> tuple[Tier, str]:
    tier, reason = base_tier(extract_features(messages), rules)
    return shift_tier(tier, quality), reason
