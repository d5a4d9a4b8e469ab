"""The official openai client (pinned) against the running gateway: only base_url changes."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from recordkit import captured_records

from gateway.accounting.records import answer_hash

USER = [{"role": "user", "content": "What is a capacity pool?"}]


def test_completion_round_trip_with_pura_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="stand-in-medium", messages=USER)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content.startswith("(local stand-in stand-in-medium)")
    assert completion.usage.total_tokens > 0
    headers = raw.headers
    assert headers["x-pura-provider"] == "mid-a"
    assert headers["x-pura-model"] == "stand-in-medium"
    assert headers["x-pura-tier"] == "mid"
    assert headers["x-pura-request-id"].startswith("req_")
    assert headers["x-pura-explored"] == "false"
    assert 0 < float(headers["x-pura-quality"]) <= 1
    assert int(headers["x-ratelimit-remaining"]) >= 0
    # cost = usage x price table (1.00 / 4.00 USD per M tokens), rounded up to a micro-USD
    usage = completion.usage
    micros = -(-(usage.prompt_tokens * 1_000_000 + usage.completion_tokens * 4_000_000) // 1_000_000)
    assert headers["x-pura-cost"] == f"0.{micros:06d}"
    assert headers["x-pura-budget-remaining"] == f"{(1000_000_000 - micros) // 10**6}.{(1000_000_000 - micros) % 10**6:06d}"


def test_stream_delivers_text_usage_and_cost_in_final_chunk(client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="stand-in-large",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        # headers arrive before the first byte of the body
        assert response.headers["x-pura-provider"] == "prem-a"
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-pura-cost"] == "0.000000"  # known only at the end: see chunk
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("(local stand-in stand-in-large)")
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens > 0
    pura = last.model_extra["pura"]
    expected = -(-(last.usage.prompt_tokens * 5_000_000 + last.usage.completion_tokens * 15_000_000) // 1_000_000)
    assert pura["cost_micros"] == expected
    assert pura["provider"] == "prem-a"


def test_stream_without_usage_request_gets_cost_on_finish_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="stand-in-medium", messages=USER, stream=True))
    # every chunk the client sees has a choice (no usage-only chunk it did not ask for)
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["pura"]["cost_micros"] > 0


def test_streamed_and_plain_answers_hash_alike(client: openai.OpenAI, stack) -> None:
    plain = client.chat.completions.create(model="stand-in-medium", messages=USER)
    streamed = list(client.chat.completions.create(model="stand-in-medium", messages=USER, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in streamed)
    assert text == plain.choices[0].message.content
    assert answer_hash(text) == answer_hash(plain.choices[0].message.content)


def test_every_openai_field_reaches_the_upstream(client: openai.OpenAI, stack) -> None:
    tools = [{
        "type": "function",
        "function": {"name": "lookup", "description": "d", "parameters": {"type": "object", "properties": {}}},
    }]
    client.chat.completions.create(
        model="stand-in-medium",
        messages=USER,
        temperature=0.2,
        top_p=0.9,
        max_tokens=300,
        stop=["\n\n"],
        n=1,
        user="u-42",
        seed=7,
        tools=tools,
        tool_choice="auto",
        response_format={"type": "text"},
        logit_bias={"50256": -100},
        extra_body={"vendor_specific": {"x": 1}, "routing": {"quality": "balanced"}},
    )
    seen = httpx.get(stack.providers["mid-a"].server.url + "/_stand_in/last_request").json()["body"]
    assert seen["temperature"] == 0.2 and seen["top_p"] == 0.9 and seen["max_tokens"] == 300
    assert seen["stop"] == ["\n\n"] and seen["n"] == 1 and seen["user"] == "u-42"
    assert seen["seed"] == 7 and seen["tools"] == tools and seen["tool_choice"] == "auto"
    assert seen["response_format"] == {"type": "text"} and seen["logit_bias"] == {"50256": -100}
    assert seen["vendor_specific"] == {"x": 1}
    assert "routing" not in seen  # Pura's own extension is not forwarded
    assert seen["model"] == "stand-in-medium"


def test_tool_calls_pass_through_in_both_modes(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    plain = client.chat.completions.create(
        model="stand-in-medium", messages=USER, tools=tools, tool_choice="required"
    )
    call = plain.choices[0].message.tool_calls[0]
    assert call.function.name == "search" and plain.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(
        model="stand-in-medium", messages=USER, tools=tools, tool_choice="required", stream=True
    ))
    streamed_calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert streamed_calls[0].function.name == "search"


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["stand-in-large", "stand-in-medium", "stand-in-mini", "stand-in-small"]
    assert client.models.retrieve("stand-in-small").owned_by == "pura-local-stand-in"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-none")


def test_bad_key_is_authentication_error(stack) -> None:
    bad = openai.OpenAI(base_url=stack.base_url, api_key="pura_" + "0" * 48, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.chat.completions.create(model="auto", messages=USER)
    assert info.value.body["code"] == "invalid_api_key"
    missing = httpx.post(stack.base_url + "/chat/completions", json={"messages": USER})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": USER, "stream": "yes"}, "stream"),
        ({"messages": USER, "temperature": 9}, "temperature"),
        ({"messages": USER, "routing": {"quality": "ultra"}}, "routing.quality"),
        ({"messages": USER, "routing": {"maxCost": -1}}, "routing.maxCost"),
        ({"messages": USER, "routing": {"excludeProviders": ["nobody"]}}, "routing.excludeProviders"),
        ({"messages": USER, "routing": {"prefer": "nobody"}}, "routing.prefer"),
        ({"messages": USER, "routing": {"cascadeMaxEscalations": 9}}, "routing.cascadeMaxEscalations"),
        ({"messages": USER, "routing": {"typo": 1}}, "routing.typo"),
    ],
)
def test_invalid_bodies_are_bad_request_with_param(stack, api_key, body, param) -> None:
    response = httpx.post(
        stack.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_invalid_json_and_client_exception_types(client: openai.OpenAI, stack, api_key) -> None:
    response = httpx.post(
        stack.base_url + "/chat/completions", content=b"{not json",
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    # JSON's grammar allows 1e400, but it has no finite value to forward upstream; NaN is not JSON
    for number in (b"1e400", b"-1e400", b"NaN", b"Infinity"):
        response = httpx.post(
            stack.base_url + "/chat/completions",
            content=b'{"messages": [{"role": "user", "content": "x"}], "temperature": ' + number + b"}",
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json", number
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="auto", messages=[{"role": "user"}])
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-unknown", messages=USER)
    assert info.value.body["param"] == "model"


def test_budget_exhaustion_is_402(stack) -> None:
    key = stack.create_key(daily_budget_usd="0.000001", rate_limit_per_min=100)
    tight = openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        tight.chat.completions.create(model="stand-in-large", messages=USER)
    assert info.value.status_code == 402
    assert info.value.body["code"] == "budget_exhausted"
    assert info.value.response.headers["x-pura-budget-remaining"] == "0.000001"


def test_rate_limit_is_429_with_retry_after(stack) -> None:
    key = stack.create_key(daily_budget_usd="10", rate_limit_per_min=3)
    limited = openai.OpenAI(base_url=stack.base_url, api_key=key, max_retries=0)
    remaining = []
    for _ in range(3):
        raw = limited.chat.completions.with_raw_response.create(model="stand-in-small", messages=USER)
        remaining.append(int(raw.headers["x-ratelimit-remaining"]))
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as info:
        limited.chat.completions.create(model="stand-in-small", messages=USER)
    headers = info.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-remaining"] == "0"


def test_upstream_failure_after_fallback_is_server_error(client: openai.OpenAI, stack) -> None:
    for name in ("cheap-a", "cheap-b"):
        stack.providers[name].configure(failure_rate=1.0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="stand-in-small", messages=USER)
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_failed"


def test_no_eligible_provider_is_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(
            model="stand-in-large", messages=USER, extra_body={"routing": {"excludeProviders": ["prem-a"]}}
        )
    assert info.value.status_code == 503 and info.value.body["code"] == "no_eligible_provider"


def test_mid_stream_cut_surfaces_as_api_error(client: openai.OpenAI, stack) -> None:
    stack.providers["prem-a"].configure(cut_stream_rate=1.0)
    stream = client.chat.completions.create(model="stand-in-large", messages=USER, stream=True)
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk)
    assert received, "the cut comes after some content was delivered"
    assert "broke off" in str(info.value)


def test_cors_preflight_and_exposed_headers(stack) -> None:
    response = httpx.options(
        stack.base_url + "/chat/completions",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "https://app.example")
    plain = httpx.get(stack.base_url + "/models", headers={"Origin": "https://app.example"})
    assert "X-Pura-Cost" in plain.headers["access-control-expose-headers"]


def test_unknown_path_and_method_use_openai_error_shape(stack) -> None:
    for response in (httpx.get(stack.base_url + "/nothing"), httpx.delete(stack.base_url + "/models")):
        assert response.status_code in (404, 405)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_report_and_income(client: openai.OpenAI, stack, api_key) -> None:
    client.chat.completions.create(model="stand-in-small", messages=USER)
    client.chat.completions.create(model="stand-in-large", messages=USER)
    auth = {"Authorization": f"Bearer {api_key}"}
    report = httpx.get(stack.gateway.url + "/api/report", headers=auth).json()
    assert report["requests"] == 2 and report["period"] == "24h"
    assert set(report["per_model"]) == {"stand-in-small", "stand-in-large"}
    assert set(report["per_tier"]) == {"cheap", "premium"}
    spend = sum(m["spend"]["micros"] for m in report["per_model"].values())
    assert spend == report["spend"]["micros"]
    assert report["savings_vs_premium"]["saved"]["micros"] > 0  # the cheap call saved money
    income = httpx.get(stack.gateway.url + "/api/income", headers=auth).json()
    assert sum(p["calls"] for p in income["costs"]["per_provider"].values()) == 2
    assert income["quality"], "quality scores of the routes used"
    text = httpx.get(stack.gateway.url + "/api/income", headers=auth | {"Accept": "text/plain"})
    assert text.headers["content-type"].startswith("text/plain") and "COSTS BY PROVIDER" in text.text
    # another key sees none of it; only admin keys may ask for everything
    other = stack.create_key()
    assert httpx.get(stack.gateway.url + "/api/report", headers={"Authorization": f"Bearer {other}"}).json()["requests"] == 0
    forbidden = httpx.get(stack.gateway.url + "/api/report?scope=all", headers=auth)
    assert forbidden.status_code == 403
    admin = httpx.get(stack.gateway.url + "/api/report?scope=all", headers={"Authorization": f"Bearer {stack.api_key}"})
    assert admin.status_code == 200 and admin.json()["requests"] >= 2


def test_async_client_stream(stack, api_key) -> None:
    import asyncio

    async def run() -> str:
        aclient = openai.AsyncOpenAI(base_url=stack.base_url, api_key=api_key, max_retries=0)
        stream = await aclient.chat.completions.create(model="stand-in-small", messages=USER, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await aclient.close()
        return "".join(parts)

    assert asyncio.run(run()).startswith("(local stand-in stand-in-small)")


def test_error_bodies_are_json_objects(stack, api_key) -> None:
    response = httpx.post(
        stack.base_url + "/chat/completions", json={"messages": USER, "model": "nope"},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert json.loads(response.text)["error"]["code"] == "model_not_found"
    assert response.headers["x-pura-request-id"].startswith("req_")


def test_one_structured_log_line_per_request(stack, client: openai.OpenAI) -> None:
    import io
    import time as _time

    from gateway.logs import RequestLog

    sink = io.StringIO()
    pipeline = stack.services.pipeline
    original, was_logging = pipeline.request_log, pipeline.log_requests
    pipeline.request_log, pipeline.log_requests = RequestLog(stream=sink), True
    try:
        ok = client.chat.completions.with_raw_response.create(model="stand-in-small", messages=USER)
        for name in ("cheap-a", "cheap-b"):
            stack.providers[name].configure(failure_rate=1.0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="stand-in-small", messages=USER)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=stack.base_url, api_key="nope", max_retries=0).chat.completions.create(
                model="auto", messages=USER
            )
        deadline = _time.monotonic() + 5
        while sink.getvalue().count("\n") < 3 and _time.monotonic() < deadline:
            _time.sleep(0.02)
    finally:
        pipeline.request_log, pipeline.log_requests = original, was_logging
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [line["status"] for line in lines] == [200, 502, 401]
    first = lines[0]
    assert first["request_id"] == ok.headers["x-pura-request-id"]
    assert first["provider"] in ("cheap-a", "cheap-b") and first["tier"] == "cheap"
    assert first["cost_micros"] > 0 and "latency_ms" in first and first["logger"] == "pura.request"
    assert lines[1]["error"] == "upstream_failed" and lines[1]["attempts"] == 2


def test_chat_cors_headers_only_for_browser_requests(stack, api_key) -> None:
    body = {"model": "stand-in-small", "messages": USER}
    auth = {"Authorization": f"Bearer {api_key}"}
    browser = httpx.post(stack.base_url + "/chat/completions", json=body,
                         headers=auth | {"Origin": "https://app.example"})
    assert browser.status_code == 200
    assert browser.headers["access-control-allow-origin"] in ("*", "https://app.example")
    assert "X-Pura-Cost" in browser.headers["access-control-expose-headers"]
    api = httpx.post(stack.base_url + "/chat/completions", json=body, headers=auth)
    assert api.status_code == 200 and "access-control-allow-origin" not in api.headers


def test_unexpected_error_on_the_chat_path_is_an_openai_500(stack, api_key, monkeypatch) -> None:
    async def broken(_request, _deferred=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(stack.services.pipeline, "handle", broken)
    response = httpx.post(stack.base_url + "/chat/completions", json={"messages": USER},
                          headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"


def test_client_leaving_mid_stream_stops_the_relay_and_bills_what_was_delivered(stack, api_key) -> None:
    import time

    stack.providers["prem-a"].configure(chunk_delay_ms=200)  # about 3 s for the whole answer
    with captured_records(stack) as captured:
        started = time.monotonic()
        with httpx.stream("POST", stack.base_url + "/chat/completions",
                          json={"model": "stand-in-large", "messages": USER, "stream": True},
                          headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))
        # the client is gone: the gateway notices while waiting for the upstream, not at its end
        deadline = time.monotonic() + 10
        while not captured and time.monotonic() < deadline:
            httpx.get(stack.gateway.url + "/api/report", headers={"Authorization": f"Bearer {api_key}"})
            time.sleep(0.05)
    (record,) = captured
    assert record.http_status == 499 and record.outcome == "partial"
    assert record.attempts[-1].outcome == "cut" and 0 < record.cost_micros
    assert time.monotonic() - started < 2  # well before the upstream would have finished


def _raw_stream(stack, api_key: str) -> tuple[httpx.Headers, list[dict]]:
    with httpx.stream("POST", stack.base_url + "/chat/completions",
                      json={"model": "stand-in-large", "messages": USER, "stream": True,
                            "stream_options": {"include_usage": True}},
                      headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return response.headers, [json.loads(line[6:]) for line in lines[:-1]]


def test_a_stream_that_arrives_at_once_and_one_that_arrives_in_pieces_look_the_same(
    stack, api_key: str, client: openai.OpenAI
) -> None:
    """An upstream stream that arrives in one write (the relay's first output is its end) and
    one that arrives in pieces: the client sees the same events, headers and bill either way,
    and each request is settled once."""
    with captured_records(stack) as captured:
        stack.providers["prem-a"].configure(stream_one_write=True)
        whole_headers, whole = _raw_stream(stack, api_key)
        stack.providers["prem-a"].configure(stream_one_write=False, chunk_delay_ms=20)
        relayed_headers, relayed = _raw_stream(stack, api_key)
        stack.providers["prem-a"].configure(stream_one_write=True)
        # the official client reads the whole response like any stream
        chunks = list(client.chat.completions.create(
            model="stand-in-large", messages=USER, stream=True, stream_options={"include_usage": True}
        ))
        httpx.get(stack.gateway.url + "/api/report", headers={"Authorization": f"Bearer {api_key}"})
    for headers in (whole_headers, relayed_headers):
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["cache-control"] == "no-cache" and headers["x-pura-provider"] == "prem-a"

    def text(events: list[dict]) -> str:
        return "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])

    assert text(whole) == text(relayed) and text(whole).startswith("(local stand-in stand-in-large)")
    assert [bool(e["choices"]) for e in whole] == [bool(e["choices"]) for e in relayed]
    assert whole[-1]["usage"] == relayed[-1]["usage"]
    assert whole[-1]["pura"]["cost_micros"] == relayed[-1]["pura"]["cost_micros"] > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text(whole)
    assert chunks[-1].model_extra["pura"]["cost_micros"] == whole[-1]["pura"]["cost_micros"]
    # settled once each, billed what the final chunk said
    ids = [whole[-1]["pura"]["request_id"], relayed[-1]["pura"]["request_id"],
           chunks[-1].model_extra["pura"]["request_id"]]
    assert sorted(r.request_id for r in captured) == sorted(ids)
    assert {r.billed_micros for r in captured} == {whole[-1]["pura"]["cost_micros"]}
    assert all(r.outcome == "ok" and r.http_status == 200 for r in captured)


def test_an_oversized_body_sent_in_chunks_is_413(stack, api_key: str) -> None:
    """Without a Content-Length the limit applies while the body is read."""
    def body():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(9):
            yield b"x" * (1024 * 1024)
        yield b'"}]}'

    response = httpx.post(stack.base_url + "/chat/completions", content=body(),
                          headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
