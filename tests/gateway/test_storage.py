"""The storage layer on SQLite and PostgreSQL: migrations and the atomic accounting scripts.

PostgreSQL: see the ``postgres_url`` fixture in conftest.py (``PURA_TEST_POSTGRES_URL`` or a
throwaway cluster; skipped, with the reason, when neither is possible).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.accounting.db import _load_migrations, migrate, open_database
from gateway.accounting.records import AttemptRecord, CompletionRecord
from gateway.accounting.store import Store
from recordkit import completion_record


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    yield request.getfixturevalue("empty_postgres_url")


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


def test_concurrent_admissions_through_budget_leases_never_exceed_the_cap(db_url: str) -> None:
    """Three processes (stores) with budget leases on one database, 300 concurrent admissions
    each: what they admit together never passes the cap, and the budget is used up to less
    than one reservation per process (what the other processes' leases held back)."""
    dbs = [open_database(db_url) for _ in range(3)]
    migrate(dbs[0])
    try:
        stores = [Store(db, lease_factor=16) for db in dbs]
        raw, info = stores[0].create_key_sync("", 5_000, 1_000_000)

        async def burst() -> list:
            return await asyncio.gather(*(s.admit(raw, 33) for _ in range(300) for s in stores))

        results = asyncio.run(burst())
        ok = [r for r in results if r.status == "ok"]
        assert 33 * len(ok) <= 5_000
        assert {r.status for r in results} == {"ok", "budget_exhausted"}
        spent, reserved = asyncio.run(stores[0].budget_state(info.id))
        assert spent == 0 and 33 * len(ok) <= reserved <= 5_000
        for s in stores:  # no process carved more than its leases hold
            assert sum(c.amount for c in s.leases.carves.values()) <= sum(
                lease.total for lease in s.leases.leases.values())
        assert 33 * len(ok) > 5_000 - 3 * 33  # less than a reservation left per process
        # once every request has settled and the leases are back, nothing stays held
        for s, r in ((s, r) for s in stores for r in ok if r.reservation_id in s.leases.carves):
            asyncio.run(s.settle(r.reservation_id, completion_record(info.id, r.reservation_id, 10), 5_000))
        for s in stores:
            asyncio.run(s.return_leases())
        assert asyncio.run(stores[0].budget_state(info.id)) == (10 * len(ok), 0)
    finally:
        for db in dbs:
            db.close_sync()


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


# ---------------------------------------------------------------- keys cached per process


class _Clock:
    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def __call__(self) -> int:
        return self.ms


@pytest.fixture()
def two_stores(db_url: str) -> Iterator[tuple[Store, Store, _Clock]]:
    """Two stores on their own connections: two gateway processes (or one and the CLI) sharing
    one database, on one clock. Keys are cached for 1 s."""
    clock = _Clock()
    dbs = [open_database(db_url) for _ in range(2)]
    migrate(dbs[0])
    yield Store(dbs[0], clock=clock, key_cache_ttl_ms=1_000), Store(dbs[1], clock=clock, key_cache_ttl_ms=1_000), clock
    for db in dbs:
        db.close_sync()


def test_revocation_elsewhere_refuses_a_cached_key_at_once(two_stores) -> None:
    gateway, cli, _clock = two_stores
    raw, info = cli.create_key_sync("", 10_000, 100)
    assert asyncio.run(gateway.admit(raw, 100)).status == "ok"  # the key is cached now
    assert cli.revoke_key_sync(info.id)
    # well within the cache's TTL: the reservation reads the stored key, not the cache
    assert asyncio.run(gateway.admit(raw, 100)).status == "unauthorized"
    assert asyncio.run(gateway.admit(raw, None)).status == "unauthorized"
    assert asyncio.run(gateway.budget_state(info.id)) == (0, 100)  # nothing reserved after it


def test_revoked_key_at_its_rate_limit_gets_401_not_429(two_stores) -> None:
    gateway, cli, _clock = two_stores
    raw, info = cli.create_key_sync("", 10_000, 1)
    assert asyncio.run(gateway.admit(raw, 100)).status == "ok"
    assert asyncio.run(gateway.admit(raw, 100)).status == "rate_limited"
    cli.revoke_key_sync(info.id)
    assert asyncio.run(gateway.admit(raw, 100)).status == "unauthorized"


def test_cached_key_sees_budget_changes_and_spending_elsewhere_at_once(two_stores) -> None:
    gateway, other, _clock = two_stores
    raw, info = other.create_key_sync("", 10_000, 100)
    assert asyncio.run(gateway.admit(raw, 1_000)).status == "ok"  # cached with a 10_000 cap
    assert other.set_limits_sync(info.id, 3_000, None) == 1
    refused = asyncio.run(gateway.admit(raw, 2_500))
    assert refused.status == "budget_exhausted" and refused.budget_remaining_micros == 2_000
    assert asyncio.run(other.admit(raw, 1_500)).status == "ok"  # another process reserves
    assert asyncio.run(gateway.admit(raw, 600)).status == "budget_exhausted"  # 1000+1500+600 > 3000
    fits = asyncio.run(gateway.admit(raw, 500))
    assert fits.status == "ok" and fits.budget_remaining_micros == 0
    assert fits.key.daily_budget_micros == 3_000  # the stored cap, not the cached one


def test_rate_limit_change_elsewhere_applies_within_the_cache_ttl(two_stores) -> None:
    gateway, cli, clock = two_stores
    raw, info = cli.create_key_sync("", 10_000, 5)
    for _ in range(2):
        assert asyncio.run(gateway.admit(raw, 1)).status == "ok"
    cli.set_limits_sync(info.id, None, 2)
    # the documented delay: up to the cache's TTL on the old limit ...
    assert asyncio.run(gateway.admit(raw, 1)).status == "ok"
    clock.ms += 1_000
    # ... then the new one
    limited = asyncio.run(gateway.admit(raw, 1))
    assert limited.status == "rate_limited" and limited.rate_limit == 2


def test_rate_limit_counts_reach_other_processes_and_restarts_through_the_database(two_stores, db_url) -> None:
    a, b, clock = two_stores
    raw, _info = a.create_key_sync("", 10_000, 4)
    assert [asyncio.run(a.admit(raw, None)).status for _ in range(2)] == ["ok", "ok"]
    asyncio.run(a.settle_many([]))  # the settlement's group commit writes the counts behind
    seen = asyncio.run(b.admit(raw, 1))  # b loads the key with the stored counts
    assert seen.status == "ok" and seen.rate_remaining == 1
    asyncio.run(b.settle_many([]))
    # Within a's cache TTL, a still counts b's request as unseen: the documented excess across
    # processes (4 admitted against a limit of 4 here, one more than a single process allows).
    assert asyncio.run(a.admit(raw, 1)).rate_remaining == 1
    asyncio.run(a.settle_many([]))
    clock.ms += 1_000  # a reloads the key and the stored counts: everyone's 4 requests
    assert asyncio.run(a.admit(raw, 1)).status == "rate_limited"
    # a restarted process starts from the stored window, not from zero
    db = open_database(db_url)
    try:
        restarted = Store(db, clock=clock)
        assert asyncio.run(restarted.admit(raw, 1)).status == "rate_limited"
    finally:
        db.close_sync()


def test_batched_settlement_bills_like_settling_one_by_one(store: Store) -> None:
    raw1, k1 = store.create_key_sync("", 10_000, 100)
    raw2, k2 = store.create_key_sync("", 10_000, 100)
    ts = store.clock()

    def record(key_id: str, rid: str, cost: int) -> CompletionRecord:
        return completion_record(key_id, rid, cost, ts)

    r1 = asyncio.run(store.admit(raw1, 300, "req_1"))
    r2 = asyncio.run(store.admit(raw1, 400, "req_2"))
    r3 = asyncio.run(store.admit(raw2, 100, "req_3"))
    r4 = asyncio.run(store.admit(raw2, 100, "req_4"))
    asyncio.run(store.settle(r4.reservation_id, record(k2.id, "req_4", 70), 10_000))  # earlier batch
    # r5 is two seconds old, admitted by another process (its own budget lease) ...
    r5 = asyncio.run(Store(store.db, clock=lambda: ts - 2_000).admit(raw1, 200, "req_5"))
    assert asyncio.run(store.release_stale(1_000)) == 1  # ... so the sweeper releases it alone
    results = asyncio.run(store.settle_many([
        (r1.reservation_id, record(k1.id, "req_1", 100), 10_000),
        (r2.reservation_id, record(k1.id, "req_2", 500), 10_000),  # clamped to its 400
        (r3.reservation_id, record(k2.id, "req_3", 50), 10_000),
        (r1.reservation_id, record(k1.id, "req_1", 100), 10_000),  # settled twice in one batch
        (r4.reservation_id, record(k2.id, "req_4", 70), 10_000),  # settled in an earlier batch
        (r5.reservation_id, record(k1.id, "req_5", 150), 10_000),  # swept: billed what fits
    ]))
    assert [billed for billed, _left in results] == [100, 400, 50, 0, 0, 150]
    assert {left for billed, left in results[:2] + results[3:4] + results[5:]} == {10_000 - 650}
    assert asyncio.run(store.budget_state(k1.id)) == (650, 0)
    assert asyncio.run(store.budget_state(k2.id)) == (120, 0)
    rows = asyncio.run(store.report_rows(None, ts - 1))
    assert [int(x) for x in rows["totals"][:2]] == [5, 770]  # one record per request


class _FailingCommit:
    """The SQLite connection, except that the next COMMIT fails as a full disk would."""

    def __init__(self, conn, fail_rollback: bool = False) -> None:
        self._conn = conn
        self.fail_next_commit = True
        self.fail_next_rollback = fail_rollback

    def execute(self, sql: str, params=()):
        if sql == "COMMIT" and self.fail_next_commit:
            self.fail_next_commit = False
            raise sqlite3.OperationalError("database or disk is full")
        if sql == "ROLLBACK" and self.fail_next_rollback:
            self.fail_next_rollback = False
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, params)

    def __getattr__(self, name: str):
        return getattr(self._conn, name)


def test_a_failed_sqlite_commit_is_rolled_back_and_the_connection_keeps_working(tmp_path: Path) -> None:
    """SQLite leaves the transaction open when COMMIT fails: without a ROLLBACK every later
    transaction of the process failed ("cannot start a transaction within a transaction")."""
    db = open_database(f"sqlite:///{tmp_path / 'store.db'}")
    migrate(db)
    try:
        db.run_sync(lambda tx: tx.execute("CREATE TABLE t (v INTEGER)"))
        db._conn = _FailingCommit(db._conn)
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            db.run_sync(lambda tx: tx.execute("INSERT INTO t VALUES (1)"))
        assert not db._conn.in_transaction  # rolled back: the insert did not persist
        db.run_sync(lambda tx: tx.execute("INSERT INTO t VALUES (2)"))
        assert db.run_sync(lambda tx: tx.all("SELECT v FROM t")) == [(2,)]
    finally:
        db.close_sync()


def test_a_broken_postgresql_connection_is_replaced(empty_postgres_url: str) -> None:
    """A connection whose backend went away (server restart, network cut) is replaced when it
    is next drawn from the pool; before, it went back broken and every call that drew it
    failed until the process restarted."""
    import psycopg

    from gateway.accounting.db import PostgresDatabase

    db = PostgresDatabase(empty_postgres_url, pool_size=1)
    try:
        pid = db.run_sync(lambda tx: tx.one("SELECT pg_backend_pid()")[0])
        with psycopg.connect(empty_postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            db.run_sync(lambda tx: tx.one("SELECT 1"))  # the call that finds it broken fails
        for _ in range(3):  # ... and the next ones run on a new connection
            assert db.run_sync(lambda tx: tx.one("SELECT 1")) == (1,)
        assert db.run_sync(lambda tx: tx.one("SELECT pg_backend_pid()")[0]) != pid
    finally:
        db.close_sync()


def test_an_outage_fails_one_call_not_one_per_pooled_connection(empty_postgres_url: str) -> None:
    """Every backend of the pool goes away at once (a server restart): the call that finds
    its connection broken fails (whether its work landed is unknown, so it is not retried
    here), and it marks the others suspect, so they are pinged and replaced before their next
    use. Before, each pooled connection failed one call of its own."""
    import psycopg

    from gateway.accounting.db import PostgresDatabase

    db = PostgresDatabase(empty_postgres_url, pool_size=3)
    try:
        with psycopg.connect(empty_postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND datname = current_database()"
            )
        with pytest.raises(psycopg.OperationalError):
            db.run_sync(lambda tx: tx.one("SELECT 1"))
        pids = {db.run_sync(lambda tx: tx.one("SELECT pg_backend_pid()")[0]) for _ in range(6)}
        assert len(pids) == 3  # each connection drawn in turn, all three replaced and working
    finally:
        db.close_sync()


def test_postgresql_connects_with_a_timeout_unless_the_url_sets_one(empty_postgres_url: str) -> None:
    from gateway.accounting.db import PostgresDatabase

    db = PostgresDatabase(empty_postgres_url, pool_size=1)
    own = PostgresDatabase(empty_postgres_url + "&connect_timeout=2", pool_size=1)
    try:
        assert db._connect_kwargs["connect_timeout"] == PostgresDatabase.CONNECT_TIMEOUT_S
        assert "connect_timeout" not in own._connect_kwargs
        assert own.run_sync(lambda tx: tx.one("SELECT 1")) == (1,)
    finally:
        db.close_sync()
        own.close_sync()


@pytest.mark.parametrize("reconnect_fails", [False, True])
def test_a_rollback_that_fails_too_leaves_the_database_usable(tmp_path: Path, monkeypatch, reconnect_fails: bool) -> None:
    """COMMIT and then ROLLBACK fail: the caller gets the original error; the connection is
    replaced, or, when even reconnecting fails, kept and cleaned up at the next transaction.
    The database is never left closed."""
    db = open_database(f"sqlite:///{tmp_path / 'store.db'}")
    migrate(db)
    try:
        db.run_sync(lambda tx: tx.execute("CREATE TABLE t (v INTEGER)"))
        db._conn = _FailingCommit(db._conn, fail_rollback=True)
        if reconnect_fails:
            def refuse():
                raise sqlite3.OperationalError("unable to open database file")
            monkeypatch.setattr(db, "_connect", refuse)
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            db.run_sync(lambda tx: tx.execute("INSERT INTO t VALUES (1)"))
        monkeypatch.undo()
        db.run_sync(lambda tx: tx.execute("INSERT INTO t VALUES (2)"))
        assert db.run_sync(lambda tx: tx.all("SELECT v FROM t")) == [(2,)]
    finally:
        db.close_sync()
