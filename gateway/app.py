"""The HTTP service (FastAPI on uvicorn).

Routes: ``POST /v1/chat/completions`` (alias ``POST /api/chat``), ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /api/report``, ``GET /api/income``, ``GET /health``.
Every error, including unknown paths and wrong methods, is an OpenAI error object.

Everything mutable (database, store, health windows, router, HTTP client, background tasks) is
created in the lifespan and hangs off ``app.state.services``; nothing lives in module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import __version__, errors
from gateway.accounting.db import SqliteDatabase, PostgresDatabase, migrate, open_database
from gateway.accounting.records import LoggingRecordSink, RecordSink
from gateway.accounting.settlement import SettlementQueue
from gateway.accounting.reports import build_income, build_report, render_income_text, window_start
from gateway.accounting.store import Store, now_ms
from gateway.config import GatewaySettings, RoutingConfig
from gateway.errors import GatewayError
from gateway.logs import configure as configure_logging
from gateway.pipeline import ChatPipeline, _bearer
from gateway.routing.quality import HealthBook
from gateway.routing.selection import Catalogue, Router
from gateway.routing.weights import ConfigWeightSource, WeightSource
from gateway.chain.service import ChainService
from gateway.schemas import ChatCompletionRequest, ErrorResponse, ModelCard, ModelList
from gateway.upstreams.client import UpstreamClient

log = logging.getLogger("pura.app")

EXPOSED_HEADERS = [
    "X-Pura-Provider",
    "X-Pura-Model",
    "X-Pura-Tier",
    "X-Pura-Cost",
    "X-Pura-Request-Id",
    "X-Pura-Budget-Remaining",
    "X-Pura-Quality",
    "X-Pura-Explored",
    "X-Pura-Experimental",
    "X-Pura-Attempts",
    "X-Pura-Cascade-Depth",
    "X-Pura-Cascade-Savings",
    "X-Pura-Cascade-Stopped",
    "X-Pura-Confidence",
    "X-RateLimit-Remaining",
    "X-RateLimit-Limit",
    "Retry-After",
    "X-Pura-Weights-Age",
    "X-Pura-Weights-Stale",
    "X-Pura-Receipt",
]

CHAT_PATHS = ("/v1/chat/completions", "/api/chat")


def default_routing_config() -> RoutingConfig:
    """The embedded default: three local stand-in providers (see ``pura devstack``)."""
    text = (resources.files("gateway") / "default_routing.toml").read_text("utf-8")
    return RoutingConfig.model_validate(tomllib.loads(text))


@dataclass
class Services:
    settings: GatewaySettings
    config: RoutingConfig
    db: SqliteDatabase | PostgresDatabase
    store: Store
    catalogue: Catalogue
    health: HealthBook
    weights: WeightSource
    router: Router
    upstream: UpstreamClient
    pipeline: ChatPipeline
    chain: ChainService | None = None


def build_services(
    settings: GatewaySettings,
    config: RoutingConfig,
    weights: WeightSource | None = None,
    sinks: list[RecordSink] | None = None,
) -> Services:
    db = open_database(settings.database_url)
    migrate(db)
    store = Store(
        db,
        key_cache_ttl_ms=round(settings.key_cache_ttl_s * 1000),
        lease_factor=settings.budget_lease_factor,
        lease_refresh_ms=settings.reservation_ttl_s * 1000 // 4,
        lease_carve_ttl_ms=settings.reservation_ttl_s * 1000,
    )
    catalogue = Catalogue(config)
    policy = config.selection
    health = HealthBook(
        window_s=policy.window_s,
        degraded_error_rate=policy.degraded_error_rate,
        degraded_latency_ms=policy.degraded_latency_ms,
        min_samples=policy.min_samples,
    )
    chain = None
    if config.chain is not None and config.chain.enabled:
        chain = ChainService(config, db)
        weights = weights or chain.weights
    weights = weights or ConfigWeightSource(config)
    router = Router(catalogue, weights, health, policy, random.Random(settings.routing_seed))
    upstream = UpstreamClient()
    settlement = SettlementQueue(
        store,
        sinks if sinks is not None else [LoggingRecordSink()],
        delay_ms=settings.settle_delay_ms,
        retry_ms=settings.settlement_retry_ms,
        retry_max_ms=settings.settlement_retry_max_ms,
        max_failures=settings.settlement_max_failures,
        dead_letter_path=settings.settlement_dead_letter,
    )
    pipeline = ChatPipeline(
        config, catalogue, router, health, store, upstream, settlement,
        log_requests=settings.log_requests,
        max_body_bytes=settings.max_body_bytes,
    )
    pipeline.chain = chain
    return Services(settings, config, db, store, catalogue, health, weights, router, upstream, pipeline, chain)


async def _sweeper(services: Services) -> None:
    """Release reservations of requests that died without settling (crash, kill)."""
    settings = services.settings
    while True:
        await asyncio.sleep(settings.sweep_interval_s)
        try:
            released = await services.store.release_stale(settings.reservation_ttl_s * 1000)
            if released:
                log.warning("released stale reservations", extra={"fields": {"count": released}})
        except Exception:
            log.exception("reservation sweep failed")


async def _weight_refresher(services: Services) -> None:
    interval = services.weights.refresh_interval_s
    while True:
        await asyncio.sleep(interval)
        try:
            await services.weights.refresh()
        except Exception:  # keep serving on the last snapshot
            log.exception("weight refresh failed; keeping last-known weights")


class ChatEndpoint:
    """``POST /v1/chat/completions`` (and ``/api/chat``) as a bare ASGI app.

    A class instance, so that Starlette's ``Route`` mounts it as an ASGI app as it is and the
    router and :class:`GatewayApp`'s short cut run the very same code.
    """

    def __init__(self, app: FastAPI) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pipeline = self._app.state.services.pipeline
        deferred: list = []  # the request's settlement and log line, published after its response
        try:
            try:
                response = await pipeline.handle(Request(scope, receive), deferred)
            except GatewayError as exc:
                response = exc.response()
            except Exception:
                response = _internal_error()
            await response(scope, receive, send)
        finally:
            pipeline.publish(deferred)


class GatewayApp(FastAPI):
    """FastAPI, except that a chat POST goes straight to :class:`ChatEndpoint`.

    FastAPI 0.165 wraps every request in seven layers before the router (server errors,
    telemetry, body limit, user middleware, exception handlers, an exit stack, then route
    matching), which cost about 35 us a request on the 2-core target machine (measured in
    process, the same handler behind each). The chat endpoint needs none of them: it handles its own errors
    (every one an OpenAI error, unexpected ones the same 500 as :func:`_install_error_handlers`),
    has no dependencies or validation layer, and keeps CORS through its own
    :class:`CORSMiddleware` with the app's settings. Everything else (other paths and methods,
    CORS preflights, the lifespan, the OpenAPI document) goes through FastAPI unchanged. What the
    chat path does not get is FastAPI's built-in OpenTelemetry instrumentation, which is only
    active when an OpenTelemetry SDK is configured (Pura configures none).
    """

    chat: ChatEndpoint | None = None
    chat_cors: ASGIApp | None = None  # ``chat`` inside a CORSMiddleware with the app's settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.chat is not None
            and scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in CHAT_PATHS
        ):
            # CORS only acts on requests with an Origin header (browsers); API clients skip it.
            if any(name == b"origin" for name, _ in scope["headers"]):
                await self.chat_cors(scope, receive, send)
            else:
                await self.chat(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(
    settings: GatewaySettings | None = None,
    config: RoutingConfig | None = None,
    weights: WeightSource | None = None,
    sinks: list[RecordSink] | None = None,
) -> FastAPI:
    settings = settings or GatewaySettings()
    if config is None:
        config = RoutingConfig.load(settings.config) if settings.config else default_routing_config()
    configure_logging(settings.log_level)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = build_services(settings, config, weights, sinks)
        app.state.services = services
        # Released reservations left by a previous crash before serving.
        await services.store.release_stale(settings.reservation_ttl_s * 1000)
        services.pipeline.settlement.start()
        if services.chain is not None:
            await services.chain.start()
        tasks = [asyncio.create_task(_sweeper(services))]
        if services.weights.refresh_interval_s > 0:
            tasks.append(asyncio.create_task(_weight_refresher(services)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if services.chain is not None:
                await services.chain.stop()
            await services.pipeline.settlement.close()
            services.pipeline.request_log.flush()
            await services.upstream.close()
            await services.db.close()

    app = GatewayApp(
        title="Pura gateway",
        version=__version__,
        description="OpenAI-compatible routing gateway. Change only your base_url.",
        lifespan=lifespan,
    )
    cors = dict(
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type", "X-Requested-With", "OpenAI-Organization",
                       "OpenAI-Project"],
        allow_credentials=False,
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )
    app.add_middleware(CORSMiddleware, **cors)
    chat = app.chat = ChatEndpoint(app)
    app.chat_cors = CORSMiddleware(chat, **cors)
    _install_error_handlers(app)
    _install_routes(app, chat)
    _install_openapi(app)
    return app


def _services(request: Request) -> Services:
    return request.app.state.services


CHAT_ERRORS = {
    "400": "invalid body or routing hint",
    "401": "missing or invalid key",
    "402": "daily budget exhausted",
    "404": "unknown model",
    "413": "body too large",
    "429": "rate limited (Retry-After)",
    "502": "upstream failed after fallback",
    "503": "no eligible upstream",
    "504": "upstream timed out after fallback",
}


def _error_response(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }


def _install_routes(app: FastAPI, chat: ChatEndpoint) -> None:
    # GatewayApp serves chat POSTs before the router; these routes give the other methods on the
    # chat paths their 405. The OpenAPI entry is written by _install_openapi from the models.
    for path in CHAT_PATHS:
        app.router.routes.insert(0, Route(path, chat, methods=["POST"]))

    @app.get("/v1/models", response_model=ModelList, summary="List models (OpenAI list format)")
    async def list_models(request: Request) -> ModelList:
        catalogue = _services(request).catalogue
        return ModelList(data=[_card(catalogue, m) for m in catalogue.model_ids()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard,
             responses={404: _error_response(CHAT_ERRORS["404"])})
    async def get_model(model_id: str, request: Request) -> ModelCard:
        catalogue = _services(request).catalogue
        if model_id not in catalogue.by_model:
            raise errors.model_not_found(model_id)
        return _card(catalogue, model_id)

    @app.get("/api/report", summary="24 h spend report of the calling key")
    async def report(
        request: Request, scope: Literal["key", "all"] = Query(default="key")
    ) -> JSONResponse:
        services = _services(request)
        key_id, scope_name = await _report_scope(request, services, scope)
        await services.pipeline.settlement.flush()  # read your own completed requests
        since = window_start(now_ms())
        rows = await services.store.report_rows(key_id, since)
        return JSONResponse(build_report(rows, scope_name, since))

    @app.get("/api/income", summary="24 h income statement (JSON, or text with Accept: text/plain)")
    async def income(
        request: Request, scope: Literal["key", "all"] = Query(default="key")
    ) -> Response:
        services = _services(request)
        key_id, scope_name = await _report_scope(request, services, scope)
        await services.pipeline.settlement.flush()
        since = window_start(now_ms())
        rows = await services.store.report_rows(key_id, since)
        statement = build_income(rows, scope_name, since, services.health)
        accept = request.headers.get("accept", "")
        if "text/plain" in accept and "application/json" not in accept:
            return PlainTextResponse(render_income_text(statement))
        return JSONResponse(statement)

    @app.get("/api/status", summary="Chain status: weights and their staleness, receipts, keeper")
    async def status(request: Request) -> dict:
        services = _services(request)
        snap = services.weights.snapshot()
        out: dict = {
            "weights": {"source": snap.source, "stale": snap.stale,
                        "age_s": round(snap.age_s(), 3) if snap.as_of else None},
            "chain": None,
        }
        if services.chain is not None:
            out["chain"] = await services.chain.status()
        return out

    @app.get("/health", summary="Liveness")
    async def health(request: Request) -> dict:
        services = _services(request)
        return {
            "status": "ok",
            "service": "pura-gateway",
            "version": __version__,
            "providers": len(services.catalogue.provider_names),
            "models": len(services.catalogue.by_model),
            "weights": services.weights.snapshot().source,
            "settlements": services.pipeline.settlement.health,
        }


def _card(catalogue: Catalogue, model_id: str) -> ModelCard:
    route = catalogue.by_model[model_id][0]
    owner = "pura-local-stand-in" if route.provider.local_stand_in else route.provider.name
    return ModelCard(id=model_id, created=0, owned_by=owner)


async def _report_scope(request: Request, services: Services, scope: str) -> tuple[str | None, str]:
    raw_key = _bearer(request.headers.get("authorization"))
    if raw_key is None:
        raise errors.unauthorized()
    admission = await services.store.admit(raw_key, None)
    if admission.status == "unauthorized" or admission.key is None:
        raise errors.unauthorized()
    if admission.status == "rate_limited":
        raise errors.rate_limited(admission.retry_after_s, admission.rate_limit)
    if scope == "all":
        if not admission.key.is_admin:
            raise GatewayError(
                403, "scope=all needs an admin key", "permission_error", "admin_required", "scope"
            )
        return None, "all"
    return admission.key.id, f"key:{admission.key.prefix}"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(_request: Request, exc: GatewayError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return errors.bad_request(f"{param}: {first['msg']}", param=param or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return GatewayError(exc.status_code, str(exc.detail), type_, code,
                            headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> Response:
        return _internal_error()


def _internal_error() -> Response:
    """The 500 of an unexpected exception; call it from the ``except`` block (it logs the trace)."""
    log.exception("unhandled error")
    return GatewayError(500, "Internal error in the gateway.", "server_error", "internal_error").response()


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["ChatCompletionRequest"] = body
        error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(error.pop("$defs", {}))
        components["ErrorResponse"] = error
        responses = {code: _error_response(text) for code, text in CHAT_ERRORS.items()}
        responses["200"] = {
            "description": "chat.completion JSON, or text/event-stream chunks when stream is true",
            "content": {"application/json": {}, "text/event-stream": {}},
        }
        schema["paths"]["/v1/chat/completions"] = {
            "post": {
                "summary": "Create a chat completion (OpenAI-compatible; SSE when stream is true)",
                "operationId": "create_chat_completion",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}
                        }
                    },
                },
                "responses": responses,
            }
        }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
