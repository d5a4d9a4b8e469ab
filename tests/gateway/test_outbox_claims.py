"""Outbox claims with several claimers on one database (gateway.chain.outbox).

Replicas on PostgreSQL claim receipts from one table: each row must go to exactly one batcher
at a time (a second submission of a receipt wastes a transaction's gas), a claim whose
batcher died must come back after its lease, and a starting replica must not requeue what a
live one is submitting. On SQLite, the one-process deployment, a restart still resubmits its
in-flight rows at once. A live batcher renews its claim before each transaction, so a slow
chain does not hand its rows to another replica, and it drops the rows it lost after a lapse.
PostgreSQL: see the ``postgres_url`` fixture in conftest.py.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest

from gateway.accounting.db import PostgresDatabase, SqliteDatabase, Tx, migrate, open_database
from gateway.chain.batcher import MAX_BATCH, Batcher
from gateway.chain.outbox import Outbox, OutboxRow

T = TypeVar("T")
LEASE_MS = 60_000
TASK_TYPE, OTHER_TASK_TYPE = "0x" + "22" * 32, "0x" + "88" * 32


def receipt(i: int, task_type: str = TASK_TYPE) -> OutboxRow:
    return OutboxRow(
        request_id=f"req_{i:04d}", provider="p", task_type=task_type, sink="0x" + "33" * 20,
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


class Clock:
    """Wall-clock milliseconds that move only when a test says so, shared by the outboxes of
    several "replicas" (as if their clocks agreed)."""

    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms

    def advance(self, seconds: float) -> None:
        self.ms += int(seconds * 1000)


def updated_ms(db: SqliteDatabase | PostgresDatabase) -> dict[str, int]:
    rows = db.run_sync(lambda tx: tx.all("SELECT request_id, updated_ms FROM chain_receipts"))
    return {rid: int(ms) for rid, ms in rows}


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


def test_a_renewed_claim_outlives_its_first_lease(open_db) -> None:
    """Renewed before its lease ran out, a claim is not taken over at the time the first lease
    would have ended; it lapses a full lease after the renewal."""
    clock, db_a, db_b = Clock(), open_db(), open_db()
    a, b = Outbox(db_a, LEASE_MS, clock), Outbox(db_b, LEASE_MS, clock)
    asyncio.run(a.put(receipt(0)))
    asyncio.run(a.put(receipt(1)))
    claimed = ids(asyncio.run(a.claim(10)))
    clock.advance(50)
    assert asyncio.run(a.renew(claimed)) == claimed
    clock.advance(30)  # 80 s after the claim, 30 s after the renewal
    assert asyncio.run(b.claim(10)) == {}
    assert list(stored(db_b).values()) == [("sent", a.owner, 1)] * 2
    clock.advance(31)  # now the renewed lease has run out too
    assert ids(asyncio.run(b.claim(10))) == claimed


def test_renew_returns_only_the_rows_the_claimer_still_holds(open_db) -> None:
    """After a lapse another claimer took two of A's three rows: A's renew leaves them alone and
    returns only the third (lapsed too, but nobody took it, so it is still A's to submit)."""
    clock, db_a, db_b = Clock(), open_db(), open_db()
    a, b = Outbox(db_a, LEASE_MS, clock), Outbox(db_b, LEASE_MS, clock)
    for i in range(3):
        asyncio.run(a.put(receipt(i)))
    claimed = ids(asyncio.run(a.claim(10)))
    clock.advance(LEASE_MS / 1000 + 1)
    taken = ids(asyncio.run(b.claim(2)))
    assert taken == claimed[:2]
    before = updated_ms(db_a)
    clock.advance(1)
    assert asyncio.run(a.renew(claimed)) == claimed[2:]
    after, rows = updated_ms(db_a), stored(db_a)
    assert [rows[rid] for rid in taken] == [("sent", b.owner, 2)] * 2
    assert [after[rid] for rid in taken] == [before[rid] for rid in taken]  # b's lease, untouched
    assert after[claimed[2]] == clock()
    assert asyncio.run(b.claim(10)) == {}  # the renewal made A's last row fresh again


def test_renew_leaves_settled_and_requeued_rows_alone(open_db) -> None:
    """Confirmed, rejected and requeued rows are no longer the claimer's to submit: renew
    returns none of them and writes nothing."""
    clock, db = Clock(), open_db()
    a = Outbox(db, LEASE_MS, clock)
    for i in range(3):
        asyncio.run(a.put(receipt(i)))
    claimed = ids(asyncio.run(a.claim(10)))
    asyncio.run(a.settle({claimed[0]: ("confirmed", None), claimed[1]: ("rejected", 2)}, "0x" + "ab" * 32))
    asyncio.run(a.requeue([claimed[2]]))
    before, rows_before = updated_ms(db), stored(db)
    clock.advance(10)
    assert asyncio.run(a.renew(claimed)) == []
    assert updated_ms(db) == before and stored(db) == rows_before
    assert [s for s, _o, _t in rows_before.values()] == ["confirmed", "rejected", "queued"]


# ---------------------------------------------------------------- the batcher keeps its claim


class FakeChain:
    """The part of ChainClient the batcher uses, with ample credit room and every receipt
    recorded. Each client call moves the shared clock (a read by `read_s`, a transaction by
    `tx_s`) and then awaits `meanwhile(call)`, with call "read" or "send": what another replica
    does while this batcher waits on the chain. `sent` holds each transaction's receipts."""

    timeout_s, tx_timeout_s = 2.0, 60.0  # ChainConfig's defaults
    source = "0x" + "44" * 20

    def __init__(self, clock: Clock, tx_s: float, read_s: float = 0.0,
                 meanwhile: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.clock, self.tx_s, self.read_s, self.meanwhile = clock, tx_s, read_s, meanwhile
        self.sent: list[tuple[str, list[str]]] = []  # (task type, request ids)

        def events(recorded: bool) -> Any:
            return SimpleNamespace(process_receipt=lambda receipt, errors: [
                {"args": {"nonce": n}} for n in receipt["nonces"]] if recorded else [])

        self.c = {
            "pool": SimpleNamespace(functions=SimpleNamespace(funder_room=lambda task_type, source: None)),
            "tracker": SimpleNamespace(
                functions=SimpleNamespace(submit_receipts=lambda task_type, args: ("0x" + task_type.hex(), args)),
                events=SimpleNamespace(ReceiptRecorded=lambda: events(True), ReceiptRejected=lambda: events(False)),
            ),
        }

    async def read(self, fn: Any) -> int:
        self.clock.advance(self.read_s)
        if self.meanwhile:
            await self.meanwhile("read")
        return 10**30

    async def send(self, fn: Any) -> dict:
        task_type, args = fn
        nonces = [a[5] for a in args]
        self.sent.append((task_type, [receipt(n).request_id for n in nonces]))
        self.clock.advance(self.tx_s)
        if self.meanwhile:
            await self.meanwhile("send")
        return {"gasUsed": 50_000, "transactionHash": bytes(32), "status": 1, "nonces": nonces}

    def chain_now(self) -> int:
        return 0


def queue_mixed(outbox: Outbox, task_types: list[str]) -> None:
    async def put_all() -> None:
        for i, task_type in enumerate(task_types):
            await outbox.put(receipt(i, task_type))

    asyncio.run(put_all())


def test_the_batcher_renews_its_claim_before_each_transaction(open_db) -> None:
    """One flush claims 256 receipts of two task types and submits them in four transactions of
    55 s each (inside tx_timeout_s): 220 s in all, far past the 120 s lease. While each
    transaction waits for its receipt another replica tries to claim. It gets nothing: the
    rows in flight and those waiting their turn, even the other task type's, were renewed before
    the transaction. (Renewing nothing, the replica takes over the rows of the last two
    transactions during the third, which is carrying half of them.)"""
    clock, db_a, db_b = Clock(), open_db(), open_db()
    a, b = Outbox(db_a, clock=clock), Outbox(db_b, clock=clock)
    queue_mixed(a, [TASK_TYPE, OTHER_TASK_TYPE] * (2 * MAX_BATCH))
    taken_over: list[str] = []

    async def other_replica(call: str) -> None:
        taken_over.extend(ids(await b.claim(1_000)))

    chain = FakeChain(clock, tx_s=55, meanwhile=other_replica)
    assert asyncio.run(Batcher(chain, a, 50, 2.0).flush_once()) == 4 * MAX_BATCH
    assert taken_over == []
    assert [(tt, len(sent)) for tt, sent in chain.sent] == (
        [(TASK_TYPE, MAX_BATCH)] * 2 + [(OTHER_TASK_TYPE, MAX_BATCH)] * 2
    )
    assert {status for status, _o, _t in stored(db_a).values()} == {"confirmed"}


def test_the_batcher_submits_only_the_rows_it_still_holds(open_db) -> None:
    """A flush claims 64 receipts of one task type and 128 of another, then stalls for 130 s
    after the first transaction (past the lease; say the process was paused) and another
    replica takes over 10 of the rows still waiting. The batcher's renewal finds them gone: the
    next transaction carries the other 54 of its chunk, the last one its full 64, and the 10
    stay the other replica's, to submit once."""
    clock, db_a, db_b = Clock(), open_db(), open_db()
    a, b = Outbox(db_a, clock=clock), Outbox(db_b, clock=clock)
    queue_mixed(a, [TASK_TYPE] * MAX_BATCH + [OTHER_TASK_TYPE] * (2 * MAX_BATCH))
    taken_over: list[str] = []
    reads = 0

    async def stall_then_lose_rows(call: str) -> None:
        nonlocal reads
        if call == "read":
            reads += 1
            if reads == 2:  # the credit-room read of the second task type
                clock.advance(130)
                taken_over.extend(ids(await b.claim(10)))

    chain = FakeChain(clock, tx_s=5, meanwhile=stall_then_lose_rows)
    other = [receipt(i).request_id for i in range(MAX_BATCH, 3 * MAX_BATCH)]
    assert asyncio.run(Batcher(chain, a, 50, 2.0).flush_once()) == 3 * MAX_BATCH - 10
    assert taken_over == other[:10]
    assert chain.sent == [
        (TASK_TYPE, [receipt(i).request_id for i in range(MAX_BATCH)]),
        (OTHER_TASK_TYPE, other[10:MAX_BATCH]),
        (OTHER_TASK_TYPE, other[MAX_BATCH:]),
    ]
    rows = stored(db_a)
    assert [rows[rid] for rid in taken_over] == [("sent", b.owner, 2)] * 10
    assert {rows[rid][0] for rid in rows if rid not in taken_over} == {"confirmed"}


def test_the_batcher_refuses_timeouts_that_outlast_the_lease(tmp_path: Path) -> None:
    """One transaction may take tx_timeout_s + 9 read timeouts between two renewals; that must
    stay 30 s inside the lease, or the rows in flight could be taken over while alive."""
    db = open_database(f"sqlite:///{tmp_path / 'outbox.db'}")
    try:
        chain = FakeChain(Clock(), tx_s=0)
        Batcher(chain, Outbox(db), 50, 2.0)  # the defaults: 78 s of a 120 s lease
        chain.tx_timeout_s = 90.0
        with pytest.raises(ValueError, match=r"tx_timeout_s to at most 72 s"):
            Batcher(chain, Outbox(db), 50, 2.0)
    finally:
        db.close_sync()
