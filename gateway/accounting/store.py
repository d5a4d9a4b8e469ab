"""Keys, admission (auth + rate limit + budget reservation), settlement and report queries.

Atomicity, the property the seed lacked:

* **Admission** is one transaction: it reads the key's row (``SELECT ... FOR UPDATE`` on
  PostgreSQL, so admissions of one key run one at a time; SQLite serialises all writers with
  ``BEGIN IMMEDIATE``), prunes and sums the key's rate-limit buckets, and reserves budget with
  a single conditional upsert (``INSERT ... ON CONFLICT DO UPDATE SET reserved = reserved + :r
  WHERE spent + reserved + :r <= :cap``). N concurrent requests therefore can never reserve more
  than the cap.
* The rate limit is a sliding window of 60 one-second buckets per key (``rate_buckets``): the
  count is the sum of the buckets of the last 60 seconds, so the work per request does not grow
  with the limit, and the window slides every second (a request stops counting 59 to 60 s after
  it was made).
* **Settlement** deletes the reservation row (idempotent: a second settle, or a settle after the
  sweeper released it, changes nothing twice), moves the reserved amount out of ``reserved`` and
  the billed amount into ``spent``, and writes the usage record, in one transaction. The billed
  amount is the upstream cost clamped to the reservation, so ``spent <= cap`` always holds; the
  reservation is an upper bound of the cost (see :mod:`gateway.accounting.money`), so the clamp
  only bites if an upstream reports more tokens than physically fit, and the difference is kept
  as ``cost_micros - billed_micros`` in the record.
* Rejected requests (401/429/402) never record a rate-limit event, so a client hammering a closed
  window does not keep itself locked out.
"""

from __future__ import annotations

import os
import random
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from collections.abc import Callable
from typing import Literal

from gateway.accounting.db import PostgresDatabase, SqliteDatabase, Tx
from gateway.accounting.keys import generate_key, hash_key, key_prefix
from gateway.accounting.records import CompletionRecord

RATE_WINDOW_S = 60
DAY_MS = 86_400_000

_KEY_COLUMNS = (
    "id, prefix, label, daily_budget_micros, rate_limit_per_min, is_admin, created_ms,"
    " revoked_ms, last_used_ms"
)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def utc_day(ms: int) -> str:
    return _day_name(ms // DAY_MS)


@lru_cache(maxsize=64)
def _day_name(day_number: int) -> str:
    return datetime.fromtimestamp(day_number * 86_400, tz=UTC).strftime("%Y-%m-%d")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    prefix: str
    label: str
    daily_budget_micros: int
    rate_limit_per_min: int
    is_admin: bool
    created_ms: int
    revoked_ms: int | None
    last_used_ms: int | None

    @classmethod
    def from_row(cls, row: tuple) -> KeyInfo:
        return cls(
            id=row[0],
            prefix=row[1],
            label=row[2],
            daily_budget_micros=int(row[3]),
            rate_limit_per_min=int(row[4]),
            is_admin=bool(row[5]),
            created_ms=int(row[6]),
            revoked_ms=None if row[7] is None else int(row[7]),
            last_used_ms=None if row[8] is None else int(row[8]),
        )


AdmissionStatus = Literal["ok", "unauthorized", "rate_limited", "budget_exhausted"]


@dataclass(frozen=True, slots=True)
class Admission:
    status: AdmissionStatus
    key: KeyInfo | None = None
    rate_limit: int = 0
    rate_remaining: int = 0
    retry_after_s: int = 0
    budget_remaining_micros: int | None = None
    reservation_id: str | None = None
    reserved_micros: int = 0


# ----------------------------------------------------------------------------- scripts


def _admit(
    tx: Tx, key_hash: str, reserve_micros: int | None, reservation_id: str, ts: int
) -> Admission:
    # SQLite's BEGIN IMMEDIATE already serialises every writer; PostgreSQL needs the key's row
    # locked so that admissions of one key (rate count + reservation) run one at a time.
    lock = " FOR UPDATE" if tx.dialect == "postgresql" else ""
    row = tx.one(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_ms IS NULL{lock}",
        (key_hash,),
    )
    if row is None:
        return Admission("unauthorized")
    key = KeyInfo.from_row(row)
    limit = key.rate_limit_per_min
    sec = ts // 1000
    count, oldest = tx.one(
        "SELECT COALESCE(SUM(n), 0), MIN(sec) FROM rate_buckets WHERE key_id = ? AND sec > ?",
        (key.id, sec - RATE_WINDOW_S),
    ) or (0, None)
    count = int(count)
    if count >= limit:
        # the oldest second leaves the window at (oldest + 60) s
        wait_ms = (int(oldest) + RATE_WINDOW_S) * 1000 - ts if oldest is not None else 1000
        return Admission(
            "rate_limited",
            key=key,
            rate_limit=limit,
            rate_remaining=0,
            retry_after_s=max(1, -(-wait_ms // 1000)),
        )
    # The request counts against the rate limit whether or not the budget admits it.
    tx.execute(
        "INSERT INTO rate_buckets (key_id, sec, n) VALUES (?, ?, 1)"
        " ON CONFLICT (key_id, sec) DO UPDATE SET n = rate_buckets.n + 1",
        (key.id, sec),
    )
    remaining_rate = limit - count - 1
    if reserve_micros is None:
        return Admission("ok", key=key, rate_limit=limit, rate_remaining=remaining_rate)
    day = utc_day(ts)
    cap = key.daily_budget_micros
    remaining = None
    if reserve_micros <= cap:
        # One statement: create today's row with the reservation, or add to it only if it fits.
        remaining = tx.one(
            "INSERT INTO budget_days (key_id, day, spent_micros, reserved_micros)"
            " VALUES (?, ?, 0, ?) ON CONFLICT (key_id, day) DO UPDATE"
            " SET reserved_micros = budget_days.reserved_micros + excluded.reserved_micros"
            " WHERE budget_days.spent_micros + budget_days.reserved_micros"
            " + excluded.reserved_micros <= ?"
            " RETURNING spent_micros + reserved_micros",
            (key.id, day, reserve_micros, cap),
        )
    if remaining is None:
        left = tx.one(
            "SELECT spent_micros + reserved_micros FROM budget_days WHERE key_id = ? AND day = ?",
            (key.id, day),
        )
        return Admission(
            "budget_exhausted",
            key=key,
            rate_limit=limit,
            rate_remaining=remaining_rate,
            budget_remaining_micros=max(0, cap - int(left[0])) if left else cap,
        )
    tx.execute(
        "INSERT INTO reservations (id, key_id, day, amount_micros, created_ms) VALUES (?, ?, ?, ?, ?)",
        (reservation_id, key.id, day, reserve_micros, ts),
    )
    return Admission(
        "ok",
        key=key,
        rate_limit=limit,
        rate_remaining=remaining_rate,
        budget_remaining_micros=cap - int(remaining[0]),
        reservation_id=reservation_id,
        reserved_micros=reserve_micros,
    )


def _extend(tx: Tx, reservation_id: str, extra: int, cap: int) -> int | None:
    res = tx.one(
        "SELECT key_id, day FROM reservations WHERE id = ?", (reservation_id,)
    )
    if res is None:
        return None
    key_id, day = res
    remaining = tx.one(
        "UPDATE budget_days SET reserved_micros = reserved_micros + ?"
        " WHERE key_id = ? AND day = ? AND spent_micros + reserved_micros + ? <= ?"
        " RETURNING ? - spent_micros - reserved_micros",
        (extra, key_id, day, extra, cap, cap),
    )
    if remaining is None:
        return None
    tx.execute(
        "UPDATE reservations SET amount_micros = amount_micros + ? WHERE id = ?",
        (extra, reservation_id),
    )
    return int(remaining[0])


def _settle(
    tx: Tx, reservation_id: str | None, record: CompletionRecord, cap: int
) -> tuple[int, int]:
    """Returns (billed_micros, budget remaining)."""
    res = None
    if reservation_id is not None:
        res = tx.one(
            "DELETE FROM reservations WHERE id = ? RETURNING amount_micros, day",
            (reservation_id,),
        )
    if res is not None:
        # The common path: the reservation is still open, so this is the first settle.
        amount, day = int(res[0]), res[1]
        billed = min(record.cost_micros, amount)
        used = tx.one(
            "UPDATE budget_days SET reserved_micros = reserved_micros - ?,"
            " spent_micros = spent_micros + ? WHERE key_id = ? AND day = ?"
            " RETURNING spent_micros + reserved_micros",
            (amount, billed, record.key_id, day),
        )
    else:
        day = utc_day(record.created_ms)
        if tx.one("SELECT 1 FROM usage_records WHERE request_id = ?", (record.request_id,)):
            # Already settled (its reservation went in the same transaction): bill nothing twice.
            used = tx.one(
                "SELECT spent_micros + reserved_micros FROM budget_days WHERE key_id = ? AND day = ?",
                (record.key_id, day),
            )
            return 0, cap - (int(used[0]) if used else 0)
        # The reservation was released by the sweeper (or none was needed): bill what still
        # fits under the cap, never more.
        tx.execute(
            "INSERT INTO budget_days (key_id, day, spent_micros, reserved_micros)"
            " VALUES (?, ?, 0, 0) ON CONFLICT (key_id, day) DO NOTHING",
            (record.key_id, day),
        )
        row = tx.one(
            "SELECT spent_micros + reserved_micros FROM budget_days WHERE key_id = ? AND day = ?",
            (record.key_id, day),
        )
        billed = max(0, min(record.cost_micros, cap - int(row[0])))
        used = tx.one(
            "UPDATE budget_days SET spent_micros = spent_micros + ? WHERE key_id = ? AND day = ?"
            " RETURNING spent_micros + reserved_micros",
            (billed, record.key_id, day),
        )
    tx.execute(
        "UPDATE api_keys SET last_used_ms = ? WHERE id = ? AND (last_used_ms IS NULL OR last_used_ms < ?)",
        (record.created_ms, record.key_id, record.created_ms),
    )
    tx.execute(
        "INSERT INTO usage_records (request_id, key_id, created_ms, finished_ms, outcome,"
        " http_status, provider, model, tier, stream, prompt_tokens, completion_tokens,"
        " usage_estimated, cost_micros, billed_micros, premium_cost_micros, attempts,"
        " cascade_depth, confidence_milli, explored, latency_ms, response_sha256)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.request_id,
            record.key_id,
            record.created_ms,
            record.finished_ms,
            record.outcome,
            record.http_status,
            record.provider,
            record.model,
            record.tier,
            int(record.stream),
            record.prompt_tokens,
            record.completion_tokens,
            int(record.usage_estimated),
            record.cost_micros,
            billed,
            record.premium_cost_micros,
            len(record.attempts),
            record.cascade_depth,
            None if record.confidence is None else round(record.confidence * 1000),
            int(record.explored),
            record.latency_ms,
            record.response_sha256,
        ),
    )
    for seq, attempt in enumerate(record.attempts):
        tx.execute(
            "INSERT INTO usage_attempts (request_id, seq, key_id, created_ms, provider, model,"
            " tier, outcome, cost_micros, latency_ms, score_milli)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.request_id,
                seq,
                record.key_id,
                record.created_ms,
                attempt.provider,
                attempt.model,
                attempt.tier,
                attempt.outcome,
                attempt.cost_micros,
                attempt.latency_ms,
                None if attempt.score is None else round(attempt.score * 1000),
            ),
        )
    return billed, cap - (int(used[0]) if used else 0)


def _prune_rate_buckets(tx: Tx, now: int) -> int:
    """Drop rate-limit buckets that left every window (the sweeper's job, not the hot path's)."""
    return tx.execute("DELETE FROM rate_buckets WHERE sec <= ?", (now // 1000 - RATE_WINDOW_S,))


def _release_stale(tx: Tx, older_than_ms: int) -> int:
    rows = tx.all(
        "DELETE FROM reservations WHERE created_ms < ? RETURNING key_id, day, amount_micros",
        (older_than_ms,),
    )
    for key_id, day, amount in rows:
        tx.execute(
            "UPDATE budget_days SET reserved_micros = reserved_micros - ?"
            " WHERE key_id = ? AND day = ?",
            (amount, key_id, day),
        )
    return len(rows)


# ----------------------------------------------------------------------------- store


class Store:
    """Async accounting API over a :class:`~gateway.accounting.db.Database`."""

    def __init__(
        self, db: SqliteDatabase | PostgresDatabase, clock: Callable[[], int] = now_ms
    ) -> None:
        self.db = db
        self.clock = clock  # milliseconds since the epoch; injectable for window tests
        self._ids = random.Random(os.urandom(32))

    # ---- keys (sync variants serve the CLI)

    def create_key_sync(
        self,
        label: str,
        daily_budget_micros: int,
        rate_limit_per_min: int,
        is_admin: bool = False,
    ) -> tuple[str, KeyInfo]:
        if daily_budget_micros < 0 or rate_limit_per_min < 1:
            raise ValueError("budget must be >= 0 and rate limit >= 1")
        raw = generate_key()
        key_id = "key_" + secrets.token_hex(8)
        ts = self.clock()

        def script(tx: Tx) -> KeyInfo:
            tx.execute(
                "INSERT INTO api_keys (id, key_hash, prefix, label, daily_budget_micros,"
                " rate_limit_per_min, is_admin, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, hash_key(raw), key_prefix(raw), label[:64], daily_budget_micros,
                 rate_limit_per_min, int(is_admin), ts),
            )
            row = tx.one(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
            assert row is not None
            return KeyInfo.from_row(row)

        return raw, self.db.run_sync(script)

    def list_keys_sync(self) -> list[KeyInfo]:
        rows = self.db.run_sync(
            lambda tx: tx.all(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY created_ms")
        )
        return [KeyInfo.from_row(r) for r in rows]

    def revoke_key_sync(self, id_or_prefix: str) -> list[KeyInfo]:
        """Revoke by key id or by prefix; a prefix shared by several keys revokes none."""
        ts = self.clock()

        def script(tx: Tx) -> list[KeyInfo]:
            rows = tx.all(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE (id = ? OR prefix = ?)"
                " AND revoked_ms IS NULL",
                (id_or_prefix, id_or_prefix),
            )
            if len(rows) != 1:
                return [KeyInfo.from_row(r) for r in rows] if len(rows) > 1 else []
            tx.execute("UPDATE api_keys SET revoked_ms = ? WHERE id = ?", (ts, rows[0][0]))
            return [KeyInfo.from_row(rows[0])]

        return self.db.run_sync(script)

    def set_limits_sync(
        self, id_or_prefix: str, daily_budget_micros: int | None, rate_limit_per_min: int | None
    ) -> int:
        def script(tx: Tx) -> int:
            n = 0
            if daily_budget_micros is not None:
                n = tx.execute(
                    "UPDATE api_keys SET daily_budget_micros = ? WHERE id = ? OR prefix = ?",
                    (daily_budget_micros, id_or_prefix, id_or_prefix),
                )
            if rate_limit_per_min is not None:
                n = tx.execute(
                    "UPDATE api_keys SET rate_limit_per_min = ? WHERE id = ? OR prefix = ?",
                    (rate_limit_per_min, id_or_prefix, id_or_prefix),
                )
            return n

        return self.db.run_sync(script)

    async def authenticate(self, raw_key: str) -> KeyInfo | None:
        row = await self.db.run(
            lambda tx: tx.one(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_ms IS NULL",
                (hash_key(raw_key),),
            )
        )
        return None if row is None else KeyInfo.from_row(row)

    # ---- request path

    async def admit(
        self, raw_key: str, reserve_micros: int | None, reservation_id: str | None = None
    ) -> Admission:
        """Authenticate, count against the rate limit and reserve budget, atomically."""
        reservation_id = reservation_id or f"res_{self._ids.getrandbits(96):024x}"
        key_hash = hash_key(raw_key)
        ts = self.clock()
        script = lambda tx: _admit(tx, key_hash, reserve_micros, reservation_id, ts)  # noqa: E731
        if isinstance(self.db, SqliteDatabase):
            return await self.db.run_grouped(script)  # group commit under load
        return await self.db.run(script)

    async def extend(self, reservation_id: str, extra_micros: int, cap_micros: int) -> int | None:
        """Grow a reservation (cascade escalation); None when the budget cannot cover it."""
        return await self.db.run(lambda tx: _extend(tx, reservation_id, extra_micros, cap_micros))

    async def settle(
        self, reservation_id: str | None, record: CompletionRecord, cap_micros: int
    ) -> tuple[int, int]:
        """Release the reservation, bill the record; returns (billed, budget remaining)."""
        return await self.db.run(lambda tx: _settle(tx, reservation_id, record, cap_micros))

    async def settle_many(
        self, items: list[tuple[str | None, CompletionRecord, int]]
    ) -> list[tuple[int, int]]:
        """Settle several requests in one transaction (group commit)."""
        return await self.db.run(lambda tx: [_settle(tx, r, rec, cap) for r, rec, cap in items])

    async def release_stale(self, max_age_ms: int) -> int:
        """Release reservations older than ``max_age_ms`` and prune old rate-limit buckets."""
        now = self.clock()
        await self.db.run(lambda tx: _prune_rate_buckets(tx, now))
        return await self.db.run(lambda tx: _release_stale(tx, now - max_age_ms))

    async def budget_state(self, key_id: str) -> tuple[int, int]:
        """(spent, reserved) of the key today."""
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT spent_micros, reserved_micros FROM budget_days WHERE key_id = ? AND day = ?",
                (key_id, utc_day(self.clock())),
            )
        )
        return (int(row[0]), int(row[1])) if row else (0, 0)

    # ---- reports

    async def report_rows(self, key_id: str | None, since_ms: int) -> dict:
        """Aggregates over usage_records/usage_attempts since ``since_ms`` (one key or all)."""
        where = "created_ms >= ?" + ("" if key_id is None else " AND key_id = ?")
        params: tuple = (since_ms,) if key_id is None else (since_ms, key_id)

        def script(tx: Tx) -> dict:
            totals = tx.one(
                "SELECT COUNT(*), COALESCE(SUM(billed_micros), 0), COALESCE(SUM(cost_micros), 0),"
                " COALESCE(SUM(premium_cost_micros), 0), COALESCE(SUM(prompt_tokens), 0),"
                f" COALESCE(SUM(completion_tokens), 0) FROM usage_records WHERE {where}",
                params,
            )
            per_model = tx.all(
                "SELECT COALESCE(model, ''), COUNT(*), COALESCE(SUM(billed_micros), 0),"
                " COALESCE(SUM(prompt_tokens + completion_tokens), 0)"
                f" FROM usage_records WHERE {where} GROUP BY COALESCE(model, '') ORDER BY 1",
                params,
            )
            per_tier = tx.all(
                "SELECT COALESCE(tier, ''), COUNT(*), COALESCE(SUM(billed_micros), 0),"
                " COALESCE(SUM(premium_cost_micros), 0)"
                f" FROM usage_records WHERE {where} GROUP BY COALESCE(tier, '') ORDER BY 1",
                params,
            )
            per_outcome = tx.all(
                f"SELECT outcome, COUNT(*) FROM usage_records WHERE {where} GROUP BY outcome",
                params,
            )
            per_provider = tx.all(
                "SELECT provider, COUNT(*), SUM(CASE WHEN outcome IN ('ok', 'accepted',"
                " 'rejected') THEN 1 ELSE 0 END), COALESCE(SUM(cost_micros), 0),"
                " COALESCE(SUM(latency_ms), 0)"
                f" FROM usage_attempts WHERE {where} GROUP BY provider ORDER BY provider",
                params,
            )
            cascade = tx.all(
                "SELECT cascade_depth, COUNT(*), COALESCE(SUM(premium_cost_micros - cost_micros), 0),"
                " COALESCE(SUM(confidence_milli), 0), COUNT(confidence_milli)"
                f" FROM usage_records WHERE {where} AND cascade_depth > 0"
                " GROUP BY cascade_depth ORDER BY cascade_depth",
                params,
            )
            return {
                "totals": totals,
                "per_model": per_model,
                "per_tier": per_tier,
                "per_outcome": per_outcome,
                "per_provider": per_provider,
                "cascade": cascade,
            }

        return await self.db.run(script)
