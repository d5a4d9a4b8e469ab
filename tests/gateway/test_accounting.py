"""Keys, money, budgets (atomic under concurrency), rate-limit windows, settlement, CLI."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from recordkit import captured_records

from gateway.accounting.db import migrate, open_database
from gateway.accounting.keys import hash_key, looks_like_key
from gateway.accounting.money import (
    Price,
    estimate_tokens,
    format_usd,
    prompt_token_bound,
    token_upper_bound,
    usd_to_micros,
)
from gateway.accounting.records import CompletionRecord
from gateway.accounting.store import Store, utc_day
from gateway.cli import main as cli

QUESTION = [{"role": "user", "content": "What is a pool?"}]


class FakeClock:
    def __init__(self, start_ms: int = 1_800_000_000_000) -> None:
        self.ms = start_ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture()
def store(tmp_path: Path) -> Store:
    db = open_database(f"sqlite:///{tmp_path / 'acct.db'}")
    migrate(db)
    yield Store(db, clock=FakeClock())
    db.close_sync()


def _record(key_id: str, request_id: str, cost: int, created_ms: int) -> CompletionRecord:
    return CompletionRecord(
        request_id=request_id, key_id=key_id, created_ms=created_ms, finished_ms=created_ms,
        outcome="ok", http_status=200, provider="p", model="m", tier="cheap", stream=False,
        prompt_tokens=1, completion_tokens=1, usage_estimated=False, cost_micros=cost,
        billed_micros=cost, premium_cost_micros=cost, cascade_depth=0, confidence=None,
        explored=False, latency_ms=1, response_sha256=None,
    )


# ---------------------------------------------------------------- money


def test_money_is_integer_micro_usd_rounded_up() -> None:
    assert usd_to_micros("0.15") == 150_000 and usd_to_micros(Decimal("0.0000001")) == 1
    assert format_usd(150) == "0.000150" and format_usd(12_345_678) == "12.345678"
    price = Price.from_usd_per_mtok(Decimal("0.15"), Decimal("0.60"))
    assert price.cost_micros(1_000_000, 0) == 150_000
    assert price.cost_micros(1, 0) == 1  # 0.15 micro-USD rounds up, never down
    assert price.cost_micros(0, 0) == 0
    assert price.cost_micros(1000, 500) == 150 + 300


def test_token_estimates_without_tiktoken() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("hello world") == 2
    assert estimate_tokens("internationalisation, really!") == 4 + 1 + 1 + 1  # 20 chars: 4
    text = "naïve 東京 code(x) = {y}; émigré"
    assert estimate_tokens(text) <= token_upper_bound(text)
    assert prompt_token_bound([{"role": "user", "content": "abc"}]) == 3 + 4


# ---------------------------------------------------------------- keys


def test_keys_are_random_and_stored_hashed(store: Store, tmp_path: Path) -> None:
    raw, info = store.create_key_sync("alice", 1_000_000, 30)
    assert looks_like_key(raw) and info.prefix == raw[:13]
    other, _ = store.create_key_sync("bob", 1_000_000, 30)
    assert other != raw
    conn = sqlite3.connect(tmp_path / "acct.db")
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert raw not in dump and hash_key(raw) in dump


def test_revoked_key_is_refused(store: Store) -> None:
    raw, info = store.create_key_sync("", 1_000_000, 30)
    assert asyncio.run(store.admit(raw, None)).status == "ok"
    assert [k.id for k in store.revoke_key_sync(info.id)] == [info.id]
    assert asyncio.run(store.admit(raw, None)).status == "unauthorized"
    assert store.revoke_key_sync(info.id) == []  # already revoked


def test_cli_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str], stack) -> None:
    url = stack.settings.database_url
    assert cli(["--database-url", url, "keys", "create", "--label", "cli", "--daily-budget-usd", "2.5",
                "--rate-limit", "7"]) == 0
    raw = capsys.readouterr().out.strip()
    assert looks_like_key(raw)
    client = openai.OpenAI(base_url=stack.base_url, api_key=raw, max_retries=0)
    ok = client.chat.completions.with_raw_response.create(model="stand-in-small", messages=QUESTION)
    assert ok.headers["x-ratelimit-limit"] == "7"
    assert cli(["--database-url", url, "keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert raw[:13] in listing and "budget_usd=2.500000" in listing and raw not in listing
    assert cli(["--database-url", url, "keys", "revoke", raw[:13]]) == 0
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="stand-in-small", messages=QUESTION)
    assert cli(["--database-url", url, "keys", "revoke", raw[:13]]) == 1


# ---------------------------------------------------------------- rate-limit windows


def test_rate_limit_window_slides(store: Store) -> None:
    clock: FakeClock = store.clock  # type: ignore[assignment]
    raw, _ = store.create_key_sync("", 1_000_000, 3)
    t0 = clock.ms
    results = []
    for offset in (0, 10_000, 20_000, 30_000):
        clock.ms = t0 + offset
        results.append(asyncio.run(store.admit(raw, None)))
    assert [r.status for r in results] == ["ok", "ok", "ok", "rate_limited"]
    assert [r.rate_remaining for r in results[:3]] == [2, 1, 0]
    assert results[3].retry_after_s == 30  # the oldest event leaves the window at t0 + 60 s
    # hammering while limited does not extend the lock-out
    for offset in range(31_000, 60_000, 1_000):
        clock.ms = t0 + offset
        assert asyncio.run(store.admit(raw, None)).status == "rate_limited"
    clock.ms = t0 + 59_999
    assert asyncio.run(store.admit(raw, None)).retry_after_s == 1
    clock.ms = t0 + 60_000  # exactly one window later: the first event slid out
    assert asyncio.run(store.admit(raw, None)).status == "ok"
    assert asyncio.run(store.admit(raw, None)).status == "rate_limited"
    clock.ms = t0 + 130_000  # everything slid out
    assert asyncio.run(store.admit(raw, None)).rate_remaining == 2


def test_rate_limit_window_has_one_second_resolution(store: Store) -> None:
    clock: FakeClock = store.clock  # type: ignore[assignment]
    raw, _ = store.create_key_sync("", 1_000_000, 1)
    t0 = clock.ms
    clock.ms = t0 + 700  # counted in the bucket of second t0
    assert asyncio.run(store.admit(raw, None)).status == "ok"
    clock.ms = t0 + 59_999
    limited = asyncio.run(store.admit(raw, None))
    assert limited.status == "rate_limited" and limited.retry_after_s == 1
    clock.ms = t0 + 60_000  # 59.3 s after the request: its second has left the window
    assert asyncio.run(store.admit(raw, None)).status == "ok"


def test_rate_limit_is_per_key(store: Store) -> None:
    a, _ = store.create_key_sync("", 1_000_000, 1)
    b, _ = store.create_key_sync("", 1_000_000, 1)
    assert asyncio.run(store.admit(a, None)).status == "ok"
    assert asyncio.run(store.admit(a, None)).status == "rate_limited"
    assert asyncio.run(store.admit(b, None)).status == "ok"


# ---------------------------------------------------------------- budgets


def test_reservation_settlement_and_idempotency(store: Store) -> None:
    raw, info = store.create_key_sync("", 1_000, 100)
    admitted = asyncio.run(store.admit(raw, 400))
    assert admitted.status == "ok" and admitted.budget_remaining_micros == 600
    assert asyncio.run(store.budget_state(info.id)) == (0, 400)
    record = _record(info.id, "r1", 150, store.clock())
    billed, remaining = asyncio.run(store.settle(admitted.reservation_id, record, 1_000))
    assert (billed, remaining) == (150, 850)
    assert asyncio.run(store.settle(admitted.reservation_id, record, 1_000))[0] == 0  # no double bill
    assert asyncio.run(store.budget_state(info.id)) == (150, 0)


def test_billing_is_clamped_to_the_reservation(store: Store) -> None:
    raw, info = store.create_key_sync("", 1_000, 100)
    admitted = asyncio.run(store.admit(raw, 100))
    billed, _ = asyncio.run(store.settle(admitted.reservation_id, _record(info.id, "r", 500, store.clock()), 1_000))
    assert billed == 100
    assert asyncio.run(store.budget_state(info.id)) == (100, 0)


def test_budget_refuses_what_does_not_fit(store: Store) -> None:
    raw, info = store.create_key_sync("", 1_000, 100)
    assert asyncio.run(store.admit(raw, 1_001)).status == "budget_exhausted"
    first = asyncio.run(store.admit(raw, 700))
    assert first.status == "ok"
    refused = asyncio.run(store.admit(raw, 301))
    assert refused.status == "budget_exhausted" and refused.budget_remaining_micros == 300
    assert asyncio.run(store.extend(first.reservation_id, 300, 1_000)) == 0
    assert asyncio.run(store.extend(first.reservation_id, 1, 1_000)) is None


def test_budget_resets_each_utc_day(store: Store) -> None:
    clock: FakeClock = store.clock  # type: ignore[assignment]
    raw, info = store.create_key_sync("", 1_000, 100)
    admitted = asyncio.run(store.admit(raw, 1_000))
    asyncio.run(store.settle(admitted.reservation_id, _record(info.id, "d1", 1_000, clock.ms), 1_000))
    assert asyncio.run(store.admit(raw, 1)).status == "budget_exhausted"
    day = utc_day(clock.ms)
    clock.ms += 86_400_000
    assert utc_day(clock.ms) != day
    assert asyncio.run(store.admit(raw, 1_000)).status == "ok"


def test_sweeper_releases_stale_reservations(store: Store) -> None:
    clock: FakeClock = store.clock  # type: ignore[assignment]
    raw, info = store.create_key_sync("", 1_000, 100)
    admitted = asyncio.run(store.admit(raw, 900))
    clock.ms += 60_000
    assert asyncio.run(store.release_stale(120_000)) == 0
    clock.ms += 61_000
    assert asyncio.run(store.release_stale(120_000)) == 1
    assert asyncio.run(store.budget_state(info.id)) == (0, 0)
    # a late settle after the sweep bills only what still fits, once
    billed, _ = asyncio.run(store.settle(admitted.reservation_id, _record(info.id, "late", 300, clock.ms), 1_000))
    assert billed == 300 and asyncio.run(store.budget_state(info.id)) == (300, 0)


def test_store_reservations_are_atomic_under_concurrency(store: Store) -> None:
    raw, info = store.create_key_sync("", 10_000, 1_000_000)

    async def burst() -> list:
        return await asyncio.gather(*(store.admit(raw, 70) for _ in range(400)))

    results = asyncio.run(burst())
    admitted = [r for r in results if r.status == "ok"]
    assert len(admitted) == 10_000 // 70  # exactly as many as fit, never one more
    assert asyncio.run(store.budget_state(info.id)) == (0, 70 * len(admitted))


def test_budget_never_exceeded_by_hundreds_of_parallel_requests(stack) -> None:
    budget_usd = "0.004"
    key = stack.create_key(daily_budget_usd=budget_usd, rate_limit_per_min=100_000)
    cap = usd_to_micros(budget_usd)

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        return await client.post(
            "/chat/completions",
            json={"model": "stand-in-small", "max_tokens": 200,
                  "messages": [{"role": "user", "content": f"Question {i}: what is a pool?"}],
                  "stream": i % 3 == 0},
        )

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(base_url=stack.base_url, limits=limits, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) as client:
            return await asyncio.gather(*(one(client, i) for i in range(300)))

    # 300 requests at once against stand-ins that share this process's GIL with the gateway:
    # on a loaded 2-core CI machine the stack's tight loopback timeouts (1 s connect, 5 s first
    # byte) fired once and answered 504. This test is about budgets, not timeouts (those have
    # their own tests), so it gives the upstreams room for the duration.
    providers = {id(r.provider): r.provider for routes in stack.services.catalogue.by_model.values()
                 for r in routes}.values()
    originals = [(p, p.connect_timeout_s, p.first_byte_timeout_s) for p in providers]
    for p in providers:
        p.connect_timeout_s, p.first_byte_timeout_s = 30.0, 60.0
    try:
        responses = asyncio.run(run())
    finally:
        for p, connect, first_byte in originals:
            p.connect_timeout_s, p.first_byte_timeout_s = connect, first_byte
    _flush(stack, key)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 402}
    assert statuses.count(402) > 0 and statuses.count(200) > 0
    spent, reserved = asyncio.run(_budget(stack, key))
    assert reserved == 0  # every reservation released on completion
    assert spent <= cap
    billed = 0
    for r in responses:
        if r.status_code != 200:
            continue
        if r.headers["content-type"].startswith("text/event-stream"):
            last = [line for line in r.text.splitlines() if line.startswith("data: {")][-1]
            import json

            billed += json.loads(last[6:])["pura"]["billed_micros"]
        else:
            billed += usd_to_micros(r.headers["x-pura-cost"])
    assert billed == spent


def _flush(stack, raw_key: str) -> None:
    """Reports commit queued settlements first (read-your-writes)."""
    response = httpx.get(stack.gateway.url + "/api/report", headers={"Authorization": f"Bearer {raw_key}"})
    assert response.status_code == 200


async def _budget(stack, raw_key: str) -> tuple[int, int]:
    info = await stack.services.store.authenticate(raw_key)
    return await stack.services.store.budget_state(info.id)


def test_usage_is_estimated_only_when_the_upstream_reports_none(stack, client: openai.OpenAI, api_key) -> None:
    stack.providers["mid-a"].configure(report_usage=False)
    raw = client.chat.completions.with_raw_response.create(model="stand-in-medium", messages=QUESTION)
    assert raw.parse().usage is None
    assert usd_to_micros(raw.headers["x-pura-cost"]) > 0
    report = httpx.get(stack.gateway.url + "/api/report", headers={"Authorization": f"Bearer {api_key}"}).json()
    assert report["tokens"]["completion"] > 0


def test_completion_records_reach_the_sinks(stack, client: openai.OpenAI) -> None:
    from gateway.accounting.records import answer_hash

    with captured_records(stack) as captured:
        raw = client.chat.completions.with_raw_response.create(model="stand-in-large", messages=QUESTION)
        _flush(stack, client.api_key)  # records reach the sinks once committed
    (record,) = captured
    assert record.request_id == raw.headers["x-pura-request-id"]
    assert record.provider == "prem-a" and record.model == "stand-in-large" and record.tier == "premium"
    assert record.cost_micros == usd_to_micros(raw.headers["x-pura-cost"]) and record.cost_micros > 0
    assert record.response_sha256 == answer_hash(raw.parse().choices[0].message.content)
