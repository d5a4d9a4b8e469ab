"""`kill -9` the gateway at two bad moments; restart it; every receipt of every answered
request lands on chain exactly once (the outbox is durable before an answer is sent, and a
resubmission after a lost confirmation is recorded by the tracker as a replay of our own
nonce, which the batcher reads as confirmed)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from ape import chain

from .conftest import CHEAP, MODELS, provider_setup, wait_until
from gateway.devstack import create_key, free_port, start_stand_in
from pura.stack import chain_config


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def write_routing(path: Path, providers: dict, extras: dict, chain_cfg: dict) -> None:
    lines = ["[chain]"] + [f"{k} = {_toml(v)}" for k, v in chain_cfg.items()]
    for name, base_url in providers.items():
        lines += ["", "[[providers]]", f'name = "{name}"', f'base_url = "{base_url}"', "local_stand_in = true"]
        lines += [f"{k} = {_toml(v)}" for k, v in extras[name].items()]
        for m in MODELS:
            lines += ["  [[providers.models]]", f'  id = "{m.id}"', f'  tier = "{m.tier}"',
                      f'  input_usd_per_mtok = "{m.input_usd_per_mtok}"',
                      f'  output_usd_per_mtok = "{m.output_usd_per_mtok}"']
    path.write_text("\n".join(lines) + "\n")


class Gateway:
    def __init__(self, routing: Path, db_url: str, port: int, env: dict) -> None:
        self.args = [sys.executable, "-m", "gateway.cli", "--database-url", db_url, "serve",
                     "--config", str(routing), "--port", str(port)]
        self.port, self.env = port, env
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self._up, timeout_s=60, what="the gateway to start")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"gateway exited: {self.proc.stderr.read().decode()[-2000:]}")
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def statuses(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT status, COUNT(*) FROM chain_receipts GROUP BY status").fetchall())


def test_kill_9_at_any_point_loses_no_receipt_and_double_counts_none(stack, accounts, tmp_path):
    stand_ins, extras = provider_setup(stack, accounts)
    providers = {name: start_stand_in(name, behaviour) for name, (behaviour, _models) in stand_ins.items()}
    db = tmp_path / "gateway.db"
    db_url = f"sqlite:///{db}"
    # a long batch interval: receipts sit in the outbox when the first kill comes
    cfg = chain_config(stack, batch_interval_s=2.0, batch_size=64)
    routing = tmp_path / "routing.toml"
    write_routing(routing, {n: p.base_url for n, p in providers.items()}, extras, cfg)
    env = dict(os.environ, PURA_LOG_LEVEL="WARNING", PURA_LOG_REQUESTS="false")
    key = create_key(db_url, "1000", 100_000)
    gw = Gateway(routing, db_url, free_port(), env)
    answered = 0
    first_block = chain.blocks.head.number + 1
    try:
        gw.start()
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
        for i in range(12):
            r = client.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": f"q{i}"}])
            assert r.headers["x-pura-receipt"] == "queued"
            answered += 1
        # kill 1: right after the answers, before any batch went out
        gw.kill9()
        assert statuses(db) == {"queued": 12}
        gw.start()
        for i in range(12, 30):
            r = client.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": f"q{i}"}])
            assert r.headers["x-pura-receipt"] == "queued"
            answered += 1
        # kill 2: the moment a batch is claimed for submission (sent, confirmation pending)
        wait_until(lambda: statuses(db).get("sent", 0) > 0, interval_s=0.01, what="a batch in flight")
        gw.kill9()
        assert sum(statuses(db).values()) == answered
        gw.start()
        wait_until(lambda: statuses(db) == {"confirmed": answered}, timeout_s=90,
                   what=f"every receipt confirmed (now {statuses(db)})")
    finally:
        gw.stop()
        for p in providers.values():
            p.server.stop()
    p = stack.proto
    events = list(p.tracker.ReceiptRecorded.range(first_block, chain.blocks.head.number + 1))
    nonces = [e.nonce for e in events]
    assert len(events) == answered == 30 and len(set(nonces)) == 30  # each exactly once
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT nonce, amount FROM chain_receipts").fetchall()
    assert sorted(int(n) for n, _ in rows) == sorted(nonces)
    assert p.tracker.total_verified(CHEAP) == sum(int(a) for _, a in rows)
