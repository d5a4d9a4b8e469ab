"""Fixtures for the gateway suite: LOCAL STAND-IN providers and a gateway on loopback ports.

No ape fixtures and no network: every upstream is a ``gateway.upstreams.local_provider`` stand-in
started on a free 127.0.0.1 port.

Routes of the test stack (prices in USD per million tokens, input/output):

    cheap-a  stand-in-small  cheap    0.10 / 0.40
    cheap-b  stand-in-small  cheap    0.20 / 0.80   (also stand-in-mini, cheap)
    mid-a    stand-in-medium mid      1.00 / 4.00
    prem-a   stand-in-large  premium  5.00 / 15.00
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from gateway.accounting.db import open_database
from gateway.config import ModelConfig, RoutingConfig, SelectionPolicy
from gateway.devstack import LocalStack, free_port, start_local_stack
from gateway.upstreams.local_provider import StandInBehaviour


# Under plain `python -m pytest`, ape's pytest plugin still starts its local chain for any
# collected test; make the repository's pinned anvil findable the way `./dev test` does.
_ANVIL_BIN = Path(__file__).resolve().parents[2] / "node_modules" / ".bin"
if shutil.which("anvil") is None and (_ANVIL_BIN / "anvil").exists():
    os.environ["PATH"] = f"{_ANVIL_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for the storage tests: ``PURA_TEST_POSTGRES_URL`` if set; otherwise,
    when the PostgreSQL 15 server binaries are installed (Debian's ``postgresql-15``), a throwaway
    cluster on a unix socket in a temporary directory (run as the ``postgres`` user when running
    as root), one for the whole session. Without either, the PostgreSQL cases are skipped and say
    why."""
    url = os.environ.get("PURA_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    initdb = PG_BIN / "initdb"
    if not initdb.exists():
        pytest.skip("no PURA_TEST_POSTGRES_URL and no PostgreSQL 15 server binaries")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: cannot start a PostgreSQL cluster")
    workdir = Path(tempfile.mkdtemp(prefix="pura-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    data, port = workdir / "data", free_port()
    try:
        subprocess.run(
            _as_postgres([str(initdb), "-D", str(data), "-A", "trust", "-U", "postgres",
                          "-E", "UTF8", "--locale=C", "--no-sync"]),
            check=True, capture_output=True, timeout=120,
        )
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l",
                          str(workdir / "log"), "-o",
                          f"-p {port} -k {workdir} -c listen_addresses='' -c fsync=off", "start"]),
            check=True, capture_output=True, timeout=120,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        pytest.skip(f"could not start a throwaway PostgreSQL cluster: {exc}")
    try:
        yield f"postgresql://postgres@/postgres?host={workdir}&port={port}"
    finally:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True, timeout=60,
        )
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture()
def empty_postgres_url(postgres_url: str) -> str:
    """``postgres_url`` with none of the gateway's tables: every test migrates from scratch."""
    db = open_database(postgres_url)
    db.run_sync(lambda tx: [tx.execute(f"DROP TABLE IF EXISTS {t}") for t in (
        "usage_attempts", "usage_records", "reservations", "budget_days", "rate_buckets",
        "api_keys", "chain_receipts", "chain_nonces", "schema_migrations")])
    db.close_sync()
    return postgres_url


def _model(id_: str, tier: str, inp: str, out: str) -> ModelConfig:
    return ModelConfig(
        id=id_, tier=tier, input_usd_per_mtok=Decimal(inp), output_usd_per_mtok=Decimal(out)
    )


TEST_STAND_INS = {
    "cheap-a": (
        StandInBehaviour(models=["stand-in-small"]),
        [_model("stand-in-small", "cheap", "0.10", "0.40")],
    ),
    "cheap-b": (
        StandInBehaviour(models=["stand-in-small", "stand-in-mini"]),
        [
            _model("stand-in-small", "cheap", "0.20", "0.80"),
            _model("stand-in-mini", "cheap", "0.05", "0.20"),
        ],
    ),
    "mid-a": (
        StandInBehaviour(models=["stand-in-medium"]),
        [_model("stand-in-medium", "mid", "1.00", "4.00")],
    ),
    "prem-a": (
        StandInBehaviour(models=["stand-in-large"]),
        [_model("stand-in-large", "premium", "5.00", "15.00")],
    ),
}


@pytest.fixture(scope="session")
def stack() -> LocalStack:
    routing = RoutingConfig(selection=SelectionPolicy(exploration_rate=0.0, max_attempts=3))
    started = start_local_stack(
        stand_ins=TEST_STAND_INS, routing=routing, routing_seed=1234, rate_limit_per_min=100_000,
        daily_budget_usd="1000",
    )
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def _reset_stack(request: pytest.FixtureRequest) -> None:
    """Every test starts from default stand-in behaviour and empty health windows."""
    if "stack" not in request.fixturenames:
        yield
        return
    stack: LocalStack = request.getfixturevalue("stack")
    for name, (behaviour, _models) in TEST_STAND_INS.items():
        stack.providers[name].configure(**behaviour.model_dump())
    stack.services.health.clear()
    stack.services.router.policy = stack.config.selection
    stack.services.router.weights = stack.services.weights
    yield


@pytest.fixture()
def api_key(stack: LocalStack) -> str:
    """A fresh key per test: 1000 USD a day, effectively no rate limit."""
    return stack.create_key(daily_budget_usd="1000", rate_limit_per_min=100_000)


@pytest.fixture()
def client(stack: LocalStack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url, api_key=api_key, max_retries=0, timeout=30)


def long_run() -> bool:
    return os.environ.get("PURA_LONG") == "1"
