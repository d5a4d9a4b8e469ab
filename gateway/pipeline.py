"""The chat-completions pipeline: request -> routing -> upstream -> accounting -> record.

One :class:`ChatPipeline` lives in the app's lifespan. :meth:`ChatPipeline.handle` does, in
order: key check, body validation, routing plan, admission (auth and rate limit in memory, then
the budget reservation, committed before any upstream call), the upstream calls (with fallback,
or the cascade), the bill, and the response with its ``X-Pura-*`` headers; the completion record
(queued for settlement) and one structured log line follow the response's last byte (see
:meth:`ChatPipeline.handle`).

Streams: the upstream's first event is awaited before anything is sent, so a failure before the
first byte still falls back to the next route; once bytes have gone to the client, a failure ends
the stream with an OpenAI error event (the ``openai`` client raises it as ``APIError``). The
chunk that carries ``finish_reason`` is held back until the upstream's end so that Pura's cost
can ride in the final chunk (``"pura": {...}``); content chunks are forwarded as they arrive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive

from gateway import errors
from gateway.accounting.money import (
    estimate_tokens,
    format_usd,
    message_text,
    prompt_token_bound,
    prompt_token_estimate,
)
from gateway.accounting.records import AttemptRecord, CompletionRecord, RecordSink, answer_hash
from gateway.accounting.settlement import Settlement, SettlementQueue
from gateway.accounting.store import Admission, Store, now_ms
from gateway.config import TIERS, RoutingConfig, Tier
from gateway.errors import GatewayError
from gateway.jsonio import dumps, loads
from gateway.logs import RequestLog
from gateway.responses import EventStreamResponse, LastChunk
from gateway.routing.cascade import AnswerScore, score_answer
from gateway.routing.complexity import classify, extract_features
from gateway.routing.quality import HealthBook
from gateway.routing.selection import Catalogue, Hints, NoEligibleRoute, Plan, Route, Router
from gateway.schemas import ChatCompletionRequest, RoutingHints
from gateway.upstreams.client import Completion, EventStream, UpstreamClient, UpstreamFailure
from gateway.upstreams.sse import encode_event

STREAM_SIGNATURE_FIELD = "pura_sink_signature"  # gateway.chain.receipts.STREAM_FIELD

if TYPE_CHECKING:
    from gateway.chain.service import ChainService


log = logging.getLogger("pura.pipeline")

MAX_RESERVATION_MICROS = 2**53
NO_HINTS = Hints()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    estimated: bool


@dataclass(slots=True)
class RequestContext:
    """Everything one request accumulates on its way through the pipeline."""

    request_id: str
    started_ms: int
    started: float
    raw_key: str
    body: dict
    parsed: ChatCompletionRequest
    hints: Hints
    experimental: list[str]
    stream: bool
    client_wants_usage: bool
    pinned_model: str | None
    tier: Tier = "mid"
    tier_reason: str = ""
    admission: Admission | None = None
    reserved_micros: int = 0  # held for this request (admission + cascade extensions)
    budget_remaining: int = 0  # cap - spent - reserved as of the last reservation change
    attempts: list[AttemptRecord] = field(default_factory=list)
    cost_micros: int = 0
    premium_cost_micros: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False
    explored: bool = False
    cascade_depth: int = 0
    confidence: float | None = None
    cascade_stopped: str | None = None
    # on-chain receipt (when the chain is enabled): one nonce and deadline per request; the
    # terms each attempted route was sent, and the sink signatures sidecars returned
    receipt_nonce: int | None = None
    receipt_deadline: int = 0
    terms: dict[str, Any] = field(default_factory=dict)
    sink_sigs: dict[str, str | None] = field(default_factory=dict)
    receipt_status: str | None = None
    # where _finish leaves the settlement and the log line when the caller sends the response
    # itself and publishes them after its last byte (see ChatPipeline.handle); None: at once
    deferred: list[Callable[[], None]] | None = None
    # (billed, budget remaining) once _finish has run: a request is finished once
    finished: tuple[int, int] | None = None

    @property
    def messages(self) -> list[dict]:
        return self.body["messages"]


def _completion_text(data: dict) -> tuple[str, str | None, bool]:
    """(answer text of choice 0, its finish_reason, whether it holds tool calls)."""
    choices = data.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return "", None, False
    choice = choices[0]
    message = choice.get("message") or {}
    text = message_text(message) if isinstance(message, dict) else ""
    has_tools = bool(isinstance(message, dict) and message.get("tool_calls"))
    return text, choice.get("finish_reason"), has_tools


def _all_choice_text(data: dict) -> str:
    return "\n".join(
        message_text(c.get("message") or {})
        for c in data.get("choices") or []
        if isinstance(c, dict)
    )


async def _read_body(receive: Receive, limit: int) -> bytes:
    """The request body, straight from the ASGI ``receive`` (Starlette's ``Request.body()``
    goes through an async generator and a context manager for the same result, ~10 us on the
    target machine). More than ``limit`` bytes: 413, without reading the rest."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body = message.get("body", b"")
        if body:
            size += len(body)
            if size > limit:
                raise errors.too_large(limit)
            chunks.append(body)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _reported_usage(obj: dict) -> tuple[int, int] | None:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(p, int) and isinstance(c, int) and p >= 0 and c >= 0:
        return p, c
    return None


class ChatPipeline:
    def __init__(
        self,
        config: RoutingConfig,
        catalogue: Catalogue,
        router: Router,
        health: HealthBook,
        store: Store,
        upstream: UpstreamClient,
        settlement: SettlementQueue,
        log_requests: bool = True,
        max_body_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.max_body_bytes = max_body_bytes
        # Request ids need uniqueness, not secrecy: a PRNG seeded from the OS once per process
        # (os.urandom costs ~60 us a call on the target machine). They start with the
        # millisecond clock so that the indexes keyed by them (reservations, usage_records,
        # usage_attempts) grow at their right edge: a group commit of settlements then dirties
        # a few pages instead of about one per request (each page is a write at commit).
        self._ids = random.Random(os.urandom(32))
        self.config = config
        self.catalogue = catalogue
        self._provider_names = frozenset(catalogue.provider_names)
        self.router = router
        self.health = health
        self.store = store
        self.upstream = upstream
        self.settlement = settlement
        self.log_requests = log_requests
        self.request_log = RequestLog()
        self.chain: ChainService | None = None  # set by the app when [chain] is enabled
        self.in_flight = 0  # requests between arrival and their response (or its first byte)

    @property
    def sinks(self) -> list[RecordSink]:
        return self.settlement.sinks

    # ------------------------------------------------------------------ entry point

    async def handle(
        self, request: Request, deferred: list[Callable[[], None]] | None = None
    ) -> Response:
        """Answer one chat request.

        ``deferred``: a list the caller owns. The request's settlement and log line (everything
        of :meth:`_finish` but the bill) are appended to it instead of being published at once,
        and the caller runs :meth:`publish` on it after the response's last byte, however the
        response ended. Neither has to be in place before the client has its answer: the bill
        is computed before the response and the reservation stays held until the settlement
        commits; and as nothing awaits between the last write and :meth:`publish`, a report the
        client asks for next still sees the request. This takes them (about 40 us on the 2-core
        target machine) off every response's critical path.
        """
        self.in_flight += 1
        try:
            return await self._handle(request, deferred)
        finally:
            self.in_flight -= 1

    @staticmethod
    def publish(deferred: list[Callable[[], None]]) -> None:
        """Run what :meth:`handle` deferred; one failing step does not stop the others."""
        for step in deferred:
            try:
                step()
            except Exception:
                log.exception("publishing a request's record failed")
        deferred.clear()

    async def _handle(self, request: Request, deferred: list[Callable[[], None]] | None) -> Response:
        request_id = f"req_{time.time_ns() // 1_000_000:012x}{self._ids.getrandbits(48):012x}"
        base_headers = {"X-Pura-Request-Id": request_id}
        started = time.perf_counter()
        raw_key = _bearer(request.headers.get("authorization"))
        if raw_key is None:
            return self._error(errors.unauthorized(), base_headers, request_id, None, started)
        try:
            ctx = await self._prepare(request, request_id, raw_key, started)
        except GatewayError as err:
            # Errors found before admission still authenticate and count against the limit.
            admission = await self.store.admit(raw_key, None)
            if admission.status == "unauthorized":
                err = errors.unauthorized()
            elif admission.status == "rate_limited":
                err = errors.rate_limited(admission.retry_after_s, admission.rate_limit)
            headers = dict(base_headers)
            if admission.status == "ok":
                headers["X-RateLimit-Remaining"] = str(admission.rate_remaining)
                headers["X-RateLimit-Limit"] = str(admission.rate_limit)
            return self._error(err, headers, request_id, admission.key and admission.key.prefix, started)
        ctx.deferred = deferred
        try:
            return await self._run(ctx)
        except GatewayError as err:
            headers = dict(base_headers)
            if ctx.admission is not None and ctx.admission.status == "ok":
                # admitted: _finish already settled and logged this request
                headers["X-RateLimit-Remaining"] = str(ctx.admission.rate_remaining)
                return err.response(headers)
            key = ctx.admission.key.prefix if ctx.admission and ctx.admission.key else None
            return self._error(err, headers, request_id, key, started)

    def _error(
        self,
        err: GatewayError,
        headers: dict[str, str],
        request_id: str,
        key_prefix: str | None,
        started: float,
    ) -> Response:
        if self.log_requests:
            self._log(
                request_id=request_id,
                key=key_prefix,
                status=err.status,
                error=err.code,
                latency_ms=round((time.perf_counter() - started) * 1000, 2),
            )
        return err.response(headers)

    # ------------------------------------------------------------------ validation + plan

    async def _prepare(
        self, request: Request, request_id: str, raw_key: str, started: float
    ) -> RequestContext:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise errors.too_large(self.max_body_bytes)
        raw = await _read_body(request.receive, self.max_body_bytes)
        try:
            body = loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise errors.bad_request("The request body is not valid JSON.", code="invalid_json")
        if not isinstance(body, dict):
            raise errors.bad_request("The request body must be a JSON object.", code="invalid_json")
        try:
            parsed = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            code = "invalid_routing_hint" if first["loc"][:1] == ("routing",) else "invalid_value"
            raise errors.bad_request(f"{param}: {first['msg']}", param=param, code=code)
        if parsed.routing is None:
            hints, experimental = NO_HINTS, []
        else:
            hints, experimental = self._hints(parsed.routing), parsed.routing.experimental_used()
        model = parsed.model
        pinned = None if model in (None, "auto") else model
        if pinned is not None and pinned not in self.catalogue.by_model:
            raise errors.model_not_found(pinned)
        options = parsed.stream_options or {}
        return RequestContext(
            request_id=request_id,
            started_ms=now_ms(),
            started=started,
            raw_key=raw_key,
            body=body,
            parsed=parsed,
            hints=hints,
            experimental=experimental,
            stream=bool(parsed.stream),
            client_wants_usage=bool(options.get("include_usage")),
            pinned_model=pinned,
        )

    def _hints(self, routing: RoutingHints) -> Hints:
        """The routing hints, checked against the configured providers."""
        if routing.prefer is not None and routing.prefer not in self._provider_names:
            raise errors.bad_request(
                f"routing.prefer: unknown provider {routing.prefer!r}",
                param="routing.prefer",
                code="invalid_routing_hint",
            )
        unknown = sorted(set(routing.excludeProviders or ()) - self._provider_names)
        if unknown:
            raise errors.bad_request(
                f"routing.excludeProviders: unknown provider(s) {unknown}",
                param="routing.excludeProviders",
                code="invalid_routing_hint",
            )
        return Hints(
            quality=routing.quality,
            prefer=routing.prefer,
            max_cost_usd_per_1k=None if routing.maxCost is None else Decimal(str(routing.maxCost)),
            max_latency_ms=routing.maxLatency,
            exclude_providers=frozenset(routing.excludeProviders or ()),
        )

    def _reservation_bound(self, ctx: RequestContext, routes: list[Route]) -> int:
        """Upper bound of what answering with any of ``routes`` can cost, in micro-USD."""
        prompt = prompt_token_bound(ctx.messages, ctx.body.get("tools"))
        completion = (
            ctx.parsed.max_completion_tokens
            or ctx.parsed.max_tokens
            or self.config.accounting.default_max_completion_tokens
        ) * (ctx.parsed.n or 1)
        bound = max((r.price.cost_micros(prompt, completion) for r in routes), default=0)
        # Any bound above the largest budget fails the same way; keep it inside BIGINT.
        return min(bound, MAX_RESERVATION_MICROS)

    # ------------------------------------------------------------------ run

    async def _run(self, ctx: RequestContext) -> Response:
        cascade_policy = self.config.cascade
        use_cascade = ctx.pinned_model is None and (
            ctx.parsed.routing.cascade
            if ctx.parsed.routing is not None and ctx.parsed.routing.cascade is not None
            else cascade_policy.enabled_for_auto
        )
        if ctx.pinned_model is not None:
            ctx.tier = self.catalogue.by_model[ctx.pinned_model][0].tier
            ctx.tier_reason = "pinned"
        else:
            ctx.tier, ctx.tier_reason = classify(
                ctx.messages, self.config.complexity, ctx.hints.quality
            )
            # back-pressure from the chain: a saturated tier (its escrow filling because its
            # sinks cannot absorb more) sends auto-routed work one tier up
            if self.chain is not None and self.chain.saturated(ctx.tier) and ctx.tier != TIERS[-1]:
                ctx.tier = TIERS[TIERS.index(ctx.tier) + 1]
                ctx.tier_reason = "escrow_pressure"
        try:
            if use_cascade:
                plan = self._cascade_step_plan(ctx, ctx.tier, frozenset())
            else:
                plan = self.router.plan(ctx.tier, ctx.hints, pinned_model=ctx.pinned_model)
        except NoEligibleRoute as exc:
            raise errors.no_route(str(exc)) from exc
        ctx.explored = plan.explored
        admission = await self.store.admit(
            ctx.raw_key,
            self._reservation_bound(ctx, plan.routes),
            reservation_id=ctx.request_id,
            alone=self.in_flight == 1,
        )
        ctx.admission = admission
        ctx.reserved_micros = admission.reserved_micros
        ctx.budget_remaining = admission.budget_remaining_micros or 0
        if admission.status == "unauthorized":
            raise errors.unauthorized()
        if admission.status == "rate_limited":
            raise errors.rate_limited(admission.retry_after_s, admission.rate_limit)
        if admission.status == "budget_exhausted":
            raise errors.budget_exhausted(format_usd(admission.budget_remaining_micros or 0))
        try:  # from here on every exit settles the reservation (a failure bills nothing)
            if self.chain is not None:
                ctx.receipt_nonce = await self.chain.new_nonce()
                ctx.receipt_deadline = self.chain.client.chain_now() + self.chain.cc.receipt_ttl_s
            if use_cascade:
                return await self._cascade(ctx, plan)
            if ctx.stream:
                return await self._stream(ctx, plan)
            return await self._complete(ctx, plan)
        except GatewayError as err:
            self._finish(ctx, err.status, None, None, "failed", error=err.code)
            raise
        except BaseException:
            self._finish(ctx, 500, None, None, "failed", error="internal_error")
            raise

    # ------------------------------------------------------------------ helpers

    def _receipt_headers(self, ctx: RequestContext, route: Route) -> dict[str, str] | None:
        """Receipt terms for this attempt; the header a sidecar provider signs against."""
        if self.chain is None or ctx.receipt_nonce is None:
            return None
        terms = ctx.terms.get(route.key)
        if terms is None:
            terms = self.chain.terms(
                route.provider, route.tier, ctx.request_id, ctx.receipt_nonce, ctx.receipt_deadline,
                route.price.input_micros_per_mtok, route.price.output_micros_per_mtok,
            )
            ctx.terms[route.key] = terms
        return self.chain.request_headers(route.provider, terms)

    async def _receipt(self, ctx: RequestContext, route: Route, answer: str, attempt_cost: int) -> None:
        """Commit the answer's dual-signed receipt to the outbox before the answer is sent."""
        if self.chain is None or ctx.receipt_nonce is None:
            return
        try:
            ctx.receipt_status = await self.chain.issue(
                route.provider_name, ctx.terms.get(route.key), attempt_cost, answer_hash(answer),
                ctx.sink_sigs.get(route.key), ctx.request_id,
            )
        except Exception:
            # the answer is good; a receipt failure must not turn it into an error
            ctx.receipt_status = "error"
            log.exception("receipt not issued", extra={"fields": {"request_id": ctx.request_id}})

    def _forward_body(self, ctx: RequestContext, route: Route, stream: bool) -> bytes:
        body = {k: v for k, v in ctx.body.items() if k != "routing"}
        body["model"] = route.model.send_as
        if stream:
            body["stream"] = True
            if route.provider.stream_usage and not ctx.client_wants_usage:
                options = dict(body.get("stream_options") or {})
                options["include_usage"] = True
                body["stream_options"] = options
        else:
            if "stream" in body:
                body["stream"] = False
            body.pop("stream_options", None)
        return dumps(body)

    def _usage(self, ctx: RequestContext, reported: tuple[int, int] | None, text: str) -> Usage:
        if reported is not None:
            return Usage(reported[0], reported[1], False)
        return Usage(prompt_token_estimate(ctx.messages), estimate_tokens(text), True)

    def _charge(self, ctx: RequestContext, route: Route, usage: Usage) -> int:
        cost = route.price.cost_micros(usage.prompt_tokens, usage.completion_tokens)
        ctx.cost_micros += cost
        premium = self.catalogue.premium_reference
        ctx.premium_cost_micros += (
            premium.cost_micros(usage.prompt_tokens, usage.completion_tokens) if premium else cost
        )
        ctx.prompt_tokens += usage.prompt_tokens
        ctx.completion_tokens += usage.completion_tokens
        ctx.usage_estimated = ctx.usage_estimated or usage.estimated
        return cost

    def _fail(self, ctx: RequestContext, route: Route, failure: UpstreamFailure, started: float) -> None:
        latency = (time.perf_counter() - started) * 1000
        if failure.kind != "rejected":
            self.health.record(route.key, False, latency)
        ctx.attempts.append(
            AttemptRecord(
                provider=route.provider_name,
                model=route.model.id,
                tier=route.tier,
                outcome="timeout" if failure.kind == "timeout" else (
                    "client_error" if failure.kind == "rejected" else "error"
                ),
                cost_micros=0,
                latency_ms=round(latency),
                error=failure.detail,
            )
        )

    def _exhausted(self, ctx: RequestContext, failures: list[UpstreamFailure]) -> GatewayError:
        for failure in failures:
            if failure.kind == "rejected":
                return GatewayError(
                    400,
                    f"The upstream rejected the request: {failure.client_message}",
                    "invalid_request_error",
                    "upstream_rejected",
                )
        timed_out = bool(failures) and failures[-1].kind == "timeout"
        return errors.upstream_failed(timed_out, len(failures))

    async def _call(
        self, ctx: RequestContext, plan: Plan, failures: list[UpstreamFailure]
    ) -> tuple[Route, Completion] | None:
        """Try the plan's routes in order (non-streaming); None when all failed."""
        for route in plan.routes:
            started = time.perf_counter()
            try:
                completion = await self.upstream.complete(
                    route.provider, self._forward_body(ctx, route, stream=False),
                    self._receipt_headers(ctx, route),
                )
            except UpstreamFailure as failure:
                self._fail(ctx, route, failure, started)
                failures.append(failure)
                if not failure.retryable:
                    return None
                continue
            self.health.record(route.key, True, completion.latency_ms)
            ctx.sink_sigs[route.key] = completion.headers.get("x-pura-sink-signature")
            return route, completion
        return None

    def _headers(self, ctx: RequestContext, route: Route | None, remaining: int | None) -> dict[str, str]:
        admission = ctx.admission
        headers = {
            "X-Pura-Request-Id": ctx.request_id,
            "X-Pura-Tier": ctx.tier,
            "X-Pura-Cost": format_usd(ctx.cost_micros),
            "X-Pura-Explored": "true" if ctx.explored else "false",
            "X-Pura-Attempts": str(len(ctx.attempts)),
        }
        if route is not None:
            headers["X-Pura-Provider"] = route.provider_name
            headers["X-Pura-Model"] = route.model.id
            headers["X-Pura-Quality"] = f"{self.health.quality(route.key):.3f}"
        if remaining is not None:
            headers["X-Pura-Budget-Remaining"] = format_usd(max(0, remaining))
        if admission is not None:
            headers["X-RateLimit-Remaining"] = str(admission.rate_remaining)
            headers["X-RateLimit-Limit"] = str(admission.rate_limit)
        if ctx.experimental:
            headers["X-Pura-Experimental"] = ", ".join(ctx.experimental)
        if ctx.cascade_depth:
            headers["X-Pura-Cascade-Depth"] = str(ctx.cascade_depth)
            headers["X-Pura-Confidence"] = f"{(ctx.confidence or 0.0):.3f}"
            headers["X-Pura-Cascade-Savings"] = format_usd(
                max(0, ctx.premium_cost_micros - ctx.cost_micros)
            )
            if ctx.cascade_stopped:
                headers["X-Pura-Cascade-Stopped"] = ctx.cascade_stopped
        if self.chain is not None:
            snap = self.router.weights.snapshot()
            headers["X-Pura-Weights-Age"] = f"{snap.age_s():.1f}" if snap.as_of else "never"
            if snap.stale:
                headers["X-Pura-Weights-Stale"] = "true"
            if ctx.receipt_status is not None:
                headers["X-Pura-Receipt"] = ctx.receipt_status
        return headers

    def _finish(
        self,
        ctx: RequestContext,
        status: int,
        route: Route | None,
        answer: str | None,
        outcome: str,
        error: str | None = None,
    ) -> tuple[int, int]:
        """Bill in memory, then queue the settlement and log (at once, or deferred to the end
        of the response: ``ctx.deferred``). Returns (billed, budget remaining).

        The bill uses the database's own rule (cost clamped to what this request reserved), so
        the headers agree with what the settlement commits a few milliseconds later.
        """
        admission = ctx.admission
        if admission is None or admission.key is None:
            return 0, 0
        if ctx.finished is not None:
            # Already finished (e.g. the client left while the response was being built, and
            # _run's error path finishes again): one record, one log line, the first verdict.
            return ctx.finished
        finished = now_ms()
        latency_ms = round((time.perf_counter() - ctx.started) * 1000)
        billed = min(ctx.cost_micros, ctx.reserved_micros)
        remaining = ctx.budget_remaining + ctx.reserved_micros - billed
        attempts = tuple(ctx.attempts)  # the record is built later: fix what it says now

        def publish() -> None:
            self._publish(ctx, admission, status, route, answer, outcome, error, finished,
                          latency_ms, billed, attempts)

        if ctx.deferred is None:
            publish()
        else:
            ctx.deferred.append(publish)
        ctx.finished = (billed, remaining)
        return ctx.finished

    def _publish(
        self,
        ctx: RequestContext,
        admission: Admission,
        status: int,
        route: Route | None,
        answer: str | None,
        outcome: str,
        error: str | None,
        finished: int,
        latency_ms: int,
        billed: int,
        attempts: tuple[AttemptRecord, ...],
    ) -> None:
        """Queue the request's settlement and write its log line (see :meth:`_finish`)."""
        assert admission.key is not None
        record = CompletionRecord(
            request_id=ctx.request_id,
            key_id=admission.key.id,
            created_ms=ctx.started_ms,
            finished_ms=finished,
            outcome=outcome,
            http_status=status,
            provider=route.provider_name if route else None,
            model=route.model.id if route else None,
            tier=route.tier if route else ctx.tier,
            stream=ctx.stream,
            prompt_tokens=ctx.prompt_tokens,
            completion_tokens=ctx.completion_tokens,
            usage_estimated=ctx.usage_estimated,
            cost_micros=ctx.cost_micros,
            billed_micros=billed,
            premium_cost_micros=ctx.premium_cost_micros,
            cascade_depth=ctx.cascade_depth,
            confidence=ctx.confidence,
            explored=ctx.explored,
            latency_ms=latency_ms,
            response_sha256=None if answer is None else answer_hash(answer),
            attempts=attempts,
        )
        self.settlement.submit(
            Settlement(admission.reservation_id, record, admission.key.daily_budget_micros)
        )
        if self.log_requests:
            self._log(
                request_id=ctx.request_id,
                key=admission.key.prefix,
                status=status,
                outcome=outcome,
                provider=record.provider,
                model=record.model,
                tier=record.tier,
                tier_reason=ctx.tier_reason,
                stream=ctx.stream,
                attempts=len(attempts),
                cascade_depth=ctx.cascade_depth,
                explored=ctx.explored,
                cost_micros=record.cost_micros,
                billed_micros=billed,
                tokens=ctx.prompt_tokens + ctx.completion_tokens,
                latency_ms=latency_ms,
                error=error,
            )

    def _log(self, **fields: Any) -> None:
        self.request_log.emit(fields)

    # ------------------------------------------------------------------ non-streaming

    async def _complete(self, ctx: RequestContext, plan: Plan) -> Response:
        failures: list[UpstreamFailure] = []
        result = await self._call(ctx, plan, failures)
        if result is None:
            raise self._exhausted(ctx, failures)
        route, completion = result
        text, _finish, _tools = _completion_text(completion.data)
        usage = self._usage(ctx, _reported_usage(completion.data), _all_choice_text(completion.data))
        cost = self._charge(ctx, route, usage)
        ctx.attempts.append(
            AttemptRecord(route.provider_name, route.model.id, route.tier, "ok", cost,
                          round(completion.latency_ms))
        )
        _billed, remaining = self._finish(ctx, 200, route, text, "ok")
        await self._receipt(ctx, route, text, cost)
        return Response(
            content=completion.raw,
            media_type="application/json",
            headers=self._headers(ctx, route, remaining),
        )

    # ------------------------------------------------------------------ streaming

    async def _open_stream(
        self, ctx: RequestContext, plan: Plan
    ) -> tuple[Route, EventStream, float]:
        failures: list[UpstreamFailure] = []
        for route in plan.routes:
            started = time.perf_counter()
            try:
                stream = await self.upstream.stream(
                    route.provider, self._forward_body(ctx, route, stream=True),
                    self._receipt_headers(ctx, route),
                )
            except UpstreamFailure as failure:
                self._fail(ctx, route, failure, started)
                failures.append(failure)
                if not failure.retryable:
                    break
                continue
            # The first event must be a JSON chunk; otherwise fall back before any byte is sent.
            try:
                first = stream.pending[0]
                if first.strip() != b"[DONE]":
                    obj = loads(first)
                    if not isinstance(obj, dict):
                        raise ValueError("chunk is not an object")
                    if "error" in obj:
                        raise ValueError("upstream sent an error event")
            except ValueError:
                stream.close()
                failure = UpstreamFailure("malformed", "first stream event is not a JSON chunk")
                self._fail(ctx, route, failure, started)
                failures.append(failure)
                continue
            self.health.record(route.key, True, stream.first_byte_ms)
            return route, stream, started
        raise self._exhausted(ctx, failures)

    async def _stream(self, ctx: RequestContext, plan: Plan) -> Response:
        route, stream, started = await self._open_stream(ctx, plan)
        remaining = (ctx.admission.budget_remaining_micros if ctx.admission else None)
        headers = self._headers(ctx, route, remaining)
        headers.update(SSE_HEADERS)
        relay = self._relay(ctx, route, stream, started)
        # Started before the response: from here on, however the response ends, closing the
        # relay bills what was delivered and closes the upstream (see EventStreamResponse).
        first = await relay.__anext__()
        return EventStreamResponse(relay, first=first, headers=headers)

    async def _relay(
        self, ctx: RequestContext, route: Route, stream: EventStream, started: float
    ) -> AsyncIterator[bytes]:
        answer: list[str] = []
        all_text: list[str] = []
        reported: tuple[int, int] | None = None
        held_finish: dict | None = None
        usage_chunk: dict | None = None
        outcome, status = "partial", 200
        failure: UpstreamFailure | None = None
        last_events: list[bytes] = []
        try:
            async for batch in stream.batches():
                out: list[bytes] = []
                broken: UpstreamFailure | None = None
                for data in batch:
                    try:
                        obj = loads(data)
                        if type(obj) is not dict:
                            raise ValueError
                    except ValueError:
                        broken = UpstreamFailure("malformed", "stream event is not JSON")
                        break
                    if "error" in obj:
                        broken = UpstreamFailure("status", "upstream sent an error event")
                        break
                    if STREAM_SIGNATURE_FIELD in obj:  # a sidecar's receipt signature: ours, not the client's
                        ctx.sink_sigs[route.key] = obj.pop(STREAM_SIGNATURE_FIELD)
                        data = dumps(obj)
                    usage = None
                    if obj.get("usage") is not None:
                        usage = _reported_usage(obj)
                        if usage is not None:
                            reported = usage
                    choices = obj.get("choices") or ()
                    finishing = False
                    for choice in choices:
                        if type(choice) is not dict:
                            continue
                        delta = choice.get("delta")
                        if type(delta) is not dict:
                            piece = ""
                        elif type(delta.get("content")) is str and not delta.get("tool_calls"):
                            piece = delta["content"]  # a text delta: what message_text would return
                        else:
                            piece = message_text(delta)
                        if piece:
                            all_text.append(piece)
                            if choice.get("index", 0) == 0:
                                answer.append(piece)
                        if choice.get("finish_reason"):
                            finishing = True
                    if not choices and usage is not None:
                        usage_chunk = obj
                        continue
                    if held_finish is not None:
                        out.append(encode_event(dumps(held_finish)))
                        held_finish = None
                    if finishing:
                        held_finish = obj
                    else:
                        out.append(encode_event(data))
                if out:
                    if stream.done and broken is None:
                        # the upstream's last events: they go out with the tail, in one write
                        last_events = out
                    else:
                        yield b"".join(out)
                if broken is not None:
                    raise broken
            outcome = "ok"
        except UpstreamFailure as exc:
            failure = exc
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away: bill what was delivered, then let the cancellation through
            stream.close()
            self._account_stream(ctx, route, reported, "".join(all_text), started, "cut")
            self._finish(ctx, 499, route, "".join(answer), "partial")
            raise
        stream.close()
        if failure is not None:
            self.health.record(route.key, False, (time.perf_counter() - started) * 1000)
            status = 502
        self._account_stream(
            ctx, route, reported, "".join(all_text), started, "ok" if failure is None else "cut"
        )
        pura = {
            "request_id": ctx.request_id,
            "provider": route.provider_name,
            "model": route.model.id,
            "tier": route.tier,
            "cost_usd": format_usd(ctx.cost_micros),
            "cost_micros": ctx.cost_micros,
        }
        billed, remaining = self._finish(ctx, status, route, "".join(answer), outcome)
        if failure is None:
            await self._receipt(ctx, route, "".join(answer), ctx.attempts[-1].cost_micros)
        pura["billed_micros"] = billed
        pura["budget_remaining_usd"] = format_usd(max(0, remaining))
        # Everything after the upstream's end goes out in one write, with the end of the body
        # (and with the upstream's last events when they came in the read that ended it).
        tail: list[bytes] = last_events
        if failure is not None:
            if held_finish is not None:
                tail.append(encode_event(dumps(held_finish)))
            err = {
                "error": {
                    "message": "The upstream stream broke off after the response started "
                    f"({failure.kind}); the answer is incomplete.",
                    "type": "upstream_error",
                    "param": None,
                    "code": "upstream_stream_cut",
                },
                "pura": pura,
            }
            tail.append(encode_event(dumps(err)))
        else:
            if ctx.client_wants_usage and usage_chunk is not None:
                if held_finish is not None:
                    tail.append(encode_event(dumps(held_finish)))
                usage_chunk["pura"] = pura
                tail.append(encode_event(dumps(usage_chunk)))
            elif held_finish is not None:
                held_finish["pura"] = pura
                tail.append(encode_event(dumps(held_finish)))
            tail.append(encode_event(b"[DONE]"))
        yield LastChunk(b"".join(tail))

    def _account_stream(
        self,
        ctx: RequestContext,
        route: Route,
        reported: tuple[int, int] | None,
        text: str,
        started: float,
        outcome: str,
    ) -> int:
        usage = self._usage(ctx, reported, text)
        cost = self._charge(ctx, route, usage)
        ctx.attempts.append(
            AttemptRecord(route.provider_name, route.model.id, route.tier, outcome, cost,
                          round((time.perf_counter() - started) * 1000))
        )
        return cost

    # ------------------------------------------------------------------ cascade

    def _cascade_step_plan(self, ctx: RequestContext, tier: Tier, avoid: frozenset[str]) -> Plan:
        """The plan for one cascade step: ``tier``, or the next tier up with an eligible route."""
        for candidate in TIERS[TIERS.index(tier):]:
            try:
                return self.router.plan(candidate, ctx.hints, same_tier_only=True, avoid=avoid)
            except NoEligibleRoute:
                continue
        raise NoEligibleRoute("no upstream satisfies the routing constraints")

    async def _cascade(self, ctx: RequestContext, plan: Plan) -> Response:
        policy = self.config.cascade
        routing = ctx.parsed.routing
        threshold = (
            routing.cascadeThreshold
            if routing is not None and routing.cascadeThreshold is not None
            else policy.accept_threshold
        )
        max_escalations = (
            routing.cascadeMaxEscalations
            if routing is not None and routing.cascadeMaxEscalations is not None
            else policy.max_escalations
        )
        features = extract_features(ctx.messages)
        failures: list[UpstreamFailure] = []
        tried: set[str] = set()
        best: tuple[Route, Completion, AnswerScore, int] | None = None
        current = plan
        escalations = 0
        while True:
            ctx.cascade_depth += 1
            result = await self._call(ctx, current, failures)
            if result is None:
                tried.update(r.key for r in current.routes)
                if failures and not failures[-1].retryable:
                    break
            else:
                route, completion = result
                tried.add(route.key)
                text, finish, has_tools = _completion_text(completion.data)
                usage = self._usage(
                    ctx, _reported_usage(completion.data), _all_choice_text(completion.data)
                )
                cost = self._charge(ctx, route, usage)
                verdict = score_answer(
                    text,
                    question=features.last_user,
                    prompt_chars=features.total_chars,
                    tier=route.tier,
                    policy=policy,
                    threshold=threshold,
                    finish_reason=finish,
                    has_tool_calls=has_tools,
                )
                ctx.attempts.append(
                    AttemptRecord(
                        route.provider_name, route.model.id, route.tier,
                        "accepted" if verdict.accepted else "rejected", cost,
                        round(completion.latency_ms), score=verdict.score,
                    )
                )
                if best is None or verdict.score >= best[2].score:
                    best = (route, completion, verdict, cost)
                if verdict.accepted:
                    break
            if escalations >= max_escalations:
                ctx.cascade_stopped = "max_escalations" if best and not best[2].accepted else None
                break
            base = best[0].tier if best is not None else current.tier
            next_tier = TIERS[min(TIERS.index(base) + 1, len(TIERS) - 1)]
            try:
                nxt = self._cascade_step_plan(ctx, next_tier, frozenset(tried))
            except NoEligibleRoute:
                ctx.cascade_stopped = "no_higher_tier"
                break
            extra = self._reservation_bound(ctx, nxt.routes)
            assert ctx.admission is not None and ctx.admission.key is not None
            if ctx.admission.reservation_id is not None:
                left = await self.store.extend(
                    ctx.admission.reservation_id, extra, ctx.admission.key.daily_budget_micros
                )
                if left is None:
                    ctx.cascade_stopped = "budget"
                    break
                ctx.reserved_micros += extra
                ctx.budget_remaining = left
            escalations += 1
            current = nxt
        if best is None:
            raise self._exhausted(ctx, failures)
        route, completion, verdict, best_cost = best
        ctx.confidence = verdict.score
        ctx.tier = route.tier
        text, _finish, _tools = _completion_text(completion.data)
        if not ctx.stream:
            _billed, remaining = self._finish(ctx, 200, route, text, "ok")
            await self._receipt(ctx, route, text, best_cost)
            return Response(
                content=completion.raw,
                media_type="application/json",
                headers=self._headers(ctx, route, remaining),
            )
        billed, remaining = self._finish(ctx, 200, route, text, "ok")
        await self._receipt(ctx, route, text, best_cost)
        headers = self._headers(ctx, route, remaining)
        headers.update(SSE_HEADERS)
        pura = {
            "request_id": ctx.request_id,
            "provider": route.provider_name,
            "model": route.model.id,
            "tier": route.tier,
            "cost_usd": format_usd(ctx.cost_micros),
            "cost_micros": ctx.cost_micros,
            "billed_micros": billed,
            "budget_remaining_usd": format_usd(max(0, remaining)),
            "cascade_depth": ctx.cascade_depth,
            "confidence": round(verdict.score, 3),
        }
        chunks = completion_to_chunks(completion.data, pura, ctx.client_wants_usage)
        return EventStreamResponse(_replay(chunks), headers=headers)


async def _replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    yield LastChunk(b"".join(chunks))  # all known already: one write


def completion_to_chunks(data: dict, pura: dict, include_usage: bool) -> list[bytes]:
    """Replay a non-streamed completion as OpenAI stream chunks (cascade with ``stream``)."""
    base = {
        "id": data.get("id", "chatcmpl-pura"),
        "object": "chat.completion.chunk",
        "created": data.get("created", int(time.time())),
        "model": data.get("model", ""),
    }
    if data.get("system_fingerprint") is not None:
        base["system_fingerprint"] = data["system_fingerprint"]
    out: list[dict] = []
    choices = [c for c in data.get("choices") or [] if isinstance(c, dict)]
    for choice in choices:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        out.append(dict(base, choices=[{
            "index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None
        }]))
        content = message.get("content")
        if isinstance(content, str) and content:
            out.append(dict(base, choices=[{
                "index": index, "delta": {"content": content}, "finish_reason": None
            }]))
        if message.get("tool_calls"):
            calls = [dict(c, index=i) for i, c in enumerate(message["tool_calls"])]
            out.append(dict(base, choices=[{
                "index": index, "delta": {"tool_calls": calls}, "finish_reason": None
            }]))
        out.append(dict(base, choices=[{
            "index": index, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"
        }]))
    if include_usage and isinstance(data.get("usage"), dict):
        out.append(dict(base, choices=[], usage=data["usage"]))
    if out:
        out[-1]["pura"] = pura
    encoded = [encode_event(dumps(chunk)) for chunk in out]
    encoded.append(encode_event(b"[DONE]"))
    return encoded


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # a number beyond a double (1e400) would become inf, which has no JSON spelling to forward
    value = float(text)
    if value in (_INF, -_INF):
        raise ValueError(f"{text} is out of range")
    return value


_INF = float("inf")


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
