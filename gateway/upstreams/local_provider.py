"""LOCAL STAND-IN PROVIDER: an OpenAI-compatible server that Pura ships for its embedded default
and its tests. It is not a language model. Its answers are deterministic text built from the
prompt, and it is labelled as a stand-in everywhere it shows: the answer text starts with
``(local stand-in <model>)``, responses carry ``system_fingerprint: "pura-local-stand-in"`` and
the header ``X-Pura-Stand-In: true``, and ``/v1/models`` lists ``owned_by: "pura-local-stand-in"``.

Settable behaviour (:class:`StandInBehaviour`, also changeable at run time through
``POST /_stand_in/config``): served model names, latency before the first byte, delay between
stream chunks, answer quality, parameters it rejects with a 400 (as some vendors' compatibility
endpoints do), and the rates of refusals, HTTP 500s, malformed JSON bodies, streams cut mid-way
and hung requests. Faults are scheduled deterministically (a rate ``r``
faults requests ``i`` where ``floor((i+1)r) > floor(ir)``), so a test that sets ``failure_rate
= 0.25`` gets exactly every fourth request failing.

It is a bare ASGI application (no framework) so that it is fast enough to serve as the "instant
upstream" of the overhead benchmark.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.accounting.money import estimate_tokens, message_text

FINGERPRINT = "pura-local-stand-in"

_WORDS = (
    "capacity routing payment stream pool weight epoch receipt sink source backlog price "
    "signal latency answer model tier budget ledger quota market buffer escrow stake bond "
    "verify settle measure balance share demand supply queue window rate"
).split()


class StandInBehaviour(BaseModel):
    """How the stand-in behaves. Rates are in [0, 1]; times in milliseconds."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=lambda: ["stand-in-small"])
    latency_ms: float = Field(default=0.0, ge=0)
    chunk_delay_ms: float = Field(default=0.0, ge=0)
    stream_one_write: bool = Field(
        default=False, description="send a stream's events in one write after its headers (tests)"
    )
    quality: float = Field(default=1.0, ge=0, le=1)
    refusal_rate: float = Field(default=0.0, ge=0, le=1)
    failure_rate: float = Field(default=0.0, ge=0, le=1)
    malformed_rate: float = Field(default=0.0, ge=0, le=1)
    cut_stream_rate: float = Field(default=0.0, ge=0, le=1)
    hang_rate: float = Field(default=0.0, ge=0, le=1)
    hang_s: float = Field(default=3600.0, gt=0)
    report_usage: bool = True
    api_key: str | None = Field(default=None, description="require this bearer key if set")
    unsupported_params: list[str] = Field(
        default_factory=list, description="reject requests using these fields with a 400"
    )
    fixed_answer: str | None = Field(
        default=None, description="answer exactly this text (cascade tests)"
    )
    # The Pura sidecar (gateway.chain.receipts): with a sink key, the stand-in signs the
    # receipt terms the gateway sends in X-Pura-Receipt-Request for what it actually served.
    sink_key: str | None = Field(default=None, description="the provider's sink private key (hex)")
    receipt_mode: Literal["honest", "forge", "omit"] = Field(
        default="honest", description="sign honestly, return a forged signature, or return none (tests)"
    )


def _fires(rate: float, index: int) -> bool:
    return rate > 0 and math.floor((index + 1) * rate) > math.floor(index * rate)


def _last_user(messages: list[dict]) -> str:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return message_text(m)
    return ""


def compose_answer(model: str, messages: list[dict], quality: float, refusal: bool) -> str:
    """Deterministic answer text for a prompt, shaped by ``quality``."""
    label = f"(local stand-in {model})"
    if refusal:
        return f"{label} I'm sorry, but I can't help with that request."
    question = _last_user(messages).strip()
    digest = hashlib.sha256(f"{model}\n{question}".encode()).digest()

    def words(offset: int, n: int) -> str:
        return " ".join(_WORDS[digest[(offset + i) % len(digest)] % len(_WORDS)] for i in range(n))

    if quality < 0.4:
        return f"{label} I'm not sure, it depends."
    if quality < 0.75:
        return f"{label} Perhaps the {words(0, 3)} matters here; it depends on the {words(3, 2)}."
    questions = [q.strip() for q in question.split("?") if q.strip()] if "?" in question else []
    if len(questions) > 1:
        items = [
            f"{i + 1}. On \"{q[:60]}\": the {words(4 * i, 4)} sets the {words(4 * i + 2, 3)}, "
            f"so the answer follows from the {words(4 * i + 5, 3)}."
            for i, q in enumerate(questions)
        ]
        return label + "\n\n" + "\n".join(items)
    topic = question[:80] or "the request"
    return (
        f"{label} Here is a complete answer about \"{topic}\". The {words(0, 4)} determines the "
        f"{words(4, 3)}. In practice the {words(7, 4)} follows directly, and the {words(11, 3)} "
        f"confirms it. In short: the {words(14, 3)} is what matters."
    )


@dataclass(slots=True)
class StandInState:
    behaviour: StandInBehaviour
    requests: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    last_request: dict | None = None
    served: dict[str, int] = field(default_factory=dict)

    def next_index(self, kind: str) -> int:
        value = self.counters.get(kind, 0)
        self.counters[kind] = value + 1
        return value


class LocalProviderApp:
    """ASGI application of the local stand-in provider."""

    def __init__(self, behaviour: StandInBehaviour | None = None) -> None:
        self.state = StandInState(behaviour or StandInBehaviour())

    # ---- ASGI plumbing

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/")
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith("/_stand_in"):
            await self._control(method, path, body, send)
            return
        behaviour = self.state.behaviour
        if behaviour.api_key is not None and headers.get("authorization") != f"Bearer {behaviour.api_key}":
            await _json(send, 401, _error("invalid api key", "invalid_request_error", "invalid_api_key"))
            return
        if method == "GET" and path == "/v1/models":
            await _json(send, 200, {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": FINGERPRINT}
                    for m in behaviour.models
                ],
            })
        elif method == "POST" and path == "/v1/chat/completions":
            await self._chat(body, send, headers.get("x-pura-receipt-request"))
        elif method == "GET" and path == "/health":
            await _json(send, 200, {"status": "ok", "stand_in": True})
        else:
            await _json(send, 404, _error(f"no route {method} {path}", "invalid_request_error", None))

    async def _control(self, method: str, path: str, body: bytes, send: Any) -> None:
        state = self.state
        if path == "/_stand_in/config" and method == "POST":
            try:
                update = json.loads(body or b"{}")
                merged = state.behaviour.model_dump() | update
                state.behaviour = StandInBehaviour.model_validate(merged)
            except (ValueError, TypeError) as exc:
                await _json(send, 400, _error(str(exc)[:300], "invalid_request_error", None))
                return
            state.counters.clear()
        if path == "/_stand_in/config":
            await _json(send, 200, state.behaviour.model_dump())
        elif path == "/_stand_in/last_request":
            await _json(send, 200, {"body": state.last_request})
        elif path == "/_stand_in/stats":
            await _json(send, 200, {"requests": state.requests, "served": state.served})
        else:
            await _json(send, 404, _error("unknown control path", "invalid_request_error", None))

    # ---- chat completions

    def _sink_signature(self, terms_header: str | None, usage: dict, answer: str) -> str | None:
        """The sidecar: sign the gateway's receipt terms for what was served (or misbehave,
        when a test asks it to)."""
        b = self.state.behaviour
        if not terms_header or not b.sink_key or b.receipt_mode == "omit":
            return None
        from eth_account import Account

        from gateway.chain.receipts import ReceiptTerms, sign_as_sink

        try:
            terms = ReceiptTerms.decode(terms_header)
        except (ValueError, TypeError, KeyError):
            return None
        if Account.from_key(b.sink_key).address.lower() != terms.sink.lower():
            return None  # not our sink: sign nothing
        digest = hashlib.sha256(answer.encode("utf-8")).hexdigest()
        receipt = terms.receipt_for_usage(usage["prompt_tokens"], usage["completion_tokens"], digest)
        if b.receipt_mode == "forge":
            # claims more than was served: the gateway must refuse it
            receipt = dataclasses.replace(receipt, amount=receipt.amount * 2 + 1)
        return sign_as_sink(terms, receipt, b.sink_key)

    async def _chat(self, body: bytes, send: Any, receipt_terms: str | None = None) -> None:
        state = self.state
        b = state.behaviour
        state.requests += 1
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise ValueError("body must be an object")
            messages = request["messages"]
            model = request.get("model") or b.models[0]
        except (ValueError, KeyError, TypeError) as exc:
            await _json(send, 400, _error(f"bad request: {exc}", "invalid_request_error", None))
            return
        state.last_request = request
        unsupported = [p for p in b.unsupported_params if p in request]
        if unsupported:
            await _json(send, 400, _error(
                f"Unsupported parameter: {unsupported[0]}", "invalid_request_error", "unsupported_parameter"
            ))
            return
        if model not in b.models:
            await _json(send, 404, _error(
                f"The model `{model}` does not exist", "invalid_request_error", "model_not_found"
            ))
            return
        if _fires(b.hang_rate, state.next_index("hang")):
            await asyncio.sleep(b.hang_s)
        if b.latency_ms:
            await asyncio.sleep(b.latency_ms / 1000)
        if _fires(b.failure_rate, state.next_index("failure")):
            await _json(send, 500, _error("stand-in injected failure", "server_error", None))
            return
        stream = bool(request.get("stream"))
        malformed = _fires(b.malformed_rate, state.next_index("malformed"))
        cut = stream and _fires(b.cut_stream_rate, state.next_index("cut"))
        refusal = _fires(b.refusal_rate, state.next_index("refusal"))
        state.served[model] = state.served.get(model, 0) + 1

        n = request.get("n") or 1
        n = n if isinstance(n, int) and 1 <= n <= 16 else 1
        if b.fixed_answer is not None:
            text = b.fixed_answer
        else:
            text = compose_answer(model, messages, b.quality, refusal)
        max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
        finish = "stop"
        if isinstance(max_tokens, int) and max_tokens > 0 and estimate_tokens(text) > max_tokens:
            text = " ".join(text.split()[: max(1, max_tokens // 2)])
            finish = "length"
        tool_calls = None
        tools = request.get("tools")
        choice = request.get("tool_choice")
        if isinstance(tools, list) and tools and (choice == "required" or isinstance(choice, dict)):
            source = choice if isinstance(choice, dict) else tools[0]
            function = source.get("function") if isinstance(source, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            name = name if isinstance(name, str) else "tool"
            tool_calls = [{
                "id": "call_" + hashlib.sha256(text.encode()).hexdigest()[:16],
                "type": "function",
                "function": {"name": name, "arguments": json.dumps({"query": text[:40]})},
            }]
            finish = "tool_calls"
        prompt_tokens = sum(estimate_tokens(message_text(m)) + 4 for m in messages if isinstance(m, dict))
        completion_tokens = estimate_tokens(text) * n
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        created = int(time.time())
        rid = "chatcmpl-standin-" + hashlib.sha256(body).hexdigest()[:20]
        if not stream:
            if malformed:
                await _raw(send, 200, b'{"id": "broken', "application/json")
                return
            message: dict[str, Any] = {"role": "assistant", "content": None if tool_calls else text}
            if tool_calls:
                message["tool_calls"] = tool_calls
            payload = {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [
                    {"index": i, "message": message, "finish_reason": finish, "logprobs": None}
                    for i in range(n)
                ],
            }
            if b.report_usage:
                payload["usage"] = usage
            signature = self._sink_signature(receipt_terms, usage, message_text(message))
            extra = [(b"x-pura-sink-signature", signature.encode())] if signature else []
            await _json(send, 200, payload, extra)
            return
        await send({
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream"),
                (b"cache-control", b"no-cache"),
                (b"x-pura-stand-in", b"true"),
            ],
        })

        def chunk(delta: dict, finish_reason: str | None, index: int = 0) -> bytes:
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}],
            }
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        held: list[bytes] | None = [] if b.stream_one_write else None

        async def emit(data: bytes) -> None:
            if held is not None:
                held.append(data)
                return
            await send({"type": "http.response.body", "body": data, "more_body": True})
            if b.chunk_delay_ms:
                await asyncio.sleep(b.chunk_delay_ms / 1000)

        async def end(data: bytes) -> None:
            body = data if held is None else b"".join(held) + data
            await send({"type": "http.response.body", "body": body, "more_body": False})

        if malformed:
            await emit(b"data: {not json\n\n")
            await end(b"")
            return
        words = text.split(" ")
        pieces = [" ".join(words[i : i + 4]) + (" " if i + 4 < len(words) else "")
                  for i in range(0, len(words), 4)]
        for i in range(n):
            await emit(chunk({"role": "assistant", "content": ""}, None, i))
            if tool_calls:
                calls = [dict(c, index=j) for j, c in enumerate(tool_calls)]
                await emit(chunk({"tool_calls": calls}, None, i))
            else:
                for j, piece in enumerate(pieces):
                    if cut and i == 0 and j >= max(1, len(pieces) // 2):
                        # cut mid-way: close the connection without finish chunk or [DONE]
                        await end(b"")
                        return
                    await emit(chunk({"content": piece}, None, i))
            if i == n - 1:
                continue  # the last finish chunk may carry the signature (below)
            await emit(chunk({}, finish, i))
        streamed = (message_text({"tool_calls": tool_calls}) if tool_calls else "".join(pieces))
        signature = self._sink_signature(receipt_terms, usage, streamed)
        options = request.get("stream_options") or {}
        wants_usage = b.report_usage and isinstance(options, dict) and options.get("include_usage")
        last = json.loads(chunk({}, finish, n - 1)[6:])
        if signature and not wants_usage:
            last["pura_sink_signature"] = signature
        await emit(b"data: " + json.dumps(last).encode() + b"\n\n")
        if wants_usage:
            obj = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": [],
                "usage": usage,
            }
            if signature:
                obj["pura_sink_signature"] = signature
            await emit(b"data: " + json.dumps(obj).encode() + b"\n\n")
        await end(b"data: [DONE]\n\n")


def _error(message: str, type_: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


async def _json(send: Any, status: int, payload: dict, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    await _raw(send, status, json.dumps(payload).encode(), "application/json", extra)


async def _raw(
    send: Any, status: int, body: bytes, content_type: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"x-pura-stand-in", b"true"),
            *(extra or []),
        ],
    })
    await send({"type": "http.response.body", "body": body})
