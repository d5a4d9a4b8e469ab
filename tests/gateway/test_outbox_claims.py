"""Outbox claims with several claimers on one database (gateway.chain.outbox).

Replicas on PostgreSQL claim receipts from one table: each row must go to exactly one batcher
at a time (a second submission of a receipt wastes a transaction's gas), a claim whose
batcher died must come back after its lease, and a starting replica must not requeue what a
live one is submitting. On SQLite, the one-process deployment, a restart still resubmits its
in-flight rows at once. PostgreSQL: see the ``postgres_url`` fixture in conftest.py.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from gateway.accounting.db import PostgresDatabase, SqliteDatabase, Tx, migrate, open_database
from gateway.chain.outbox import Outbox, OutboxRow

T = TypeVar("T")
LEASE_MS = 60_000


def receipt(i: int) -> OutboxRow:
    return OutboxRow(
        request_id=f"req_{i:04d}", provider="p", task_type="0x" + "22" * 32, sink="0x" + "33" * 20,
        source="0x" + "44" * 20, task_id="0x" + i.to_bytes(32, "big").hex(), amount=1_000 + i,
        response_hash="0x" + "55" * 32, nonce=i, deadline=2_000_000_000, sink_sig="0x" + "66" * 65,
        source_sig="0x" + "77" * 65, chain_ts=0,
    )


def ids(claimed: dict[str, list[OutboxRow]]) -> list[str]:
    return [r.request_id for rows in claimed.values() for r in rows]


def stored(db: SqliteDatabase | PostgresDatabase) -> dict[str, tuple[str, str | None, int]]:
    """request_id -> (status, claimed_by, tries)."""
    rows = db.run_sync(
        lambda tx: tx.all("SELECT request_id, status, claimed_by, tries FROM chain_receipts ORDER BY request_id")
    )
    return {rid: (status, owner, int(tries)) for rid, status, owner, tries in rows}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database holding no receipts."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'outbox.db'}"
    else:
        url = request.getfixturevalue("empty_postgres_url")
    db = open_database(url)
    migrate(db)
    db.close_sync()
    return url


@pytest.fixture()
def open_db(db_url: str) -> Iterator[Callable[[], SqliteDatabase | PostgresDatabase]]:
    """Opens connections of their own to the test's database, as another process would."""
    opened: list[SqliteDatabase | PostgresDatabase] = []

    def connect() -> SqliteDatabase | PostgresDatabase:
        opened.append(open_database(db_url))
        return opened[-1]

    yield connect
    for db in opened:
        db.close_sync()


def queue_receipts(db: SqliteDatabase | PostgresDatabase, n: int) -> None:
    outbox = Outbox(db)

    async def put_all() -> None:
        for i in range(n):
            await outbox.put(receipt(i))

    asyncio.run(put_all())


# ---------------------------------------------------------------- one claimer per row


def _claim_until_empty(url: str, limit: int, start, results) -> None:
    """One replica's batcher, in a process of its own: claim until nothing is left."""
    db = open_database(url)
    outbox = Outbox(db)
    claimed: list[str] = []

    async def drain() -> None:
        while batch := await outbox.claim(limit):
            claimed.extend(ids(batch))

    start.wait()
    try:
        asyncio.run(drain())
    finally:
        results.put((outbox.owner, claimed))
        db.close_sync()


def test_concurrent_claimers_in_separate_processes_take_every_row_exactly_once(db_url: str, open_db) -> None:
    """Four processes drain 500 queued rows at once, a few rows per claim: together they
    claim every row, and no row twice (on PostgreSQL the claim without row locks hands the
    same rows to several processes)."""
    n, processes = 500, 4
    db = open_db()
    queue_receipts(db, n)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: nothing shared but the database
    start, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_claim_until_empty, args=(db_url, 7, start, results)) for _ in range(processes)]
    for w in workers:
        w.start()
    claims = dict(results.get(timeout=120) for _ in workers)
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    everything = [rid for claimed in claims.values() for rid in claimed]
    assert len(everything) == len(set(everything)), f"{len(everything) - len(set(everything))} rows claimed twice"
    assert set(everything) == {receipt(i).request_id for i in range(n)}
    if db.dialect == "postgresql":  # the claims did interleave (SQLite's write lock may let one process drain all)
        assert sum(1 for claimed in claims.values() if claimed) > 1
    rows = stored(db)
    assert {(status, tries) for status, _owner, tries in rows.values()} == {("sent", 1)}
    assert all(rows[rid][1] == owner for owner, claimed in claims.items() for rid in claimed)


class HeldOpen:
    """A database whose scripts keep their transaction open, after they ran, until `release`
    is set: a claim caught between its select and its commit."""

    def __init__(self, db: SqliteDatabase | PostgresDatabase) -> None:
        self.db, self.dialect = db, db.dialect
        self.inside, self.release = threading.Event(), threading.Event()

    async def run(self, fn: Callable[[Tx], T]) -> T:
        def held(tx: Tx) -> T:
            result = fn(tx)
            self.inside.set()
            self.release.wait(timeout=30)
            return result

        return await self.db.run(held)


def test_a_claim_skips_the_rows_an_uncommitted_claim_holds(empty_postgres_url: str) -> None:
    """The race made deterministic (PostgreSQL): replica A's claim has selected and marked 8
    rows but not committed; replica B's claim meanwhile takes the next 8, without waiting for
    A. (The claim without row locks reads A's rows as still queued, waits on A's row locks in
    its update and, once A commits, marks and returns the same 8 rows.)"""
    dbs = [open_database(empty_postgres_url) for _ in range(2)]
    try:
        migrate(dbs[0])
        queue_receipts(dbs[0], 20)
        held = HeldOpen(dbs[0])
        a, b = Outbox(held), Outbox(dbs[1])
        with ThreadPoolExecutor(2) as pool:
            a_claim = pool.submit(asyncio.run, a.claim(8))
            assert held.inside.wait(timeout=30)
            b_claim = pool.submit(asyncio.run, b.claim(8))
            try:
                b_ids = ids(b_claim.result(timeout=5))  # returns while A still holds its rows
            finally:
                held.release.set()
            a_ids = ids(a_claim.result(timeout=30))
        assert a_ids == [receipt(i).request_id for i in range(8)]
        assert b_ids == [receipt(i).request_id for i in range(8, 16)]
        rows = stored(dbs[1])
        assert {rows[rid][1] for rid in a_ids} == {a.owner} and {rows[rid][1] for rid in b_ids} == {b.owner}
    finally:
        for db in dbs:
            db.close_sync()


# ---------------------------------------------------------------- leases and restarts


def test_a_claim_takes_over_rows_whose_lease_ran_out_and_the_old_claimer_cannot_requeue_them(open_db) -> None:
    db_a, db_b = open_db(), open_db()
    queue_receipts(db_a, 3)
    a, b = Outbox(db_a, reclaim_after_ms=LEASE_MS), Outbox(db_b, reclaim_after_ms=LEASE_MS)
    assert len(ids(asyncio.run(a.claim(10)))) == 3
    assert asyncio.run(b.claim(10)) == {}  # a's claims are fresh
    # a stalls past its lease on two of the rows (its process hung, or died)
    lapsed = [receipt(0).request_id, receipt(1).request_id]
    db_b.run_sync(lambda tx: tx.many("UPDATE chain_receipts SET updated_ms = updated_ms - ? WHERE request_id = ?",
                                     [(LEASE_MS + 1_000, rid) for rid in lapsed]))
    assert ids(asyncio.run(b.claim(10))) == lapsed
    # a wakes up, its submission failed: it requeues what it claimed, but only its own row goes back
    asyncio.run(a.requeue([receipt(i).request_id for i in range(3)]))
    rows = stored(db_a)
    assert rows[lapsed[0]] == rows[lapsed[1]] == ("sent", b.owner, 2)
    assert rows[receipt(2).request_id] == ("queued", None, 1)


def test_a_starting_replica_leaves_a_live_replicas_claims_alone(empty_postgres_url: str) -> None:
    """PostgreSQL: recover() of a process that starts while another replica has rows in flight
    requeues nothing; the rows stay the live replica's until they settle or their lease runs out."""
    dbs = [open_database(empty_postgres_url) for _ in range(2)]
    try:
        migrate(dbs[0])
        queue_receipts(dbs[0], 5)
        running, started = Outbox(dbs[0]), Outbox(dbs[1])
        assert len(ids(asyncio.run(running.claim(3)))) == 3
        assert asyncio.run(started.recover()) == 0
        assert list(stored(dbs[1]).values()) == [("sent", running.owner, 1)] * 3 + [("queued", None, 0)] * 2
        assert ids(asyncio.run(started.claim(10))) == [receipt(i).request_id for i in (3, 4)]
    finally:
        for db in dbs:
            db.close_sync()


def test_sqlite_restart_resubmits_the_rows_its_previous_process_had_in_flight(tmp_path: Path) -> None:
    """SQLite is the one-process deployment: what is ``sent`` at start was claimed by a process
    that is gone (here: closed mid-batch, never settling), and is claimable again at once,
    not only after the lease."""
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    before = open_database(url)
    migrate(before)
    queue_receipts(before, 4)
    in_flight = ids(asyncio.run(Outbox(before).claim(3)))
    before.close_sync()

    after = open_database(url)
    try:
        restarted = Outbox(after)
        assert asyncio.run(restarted.recover()) == 3
        assert ids(asyncio.run(restarted.claim(10))) == in_flight + [receipt(3).request_id]
        assert [tries for _s, _o, tries in stored(after).values()] == [2, 2, 2, 1]
    finally:
        after.close_sync()
