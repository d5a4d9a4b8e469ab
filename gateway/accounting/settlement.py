"""Group-committed settlement: completed requests are settled in batches, after their response.

Why: on the 2-core target machine one SQLite commit costs 50-100 us, more than all the SQL of a
settlement. Settling each request in its own transaction, before its response, put two commits
on every request's critical path. Here the pipeline computes the bill in memory (the same
``min(cost, reservation)`` rule the database applies), answers, and queues the record; a
background task commits everything queued during the last ``delay_ms`` in one transaction, then
hands the committed records to the record sinks (so the receipt outbox of issue 5 only ever sees
records that are durable, each once).

The same commit writes the rate-limit counts of the requests admitted since the last one (the
limit itself is enforced in memory, see :mod:`gateway.accounting.ratelimit`) and each key's last
use, one statement per key.

Safety: a reservation (a carve of the process's budget lease, see
:mod:`gateway.accounting.leases`) stays held until its settlement commits, so the budget bound
holds throughout. The same commit gives each lease back what its settled carves released and,
when that still fits under the cap, holds it again for the requests to come. If the process
dies before a batch commits, those records are lost but their reservations are released by the
sweeper: the keys are never over-charged. Reports call :meth:`SettlementQueue.flush` first, so a
client always reads its own completed requests (unless they wait for a retry, see below).

Failures: a settlement that does not commit (the database locked beyond its busy timeout, a
connection lost, a full disk) is kept in memory and tried again, in submission order, after a
backoff that doubles from ``retry_ms`` to ``retry_max_ms``; its carve stays held meanwhile (a
failed settlement changes nothing, :meth:`~gateway.accounting.store.Store.settle_many` puts its
carves back), so the budget bound keeps holding and the retry bills it as the first try would
have. A batch refused for another reason than the database being unavailable is settled one by
one, so that one bad record does not hold back the others. A settlement that fails
``max_failures`` times, or can provably never commit (another record holds its request id), is
appended to a dead-letter file of JSON lines with the full record, for an operator to replay
(``pura settlements replay``, see :func:`replay_dead_letters`), and logged at ERROR: none is
retried forever silently, none is dropped. While the database is unavailable, new settlements
wait for the next retry instead of each trying on its own (on SQLite each try blocks the event
loop for the busy timeout). :meth:`SettlementQueue.close` tries everything once more and
dead-letters what still fails, so a shutdown during an outage loses nothing; a crash during one
loses what waited for a retry, as it loses the last batch.

A commit whose answer was lost (a connection dropped during COMMIT) is found out when its retry
collides with its own record (the request id is the primary key, so nothing is billed twice):
:meth:`~gateway.accounting.store.Store.find_settled` then counts it as settled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from gateway.accounting.db import SqliteDatabase
from gateway.accounting.records import CompletionRecord, RecordSink
from gateway.accounting.store import Store, now_ms

log = logging.getLogger("pura.settlement")

DEAD_LETTER_NAME = "settlement-dead-letter.jsonl"


@dataclass(frozen=True, slots=True)
class Settlement:
    reservation_id: str | None
    record: CompletionRecord
    cap_micros: int

    @property
    def item(self) -> tuple[str | None, CompletionRecord, int]:
        """What :meth:`Store.settle_many` takes."""
        return (self.reservation_id, self.record, self.cap_micros)


@dataclass(slots=True, eq=False)
class _Pending:
    """A settlement being tried, or waiting for a retry: its place in submission order, how
    many rounds it failed, and the last error (for the dead-letter file)."""

    seq: int
    settlement: Settlement
    failures: int = 0
    error: str = ""


# (committed, failed, can never commit)
_Outcome = tuple[list[_Pending], list[_Pending], list[_Pending]]


def _unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not do any work (locked or busy beyond the
    timeout, disk full or failing, connection lost), not that it refused this work (a
    constraint, a bug). DB-API drivers (sqlite3, psycopg) call the former OperationalError;
    matched by name so that this module need not import psycopg."""
    return any(cls.__name__ == "OperationalError" for cls in type(exc).__mro__)


def default_dead_letter_path(store: Store) -> Path:
    """Next to the SQLite file; in the working directory with PostgreSQL (or in memory)."""
    db = store.db
    if isinstance(db, SqliteDatabase) and db.path != ":memory:":
        return Path(db.path).absolute().parent / DEAD_LETTER_NAME
    return Path(DEAD_LETTER_NAME).absolute()


def _dead_letter_line(pending: _Pending) -> str:
    """One dead-letter entry: what :meth:`Store.settle` needs to replay it, and why it failed.
    Replaying is idempotent (a record already there is billed nothing twice)."""
    s = pending.settlement
    return json.dumps(
        {
            "reservation_id": s.reservation_id,
            "cap_micros": s.cap_micros,
            "record": dataclasses.asdict(s.record),
            "failures": pending.failures,
            "error": pending.error,
            "dead_lettered_ms": now_ms(),
        },
        separators=(",", ":"),
    )


def _append_synced(path: Path, lines: list[str]) -> None:
    """Append ``lines`` to ``path`` and sync. ``pura settlements replay`` claims the file by
    linking it elsewhere and unlinking the name: if that happened while this append had the file
    open, the lines went into the claimed file, possibly after the replay's last read, so they
    are written again under the name (a line replayed twice is reported as already settled the
    second time, never billed twice)."""
    for _ in range(3):
        with path.open("a", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in lines))
            out.flush()
            os.fsync(out.fileno())
            written = os.fstat(out.fileno())
        try:
            if os.path.samestat(written, os.stat(path)):
                return
        except FileNotFoundError:
            pass
    raise OSError(f"{path} keeps being replaced while dead letters are written to it")


class _DeadLetter(BaseModel):
    """A dead-letter line read back, strictly: the record and its attempts are rebuilt as the
    dataclasses :func:`_dead_letter_line` wrote (a field missing, unknown or of another type
    refuses the line, rather than settle something else than what was dead-lettered). The
    failure count, error and time are for the operator; a line edited by hand may drop them."""

    model_config = ConfigDict(strict=True, extra="forbid")

    reservation_id: str | None
    cap_micros: int
    record: CompletionRecord
    failures: int = 0
    error: str = ""
    dead_lettered_ms: int | None = None


def read_dead_letter(line: str | bytes) -> Settlement:
    """The settlement a dead-letter line holds; ValueError (naming the first bad field) if the
    line is not one."""
    try:
        entry = _DeadLetter.model_validate_json(line)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ValueError(f"{where + ': ' if where else ''}{first['msg']}{more}") from None
    return Settlement(entry.reservation_id, entry.record, entry.cap_micros)


ReplayStatus = Literal["replayed", "settled", "failed", "malformed"]


@dataclass(frozen=True, slots=True)
class Replay:
    """What replaying one dead-letter line did: "replayed" (committed now; in a dry run, would
    be), "settled" (its record was already in the database: nothing changed), "failed" (kept
    for another replay) or "malformed" (not a dead-letter line: kept for the operator)."""

    line_no: int
    status: ReplayStatus
    request_id: str | None = None
    cost_micros: int | None = None
    billed_micros: int | None = None
    detail: str = ""


async def replay_dead_letters(
    store: Store, lines: Iterable[tuple[int, str | bytes]], dry_run: bool = False
) -> list[Replay]:
    """Settle each dead-letter line ``(line number, text)`` through :meth:`Store.settle`, in
    order, each in its own transaction (one that fails does not hold back the others).

    Each record is looked up first (:meth:`Store.find_settled`), because :meth:`Store.settle`
    alone cannot tell the cases apart: it bills nothing and writes nothing both for a record
    already settled and for one whose request id another record holds. The first is reported as
    settled, the second as failed (it can never commit as it is). A record settled now is
    billed as the rules say for a settlement whose reservation is not held by this process: a
    reservation row still there is released and the bill clamped to it; otherwise (a lease's
    carve, which lives in the memory of the process that admitted the request) the bill is
    what still fits under the cap, never more, so ``spent + reserved <= cap`` keeps holding
    while that lease is still held. Once the database is found unavailable the remaining
    lines are failed without a try (on SQLite each would wait out the busy timeout).
    ``dry_run``: only look up, settle nothing."""
    results: list[Replay] = []
    down = ""  # the error that found the database unavailable
    for line_no, text in lines:
        try:
            s = read_dead_letter(text)
        except ValueError as exc:
            results.append(Replay(line_no, "malformed", detail=str(exc)))
            continue
        record = s.record
        found = Replay(line_no, "failed", record.request_id, record.cost_micros)
        if down:
            results.append(dataclasses.replace(found, detail=f"not tried: {down}"))
            continue
        try:
            where = await store.find_settled(None, record)
            billed = None
            if where == "absent" and not dry_run:
                billed, _remaining = await store.settle(*s.item)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            if _unavailable(exc):
                down = error
            results.append(dataclasses.replace(found, detail=error))
            continue
        if where == "settled":
            found = dataclasses.replace(found, status="settled")
        elif where == "conflict":
            found = dataclasses.replace(found, detail="another record holds its request id")
        else:
            clamped = billed is not None and billed < record.cost_micros
            found = dataclasses.replace(
                found, status="replayed", billed_micros=billed,
                detail="clamped to what its budget allowed" if clamped else "",
            )
        results.append(found)
    return results


class SettlementQueue:
    def __init__(
        self,
        store: Store,
        sinks: list[RecordSink],
        delay_ms: float = 5.0,
        max_batch: int = 512,
        retry_ms: float = 50.0,
        retry_max_ms: float = 10_000.0,
        max_failures: int = 20,
        dead_letter_path: str | os.PathLike[str] | None = None,
    ) -> None:
        """``retry_ms``: the first backoff after a failed commit, doubled after each failure up
        to ``retry_max_ms``; ``max_failures``: failed tries before a settlement is
        dead-lettered (the defaults retry for about two minutes);
        ``dead_letter_path``: the dead-letter file (default: :func:`default_dead_letter_path`)."""
        if max_failures < 1:
            raise ValueError("max_failures must be >= 1")
        self.store = store
        self.sinks = sinks
        self.delay_s = delay_ms / 1000
        self.max_batch = max_batch
        self.retry_s = retry_ms / 1000
        self.retry_max_s = retry_max_ms / 1000
        self.max_failures = max_failures
        self.dead_letter_path = (
            Path(dead_letter_path) if dead_letter_path is not None else default_dead_letter_path(store)
        )
        self.dead_lettered = 0
        self._items: list[Settlement] = []  # submitted, not tried yet
        self._parked: list[_Pending] = []  # failed, waiting for a retry; in submission order
        self._retry_due = False
        self._retry_timer: asyncio.TimerHandle | None = None
        self._unavailable = False  # the last try found the database unavailable
        self._failed_rounds = 0  # rounds in a row that left something uncommitted
        self._wake = asyncio.Event()
        self._done = asyncio.Condition()
        self._submitted = 0
        self._taken = 0  # submitted settlements taken out of ``_items``
        self._resolved = 0  # ... of which the first try has ended (committed, parked or dead)
        self._closing = False
        self._closed = False  # close() has finished: a late submit is dead-lettered
        self._task: asyncio.Task | None = None
        self._leases_task: asyncio.Task | None = None

    @property
    def health(self) -> dict[str, int]:
        """Settlements waiting for a retry, and dead-lettered since the start (for /health)."""
        return {"retrying": len(self._parked), "dead_lettered": self.dead_lettered}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pura-settlement")
        self._leases_task = asyncio.create_task(self._keep_leases(), name="pura-leases")
        self.store.on_unwritten = self._wake.set

    def submit(self, settlement: Settlement) -> None:
        if self._closed:
            # A request that finished after close() (its task outlived the server's graceful
            # shutdown): nothing will commit it any more, so it goes to the dead-letter file.
            self._taken += 1
            self._dead_letter([_Pending(self._taken - 1, settlement, error="submitted after close")],
                              final=True)
            return
        self._items.append(settlement)
        self._submitted += 1
        self._wake.set()

    async def flush(self) -> None:
        """Return once everything submitted before this call has been tried: committed, or
        parked for a retry because the try failed. So a report does not wait for a database
        that is down (and misses what waits for a retry)."""
        target = self._submitted
        if self._resolved >= target:
            return
        self._wake.set()
        async with self._done:
            await self._done.wait_for(lambda: self._resolved >= target)

    async def close(self) -> None:
        """Stop. What is queued and what waits for a retry is tried once more; what still
        fails is dead-lettered, so a shutdown during an outage loses nothing."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        await asyncio.gather(self._task, return_exceptions=True)  # (ends its round first)
        self._cancel_retry()
        await self._drain()
        self._closed = True  # (no await since the drain saw its queue empty)
        if self._leases_task is not None:
            self._leases_task.cancel()
            await asyncio.gather(self._leases_task, return_exceptions=True)
        self._task = self._leases_task = None
        try:
            await self.store.return_leases()
        except Exception:  # the sweeper releases them after the TTL
            log.exception("returning budget leases failed")

    async def _keep_leases(self) -> None:
        """Give back idle budget leases and keep held ones fresh (see accounting.leases)."""
        while True:
            await asyncio.sleep(self.store.leases.idle_ms / 2000)
            try:
                await self.store.maintain_leases()
            except Exception:
                log.exception("budget lease upkeep failed")

    async def _run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            if self.delay_s > 0 and len(self._items) < self.max_batch:
                await asyncio.sleep(self.delay_s)
            self._wake.clear()
            due = self._retry_due
            retry = self._take_parked() if due else []
            if self._unavailable and not due:
                # Found down at the last try: the new ones wait for the retry round (after
                # everything parked: no sort needed).
                self._parked += self._take_fresh(len(self._items))
                await self._resolve()
                continue
            fresh = self._take_fresh(self.max_batch - len(retry))
            if self._items or self._retry_due:
                self._wake.set()
            # A retry that came due always runs a round, an empty one too: it is the probe that
            # finds the database back. (Without it, an outage whose settlements had all been
            # dead-lettered left the queue "unavailable" with no timer armed, and everything
            # submitted after that waited, untried, for close().)
            if retry or fresh or due or self.store.rates.has_unwritten:
                await self._commit(retry + fresh)

    async def _drain(self) -> None:
        """Try everything left once more, a batch at a time, dead-lettering what fails. Once
        the database is found unavailable the rest is dead-lettered without a try (on SQLite
        each would wait out the busy timeout)."""
        self._unavailable = False
        while self._parked or self._items:
            batch = self._take_parked()
            batch += self._take_fresh(self.max_batch - len(batch))
            if self._unavailable:
                self._dead_letter(batch, final=True)
                await self._resolve()
            else:
                await self._commit(batch, final=True)
        if self.store.rates.has_unwritten and not self._unavailable:
            await self._commit([], final=True)

    def _take_parked(self) -> list[_Pending]:
        self._retry_due = False
        taken, self._parked = self._parked[: self.max_batch], self._parked[self.max_batch :]
        return taken

    def _take_fresh(self, n: int) -> list[_Pending]:
        fresh, self._items = self._items[:n], self._items[n:]
        first, self._taken = self._taken, self._taken + len(fresh)
        return [_Pending(first + i, s) for i, s in enumerate(fresh)]

    def _park(self, entries: list[_Pending]) -> None:
        if entries:
            self._parked = sorted(self._parked + entries, key=lambda p: p.seq)

    async def _resolve(self) -> None:
        """Every settlement taken so far has had its first try: release the flushes."""
        self._resolved = self._taken
        async with self._done:
            self._done.notify_all()

    async def _commit(self, batch: list[_Pending], final: bool = False) -> None:
        """One round: commit ``batch``, park what failed (dead-letter it after ``max_failures``
        tries, or at once if ``final``), then hand what committed to the sinks, in order."""
        durable, failed, doomed = await self._settle(batch)
        for pending in failed + doomed:
            pending.failures += 1
        kept: list[_Pending] = []
        for pending in failed:
            if final or pending.failures >= self.max_failures:
                doomed.append(pending)
            else:
                kept.append(pending)
        kept += self._dead_letter(doomed, final)
        self._park(kept)
        if kept or self._unavailable:
            self._failed_rounds += 1
            self._schedule_retry(self._backoff())
        else:
            self._failed_rounds = 0
            if self._parked and self._retry_timer is None:
                self._schedule_retry(0)  # more parked than one batch took: go on at once
        await self._resolve()
        await self._publish(durable)

    async def _settle(self, batch: list[_Pending]) -> _Outcome:
        """Commit ``batch`` in one transaction, or one by one if that is refused for another
        reason than the database being unavailable: (committed, failed, can never commit)."""
        try:
            await self.store.settle_many([p.settlement.item for p in batch])
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            for pending in batch:
                pending.error = error
            if _unavailable(exc) or not batch:
                log.warning("settlement failed: database unavailable", extra={"fields": {
                    "error": error, "records": len(batch), "retrying": len(self._parked) + len(batch)}})
                self._unavailable = True
                return [], batch, []
            log.exception("batch settlement failed; settling one by one")
            return await self._settle_alone(batch)
        self._unavailable = False
        return batch, [], []

    async def _settle_alone(self, batch: list[_Pending]) -> _Outcome:
        """Settle one by one, so that one bad settlement does not hold back the others; stop at
        the first that finds the database unavailable (the rest would too)."""
        found: dict[str, list[_Pending]] = {"settled": [], "absent": [], "conflict": []}
        for i, pending in enumerate(batch):
            try:
                await self.store.settle(*pending.settlement.item)
            except Exception as exc:
                pending.error = f"{type(exc).__name__}: {exc}"
                where = None if _unavailable(exc) else await self._find(pending)
                if where is None:
                    self._unavailable = True
                    return found["settled"], found["absent"] + batch[i:], found["conflict"]
                found[where].append(pending)
            else:
                found["settled"].append(pending)
        self._unavailable = False
        return found["settled"], found["absent"], found["conflict"]

    async def _find(self, pending: _Pending) -> str | None:
        """After a settlement was refused: whether it had committed all the same, can never
        commit, or neither (see :meth:`Store.find_settled`); None if the database cannot tell."""
        s = pending.settlement
        try:
            where = await self.store.find_settled(s.reservation_id, s.record)
        except Exception:
            return None
        fields = {"request_id": s.record.request_id, "error": pending.error}
        if where == "settled":
            log.warning("settlement had committed after all (its answer was lost)", extra={"fields": fields})
        elif where == "absent":
            log.warning("settlement failed; it is retried", extra={"fields": fields})
        return where

    def _backoff(self) -> float:
        """Doubled for each failed try of the settlement that failed most, or for each round
        that failed in a row (the rate-limit counts alone can fail too)."""
        tries = max([self._failed_rounds, *(p.failures for p in self._parked)])
        return min(self.retry_max_s, self.retry_s * 2 ** max(0, tries - 1))

    def _schedule_retry(self, delay: float) -> None:
        if self._closing:
            return
        self._cancel_retry()
        self._retry_timer = asyncio.get_running_loop().call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry_timer = None
        self._retry_due = True
        self._wake.set()

    def _cancel_retry(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None

    def _dead_letter(self, entries: list[_Pending], final: bool) -> list[_Pending]:
        """Append ``entries`` to the dead-letter file (synced to disk) and log each at ERROR.
        Returns the entries that could not be written, to keep for a retry; at ``final``
        (shutdown) there is no retry, and their lines go to the log as the last resort."""
        if not entries:
            return []
        lines = [_dead_letter_line(p) for p in entries]
        path = self.dead_letter_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _append_synced(path, lines)
        except OSError:
            log.exception("writing the settlement dead-letter file failed",
                          extra={"fields": {"path": str(path)}})
            if not final:
                return entries
            for line in lines:
                log.error("settlement lost, its dead-letter line: %s", line)
            return []
        self.dead_lettered += len(entries)
        for pending in entries:
            log.error(
                "settlement dead-lettered",
                extra={"fields": {
                    "request_id": pending.settlement.record.request_id, "failures": pending.failures,
                    "error": pending.error, "path": str(path),
                }},
            )
        return []

    async def _publish(self, durable: list[_Pending]) -> None:
        for pending in durable:
            for sink in self.sinks:
                try:
                    await sink.publish(pending.settlement.record)
                except Exception:  # a sink must never break settlement
                    log.exception("record sink failed")
