"""The durable receipt outbox, in the gateway's own database (SQLite or PostgreSQL).

A receipt row is committed, with both signatures, before the answer leaves the gateway, so
a crash at any later point loses nothing: on restart the batcher finds the row and submits
it. Resubmitting a receipt that already landed is harmless: CompletionTracker rejects the
nonce as replayed, and the batcher reads that as confirmation (only this source can sign its
nonces, so a replayed nonce of ours was recorded by an earlier transaction of ours).

Status: ``queued`` -> ``sent`` (claimed by a batcher) -> ``confirmed`` | ``rejected`` (with
the tracker's reason, and the hash of the transaction that settled it). A ``not funded``
rejection is not final: the row goes back to ``queued`` until the funding catches up or the
deadline passes.

Several replicas share the table on PostgreSQL. A claim hands each row to exactly one batcher
and stamps it with that outbox's random id (``claimed_by``); the claim is a lease of
``reclaim_after_ms``: a ``sent`` row older than that is taken over by the next claim, by any
replica, which is how the rows of a batcher that died come back. A live batcher keeps its
rows by renewing the lease (:meth:`Outbox.renew`) before each transaction. See
:meth:`Outbox.recover` for what a starting process does with rows left ``sent``.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

from gateway.accounting.db import PostgresDatabase, SqliteDatabase, Tx
from gateway.accounting.store import now_ms

NONCE_BLOCK = 256  # one tracker bitmap word


@dataclass(frozen=True, slots=True)
class OutboxRow:
    request_id: str
    provider: str
    task_type: str
    sink: str
    source: str
    task_id: str
    amount: int
    response_hash: str
    nonce: int
    deadline: int
    sink_sig: str
    source_sig: str
    status: str = "queued"
    reason: int | None = None
    tx_hash: str | None = None
    tries: int = 0
    created_ms: int = 0
    chain_ts: int = 0

    def call_arg(self) -> tuple:
        """One entry of CompletionTracker.submit_receipts."""
        return (
            self.sink,
            self.source,
            bytes.fromhex(self.task_id.removeprefix("0x")),
            self.amount,
            bytes.fromhex(self.response_hash.removeprefix("0x")),
            self.nonce,
            self.deadline,
            bytes.fromhex(self.sink_sig.removeprefix("0x")),
            bytes.fromhex(self.source_sig.removeprefix("0x")),
        )


_COLUMNS = (
    "request_id, provider, task_type, sink, source, task_id, amount, response_hash, nonce, deadline, "
    "sink_sig, source_sig, status, reason, tx_hash, tries, created_ms, chain_ts"
)


def _row(r: tuple) -> OutboxRow:
    return OutboxRow(
        request_id=r[0], provider=r[1], task_type=r[2], sink=r[3], source=r[4], task_id=r[5],
        amount=int(r[6]), response_hash=r[7], nonce=int(r[8]), deadline=int(r[9]), sink_sig=r[10],
        source_sig=r[11], status=r[12], reason=r[13], tx_hash=r[14], tries=int(r[15]), created_ms=int(r[16]),
        chain_ts=int(r[17]),
    )


class Outbox:
    def __init__(self, db: SqliteDatabase | PostgresDatabase, reclaim_after_ms: int = 120_000,
                 clock: Callable[[], int] = now_ms) -> None:
        self.db = db
        self.reclaim_after_ms = reclaim_after_ms
        self.clock = clock  # wall-clock ms: leases are compared across replicas
        self.owner = secrets.token_hex(8)  # claimed_by of this process's claims
        self._nonces: dict[str, list[int]] = {}  # source -> [next, end) of the block in hand
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ nonces

    async def next_nonce(self, source: str) -> int:
        """A nonce never handed out before for `source` (blocks of 256 claimed durably)."""
        with self._lock:
            block = self._nonces.get(source)
            if block and block[0] < block[1]:
                block[0] += 1
                return block[0] - 1

        def claim(tx: Tx) -> int:
            row = tx.one("SELECT next_nonce FROM chain_nonces WHERE source = ?", (source,))
            start = int(row[0]) if row else 0
            if row:
                tx.execute("UPDATE chain_nonces SET next_nonce = ? WHERE source = ?", (start + NONCE_BLOCK, source))
            else:
                tx.execute("INSERT INTO chain_nonces (source, next_nonce) VALUES (?, ?)", (source, NONCE_BLOCK))
            return start

        start = await self.db.run(claim)
        with self._lock:
            self._nonces[source] = [start + 1, start + NONCE_BLOCK]
        return start

    # ------------------------------------------------------------------ writes

    async def put(self, row: OutboxRow) -> None:
        """Commit one receipt (durable when this returns)."""
        now = self.clock()

        def insert(tx: Tx) -> None:
            tx.execute(
                f"INSERT INTO chain_receipts ({_COLUMNS}, updated_ms) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', NULL, NULL, 0, ?, ?, ?) "
                "ON CONFLICT (request_id) DO NOTHING",
                (row.request_id, row.provider, row.task_type, row.sink, row.source, row.task_id, str(row.amount),
                 row.response_hash, row.nonce, row.deadline, row.sink_sig, row.source_sig, now, row.chain_ts, now),
            )

        await self.db.run(insert)

    async def recover(self) -> int:
        """At start: on SQLite, every ``sent`` row goes back to the queue; on PostgreSQL, none.

        SQLite is the one-process deployment: a row still ``sent`` when the process starts was
        claimed by a process that is gone, usually this gateway's previous incarnation killed
        mid-batch, so it is resubmitted at once rather than after its lease (if that batch did
        land, the resubmission comes back as a replay of our own nonce and is confirmed).

        On PostgreSQL other replicas share the table, and a fresh ``sent`` row is most likely
        one a live replica is submitting right now: requeueing it would submit it twice. A new
        process cannot tell a dead claimer from a live one (``claimed_by`` is new in every
        process), so it leaves them all to the lease: the next claim after ``reclaim_after_ms``
        takes a dead claimer's rows over. Returns the rows requeued.
        """
        if self.db.dialect != "sqlite":
            return 0
        now = self.clock()
        return await self.db.run(
            lambda tx: tx.execute(
                "UPDATE chain_receipts SET status = 'queued', claimed_by = NULL, updated_ms = ? WHERE status = 'sent'",
                (now,),
            )
        )

    async def claim(self, limit: int) -> dict[str, list[OutboxRow]]:
        """Mark up to `limit` queued rows (and sent ones whose lease ran out) as sent by this
        outbox, oldest first; by task type.

        Each row goes to exactly one claimer. SQLite runs the script under the database's write
        lock (``BEGIN IMMEDIATE``, taken before the select), so selecting and marking are one
        exclusive step even across processes. PostgreSQL runs READ COMMITTED with no such lock:
        two replicas would read the same queued rows and both mark and submit them. There the
        select locks the rows it returns and skips rows another claim has locked (``FOR UPDATE
        SKIP LOCKED``), so concurrent claims take disjoint rows without waiting for each other;
        a row another claim committed meanwhile fails the re-checked condition and is dropped.
        """
        now = self.clock()
        stale = now - self.reclaim_after_ms

        def script(tx: Tx) -> list[tuple]:
            lock = " FOR UPDATE SKIP LOCKED" if tx.dialect == "postgresql" else ""
            rows = tx.all(
                f"SELECT {_COLUMNS} FROM chain_receipts "
                "WHERE status = 'queued' OR (status = 'sent' AND updated_ms < ?) "
                f"ORDER BY created_ms, request_id LIMIT ?{lock}",
                (stale, limit),
            )
            tx.many(
                "UPDATE chain_receipts SET status = 'sent', claimed_by = ?, tries = tries + 1, updated_ms = ? "
                "WHERE request_id = ?",
                [(self.owner, now, r[0]) for r in rows],
            )
            return rows

        out: dict[str, list[OutboxRow]] = {}
        for r in await self.db.run(script):
            row = _row(r)
            out.setdefault(row.task_type, []).append(row)
        return out

    async def renew(self, request_ids: list[str]) -> list[str]:
        """Restart the lease of those of `request_ids` this outbox still holds; returns them,
        in the order given.

        One claim can feed several transactions, submitted one after another, each waiting for
        its receipt: on a slow chain the rows waiting their turn would outlast the lease and
        another replica would submit them too. The batcher renews before each transaction and
        submits only what this returns. A row that is no longer ``sent`` under this outbox's id
        (settled, requeued, or taken over by another claimer after a lapse) is neither touched
        nor returned: it is someone else's to submit now. On PostgreSQL the update waits for a
        claim that has locked one of the rows and then re-checks the owner, so a row is never
        both renewed here and taken over there. Takes at most one claim's rows (one statement).
        """
        if not request_ids:
            return []
        now = self.clock()
        marks = ", ".join("?" * len(request_ids))
        held = {
            r[0] for r in await self.db.run(
                lambda tx: tx.all(
                    "UPDATE chain_receipts SET updated_ms = ? WHERE status = 'sent' AND claimed_by = ? "
                    f"AND request_id IN ({marks}) RETURNING request_id",
                    (now, self.owner, *request_ids),
                )
            )
        }
        return [rid for rid in request_ids if rid in held]

    async def settle(self, outcomes: dict[str, tuple[str, int | None]], tx_hash: str | None) -> None:
        """Record outcomes: request_id -> (status, reason)."""
        now = self.clock()

        def script(tx: Tx) -> None:
            for rid, (status, reason) in outcomes.items():
                tx.execute(
                    "UPDATE chain_receipts SET status = ?, reason = ?, tx_hash = COALESCE(?, tx_hash), "
                    "updated_ms = ? WHERE request_id = ?",
                    (status, reason, tx_hash, now, rid),
                )

        await self.db.run(script)

    async def requeue(self, request_ids: list[str]) -> None:
        """Put rows this outbox claimed back in the queue. A row settled meanwhile, or taken
        over by another claimer after this claim's lease ran out, is left as it is: queueing it
        again would only submit it once more."""
        now = self.clock()
        await self.db.run(
            lambda tx: tx.many(
                "UPDATE chain_receipts SET status = 'queued', claimed_by = NULL, updated_ms = ? "
                "WHERE request_id = ? AND status = 'sent' AND claimed_by = ?",
                [(now, rid, self.owner) for rid in request_ids],
            )
        )

    # ------------------------------------------------------------------ reads

    async def counts(self) -> dict[str, int]:
        rows = await self.db.run(lambda tx: tx.all("SELECT status, COUNT(*) FROM chain_receipts GROUP BY status"))
        return {str(s): int(n) for s, n in rows}

    async def oldest_queued_ms(self) -> int | None:
        row = await self.db.run(lambda tx: tx.one("SELECT MIN(created_ms) FROM chain_receipts WHERE status = 'queued'"))
        return int(row[0]) if row and row[0] is not None else None

    async def amount_since(self, task_type: str, since_chain_ts: int) -> int:
        """Receipt money issued for a task type since a chain time (the spend the stream follows)."""
        rows = await self.db.run(
            lambda tx: tx.all(
                "SELECT amount FROM chain_receipts WHERE task_type = ? AND chain_ts >= ?", (task_type, since_chain_ts)
            )
        )
        return sum(int(r[0]) for r in rows)

    async def amount_between(self, task_type: str, from_chain_ts: int, to_chain_ts: int) -> int:
        rows = await self.db.run(
            lambda tx: tx.all(
                "SELECT amount FROM chain_receipts WHERE task_type = ? AND chain_ts >= ? AND chain_ts < ?",
                (task_type, from_chain_ts, to_chain_ts),
            )
        )
        return sum(int(r[0]) for r in rows)

    async def unconfirmed_amount(self, task_type: str) -> int:
        rows = await self.db.run(
            lambda tx: tx.all(
                "SELECT amount FROM chain_receipts WHERE task_type = ? AND status IN ('queued', 'sent')", (task_type,)
            )
        )
        return sum(int(r[0]) for r in rows)

    async def rows(self, status: str | None = None) -> list[OutboxRow]:
        if status is None:
            fetched = await self.db.run(lambda tx: tx.all(f"SELECT {_COLUMNS} FROM chain_receipts ORDER BY created_ms"))
        else:
            fetched = await self.db.run(
                lambda tx: tx.all(f"SELECT {_COLUMNS} FROM chain_receipts WHERE status = ? ORDER BY created_ms", (status,))
            )
        return [_row(r) for r in fetched]
