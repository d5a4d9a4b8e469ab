"""Start the gateway and LOCAL STAND-IN providers from Python (demos, tests, benchmarks).

    from gateway.devstack import start_local_stack
    with start_local_stack() as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key)
        ...

Servers run in background threads, each with its own event loop and uvicorn server, bound to
loopback ports (free ports unless given). The providers are Pura's local stand-ins
(:mod:`gateway.upstreams.local_provider`), never real models.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import uvicorn

from gateway.accounting.db import migrate, open_database
from gateway.accounting.money import usd_to_micros
from gateway.accounting.records import RecordSink
from gateway.accounting.store import Store
from gateway.config import GatewaySettings, ModelConfig, ProviderConfig, RoutingConfig
from gateway.routing.weights import WeightSource
from gateway.upstreams.local_provider import LocalProviderApp, StandInBehaviour


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerThread:
    """A uvicorn server running an ASGI app in a daemon thread."""

    def __init__(self, app: object, host: str = "127.0.0.1", port: int | None = None,
                 log_level: str = "warning") -> None:
        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(
            app, host=host, port=self.port, log_level=log_level, access_log=False,
            lifespan="on", timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"uvicorn-{self.port}")
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} failed to start") from self._error
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on port {self.port} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop and wait for the server's shutdown (lifespan included) to finish.

        A server still running after ``timeout_s`` is reported, not silently left behind: a
        gateway whose shutdown outlives its test keeps submitting its outbox to the chain, into
        whatever the next test's chain snapshot is.
        """
        self.server.should_exit = True
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            warnings.warn(f"server on port {self.port} still shutting down after {timeout_s} s",
                          RuntimeWarning, stacklevel=2)


@dataclass
class StandIn:
    """A running local stand-in provider."""

    name: str
    app: LocalProviderApp
    server: ServerThread

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    def stats(self) -> dict:
        """Requests received and answers served (by model) so far."""
        return {"requests": self.app.state.requests, "served": dict(self.app.state.served)}

    def configure(self, **changes: object) -> None:
        """Change behaviour in place (same effect as POST /_stand_in/config)."""
        merged = self.app.state.behaviour.model_dump() | changes
        self.app.state.behaviour = StandInBehaviour.model_validate(merged)
        self.app.state.counters.clear()


def start_stand_in(name: str, behaviour: StandInBehaviour, port: int | None = None) -> StandIn:
    app = LocalProviderApp(behaviour)
    return StandIn(name, app, ServerThread(app, port=port).start())


@dataclass
class LocalStack:
    """The gateway plus its stand-in providers, with one API key ready to use."""

    gateway: ServerThread
    providers: dict[str, StandIn]
    config: RoutingConfig
    settings: GatewaySettings
    api_key: str
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        return self.gateway.url + "/v1"

    @property
    def services(self):  # -> gateway.app.Services (import cycle kept out of the signature)
        """The running gateway's lifespan-owned services (store, router, health windows)."""
        return self.gateway.server.config.app.state.services

    def create_key(self, daily_budget_usd: str = "10", rate_limit_per_min: int = 30,
                   is_admin: bool = False, label: str = "devstack") -> str:
        return create_key(self.settings.database_url, daily_budget_usd, rate_limit_per_min,
                          is_admin, label)

    def stop(self) -> None:
        self.gateway.stop()
        for provider in self.providers.values():
            provider.server.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def create_key(database_url: str, daily_budget_usd: str = "10", rate_limit_per_min: int = 30,
               is_admin: bool = False, label: str = "") -> str:
    """Create a key directly in the database (what ``pura keys create`` does)."""
    db = open_database(database_url)
    try:
        migrate(db)
        raw, _info = Store(db).create_key_sync(
            label, usd_to_micros(Decimal(daily_budget_usd)), rate_limit_per_min, is_admin
        )
    finally:
        db.close_sync()
    return raw


DEFAULT_QUALITY = {"local-a": 0.6, "local-b": 0.9, "local-c": 1.0}


def default_stand_ins() -> dict[str, tuple[StandInBehaviour, list[ModelConfig]]]:
    """The stand-ins of the embedded routing file (gateway/default_routing.toml): a cheap one
    of middling answer quality, a cheap+mid one, and a premium one."""
    from gateway.app import default_routing_config

    return {
        p.name: (
            StandInBehaviour(models=[m.id for m in p.models], quality=DEFAULT_QUALITY.get(p.name, 1.0)),
            list(p.models),
        )
        for p in default_routing_config().providers
    }


def default_ports() -> dict[str, int]:
    """Ports of the embedded routing file's stand-ins."""
    from urllib.parse import urlparse

    from gateway.app import default_routing_config

    return {p.name: urlparse(p.base_url).port or 80 for p in default_routing_config().providers}


def start_local_stack(
    stand_ins: dict[str, tuple[StandInBehaviour, list[ModelConfig]]] | None = None,
    database_url: str | None = None,
    gateway_port: int | None = None,
    provider_ports: dict[str, int] | None = None,
    routing: RoutingConfig | None = None,
    weights: WeightSource | None = None,
    sinks: list[RecordSink] | None = None,
    routing_seed: int | None = None,
    daily_budget_usd: str = "10",
    rate_limit_per_min: int = 30,
    log_requests: bool = False,
    provider_extras: dict[str, dict] | None = None,
) -> LocalStack:
    """Start stand-in providers and a gateway routed to them; returns the running stack.

    ``routing`` (optional) supplies every policy section; its provider list is replaced by the
    stand-ins started here. Without ``database_url`` the stack uses a temporary SQLite file.
    ``provider_extras`` adds ProviderConfig fields per stand-in (e.g. its on-chain ``sink``).
    """
    from gateway.app import create_app

    stand_ins = stand_ins or default_stand_ins()
    tmp = None
    if database_url is None:
        tmp = tempfile.TemporaryDirectory(prefix="pura-devstack-")
        database_url = f"sqlite:///{Path(tmp.name) / 'gateway.db'}"
    providers: dict[str, StandIn] = {}
    provider_configs: list[ProviderConfig] = []
    try:
        for name, (behaviour, models) in stand_ins.items():
            port = (provider_ports or {}).get(name)
            providers[name] = start_stand_in(name, behaviour, port)
            provider_configs.append(ProviderConfig(
                name=name, base_url=providers[name].base_url, models=models,
                local_stand_in=True, connect_timeout_s=1.0, first_byte_timeout_s=5.0,
                total_timeout_s=30.0, stream_idle_timeout_s=5.0,
                **(provider_extras or {}).get(name, {}),
            ))
        base = routing or RoutingConfig()
        config = base.model_copy(update={"providers": provider_configs})
        config = RoutingConfig.model_validate(config.model_dump())
        settings = GatewaySettings(
            database_url=database_url, routing_seed=routing_seed, log_requests=log_requests,
            log_level="WARNING" if not log_requests else "INFO",
        )
        api_key = create_key(database_url, daily_budget_usd, rate_limit_per_min, True, "devstack")
        app = create_app(settings, config, weights=weights, sinks=sinks)
        gateway = ServerThread(app, port=gateway_port).start()
    except BaseException:
        for provider in providers.values():
            with contextlib.suppress(Exception):
                provider.server.stop()
        if tmp is not None:
            tmp.cleanup()
        raise
    return LocalStack(gateway, providers, config, settings, api_key, tmp)


@contextlib.contextmanager
def local_stack(**kwargs: object) -> Iterator[LocalStack]:
    stack = start_local_stack(**kwargs)  # type: ignore[arg-type]
    try:
        yield stack
    finally:
        stack.stop()
