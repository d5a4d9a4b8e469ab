"""``GET /api/report`` and ``GET /api/income``: rolling 24-hour statements from the usage tables.

Both cover the last 24 hours (rolling, not the UTC day the seed called "24h") and the calling
key only; an admin key may ask for ``scope=all``. Money appears twice: as exact integer micro-USD
(``*_micros``) and as a 6-decimal USD string (``*_usd``), never as a float.

"Savings" compares what was billed with the same tokens priced at the premium reference model
(the routing file's ``premium_reference_model``, else the priciest premium model): what sending
everything to the premium tier would have cost.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.accounting.money import format_usd
from gateway.routing.quality import HealthBook

WINDOW_MS = 86_400_000


def _money(micros: int) -> dict[str, Any]:
    return {"micros": int(micros), "usd": format_usd(int(micros))}


def build_report(rows: dict, scope: str, since_ms: int) -> dict:
    requests, billed, cost, premium, prompt, completion = (int(x) for x in rows["totals"])
    return {
        "object": "pura.report",
        "period": "24h",
        "scope": scope,
        "since_ms": since_ms,
        "requests": requests,
        "spend": _money(billed),
        "upstream_cost": _money(cost),
        "average_cost": _money(billed // requests if requests else 0),
        "tokens": {"prompt": prompt, "completion": completion},
        "outcomes": {outcome: int(n) for outcome, n in rows["per_outcome"]},
        "per_model": {
            model or "(none)": {
                "requests": int(n),
                "spend": _money(int(spend)),
                "tokens": int(tokens),
            }
            for model, n, spend, tokens in rows["per_model"]
        },
        "per_tier": {
            tier or "(none)": {
                "requests": int(n),
                "spend": _money(int(spend)),
                "premium_equivalent": _money(int(prem)),
            }
            for tier, n, spend, prem in rows["per_tier"]
        },
        "savings_vs_premium": {
            "premium_equivalent": _money(premium),
            "saved": _money(max(0, premium - billed)),
            "saved_pct": round(100 * (premium - billed) / premium, 1) if premium > 0 else 0.0,
        },
    }


def build_income(rows: dict, scope: str, since_ms: int, health: HealthBook) -> dict:
    requests, billed, cost, premium, _prompt, _completion = (int(x) for x in rows["totals"])
    providers = {}
    for provider, calls, ok, p_cost, latency_sum in rows["per_provider"]:
        calls, ok = int(calls), int(ok)
        providers[provider] = {
            "calls": calls,
            "succeeded": ok,
            "failed": calls - ok,
            "cost": _money(int(p_cost)),
            "avg_latency_ms": round(int(latency_sum) / calls, 1) if calls else 0.0,
        }
    depth_counts = {int(depth): int(n) for depth, n, _s, _c, _k in rows["cascade"]}
    cascaded = sum(depth_counts.values())
    conf_sum = sum(int(c) for _d, _n, _s, c, _k in rows["cascade"])
    conf_n = sum(int(k) for _d, _n, _s, _c, k in rows["cascade"])
    quality = {}
    for route in health.routes():
        stats = health.stats(route)
        quality[route] = {
            "score": round(health.quality(route), 3),
            "requests_5m": stats.requests,
            "error_rate_5m": round(stats.error_rate, 3),
            "avg_latency_ms_5m": round(stats.avg_latency_ms, 1),
            "degraded": health.is_degraded(route),
        }
    return {
        "object": "pura.income",
        "period": "24h",
        "scope": scope,
        "since_ms": since_ms,
        "generated_ms": int(time.time() * 1000),
        "revenue": {"billed": _money(billed), "requests": requests},
        "costs": {"upstream_total": _money(cost), "per_provider": providers},
        "net": _money(billed - cost),
        "cascade": {
            "requests": cascaded,
            "resolved_at_depth": {str(k): v for k, v in sorted(depth_counts.items())},
            "escalated": sum(v for k, v in depth_counts.items() if k > 1),
            "avg_confidence": round(conf_sum / conf_n / 1000, 3) if conf_n else None,
            "saved_vs_premium": _money(max(0, premium - cost)),
        },
        "quality": quality,
    }


def render_income_text(income: dict) -> str:
    """The fixed-width statement served for ``Accept: text/plain``."""
    lines = [
        f"PURA INCOME STATEMENT  (last 24 h, scope: {income['scope']})",
        "=" * 60,
        f"{'Billed to keys':<40}{income['revenue']['billed']['usd']:>20}",
        f"{'Requests':<40}{income['revenue']['requests']:>20}",
        "",
        "COSTS BY PROVIDER",
    ]
    for name, p in income["costs"]["per_provider"].items():
        lines.append(
            f"  {name:<22}{p['calls']:>6} calls {p['failed']:>4} failed {p['cost']['usd']:>14}"
        )
    lines += [
        f"{'Upstream cost total':<40}{income['costs']['upstream_total']['usd']:>20}",
        f"{'NET':<40}{income['net']['usd']:>20}",
        "",
        "CASCADE",
        f"  requests {income['cascade']['requests']}, escalated {income['cascade']['escalated']},"
        f" avg confidence {income['cascade']['avg_confidence']}",
        f"  resolved at depth {income['cascade']['resolved_at_depth']}",
        f"  saved vs premium {income['cascade']['saved_vs_premium']['usd']}",
        "",
        "QUALITY (sliding 5 min)",
    ]
    for route, q in income["quality"].items():
        bar = "#" * round(q["score"] * 20)
        flag = "  DEGRADED" if q["degraded"] else ""
        lines.append(f"  {route:<34}{q['score']:>6.3f} {bar:<20}{flag}")
    return "\n".join(lines) + "\n"


def window_start(now_ms: int) -> int:
    return now_ms - WINDOW_MS
