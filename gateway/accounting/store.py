"""Keys, admission (auth + rate limit + budget reservation), settlement and report queries.

Atomicity, the property the seed lacked:

* **Budget reservation**: every amount the database holds for a key is added by one
  conditional upsert that holds on both engines under any concurrency (``INSERT ... ON
  CONFLICT DO UPDATE SET reserved = reserved + :r WHERE spent + reserved + :r <= cap``;
  PostgreSQL locks the conflicting row and re-checks the condition against its latest
  version), so the database never holds more than the cap. What it holds for a process is that
  process's *budget lease* (:mod:`gateway.accounting.leases`), and a request's reservation is a
  carve of the lease made in memory, in one synchronous step, so the process never admits more
  than its lease holds. A request whose lease is short grows it first (that upsert commits
  before the upstream is called); the others commit nothing before it. The cap is read from
  the key's row inside the upsert and, before every carve, by one read that also sees a
  revocation, so a revocation or a lowered cap stops new requests at once, whatever this
  process has cached about the key.
* **Keys** are cached in this process for ``key_cache_ttl_ms`` (by SHA-256, never the raw key),
  which saves a statement on every request. Revocation and budget changes do not wait for the
  cache (see above); what the cache can serve stale for up to the TTL is the rate limit of a key
  changed by another process (:meth:`Store.set_limits_sync` here clears it at once).
* The rate limit is a sliding window of 60 one-second buckets per key, counted in memory
  (exact within the process) and written behind to ``rate_buckets`` in the settlement's group
  commit; other processes' counts are read back whenever the key is reloaded. See
  :mod:`gateway.accounting.ratelimit` for what that means across replicas.
* **Settlement** gives the request's carve back to its lease (or deletes a reservation row made
  without a lease), moves the carved amount out of ``reserved`` and the billed amount into
  ``spent``, and writes the usage record, in one transaction; idempotent: a second settle, or a
  settle after the sweeper released the lease, changes nothing twice. The billed
  amount is the upstream cost clamped to the reservation, so ``spent <= cap`` always holds; the
  reservation is an upper bound of the cost (see :mod:`gateway.accounting.money`), so the clamp
  only bites if an upstream reports more tokens than physically fit, and the difference is kept
  as ``cost_micros - billed_micros`` in the record.
* Requests refused as unauthorized (401) or rate limited (429) are not counted, so a client
  hammering a closed window does not keep itself locked out; a request refused for its budget
  (402) counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from gateway.accounting import leases as lease_sql
from gateway.accounting.keys import generate_key, hash_key, key_prefix
from gateway.accounting.leases import Carve, Lease, LeaseBook, LeaseLost
from gateway.accounting.ratelimit import RATE_WINDOW_S, RateWindows
from gateway.accounting.records import CompletionRecord

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


def _load_key(tx: Tx, key_hash: str, since_sec: int) -> tuple[KeyInfo, list[tuple[int, int]]] | None:
    """The active key with this hash, and its stored rate-limit buckets after ``since_sec``."""
    row = tx.one(
        f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_ms IS NULL", (key_hash,)
    )
    if row is None:
        return None
    key = KeyInfo.from_row(row)
    buckets = tx.all(
        "SELECT sec, n FROM rate_buckets WHERE key_id = ? AND sec > ?", (key.id, since_sec)
    )
    return key, [(int(sec), int(n)) for sec, n in buckets]


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


# SQLite allows 32766 variables per statement (PostgreSQL 65535); a batch stays well below.
_IDS_PER_STATEMENT = 500


@dataclass(slots=True)
class _LeaseSettlement:
    """What a batch does to the leases it touches, and what came of it."""

    carved: dict[int, tuple[str | None, int, str]]  # item index -> (lease row, carved, day)
    regrow: dict[str, tuple[str, str, int]]  # lease row -> (key, day, amount to hold again)
    ts: int
    clamp: dict[int, int] = dataclasses.field(default_factory=dict)  # index -> carve of a lost lease
    lost: set[str] = dataclasses.field(default_factory=set)
    regrown: dict[str, int] = dataclasses.field(default_factory=dict)


def _settle(
    tx: Tx,
    items: list[tuple[str | None, CompletionRecord, int]],
    leases: _LeaseSettlement | None = None,
) -> list[tuple[int, int]]:
    """Settle requests ``(reservation id, record, cap)``: release, bill, record.

    One statement per kind of change rather than per request (the settlement queue hands over
    every request completed in the last few milliseconds): one DELETE releases the batch's
    reservations, each lease's row and each key's day are updated once, the records go in with
    ``executemany``. Items carved from a lease (``leases.carved``) release their carve from the
    lease's row; a row that is gone (a sweeper released it) means the carve holds nothing any
    more, and the item is billed like one whose reservation was released. A lease in
    ``leases.regrow`` then holds again what its settled carves released, if that still fits
    under the cap, so that the next requests find it full. Returns ``(billed, budget remaining
    after the batch)`` per item.
    """
    carved = leases.carved if leases is not None else {}
    from_lease: dict[int, tuple[int, str]] = {}
    if leases is not None:
        by_row: dict[str, int] = {}
        for row_id, amount, _day in carved.values():
            if row_id is not None:
                by_row[row_id] = by_row.get(row_id, 0) + amount
        for row_id, amount in by_row.items():  # (also resets the row's age, zero amounts too)
            if tx.one(
                "UPDATE reservations SET amount_micros = amount_micros - ?, created_ms = ?"
                " WHERE id = ? RETURNING amount_micros",
                (amount, leases.ts, row_id),
            ) is None:
                leases.lost.add(row_id)
        from_lease = {
            i: (amount, day) for i, (row_id, amount, day) in carved.items() if row_id not in leases.lost
        }
    held: dict[str, tuple[int, str]] = {}
    ids = [rid for i, (rid, _record, _cap) in enumerate(items) if rid is not None and i not in carved]
    for start in range(0, len(ids), _IDS_PER_STATEMENT):
        chunk = ids[start : start + _IDS_PER_STATEMENT]
        marks = ", ".join("?" * len(chunk))
        rows = tx.all(
            f"DELETE FROM reservations WHERE id IN ({marks}) RETURNING id, amount_micros, day", chunk
        )
        held.update((rid, (int(amount), day)) for rid, amount, day in rows)

    pending: dict[tuple[str, str], list[int]] = {}  # (key, day) -> [released, billed] to apply
    used: dict[tuple[str, str], int] = {}  # (key, day) -> spent + reserved once applied

    def apply() -> None:
        for (key_id, day), (released, billed) in pending.items():
            row = tx.one(
                "UPDATE budget_days SET reserved_micros = reserved_micros - ?,"
                " spent_micros = spent_micros + ? WHERE key_id = ? AND day = ?"
                " RETURNING spent_micros + reserved_micros",
                (released, billed, key_id, day),
            )
            used[(key_id, day)] = int(row[0]) if row else 0
        pending.clear()

    def current(key_id: str, day: str) -> int:
        row = tx.one(
            "SELECT spent_micros + reserved_micros FROM budget_days WHERE key_id = ? AND day = ?",
            (key_id, day),
        )
        return int(row[0]) if row else 0

    billed_by_item: list[tuple[int, str]] = []
    recorded: list[tuple[CompletionRecord, int]] = []
    settled: set[str] = set()
    for i, (rid, record, cap) in enumerate(items):
        res = from_lease.get(i)
        if res is None and rid is not None and i not in carved:
            res = held.pop(rid, None)
        if res is not None:
            # The common path: the reservation was still open, so this is the first settle.
            amount, day = res
            billed = min(record.cost_micros, amount)
            delta = pending.setdefault((record.key_id, day), [0, 0])
            delta[0] += amount
            delta[1] += billed
        else:
            apply()  # the paths below read the budget row: bring it up to date first
            day = utc_day(record.created_ms)
            if record.request_id in settled or tx.one(
                "SELECT 1 FROM usage_records WHERE request_id = ?", (record.request_id,)
            ):
                # Already settled (its reservation went with it): bill nothing twice.
                used.setdefault((record.key_id, day), current(record.key_id, day))
                billed_by_item.append((0, day))
                continue
            # The reservation was released by the sweeper (or none was needed): bill what still
            # fits under the cap, never more.
            tx.execute(
                "INSERT INTO budget_days (key_id, day, spent_micros, reserved_micros)"
                " VALUES (?, ?, 0, 0) ON CONFLICT (key_id, day) DO NOTHING",
                (record.key_id, day),
            )
            billed = max(0, min(record.cost_micros, cap - current(record.key_id, day)))
            if leases is not None and i in leases.clamp:  # never more than the request carved
                billed = min(billed, leases.clamp[i])
            elif i in carved:
                billed = min(billed, carved[i][1])
            row = tx.one(
                "UPDATE budget_days SET spent_micros = spent_micros + ? WHERE key_id = ? AND day = ?"
                " RETURNING spent_micros + reserved_micros",
                (billed, record.key_id, day),
            )
            used[(record.key_id, day)] = int(row[0])
        settled.add(record.request_id)
        billed_by_item.append((billed, day))
        recorded.append((record, billed))
    apply()
    if leases is not None:
        for row_id, (key_id, day, amount) in leases.regrow.items():
            if row_id in leases.lost or amount <= 0:
                continue
            if lease_sql.hold_again(tx, key_id, day, amount):
                tx.execute(
                    "UPDATE reservations SET amount_micros = amount_micros + ? WHERE id = ?",
                    (amount, row_id),
                )
                leases.regrown[row_id] = amount
    tx.many(
        "INSERT INTO usage_records (request_id, key_id, created_ms, finished_ms, outcome,"
        " http_status, provider, model, tier, stream, prompt_tokens, completion_tokens,"
        " usage_estimated, cost_micros, billed_micros, premium_cost_micros, attempts,"
        " cascade_depth, confidence_milli, explored, latency_ms, response_sha256)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
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
            )
            for record, billed in recorded
        ],
    )
    tx.many(
        "INSERT INTO usage_attempts (request_id, seq, key_id, created_ms, provider, model,"
        " tier, outcome, cost_micros, latency_ms, score_milli)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
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
            )
            for record, _billed in recorded
            for seq, attempt in enumerate(record.attempts)
        ],
    )
    return [
        (billed, cap - used[(record.key_id, day)])
        for (_rid, record, cap), (billed, day) in zip(items, billed_by_item)
    ]


def _touch_keys(tx: Tx, records: list[CompletionRecord]) -> None:
    """Record each key's last use: one statement per key, not per request."""
    last: dict[str, int] = {}
    for record in records:
        last[record.key_id] = max(last.get(record.key_id, 0), record.created_ms)
    for key_id, ms in last.items():
        tx.execute(
            "UPDATE api_keys SET last_used_ms = ? WHERE id = ? AND (last_used_ms IS NULL OR last_used_ms < ?)",
            (ms, key_id, ms),
        )


def _write_rate_counts(tx: Tx, counts: list[tuple[str, int, int]]) -> None:
    for key_id, sec, n in counts:
        tx.execute(
            "INSERT INTO rate_buckets (key_id, sec, n) VALUES (?, ?, ?)"
            " ON CONFLICT (key_id, sec) DO UPDATE SET n = rate_buckets.n + excluded.n",
            (key_id, sec, n),
        )


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
        self,
        db: SqliteDatabase | PostgresDatabase,
        clock: Callable[[], int] = now_ms,
        key_cache_ttl_ms: int = 1000,
        lease_factor: int = 0,
        lease_idle_ms: int = 1_000,
        lease_refresh_ms: int = 60_000,
        lease_carve_ttl_ms: int = 900_000,
    ) -> None:
        """``lease_factor``: how many times a request's reservation a budget lease grows by
        beyond what the request needs (see :mod:`gateway.accounting.leases`; 0 holds exactly
        the requests in flight). ``lease_refresh_ms``: how often a held lease's age is reset,
        well within the sweeper's TTL. ``lease_carve_ttl_ms``: a request that has not settled
        after this long (the sweeper's TTL) stops holding its lease."""
        if lease_factor < 0:
            raise ValueError("lease_factor must be >= 0")
        self.db = db
        self.clock = clock  # milliseconds since the epoch; injectable for window tests
        self.leases = LeaseBook(factor=lease_factor, idle_ms=lease_idle_ms)
        self.lease_refresh_ms = lease_refresh_ms
        self.lease_carve_ttl_ms = lease_carve_ttl_ms
        self._ids = random.Random(os.urandom(32))
        self.key_cache_ttl_ms = key_cache_ttl_ms
        self._keys: dict[str, tuple[KeyInfo, int]] = {}  # key hash -> (key, reload at ms)
        self.rates = RateWindows()
        # Called when there are rate-limit counts to write; the settlement queue hooks its wake-up
        # in here, so that the counts ride on its next group commit.
        self.on_unwritten: Callable[[], None] = lambda: None

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

        revoked = self.db.run_sync(script)
        # Not needed for the revocation to hold (every reservation checks the stored key), but
        # this process then stops serving what it cached about the key at once.
        self._keys.clear()
        return revoked

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

        changed = self.db.run_sync(script)
        self._keys.clear()  # the new rate limit applies from the next request in this process
        return changed

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
        self,
        raw_key: str,
        reserve_micros: int | None,
        reservation_id: str | None = None,
        alone: bool = False,
    ) -> Admission:
        """Authenticate, count against the rate limit and (if asked) reserve budget.

        Only the reservation touches the database on the common path: the key comes from the
        cache and the rate limit is checked and counted in memory, in one synchronous step, so
        concurrent admissions of one key cannot both take its last slot. ``alone`` says that no
        other request is in flight: on SQLite the reservation then commits at once instead of
        waiting a loop turn for other admissions to share its commit.
        """
        key_hash = hash_key(raw_key)
        ts = self.clock()
        sec = ts // 1000
        # Requests without a reservation (reports, requests refused before routing) are the rare
        # ones that act on what the key is now (admin flag, revocation): they read it afresh.
        key = self._cached_key(key_hash, ts) if reserve_micros is not None else None
        fresh = key is None
        if fresh and (key := await self._load_key(key_hash, ts)) is None:
            return Admission("unauthorized")
        count, oldest = self.rates.window(key.id).count(sec)
        if count >= key.rate_limit_per_min and not fresh:
            # Refused on what the cache knows: look again, as the key may have been revoked (a
            # 401, not a 429), its limit raised, or other processes' counts have slid out.
            if (key := await self._load_key(key_hash, ts)) is None:
                return Admission("unauthorized")
            count, oldest = self.rates.window(key.id).count(sec)
        limit = key.rate_limit_per_min
        if count >= limit:
            # the oldest second leaves the window at (oldest + 60) s
            wait_ms = (oldest + RATE_WINDOW_S) * 1000 - ts if oldest is not None else 1000
            return Admission(
                "rate_limited",
                key=key,
                rate_limit=limit,
                rate_remaining=0,
                retry_after_s=max(1, -(-wait_ms // 1000)),
            )
        # Counted now, before any await: the request counts whether or not the budget admits it.
        self.rates.add(key.id, sec)
        self.on_unwritten()
        remaining_rate = limit - count - 1
        if reserve_micros is None:
            return Admission("ok", key=key, rate_limit=limit, rate_remaining=remaining_rate)
        reservation_id = reservation_id or f"res_{self._ids.getrandbits(96):024x}"
        try:
            status, cap, remaining = await self._take(
                key.id, utc_day(ts), reservation_id, reserve_micros, ts, alone
            )
        except BaseException:
            self.rates.add(key.id, sec, -1)  # not admitted after all
            raise
        if status == "unauthorized":  # revoked since it was cached
            self.rates.add(key.id, sec, -1)
            self._keys.pop(key_hash, None)
            lease = self.leases.leases.get((key.id, utc_day(ts)))
            if lease is not None:
                self.leases.retire(lease)  # given back once its carves have settled
            return Admission("unauthorized")
        if cap != key.daily_budget_micros:  # changed since it was cached: the stored cap rules
            key = dataclasses.replace(key, daily_budget_micros=cap)
            self._keys.pop(key_hash, None)
        if status == "budget_exhausted":
            return Admission(
                "budget_exhausted",
                key=key,
                rate_limit=limit,
                rate_remaining=remaining_rate,
                budget_remaining_micros=remaining,
            )
        return Admission(
            "ok",
            key=key,
            rate_limit=limit,
            rate_remaining=remaining_rate,
            budget_remaining_micros=remaining,
            reservation_id=reservation_id,
            reserved_micros=reserve_micros,
        )

    def _cached_key(self, key_hash: str, ts: int) -> KeyInfo | None:
        cached = self._keys.get(key_hash)
        if cached is None or ts >= cached[1]:
            return None
        return cached[0]

    async def _load_key(self, key_hash: str, ts: int) -> KeyInfo | None:
        """Read the key and the stored counts of its window, and cache the key."""
        found = await self.db.run(lambda tx: _load_key(tx, key_hash, ts // 1000 - RATE_WINDOW_S))
        if found is None:
            self._keys.pop(key_hash, None)
            return None
        key, buckets = found
        self.rates.window(key.id).load(buckets)
        if self.key_cache_ttl_ms > 0:
            self._keys[key_hash] = (key, ts + self.key_cache_ttl_ms)
        return key

    async def _take(
        self, key_id: str, day: str, request_id: str, amount: int, ts: int, alone: bool,
        lease: Lease | None = None,
    ) -> tuple[str, int, int]:
        """Carve ``amount`` for ``request_id`` out of the key's lease, growing the lease first
        when it holds too little: (status, cap, budget remaining). ``lease``: the lease to take
        from (an escalation stays on its request's lease); by default the key's current one.

        Fast path (the lease holds enough): one read checks that the key is still active and
        that the day's holdings still fit under its stored cap (so revocation and a lowered cap
        apply at once), then the carve, with no await in between. Slow path: what the lease
        holds is carved first, the rest is added to the lease by the conditional upsert of
        :func:`~gateway.accounting.leases.hold` (plus up to ``factor`` times ``amount`` for the
        requests to come), and carved once that has committed.
        """
        book = self.leases
        fixed = lease is not None
        for _attempt in range(3):
            if not fixed:
                lease = book.lease(key_id, day)
            assert lease is not None
            if lease.lost or lease.retired:
                return "budget_exhausted", 0, 0  # an escalation on a lease that is gone
            if lease.free >= amount:
                lease.growing += 1  # (keeps the upkeep from giving the lease back meanwhile)
                try:
                    cap, used = await self.db.read(lambda tx: lease_sql.budget_view(tx, key_id, day))
                finally:
                    lease.growing -= 1
                if cap is None:
                    return "unauthorized", 0, 0
                if lease.lost or lease.retired:  # (only if the read had to wait: PostgreSQL)
                    if fixed:
                        return "budget_exhausted", 0, 0
                    continue
                if used <= cap and lease.free >= amount:
                    book.carve(lease, request_id, amount, ts)
                    return "ok", cap, cap - used + lease.free
            pre = min(lease.free, amount)
            fresh = request_id not in book.carves
            book.carve(lease, request_id, pre, ts)
            need = amount - pre
            exists = lease.total > 0
            row_id = lease.row_id
            # only the first of concurrent growers asks for more than it needs
            extra = book.factor * amount if lease.growing == 0 else 0
            script = lambda tx: lease_sql.grow(  # noqa: E731
                tx, row_id, exists, key_id, day, need, extra, ts
            )
            lease.growing += 1
            if isinstance(self.db, SqliteDatabase) and not alone:
                work = asyncio.ensure_future(self.db.run_grouped(script))
            else:
                work = asyncio.ensure_future(self.db.run(script))

            taken = [pre]  # carved for this attempt so far
            waiting = [True]

            def landed(done: asyncio.Future, lease: Lease = lease, taken=taken, need=need) -> None:
                # Runs when the grow has finished, before its waiter resumes (so no other carve
                # can take what it added first), and also when nobody waits any more (a client
                # gone mid-grow: PostgreSQL's worker thread commits regardless): what it added
                # is the lease's either way, and the waiter's share is carved here.
                lease.growing -= 1
                if done.cancelled() or done.exception() is not None:
                    return
                grown_status, _cap, _left, grown = done.result()
                if grown_status == "ok":
                    lease.total += grown
                    lease.has_row = True
                    lease.refreshed_ms = ts
                    if waiting[0]:
                        book.carve(lease, request_id, need, ts)
                        taken[0] += need

            work.add_done_callback(landed)
            try:
                status, cap, remaining, _grown = await asyncio.shield(work)
            except LeaseLost:
                book.uncarve(request_id, taken[0], fresh)
                lease.lost = True
                book.retire(lease)
                if fixed:
                    return "budget_exhausted", 0, 0
                continue
            except BaseException:
                waiting[0] = False
                book.uncarve(request_id, taken[0], fresh)
                raise
            if status != "ok":
                book.uncarve(request_id, taken[0], fresh)
                if (
                    status == "budget_exhausted" and need > 0 and lease.free >= amount
                    and not (lease.lost or lease.retired)
                ):
                    continue  # concurrent grows filled the lease meanwhile: carve from it
                return status, cap, remaining
            return "ok", cap, remaining + lease.free
        return "budget_exhausted", 0, 0  # three tries, each overtaken: refuse, hold nothing

    async def extend(self, reservation_id: str, extra_micros: int, cap_micros: int) -> int | None:
        """Grow a reservation (cascade escalation); None when the budget cannot cover it."""
        carve = self.leases.carves.get(reservation_id)
        if carve is None:  # a reservation row (not carved from a lease)
            return await self.db.run(lambda tx: _extend(tx, reservation_id, extra_micros, cap_micros))
        lease = carve.lease
        status, _cap, remaining = await self._take(
            lease.key_id, lease.day, reservation_id, extra_micros, self.clock(), True, lease
        )
        return remaining if status == "ok" else None

    async def maintain_leases(self) -> None:
        """Give back leases that are retired or idle, and reset the age of the others' rows
        before any sweeper could take them. Called about twice a second by the settlement
        queue; cheap when there is nothing to do."""
        now = self.clock()
        book = self.leases
        book.abandon_older_than(now - self.lease_carve_ttl_ms)
        back = book.returnable(now)
        if back:
            try:
                await self.db.run(lambda tx: lease_sql.give_back(tx, [lease.row_id for lease in back]))
            except BaseException:
                book.retired.extend(back)  # tried again next time
                raise
        due = [
            lease
            for lease in (*book.leases.values(), *book.retired)
            if lease.has_row and not lease.lost and now - lease.refreshed_ms >= self.lease_refresh_ms
        ]
        if due:
            found = await self.db.run(lambda tx: lease_sql.refresh(tx, [lease.row_id for lease in due], now))
            for lease in due:
                if lease.row_id in found:
                    lease.refreshed_ms = now
                else:
                    lease.lost = True
                    book.retire(lease)

    async def return_leases(self) -> None:
        """Give back every lease with nothing carved (shutdown, tests); leases with requests in
        flight are retired and go back once those settle (or to the sweeper)."""
        for lease in list(self.leases.leases.values()):
            self.leases.retire(lease)
        await self.maintain_leases()

    async def settle(
        self, reservation_id: str | None, record: CompletionRecord, cap_micros: int
    ) -> tuple[int, int]:
        """Release the reservation, bill the record; returns (billed, budget remaining)."""
        return (await self.settle_many([(reservation_id, record, cap_micros)]))[0]

    async def settle_many(
        self, items: list[tuple[str | None, CompletionRecord, int]]
    ) -> list[tuple[int, int]]:
        """Settle several requests in one transaction (group commit), together with the
        rate-limit counts not written yet."""
        counts = self.rates.take_unwritten()
        book = self.leases
        taken: dict[int, tuple[str, Carve]] = {}
        for i, (rid, _record, _cap) in enumerate(items):
            carve = book.pop(rid) if rid is not None else None
            if carve is not None:
                taken[i] = (rid, carve)
        ts = self.clock()
        leases = _LeaseSettlement(carved={}, regrow={}, ts=ts)
        for i, (_rid, carve) in taken.items():
            lease = carve.lease
            if lease.lost:
                leases.clamp[i] = carve.amount  # billed like a released reservation
                continue
            # (a lease without a row has held nothing, so its carves are all zero)
            leases.carved[i] = (lease.row_id if lease.has_row else None, carve.amount, lease.day)
            if book.factor > 0 and not lease.retired:
                key_id, day, amount = leases.regrow.get(lease.row_id, (lease.key_id, lease.day, 0))
                leases.regrow[lease.row_id] = (key_id, day, amount + carve.amount)

        def script(tx: Tx) -> list[tuple[int, int]]:
            leases.lost.clear()
            leases.regrown.clear()
            results = _settle(tx, items, leases)
            _touch_keys(tx, [rec for _r, rec, _cap in items])
            _write_rate_counts(tx, counts)
            return results

        try:
            results = await self.db.run(script)
        except BaseException:  # not committed (or cancelled): the next write carries them
            self.rates.restore_unwritten(counts)
            for rid, carve in taken.values():
                book.put_back(rid, carve)
            raise
        for _rid, carve in taken.values():
            lease = carve.lease
            lease.used -= carve.amount
            if lease.row_id in leases.lost:
                lease.lost = True
                book.retire(lease)
            elif not lease.lost:
                lease.total -= carve.amount
                if lease.has_row:
                    lease.refreshed_ms = ts
        for _rid, carve in taken.values():
            grown = leases.regrown.pop(carve.lease.row_id, 0)
            carve.lease.total += grown
        return results

    async def find_settled(
        self, reservation_id: str | None, record: CompletionRecord
    ) -> Literal["settled", "conflict", "absent"]:
        """Where a settlement that raised stands: "settled" if its record is in the database all
        the same (the call lost the answer of a commit that happened: a connection dropped
        during COMMIT; its retry then collides with its own record, so nothing is billed
        twice), "conflict" if another record holds its request id (it can never commit),
        "absent" otherwise.

        On "settled" the request's carve leaves the book, as that commit gave it back. The
        commit may also have held the carve again for the lease, or found the lease's row gone:
        the process no longer knows exactly what the row holds, so the lease is retired (no new
        carves from it) and goes back, with what its row really holds, once its other carves
        have settled. A write transaction, not :meth:`Database.read`: it must not run beside a
        settlement of the same request on another connection (PostgreSQL), and on SQLite it
        waits for the write lock like the settlement it asks about."""
        row = await self.db.run(
            lambda tx: tx.one(
                "SELECT key_id, created_ms, finished_ms, cost_micros, response_sha256"
                " FROM usage_records WHERE request_id = ?",
                (record.request_id,),
            )
        )
        if row is None:
            return "absent"
        r = record
        if tuple(row) != (r.key_id, r.created_ms, r.finished_ms, r.cost_micros, r.response_sha256):
            return "conflict"
        carve = self.leases.pop(reservation_id) if reservation_id is not None else None
        if carve is not None:
            carve.lease.used -= carve.amount
            self.leases.retire(carve.lease)
        return "settled"

    async def release_stale(self, max_age_ms: int) -> int:
        """Release reservations older than ``max_age_ms``, prune old rate-limit buckets and
        forget cached keys and windows that are no longer used."""
        now = self.clock()
        await self.db.run(lambda tx: _prune_rate_buckets(tx, now))
        self.rates.prune(now // 1000)
        self._keys = {h: cached for h, cached in self._keys.items() if now < cached[1]}
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
