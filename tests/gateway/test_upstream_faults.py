"""Upstream faults: timeouts, 500s, malformed JSON, streams cut mid-way, refused connections,
each with fallback, plus the SSE parser and the stand-in's deterministic fault schedule."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.devstack import free_port
from gateway.routing.weights import StaticWeightSource
from gateway.upstreams.local_provider import _fires
from gateway.upstreams.sse import SSEParser

Q = [{"role": "user", "content": "What is a pool?"}]


def _served(stack, name: str) -> int:
    return httpx.get(stack.providers[name].server.url + "/_stand_in/stats").json()["requests"]


@pytest.fixture()
def cheap_a_first(stack) -> None:
    """Weights that make cheap-a the first choice for stand-in-small (cheap-b the fallback)."""
    stack.services.router.weights = StaticWeightSource(
        {"cheap-a": 1_000_000, "cheap-b": 1, "mid-a": 1, "prem-a": 1}
    )


def _pinned_small(client: openai.OpenAI, stream: bool = False):
    return client.chat.completions.with_raw_response.create(
        model="stand-in-small", messages=Q, stream=stream
    )


@pytest.mark.parametrize("fault", ["failure_rate", "malformed_rate"])
@pytest.mark.parametrize("stream", [False, True])
def test_fault_falls_back_to_the_next_provider(stack, client, cheap_a_first, fault: str, stream: bool) -> None:
    stack.providers["cheap-a"].configure(**{fault: 1.0})
    providers = set()
    for _ in range(6):
        raw = _pinned_small(client, stream=stream)
        providers.add(raw.headers["x-pura-provider"])
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
        else:
            text = raw.parse().choices[0].message.content
        assert text.startswith("(local stand-in stand-in-small)")
    assert providers == {"cheap-b"}
    assert _served(stack, "cheap-a") > 0  # it was tried, and failed over


def test_failures_lower_quality_and_are_recorded(stack, client, cheap_a_first) -> None:
    stack.providers["cheap-a"].configure(failure_rate=1.0)
    for _ in range(5):
        _pinned_small(client)
    health = stack.services.health
    stats = health.stats("cheap-a/stand-in-small")
    assert stats.failures == stats.requests > 0
    assert health.is_degraded("cheap-a/stand-in-small")
    assert health.quality("cheap-a/stand-in-small") < health.quality("cheap-b/stand-in-small")


def test_first_byte_timeout_falls_back_quickly(stack, client, cheap_a_first) -> None:
    stack.providers["cheap-a"].configure(hang_rate=1.0, hang_s=30)
    provider = stack.services.catalogue.by_model["stand-in-small"][0].provider
    assert provider.name == "cheap-a" and provider.first_byte_timeout_s == 5.0
    original = provider.first_byte_timeout_s
    provider.first_byte_timeout_s = 0.5
    try:
        started = time.monotonic()
        raw = client.chat.completions.with_raw_response.create(
            model="stand-in-small", messages=Q
        )
        elapsed = time.monotonic() - started
        assert raw.headers["x-pura-attempts"] == "2"
        assert raw.headers["x-pura-provider"] == "cheap-b"
        assert elapsed < 3
    finally:
        provider.first_byte_timeout_s = original


def test_every_upstream_timing_out_is_504(stack, client) -> None:
    providers = [r.provider for r in stack.services.catalogue.by_model["stand-in-small"]]
    for name in ("cheap-a", "cheap-b"):
        stack.providers[name].configure(hang_rate=1.0, hang_s=30)
    originals = [p.first_byte_timeout_s for p in providers]
    for p in providers:
        p.first_byte_timeout_s = 0.3
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="stand-in-small", messages=Q)
        assert info.value.status_code == 504 and info.value.body["code"] == "upstream_timeout"
    finally:
        for p, t in zip(providers, originals):
            p.first_byte_timeout_s = t


def test_connection_refused_falls_back(stack, client, cheap_a_first) -> None:
    provider = stack.services.catalogue.by_model["stand-in-small"][0].provider
    original = provider.base_url
    provider.base_url = f"http://127.0.0.1:{free_port()}/v1"
    try:
        raw = client.chat.completions.with_raw_response.create(
            model="stand-in-small", messages=Q
        )
        assert raw.headers["x-pura-provider"] == "cheap-b"
    finally:
        provider.base_url = original


def test_stream_cut_mid_way_ends_with_error_event_and_bills_the_delivered_part(stack, api_key) -> None:
    stack.providers["prem-a"].configure(cut_stream_rate=1.0)
    response = httpx.post(
        stack.base_url + "/chat/completions",
        json={"model": "stand-in-large", "messages": Q, "stream": True},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
    )
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] != "[DONE]"
    final = json.loads(events[-1])
    assert final["error"]["code"] == "upstream_stream_cut"
    assert final["pura"]["cost_micros"] > 0  # the delivered part was billed
    stats = stack.services.health.stats("prem-a/stand-in-large")
    assert stats.failures == 1


def test_stream_cut_before_the_first_event_falls_back(stack, client, cheap_a_first) -> None:
    # malformed first event on cheap-a: nothing was sent yet, so the gateway falls back
    stack.providers["cheap-a"].configure(malformed_rate=1.0)
    raw = _pinned_small(client, stream=True)
    assert raw.headers["x-pura-provider"] == "cheap-b"


def test_upstream_4xx_about_the_request_is_returned_not_retried(stack, client) -> None:
    for name in ("cheap-a", "cheap-b"):
        stack.providers[name].configure(unsupported_params=["logit_bias"])
    before = _served(stack, "cheap-a") + _served(stack, "cheap-b")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="stand-in-small", messages=Q, logit_bias={"1": 1})
    assert info.value.body["code"] == "upstream_rejected"
    assert "Unsupported parameter: logit_bias" in info.value.body["message"]
    assert _served(stack, "cheap-a") + _served(stack, "cheap-b") == before + 1  # no retry


def test_upstream_key_is_sent_and_a_bad_one_fails_over(stack, client, cheap_a_first) -> None:
    stack.providers["cheap-a"].configure(api_key="sk-upstream-secret")
    raw = _pinned_small(client)
    assert raw.headers["x-pura-provider"] == "cheap-b"  # 401 from cheap-a: failover, not leaked
    assert "sk-upstream" not in raw.text


# ---------------------------------------------------------------- SSE parser


def test_sse_parser_joins_events_split_at_every_byte() -> None:
    events = [{"i": i, "text": "ünïcode ✓ " * 3} for i in range(5)]
    wire = b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + b"\r\n\r\n" for e in events)
    wire += b": keep-alive comment\n\ndata: [DONE]\n\n"
    for split in range(1, len(wire)):
        parser = SSEParser()
        out = parser.feed(wire[:split]) + parser.feed(wire[split:])
        assert [json.loads(x) for x in out[:-1]] == events and out[-1] == b"[DONE]"


def test_sse_parser_multiline_data_and_pending() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\ndata: b\n\n") == [b"a\nb"]
    assert parser.feed(b"data: partial") == [] and parser.pending


def test_stand_in_fault_schedule_is_exact() -> None:
    assert [i for i in range(12) if _fires(0.25, i)] == [3, 7, 11]
    assert all(_fires(1.0, i) for i in range(5)) and not any(_fires(0.0, i) for i in range(5))


class _ReferenceSSE:
    """SSE's line rules, one line at a time (the specification the fast parser must match)."""

    def __init__(self) -> None:
        self.line, self.data, self.events = b"", [], []

    def feed(self, chunk: bytes) -> None:
        for byte in chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n"):
            if byte != 10:
                self.line += bytes([byte])
                continue
            line, self.line = self.line, b""
            if not line:
                if self.data:
                    self.events.append(b"\n".join(self.data))
                    self.data = []
            elif not line.startswith(b":"):
                field, _, value = line.partition(b":")
                if field == b"data":
                    self.data.append(value[1:] if value.startswith(b" ") else value)


_sse_pieces = st.one_of(
    # whole events as servers send them, payloads with edge whitespace and colons included
    st.binary(max_size=12).filter(lambda b: b"\n" not in b and b"\r" not in b).map(
        lambda payload: b"data: " + payload + b"\n\n"
    ),
    # and the pieces of every other shape, in any order
    st.sampled_from([
        b"data: ", b"data:", b"data", b"event: x", b": comment", b"id: 7", b"\n", b"\n\n", b"\r\n",
        b'{"a": 1}', b"[DONE]", b"x", b" ", b"\xc3\xa9",
    ]),
)


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(_sse_pieces, max_size=40), st.lists(st.integers(0, 400), max_size=6))
def test_sse_parser_agrees_with_the_line_rules_on_any_stream_and_split(pieces, cuts) -> None:
    wire = b"".join(pieces)
    if b"\r" in wire:
        # a CR at the end of one read and an LF at the start of the next count as two line ends
        # for both parsers only if the split falls between them; keep CRLF pairs in one read
        cuts = [c for c in cuts if not (0 < c < len(wire) and wire[c - 1 : c] == b"\r")]
    bounds = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    parser, reference, out = SSEParser(), _ReferenceSSE(), []
    for a, b in zip(bounds, bounds[1:]):
        out += parser.feed(wire[a:b])
    reference.feed(wire)
    assert out == reference.events
    assert parser.pending == bool(reference.line.strip() or reference.data)
