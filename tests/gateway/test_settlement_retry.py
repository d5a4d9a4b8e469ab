"""Settlement while the database fails (gateway.accounting.settlement).

A real :class:`Store` on a temporary SQLite file. Failures are real or made at the store's
transaction call: another connection holding SQLite's write lock (the store's writes then fail
with "database is locked" once their busy timeout, cut to 20 ms here, has run out), or
:class:`Faults`, which fails the store's transactions for a while or loses the answer of one
that committed. What must hold: every record ends up in the database once, billed as the rules
say; the books balance and nothing stays reserved once everything has settled; the sinks see
each record once, only after it is durable; ``flush()`` and ``close()`` return during an outage
and nothing is lost (what cannot be committed is dead-lettered with the full record); and the
budget holds while settlements wait for a retry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.accounting.db import migrate, open_database
from gateway.accounting.records import AttemptRecord, CompletionRecord
from gateway.accounting.settlement import Settlement, SettlementQueue
from gateway.accounting.store import Store
from recordkit import completion_record, locked

T0 = 1_790_000_000_000  # a fixed day
SETTLING = "settle_many"  # (the name of the settlement's transaction script)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


class Faults:
    """Fails the store's transactions on demand, where the store calls its database.

    ``down``: each transaction raises "database is locked" before its script runs, so nothing
    of it happens (what SQLite does when another connection holds the write lock past the busy
    timeout). ``lose_next_answer``: the next transaction commits, then raises (a connection
    dropped during COMMIT: the commit happened, the caller cannot know). ``when``: only the
    transactions whose script's name contains it.
    """

    def __init__(self, store: Store, when: str = "") -> None:
        self.commit = store.db._run
        self.when = when
        self.down = False
        self.lose_next_answer = False
        self.lost = 0
        store.db._run = self._run

    def _run(self, fn: Callable):
        hit = self.when in fn.__qualname__
        if self.down and hit:
            raise sqlite3.OperationalError("database is locked")
        result = self.commit(fn)
        if self.lose_next_answer and hit:
            self.lose_next_answer = False
            self.lost += 1
            raise sqlite3.OperationalError("disk I/O error")
        return result


class DurableSink:
    """Notes each record it is handed, and whether the record was in the database then."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.seen: list[tuple[str, bool]] = []

    async def publish(self, record: CompletionRecord) -> None:
        row = await self.store.db.read(
            lambda tx: tx.one("SELECT 1 FROM usage_records WHERE request_id = ?", (record.request_id,))
        )
        self.seen.append((record.request_id, row is not None))


@pytest.fixture()
def make_store(tmp_path: Path) -> Iterator[Callable[..., Store]]:
    opened = []

    def make(**kwargs) -> Store:
        db = open_database(f"sqlite:///{tmp_path / 'acct.db'}")
        migrate(db)
        db._conn.execute("PRAGMA busy_timeout=20")
        opened.append(db)
        return Store(db, clock=Clock(), **kwargs)

    yield make
    for db in opened:
        db.close_sync()


def make_queue(store: Store, tmp_path: Path, sink: DurableSink, **kwargs) -> SettlementQueue:
    return SettlementQueue(
        store, [sink], delay_ms=1, retry_ms=5, retry_max_ms=40,
        dead_letter_path=tmp_path / "dead.jsonl", **kwargs,
    )


def settlement(key_id: str, rid: str, cost: int, cap: int, reservation_id: str | None = None) -> Settlement:
    return Settlement(reservation_id or rid, completion_record(key_id, rid, cost, T0), cap)


async def admit(store: Store, raw: str, rid: str, reserve: int) -> None:
    assert (await store.admit(raw, reserve, rid)).status == "ok"


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def recorded(store: Store) -> dict[str, int]:
    """request id -> billed, read while writes may be failing."""
    rows = await store.db.read(lambda tx: tx.all("SELECT request_id, billed_micros FROM usage_records"))
    return dict(rows)


async def books(store: Store, key_id: str) -> tuple[int, int]:
    """(spent, reserved) of the key's day, read while writes may be failing."""
    row = await store.db.read(
        lambda tx: tx.one("SELECT spent_micros, reserved_micros FROM budget_days WHERE key_id = ?", (key_id,))
    )
    return (int(row[0]), int(row[1])) if row else (0, 0)


def billed(store: Store) -> dict[str, int]:
    return dict(store.db.run_sync(lambda tx: tx.all("SELECT request_id, billed_micros FROM usage_records")))


def held(store: Store, key_id: str) -> tuple[int, int]:
    return asyncio.run(books(store, key_id))


def dead_letters(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "dead.jsonl").read_text("utf-8").splitlines()]


def replayable(line: dict) -> Settlement:
    """A dead-letter line back into the settlement it was: everything needed is in the file."""
    record = line["record"]
    attempts = tuple(AttemptRecord(**a) for a in record["attempts"])
    record = CompletionRecord(**{**record, "attempts": attempts})
    return Settlement(line["reservation_id"], record, line["cap_micros"])


class Errors(logging.Handler):
    """ERROR lines of the settlement's logger (whatever the ``pura`` tree's configuration)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record)

    def dead_lettered(self) -> list[str]:
        return [e.fields["request_id"] for e in self.lines if e.msg == "settlement dead-lettered"]

    def __enter__(self) -> Errors:
        logging.getLogger("pura.settlement").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("pura.settlement").removeHandler(self)


# ---------------------------------------------------------------------------------------------


def test_settlements_that_fail_in_an_outage_commit_in_order_once_it_ends(make_store, tmp_path: Path) -> None:
    store = make_store(lease_factor=4)
    raw, info = store.create_key_sync("", 100_000, 1_000_000)
    sink = DurableSink(store)
    queue = make_queue(store, tmp_path, sink)
    costs = {f"req_{i:02d}": 50 + i for i in range(30)}
    rids = list(costs)

    async def scenario() -> None:
        queue.start()
        for rid in rids:
            await admit(store, raw, rid, 100)
        for rid in rids[:10]:
            queue.submit(settlement(info.id, rid, costs[rid], 100_000))
        await queue.flush()
        await until(lambda: len(sink.seen) == 10)
        with locked(store.db.path):
            for rid in rids[10:]:
                queue.submit(settlement(info.id, rid, costs[rid], 100_000))
            await asyncio.wait_for(queue.flush(), 5)  # tried once, failed: parked, not waited for
            assert queue.health == {"retrying": 20, "dead_lettered": 0}
            await asyncio.sleep(0.2)  # retried meanwhile, and failed again
            assert queue.health["retrying"] == 20 and len(sink.seen) == 10
            assert set(await recorded(store)) == set(rids[:10])
        await until(lambda: queue.health["retrying"] == 0)
        await queue.close()

    asyncio.run(scenario())
    assert sink.seen == [(rid, True) for rid in rids]  # each once, once durable, in order
    assert billed(store) == costs
    assert held(store, info.id) == (sum(costs.values()), 0)  # the leases went back
    assert queue.health == {"retrying": 0, "dead_lettered": 0}
    assert not (tmp_path / "dead.jsonl").exists()


def test_close_during_an_outage_dead_letters_everything_for_replay(make_store, tmp_path: Path) -> None:
    store = make_store()
    raw, info = store.create_key_sync("", 100_000, 1_000_000)
    sink = DurableSink(store)
    queue = make_queue(store, tmp_path, sink)
    costs = {f"req_{i:02d}": 70 + i for i in range(12)}
    submitted = [settlement(info.id, rid, cost, 100_000) for rid, cost in costs.items()]

    async def scenario() -> None:
        queue.start()
        for rid in costs:
            await admit(store, raw, rid, 100)
        with locked(store.db.path):
            for s in submitted:
                queue.submit(s)
            await asyncio.wait_for(queue.flush(), 5)
            await asyncio.wait_for(queue.close(), 5)  # shutdown while the database is down

    asyncio.run(scenario())
    assert sink.seen == [] and billed(store) == {}
    assert queue.health == {"retrying": 0, "dead_lettered": 12}
    lines = dead_letters(tmp_path)
    assert [replayable(line) for line in lines] == submitted  # the full records, in order
    assert all(line["error"].startswith("OperationalError: database is locked") for line in lines)
    # The operator replays the file: the carves were still held, so each is billed as it would
    # have been; replaying again bills nothing twice.
    for line in lines:
        asyncio.run(store.settle(*replayable(line).item))
    assert billed(store) == costs
    assert asyncio.run(store.settle(*replayable(lines[0]).item))[0] == 0
    asyncio.run(store.return_leases())
    assert held(store, info.id) == (sum(costs.values()), 0)


def test_a_commit_whose_answer_was_lost_is_billed_once(make_store, tmp_path: Path) -> None:
    store = make_store(lease_factor=4)
    raw, info = store.create_key_sync("", 100_000, 1_000_000)
    faults = Faults(store, when=SETTLING)
    sink = DurableSink(store)
    queue = make_queue(store, tmp_path, sink)
    costs = {f"req_{i}": 60 + i for i in range(8)}

    async def scenario() -> None:
        queue.start()
        for rid in costs:
            await admit(store, raw, rid, 100)
        faults.lose_next_answer = True
        for rid, cost in costs.items():
            queue.submit(settlement(info.id, rid, cost, 100_000))
        await until(lambda: len(sink.seen) == len(costs))
        await queue.close()

    asyncio.run(scenario())
    assert faults.lost == 1
    assert sink.seen == [(rid, True) for rid in costs]
    assert billed(store) == costs
    # nothing released twice: once the leases are back nothing is held
    assert held(store, info.id) == (sum(costs.values()), 0)
    assert store.db.run_sync(lambda tx: tx.all("SELECT id FROM reservations")) == []
    assert queue.health == {"retrying": 0, "dead_lettered": 0}


def test_a_record_whose_request_id_is_taken_is_dead_lettered_at_once(make_store, tmp_path: Path) -> None:
    store = make_store()
    raw, info = store.create_key_sync("", 100_000, 1_000_000)
    sink = DurableSink(store)
    queue = make_queue(store, tmp_path, sink)

    async def scenario() -> None:
        await admit(store, raw, "req_dup", 100)
        await store.settle("req_dup", completion_record(info.id, "req_dup", 100, T0), 100_000)
        queue.start()
        for rid in ("res_b", "req_1", "req_2"):
            await admit(store, raw, rid, 200)
        # a bug gives another request the same request id: it can never commit
        queue.submit(settlement(info.id, "req_dup", 150, 100_000, reservation_id="res_b"))
        queue.submit(settlement(info.id, "req_1", 110, 100_000))
        queue.submit(settlement(info.id, "req_2", 120, 100_000))
        with Errors() as errors:
            await until(lambda: queue.health["dead_lettered"] == 1 and len(sink.seen) == 2)
        assert errors.dead_lettered() == ["req_dup"]
        await queue.close()

    asyncio.run(scenario())
    (line,) = dead_letters(tmp_path)
    assert line["reservation_id"] == "res_b" and line["record"]["cost_micros"] == 150
    assert line["failures"] == 1 and line["error"].startswith("IntegrityError")
    assert billed(store) == {"req_dup": 100, "req_1": 110, "req_2": 120}  # the first one untouched
    assert sink.seen == [("req_1", True), ("req_2", True)]
    # its carve stays held (neither billed nor released) until the carve TTL, as any unsettled one
    assert held(store, info.id) == (330, 200)


def test_a_record_that_keeps_failing_is_dead_lettered_after_max_failures(make_store, tmp_path: Path) -> None:
    store = make_store()
    raw, info = store.create_key_sync("", 100_000, 1_000_000)
    sink = DurableSink(store)
    queue = make_queue(store, tmp_path, sink, max_failures=4)

    async def scenario() -> None:
        queue.start()
        for rid in ("req_0", "req_bad", "req_2"):
            await admit(store, raw, rid, 100)
        queue.submit(settlement(info.id, "req_0", 10, 100_000))
        queue.submit(settlement(info.id, "req_bad", 2**63, 100_000))  # more than SQLite stores
        queue.submit(settlement(info.id, "req_2", 20, 100_000))
        with Errors() as errors:
            await until(lambda: queue.health["dead_lettered"] == 1)
        assert errors.dead_lettered() == ["req_bad"]
        assert queue.health["retrying"] == 0
        await queue.close()

    asyncio.run(scenario())
    (line,) = dead_letters(tmp_path)
    assert line["record"]["request_id"] == "req_bad" and line["record"]["cost_micros"] == 2**63
    assert line["failures"] == 4 and line["error"].startswith("OverflowError")
    assert billed(store) == {"req_0": 10, "req_2": 20}
    assert sink.seen == [("req_0", True), ("req_2", True)]


def test_a_retry_after_the_carve_ttl_bills_what_still_fits_once(make_store, tmp_path: Path) -> None:
    """A settlement still waiting for a retry when its carve is abandoned (past the carve TTL,
    its lease given back) is billed like one whose reservation the sweeper released: what
    still fits under the cap, once."""
    store = make_store(lease_carve_ttl_ms=1_000)
    raw, info = store.create_key_sync("", 1_000, 1_000_000)
    faults = Faults(store, when=SETTLING)
    sink = DurableSink(store)
    queue = make_queue(store, tmp_path, sink)

    async def scenario() -> None:
        queue.start()
        await admit(store, raw, "req_slow", 300)
        faults.down = True
        queue.submit(settlement(info.id, "req_slow", 250, 1_000))
        await queue.flush()
        assert queue.health["retrying"] == 1
        store.clock.now += 2_000
        await store.maintain_leases()  # its carve is abandoned, the idle lease goes back
        assert not store.leases.carves and await books(store, info.id) == (0, 0)
        await admit(store, raw, "req_next", 900)  # ... and the budget is taken by another
        queue.submit(settlement(info.id, "req_next", 900, 1_000))
        faults.down = False
        await until(lambda: len(sink.seen) == 2)
        await queue.close()

    asyncio.run(scenario())
    # in order: req_slow first, while req_next's 900 is still reserved: 100 fits, not 250
    assert billed(store) == {"req_slow": 100, "req_next": 900}
    assert sink.seen == [("req_slow", True), ("req_next", True)]
    assert asyncio.run(store.settle(None, completion_record(info.id, "req_slow", 250, T0), 1_000))[0] == 0
    assert held(store, info.id) == (1_000, 0)


def test_the_budget_holds_while_settlements_wait_for_a_retry(make_store, tmp_path: Path) -> None:
    """Waves of concurrent requests against a small cap while the settlements' transactions
    fail on and off: at every moment the budget spent plus what the admitted requests not yet
    durable hold stays under the cap (their carves stay held while they wait, so the cap
    refuses new requests instead), and in the end every admitted request is billed once,
    exactly as its reservation allows."""
    cap = 5_000
    store = make_store(lease_factor=4)
    raw, info = store.create_key_sync("", cap, 1_000_000)
    faults = Faults(store, when=SETTLING)
    sink = DurableSink(store)
    queue = make_queue(store, tmp_path, sink, max_failures=10_000)
    rng = random.Random(20240611)
    reserved: dict[str, int] = {}  # admitted request -> its reservation
    costs: dict[str, int] = {}
    most_waiting = [0]
    refused = [0]

    async def request(rid: str) -> None:
        reserve = rng.randint(100, 400)
        admission = await store.admit(raw, reserve, rid)
        if admission.status != "ok":
            assert admission.status == "budget_exhausted"
            refused[0] += 1
            return
        reserved[rid] = reserve
        await asyncio.sleep(rng.random() * 0.01)  # the upstream call
        cost = rng.randint(reserve, reserve + 50) if rng.random() < 0.1 else rng.randint(0, reserve // 2)
        costs[rid] = cost
        queue.submit(settlement(info.id, rid, cost, cap))

    async def storm(stop: asyncio.Event) -> None:
        while not stop.is_set():
            faults.down = rng.random() < 0.6
            await asyncio.sleep(rng.random() * 0.02)
        faults.down = False

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            spent, held_now = await books(store, info.id)
            durable = await recorded(store)
            waiting = sum(r for rid, r in reserved.items() if rid not in durable)
            assert spent + held_now <= cap and spent + waiting <= cap
            most_waiting[0] = max(most_waiting[0], queue.health["retrying"])
            await asyncio.sleep(0.002)

    async def scenario() -> None:
        queue.start()
        stop = asyncio.Event()
        side = [asyncio.create_task(storm(stop)), asyncio.create_task(watch(stop))]
        for wave in range(25):
            await asyncio.gather(*(request(f"req_{wave:02d}_{i:02d}") for i in range(16)))
        stop.set()
        await asyncio.gather(*side)
        await until(lambda: len(sink.seen) == len(reserved))
        await queue.close()

    asyncio.run(scenario())
    # settlements did wait for retries, and the cap did refuse requests meanwhile
    assert most_waiting[0] > 0 and refused[0] > 0 and reserved
    expected = {rid: min(cost, reserved[rid]) for rid, cost in costs.items()}
    assert billed(store) == expected  # every admitted request once, clamped to its reservation
    assert sorted(sink.seen) == sorted((rid, True) for rid in reserved)
    spent, held_after = held(store, info.id)
    assert spent == sum(expected.values()) <= cap and held_after == 0
    assert queue.health == {"retrying": 0, "dead_lettered": 0}


def test_after_an_outage_that_dead_lettered_everything_new_settlements_commit(make_store, tmp_path: Path) -> None:
    """An outage long enough to dead-letter every waiting settlement left nothing to retry;
    the queue must still find the database back (the due retry runs an empty round as a
    probe) instead of parking everything submitted afterwards, untried, until close()."""
    store = make_store(lease_factor=0)
    raw, info = store.create_key_sync("", 100_000, 1_000_000)
    sink = DurableSink(store)
    faults = Faults(store)

    async def scenario() -> None:
        queue = make_queue(store, tmp_path, sink, max_failures=2)
        queue.start()
        await admit(store, raw, "req_before", 500)
        await admit(store, raw, "req_after", 500)
        # the rate counts get written: from then on nothing but settlements makes a round run
        await until(lambda: not store.rates.has_unwritten)
        faults.down = True
        queue.submit(settlement(info.id, "req_before", 300, 100_000))
        await until(lambda: queue.dead_lettered == 1)
        await asyncio.sleep(0.1)  # the retry timer fires with nothing parked
        faults.down = False
        queue.submit(settlement(info.id, "req_after", 200, 100_000))
        await until(lambda: ("req_after", True) in sink.seen, timeout_s=5)
        assert queue.health == {"retrying": 0, "dead_lettered": 1}
        await queue.close()
        # a request that ends after close() is dead-lettered, not lost
        await admit(store, raw, "req_late", 500)
        queue.submit(settlement(info.id, "req_late", 100, 100_000))

    asyncio.run(scenario())
    assert billed(store) == {"req_after": 200}
    assert [line["record"]["request_id"] for line in dead_letters(tmp_path)] == ["req_before", "req_late"]
    assert dead_letters(tmp_path)[1]["error"] == "submitted after close"
