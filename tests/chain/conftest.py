"""End-to-end fixtures: the contracts on ape's anvil, providers registered as sinks, and the
gateway (in-process, or as a subprocess for crash tests) talking to the chain over JSON-RPC."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from ape import chain

from gateway.config import ModelConfig, RoutingConfig
from gateway.devstack import start_local_stack
from gateway.upstreams.local_provider import StandInBehaviour
from pura.signing import task_type_id
from pura.stack import STACK_PRICES, chain_config, deploy_stack, fund_source, gateway_status, register_sinks, run_epoch, warm, wait_until
from pura.stack import drained as _drained

CHEAP = task_type_id("llm.cheap")
MODELS = [ModelConfig(id="stand-in-small", tier="cheap", **STACK_PRICES)]


@pytest.fixture(scope="module")
def stack(project, accounts, tmp_path_factory):
    """Three cheap-tier sinks: p1 signs through the sidecar, p2 and p3 through the keystore.
    Capacities are sized to the tests' traffic (30 answers an epoch, ~0.75 task each at the
    starting fee, against 30 tasks of capacity: ~75 % utilisation)."""
    st = deploy_stack(project, accounts, tmp_path_factory.mktemp("chain"))
    register_sinks(st, {"p1": (accounts[2], 10, ["cheap"]), "p2": (accounts[3], 10, ["cheap"]),
                        "p3": (accounts[4], 10, ["cheap"])})
    fund_source(st)
    warm(st)
    return st


def provider_setup(st, accounts, **behaviour_overrides):
    os.environ["TEST_SINK_P2"] = accounts[3].private_key
    os.environ["TEST_SINK_P3"] = accounts[4].private_key
    def behaviour(name: str, **base) -> StandInBehaviour:
        return StandInBehaviour(**({"models": ["stand-in-small"]} | base | behaviour_overrides.get(name, {})))

    stand_ins = {
        "p1": (behaviour("p1", sink_key=accounts[2].private_key), MODELS),
        "p2": (behaviour("p2"), MODELS),
        "p3": (behaviour("p3"), MODELS),
    }
    extras = {"p1": {"sink": accounts[2].address, "sink_signer": "sidecar"},
              "p2": {"sink": accounts[3].address, "sink_key_env": "TEST_SINK_P2"},
              "p3": {"sink": accounts[4].address, "sink_key_env": "TEST_SINK_P3"}}
    return stand_ins, extras


def gateway(st, accounts, *, chain_overrides=None, behaviour=None, routing=None, seed=11, extra_models=None):
    stand_ins, extras = provider_setup(st, accounts, **(behaviour or {}))
    for name, models in (extra_models or {}).items():
        behaviour_, current = stand_ins[name]
        stand_ins[name] = (behaviour_, list(current) + list(models))
    cfg = {"chain": chain_config(st, **(chain_overrides or {}))}
    cfg.update(routing or {})
    return start_local_stack(stand_ins=stand_ins, routing=RoutingConfig.model_validate(cfg),
                             provider_extras=extras, rate_limit_per_min=100_000, daily_budget_usd="1000",
                             routing_seed=seed)


def status(stack) -> dict:
    return gateway_status(stack.base_url)


def drained(stack) -> bool:
    return _drained(stack.base_url)


class TcpProxy:
    """A loopback TCP proxy in front of the node, so a test can cut and restore the RPC."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._conns: set = set()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._conns.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def start(self) -> None:
        async def go():
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        asyncio.run_coroutine_threadsafe(go(), self._loop).result(5)

    def stop(self) -> None:
        async def halt():
            self._server.close()
            for w in list(self._conns):
                w.close()
            self._conns.clear()
            await self._server.wait_closed()
        asyncio.run_coroutine_threadsafe(halt(), self._loop).result(5)

