"""Budget leases (gateway.accounting.leases): unit tests and a stateful machine.

The machine drives two processes (two stores, each with its own connection and lease book) on
one SQLite file through admissions, escalations, settlements (twice, too), sweeps, idle
returns, a lowered cap and the clock, and after every step checks the books to the micro-USD:
the day's ``reserved`` equals what the reservation rows hold, every lease's row holds exactly
what the process believes, no process carved more than its leases hold, ``spent`` equals what
the records billed and never passes the cap, and once everything has settled and the leases are
back nothing stays reserved.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gateway.accounting.db import open_database, migrate
from gateway.accounting.records import CompletionRecord
from gateway.accounting.store import Store, utc_day
from recordkit import completion_record

LONG = os.environ.get("PURA_HYPOTHESIS_PROFILE") == "long"
T0 = 1_790_000_000_000  # a fixed day; the machine stays well inside it


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def record(key_id: str, rid: str, cost: int) -> CompletionRecord:
    return completion_record(key_id, rid, cost, T0)

@pytest.fixture()
def two(tmp_path: Path):
    """Two processes' stores on one SQLite file, a shared fake clock and a key."""
    url = f"sqlite:///{tmp_path / 'leases.db'}"
    dbs = [open_database(url) for _ in range(2)]
    migrate(dbs[0])
    clock = Clock()
    stores = [Store(db, clock=clock, lease_factor=4) for db in dbs]
    raw, info = stores[0].create_key_sync("", 10_000, 1_000_000)
    yield stores, clock, raw, info
    for db in dbs:
        db.close_sync()


def held(store: Store, key_id: str) -> tuple[int, int]:
    return asyncio.run(store.budget_state(key_id))


def rows(store: Store) -> dict[str, int]:
    return dict(store.db.run_sync(lambda tx: tx.all("SELECT id, amount_micros FROM reservations")))


def test_after_the_first_request_admissions_write_nothing(two) -> None:
    (a, _b), _clock, raw, info = two
    first = asyncio.run(a.admit(raw, 100, "req_1"))
    # grown by 100 + 4 x 100 (a quarter of what is left is more)
    assert first.status == "ok" and held(a, info.id) == (0, 500)
    before = rows(a)
    for i in range(2, 6):
        assert asyncio.run(a.admit(raw, 100, f"req_{i}")).status == "ok"
    assert rows(a) == before and held(a, info.id) == (0, 500)  # carved in memory only
    assert asyncio.run(a.admit(raw, 100, "req_6")).status == "ok"  # the lease was full: grows
    assert held(a, info.id) == (0, 1_000)
    # the headers' remaining: cap - spent - held + this process's unused lease
    assert asyncio.run(a.admit(raw, 100, "req_7")).budget_remaining_micros == 10_000 - 700


def test_settlement_refills_the_lease_and_an_idle_lease_goes_back(two) -> None:
    (a, _b), clock, raw, info = two
    for i in range(3):
        asyncio.run(a.admit(raw, 100, f"req_{i}"))
    assert held(a, info.id) == (0, 500)
    asyncio.run(a.settle_many([(f"req_{i}", record(info.id, f"req_{i}", 40), 10_000) for i in range(3)]))
    assert held(a, info.id) == (120, 500)  # billed 3 x 40; the lease holds its 500 again
    clock.now += 999
    asyncio.run(a.maintain_leases())
    assert held(a, info.id) == (120, 500)  # not idle long enough
    clock.now += 1
    asyncio.run(a.maintain_leases())
    assert held(a, info.id) == (120, 0) and rows(a) == {}


def test_revocation_and_a_lowered_cap_apply_to_the_next_carve(two) -> None:
    (a, b), _clock, raw, info = two
    asyncio.run(a.admit(raw, 100, "req_1"))  # a holds 500, 400 of it free
    b.set_limits_sync(info.id, 450, None)  # another process lowers the cap below what a holds
    refused = asyncio.run(a.admit(raw, 100, "req_2"))
    assert refused.status == "budget_exhausted"
    b.set_limits_sync(info.id, 10_000, None)
    assert asyncio.run(a.admit(raw, 100, "req_3")).status == "ok"
    b.revoke_key_sync(info.id)
    assert asyncio.run(a.admit(raw, 100, "req_4")).status == "unauthorized"
    # the revoked key's lease is retired and goes back once its carves have settled
    asyncio.run(a.settle_many([(r, record(info.id, r, 10), 10_000) for r in ("req_1", "req_3")]))
    asyncio.run(a.maintain_leases())
    assert held(a, info.id) == (20, 0) and rows(a) == {}


def test_a_swept_lease_bills_its_carves_at_most_what_they_carved_and_releases_nothing_twice(two) -> None:
    (a, _b), clock, raw, info = two
    asyncio.run(a.admit(raw, 100, "req_1"))
    asyncio.run(a.admit(raw, 300, "req_2"))
    assert held(a, info.id) == (0, 500)
    clock.now += 2_000
    assert asyncio.run(a.release_stale(1_000)) == 1  # this process stalled past the TTL
    assert held(a, info.id) == (0, 0)
    results = asyncio.run(a.settle_many([
        ("req_1", record(info.id, "req_1", 90), 10_000),
        ("req_2", record(info.id, "req_2", 700), 10_000),  # clamped to its carve, as before
    ]))
    assert [billed for billed, _ in results] == [90, 300]
    assert held(a, info.id) == (390, 0)
    assert asyncio.run(a.admit(raw, 100, "req_3")).status == "ok"  # a new lease
    assert held(a, info.id) == (390, 500) and len(rows(a)) == 1


def test_a_lease_in_use_is_kept_fresh_for_the_sweeper_until_the_ttl(two) -> None:
    (a, _b), clock, raw, info = two
    asyncio.run(a.admit(raw, 100, "req_long"))  # a request that runs for a long time
    for _ in range(14):
        clock.now += 60_000
        asyncio.run(a.maintain_leases())
        assert asyncio.run(a.release_stale(900_000)) == 0
    assert held(a, info.id) == (0, 500)
    # Past the sweeper's TTL an unsettled request stops holding its lease (as its reservation
    # row was swept before leases): a request that never settles cannot pin the budget.
    clock.now += 120_000
    asyncio.run(a.maintain_leases())
    assert held(a, info.id) == (0, 0) and not a.leases.carves
    # if it settles after all, it is billed what still fits, never more than it cost
    billed, _ = asyncio.run(a.settle("req_long", record(info.id, "req_long", 80), 10_000))
    assert billed == 80 and held(a, info.id) == (80, 0)


def test_free_requests_keep_their_lease_fresh_and_alive(two) -> None:
    """Zero-amount carves (a free model) still reset the lease row's age at settlement, and an
    open zero carve keeps the lease from being given back under it (an escalation needs it)."""
    (a, _b), clock, raw, info = two
    asyncio.run(a.admit(raw, 100, "paid"))
    asyncio.run(a.settle("paid", record(info.id, "paid", 0), 10_000))
    for i in range(20):  # 20 minutes of free requests, one a minute
        clock.now += 60_000
        asyncio.run(a.admit(raw, 0, f"free_{i}"))
        asyncio.run(a.settle(f"free_{i}", record(info.id, f"free_{i}", 0), 10_000))
        assert asyncio.run(a.release_stale(900_000)) == 0
    assert held(a, info.id) == (0, 500)
    asyncio.run(a.admit(raw, 0, "free_slow"))  # a free request whose upstream takes 2 s ...
    clock.now += 2_000
    asyncio.run(a.maintain_leases())
    assert asyncio.run(a.extend("free_slow", 300, 10_000)) is not None  # ... then escalates


def test_a_client_gone_while_its_lease_grows_leaves_the_grow_to_the_lease(two) -> None:
    """PostgreSQL runs the grow on a worker thread, which commits even if the request that
    asked for it is cancelled meanwhile (its client went away): the grown amount must belong
    to the lease (given back later), and nothing stays carved for the cancelled request."""
    (a, _b), _clock, raw, info = two
    assert asyncio.run(a.admit(raw, 0, "req_warm")).status == "ok"  # the key is cached now
    asyncio.run(a.settle("req_warm", record(info.id, "req_warm", 0), 10_000))
    run = a.db.run

    def commit_later(fn):
        time.sleep(0.05)  # the transaction is in flight ...
        return a.db.run_sync(fn)

    async def slow_run(fn):  # like PostgreSQL's: a worker thread that is not cancelled
        return await asyncio.get_running_loop().run_in_executor(None, commit_later, fn)

    a.db.run = slow_run

    async def scenario() -> None:
        task = asyncio.ensure_future(a.admit(raw, 100, "req_gone", alone=True))
        await asyncio.sleep(0.01)
        task.cancel()  # ... when the client goes away
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)  # the grow commits anyway

    asyncio.run(scenario())
    (lease,) = a.leases.leases.values()
    assert lease.total == 500 and lease.used == 0 and lease.growing == 0 and not a.leases.carves
    assert held(a, info.id) == (0, 500) and rows(a) == {lease.row_id: 500}
    a.db.run = run
    asyncio.run(a.return_leases())
    assert held(a, info.id) == (0, 0) and rows(a) == {}


class LeaseMachine(RuleBasedStateMachine):
    """Two processes sharing a key through leases; the books checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"pura-leases-{os.getpid()}-{id(self)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dbs = []

    @initialize(factor=st.sampled_from([0, 1, 4, 16]), cap=st.integers(0, 3_000))
    def setup(self, factor: int, cap: int) -> None:
        url = f"sqlite:///{self.dir / 'm.db'}"
        self.dbs = [open_database(url) for _ in range(2)]
        migrate(self.dbs[0])
        self.clock = Clock()
        self.stores = [
            Store(db, clock=self.clock, lease_factor=factor, lease_carve_ttl_ms=6_000)
            for db in self.dbs
        ]
        self.raw, self.info = self.stores[0].create_key_sync("", cap, 1_000_000)
        self.caps = [cap]
        self.open: dict[str, tuple[int, int]] = {}  # request -> (store, reserved)
        self.abandoned: dict[str, tuple[int, int]] = {}  # unsettled past the carve TTL
        self.closed: list[tuple[int, str]] = []  # settled requests, to settle again
        self.billed = 0
        self.n = 0
        self.swept: set[str] = set()
        self.holdings = 0

    def teardown(self) -> None:
        for db in self.dbs:
            db.close_sync()
        for f in self.dir.glob("*"):
            f.unlink()
        self.dir.rmdir()

    @rule(who=st.integers(0, 1), amount=st.integers(0, 400))
    def admit(self, who: int, amount: int) -> None:
        self.n += 1
        rid = f"req_{self.n:06d}"
        adm = asyncio.run(self.stores[who].admit(self.raw, amount, rid))
        assert adm.status in ("ok", "budget_exhausted")
        if adm.status == "ok":
            self.open[rid] = (who, amount)
            assert adm.budget_remaining_micros is not None and adm.budget_remaining_micros >= 0

    @precondition(lambda self: self.open)
    @rule(data=st.data(), extra=st.integers(0, 300))
    def escalate(self, data, extra: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.open)))
        who, amount = self.open[rid]
        left = asyncio.run(self.stores[who].extend(rid, extra, self.caps[-1]))
        if left is not None:
            self.open[rid] = (who, amount + extra)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), n=st.integers(1, 4), over=st.integers(0, 150))
    def settle(self, data, n: int, over: int) -> None:
        """Settle up to ``n`` requests of one process in one batch (costs up to 150 over)."""
        who = data.draw(st.integers(0, 1))
        mine = sorted(r for r, (w, _a) in self.open.items() if w == who)
        if not mine:
            return
        batch = data.draw(st.lists(st.sampled_from(mine), min_size=1, max_size=n, unique=True))
        items = []
        for rid in batch:
            _w, amount = self.open.pop(rid)
            cost = data.draw(st.integers(0, amount + over))
            items.append((rid, record(self.info.id, rid, cost), self.caps[-1]))
            self.closed.append((who, rid))
        results = asyncio.run(self.stores[who].settle_many(items))
        for (_rid, rec, _cap), (billed, _left) in zip(items, results):
            assert 0 <= billed <= rec.cost_micros
            self.billed += billed

    @precondition(lambda self: self.closed)
    @rule(data=st.data())
    def settle_again(self, data) -> None:
        who, rid = data.draw(st.sampled_from(self.closed))
        billed, _ = asyncio.run(self.stores[who].settle(rid, record(self.info.id, rid, 50), self.caps[-1]))
        assert billed == 0

    @rule(ms=st.integers(0, 3_000))
    def tick(self, ms: int) -> None:
        self.clock.now += ms

    @rule(who=st.integers(0, 1))
    def maintain(self, who: int) -> None:
        asyncio.run(self.stores[who].maintain_leases())
        for rid, (w, amount) in list(self.open.items()):
            if w == who and rid not in self.stores[who].leases.carves:  # past the carve TTL
                self.abandoned[rid] = self.open.pop(rid)

    @precondition(lambda self: self.abandoned)
    @rule(data=st.data())
    def settle_abandoned(self, data) -> None:
        """A request that outlived the carve TTL settles after all: never billed more than it
        cost, nor more than the cap has left."""
        rid = data.draw(st.sampled_from(sorted(self.abandoned)))
        who, amount = self.abandoned.pop(rid)
        cost = data.draw(st.integers(0, amount + 50))
        billed, _ = asyncio.run(self.stores[who].settle(rid, record(self.info.id, rid, cost), self.caps[-1]))
        assert 0 <= billed <= cost
        self.billed += billed
        self.closed.append((who, rid))

    @rule(who=st.integers(0, 1), ttl=st.integers(500, 5_000))
    def sweep(self, who: int, ttl: int) -> None:
        before = set(rows(self.stores[0]))
        asyncio.run(self.stores[who].release_stale(ttl))
        self.swept |= before - set(rows(self.stores[0]))

    @rule(who=st.integers(0, 1), cap=st.integers(0, 3_000))
    def set_cap(self, who: int, cap: int) -> None:
        self.stores[who].set_limits_sync(self.info.id, cap, None)
        self.caps.append(cap)

    @invariant()
    def books_balance(self) -> None:
        if not self.dbs:
            return
        day = utc_day(self.clock.now)
        spent, reserved = held(self.stores[0], self.info.id)
        in_rows = rows(self.stores[0])
        assert reserved == sum(in_rows.values()) and min(in_rows.values(), default=0) >= 0
        assert spent == self.billed
        # holdings only grow through the conditional hold, so whenever they grew they fit
        # under the cap of the moment (a lowered cap can leave older holdings above it)
        if spent + reserved > self.holdings:
            assert spent + reserved <= self.caps[-1]
        self.holdings = spent + reserved
        for store in self.stores:
            book = store.leases
            for lease in (*book.leases.values(), *book.retired):
                assert lease.key_id == self.info.id and lease.day == day
                assert 0 <= lease.used and lease.growing == 0
                carved = sum(c.amount for c in book.carves.values() if c.lease is lease)
                assert carved == lease.used
                if not lease.lost:
                    assert lease.used <= lease.total
                    if lease.row_id in in_rows:  # the row holds what the process believes ...
                        assert in_rows[lease.row_id] == lease.total
                    else:  # ... or a sweeper took it (found out at the next write) or it holds 0
                        assert lease.total == 0 or lease.row_id in self.swept
        # every open request is carved for exactly what it reserved
        for rid, (who, amount) in self.open.items():
            carve = self.stores[who].leases.carves.get(rid)
            assert carve is not None and carve.amount == amount

    @rule()
    def drain(self) -> None:
        """Everything settles and the leases go back: nothing stays held."""
        for rid, (who, amount) in sorted({**self.open, **self.abandoned}.items()):
            billed, _ = asyncio.run(
                self.stores[who].settle(rid, record(self.info.id, rid, amount), self.caps[-1])
            )
            self.billed += billed
            self.closed.append((who, rid))
        self.open.clear()
        self.abandoned.clear()
        for store in self.stores:
            asyncio.run(store.return_leases())
        spent, reserved = held(self.stores[0], self.info.id)
        assert reserved == 0 and rows(self.stores[0]) == {} and spent == self.billed
        for store in self.stores:
            assert not store.leases.carves and not store.leases.leases and not store.leases.retired


TestLeaseMachine = LeaseMachine.TestCase
TestLeaseMachine.settings = settings(
    max_examples=2000 if LONG else 150, stateful_step_count=60 if LONG else 40,
    deadline=None, database=None,
)
