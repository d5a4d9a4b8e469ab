"""The storage layer on SQLite and PostgreSQL: migrations and the atomic accounting scripts.

PostgreSQL: ``PURA_TEST_POSTGRES_URL`` if set; otherwise, when the PostgreSQL 15 server binaries
are installed (Debian's ``postgresql-15``), a throwaway cluster is started on a unix socket in a
temporary directory (as the ``postgres`` user when running as root). Without either, the
PostgreSQL cases are skipped and say why.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.accounting.db import _load_migrations, migrate, open_database
from gateway.accounting.records import AttemptRecord, CompletionRecord
from gateway.accounting.store import Store
from gateway.devstack import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
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


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    db = open_database(url)
    # a clean schema for every test
    db.run_sync(lambda tx: [tx.execute(f"DROP TABLE IF EXISTS {t}") for t in (
        "usage_attempts", "usage_records", "reservations", "budget_days", "rate_buckets",
        "api_keys", "chain_receipts", "chain_nonces", "schema_migrations")])
    db.close_sync()
    yield url


@pytest.fixture()
def store(db_url: str) -> Iterator[Store]:
    db = open_database(db_url)
    migrate(db)
    yield Store(db)
    db.close_sync()


def test_migrations_are_versioned_and_idempotent(db_url: str) -> None:
    db = open_database(db_url)
    try:
        versions = [v for v, _, _ in _load_migrations()]
        assert migrate(db) == versions
        assert migrate(db) == []
        rows = db.run_sync(lambda tx: tx.all("SELECT version, name FROM schema_migrations ORDER BY version"))
        assert [r[0] for r in rows] == versions and rows[0][1] == "initial"
    finally:
        db.close_sync()


def test_concurrent_reservations_never_exceed_the_cap(store: Store) -> None:
    raw, info = store.create_key_sync("", 5_000, 1_000_000)

    async def burst() -> list:
        return await asyncio.gather(*(store.admit(raw, 33) for _ in range(300)))

    results = asyncio.run(burst())
    ok = [r for r in results if r.status == "ok"]
    assert len(ok) == 5_000 // 33
    assert {r.status for r in results} == {"ok", "budget_exhausted"}
    assert asyncio.run(store.budget_state(info.id)) == (0, 33 * len(ok))


def test_concurrent_rate_limit_admits_exactly_the_limit(store: Store) -> None:
    raw, _ = store.create_key_sync("", 1_000_000, 25)

    async def burst() -> list:
        return await asyncio.gather(*(store.admit(raw, None) for _ in range(120)))

    statuses = [r.status for r in asyncio.run(burst())]
    assert statuses.count("ok") == 25 and statuses.count("rate_limited") == 95


def test_settle_and_report_queries(store: Store) -> None:
    raw, info = store.create_key_sync("", 10_000, 100)
    admitted = asyncio.run(store.admit(raw, 1_000))
    ts = store.clock()
    record = CompletionRecord(
        request_id="req_x", key_id=info.id, created_ms=ts, finished_ms=ts + 5, outcome="ok",
        http_status=200, provider="p", model="m", tier="cheap", stream=True, prompt_tokens=10,
        completion_tokens=20, usage_estimated=False, cost_micros=120, billed_micros=120,
        premium_cost_micros=900, cascade_depth=2, confidence=0.82, explored=False, latency_ms=5,
        response_sha256="ab" * 32,
        attempts=(AttemptRecord("q", "m0", "cheap", "rejected", 20, 2, 0.3),
                  AttemptRecord("p", "m", "mid", "accepted", 100, 3, 0.82)),
    )
    billed, remaining = asyncio.run(store.settle(admitted.reservation_id, record, 10_000))
    assert (billed, remaining) == (120, 9_880)
    rows = asyncio.run(store.report_rows(info.id, ts - 1))
    assert [int(x) for x in rows["totals"]] == [1, 120, 120, 900, 10, 20]
    assert {p: int(c) for p, _n, _ok, c, _l in rows["per_provider"]} == {"p": 100, "q": 20}
    assert [(int(d), int(n)) for d, n, *_ in rows["cascade"]] == [(2, 1)]
    assert asyncio.run(store.report_rows(None, ts + 10_000))["totals"][0] == 0


def test_gateway_end_to_end_on_postgresql(postgres_url: str) -> None:
    import httpx
    import openai

    from gateway.devstack import local_stack

    with local_stack(database_url=postgres_url) as stack:
        client = openai.OpenAI(base_url=stack.base_url, api_key=stack.api_key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="stand-in-small", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-pura-cost"] != "0.000000"
        report = httpx.get(stack.gateway.url + "/api/report",
                           headers={"Authorization": f"Bearer {stack.api_key}"}).json()
        assert report["requests"] >= 1 and report["spend"]["micros"] > 0


def test_grouped_scripts_share_a_commit_but_fail_alone(tmp_path: Path) -> None:
    from gateway.accounting.db import SqliteDatabase

    db = open_database(f"sqlite:///{tmp_path / 'group.db'}")
    assert isinstance(db, SqliteDatabase)
    db.run_sync(lambda tx: tx.execute("CREATE TABLE t (v INTEGER PRIMARY KEY)"))

    def insert(v: int):
        return lambda tx: tx.execute("INSERT INTO t (v) VALUES (?)", (v,))

    async def burst() -> list:
        return await asyncio.gather(
            db.run_grouped(insert(1)), db.run_grouped(insert(1)), db.run_grouped(insert(2)),
            return_exceptions=True,
        )

    first, duplicate, second = asyncio.run(burst())
    assert first == 1 and second == 1
    assert isinstance(duplicate, Exception)  # the duplicate key failed alone
    assert db.run_sync(lambda tx: tx.all("SELECT v FROM t ORDER BY v")) == [(1,), (2,)]
    db.close_sync()
