"""A small database layer that runs the same SQL on SQLite (default) and PostgreSQL.

Design: every unit of work is a *transaction script*, a plain synchronous function
``fn(tx) -> result`` over :class:`Tx`. The backend runs it inside one transaction and the event
loop awaits the result. That gives the same code path on both engines:

* SQLite: one connection, WAL journal, ``synchronous=NORMAL``, each script run inline inside
  ``BEGIN IMMEDIATE`` (writes are serialised; a script is atomic). See :class:`SqliteDatabase`.
* PostgreSQL: a fixed pool of psycopg connections, one per worker thread, READ COMMITTED. Scripts
  that must be atomic under concurrency use single conditional ``UPDATE ... WHERE ... RETURNING``
  statements or take a row lock first (see :mod:`gateway.accounting.store`).

SQL is written once with ``?`` placeholders and standard syntax that both engines accept
(``INSERT ... ON CONFLICT``, ``RETURNING``, ``BIGINT``); the PostgreSQL backend rewrites ``?`` to
``%s``. No SQL text contains a literal ``?`` or ``%``.

Schema changes are versioned migrations (``migrations/NNNN_name.sql``) recorded in
``schema_migrations``; they run at start-up under a lock (``BEGIN IMMEDIATE`` on SQLite, an
advisory transaction lock on PostgreSQL) so several replicas can start at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

log = logging.getLogger("pura.db")

T = TypeVar("T")
Row = tuple[Any, ...]

MIGRATION_LOCK_ID = 7_305_112_001  # arbitrary constant for pg_advisory_xact_lock


class Tx(Protocol):
    """What a transaction script sees."""

    dialect: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int: ...

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each parameter row (``executemany``)."""
        ...


class Database(Protocol):
    dialect: str

    async def run(self, fn: Callable[[Tx], T]) -> T: ...

    async def read(self, fn: Callable[[Tx], T]) -> T: ...

    def run_sync(self, fn: Callable[[Tx], T]) -> T: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- SQLite


class _SqliteTx:
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        cur = self._conn.execute(sql, params)
        row = cur.fetchone()
        cur.fetchall()  # finish RETURNING statements completely
        return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, params).fetchall()

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._conn.executemany(sql, rows)


class SqliteDatabase:
    """One connection; every script runs inline, under a lock, inside ``BEGIN IMMEDIATE``.

    Inline, not on a worker thread: a whole admission script costs tens of microseconds here,
    less than one hop to a thread and back (about 100 us measured on the 2-core target machine),
    and a script never awaits, so scripts cannot interleave (each is atomic). The lock only
    matters when another thread (CLI helpers, tests) shares the object. The main connection does
    not checkpoint the WAL itself (a checkpoint syncs the database file); a background thread
    with its own connection checkpoints every ``checkpoint_interval_s`` seconds instead.
    """

    dialect = "sqlite"

    def __init__(self, path: str, checkpoint_interval_s: float = 5.0) -> None:
        self.path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._group: list[tuple[Callable[[Tx], object], asyncio.Future]] = []
        self._conn: sqlite3.Connection | None = self._connect()
        self._conn.execute("PRAGMA wal_autocheckpoint=0" if path != ":memory:" else "PRAGMA foreign_keys=ON")
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if path != ":memory:":
            self._checkpointer = threading.Thread(
                target=self._checkpoint_loop, args=(checkpoint_interval_s,), daemon=True,
                name="pura-sqlite-checkpoint",
            )
            self._checkpointer.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _checkpoint_loop(self, interval_s: float) -> None:
        conn = self._connect()
        try:
            while not self._stop.wait(interval_s):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    continue  # busy: the next round catches up
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        finally:
            conn.close()

    def _run(self, fn: Callable[[Tx], T]) -> T:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError("database closed")
            if conn.in_transaction:  # left open by a ROLLBACK that failed (below)
                conn = self._abandon()
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(_SqliteTx(conn))
                conn.execute("COMMIT")
            except BaseException:
                # Also when COMMIT itself failed (a full disk, an I/O error): SQLite then leaves
                # the transaction open, and every later BEGIN would fail with "cannot start a
                # transaction within a transaction". The caller sees the original error; the
                # transaction's work is rolled back, nothing half-done.
                if conn.in_transaction:
                    self._abandon()
                raise
            return result

    def _abandon(self) -> sqlite3.Connection:
        """End the main connection's open transaction: ROLLBACK, or if even that fails, a new
        connection (closing the old one discards its transaction). Never raises: the caller is
        already handling an error, or the next BEGIN reports one. Returns the connection to
        use. Callers hold ``self._lock``."""
        conn = self._conn
        assert conn is not None
        try:
            conn.execute("ROLLBACK")
            return conn
        except sqlite3.Error:
            log.exception("ROLLBACK failed; reopening the database connection")
        if self.path == ":memory:":
            return conn  # a new connection would be a new, empty database
        try:
            fresh = self._connect()
            fresh.execute("PRAGMA wal_autocheckpoint=0")
        except sqlite3.Error:
            log.exception("reopening the database failed; trying again at the next transaction")
            return conn
        self._conn = fresh
        try:
            conn.close()
        except sqlite3.Error:
            pass
        return fresh

    async def run(self, fn: Callable[[Tx], T]) -> T:
        return self._run(fn)

    async def read(self, fn: Callable[[Tx], T]) -> T:
        """Run a read-only script without taking the write lock: each statement is its own
        read transaction (WAL readers never wait for the writer). For single-statement reads
        whose answer is one snapshot."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError("database closed")
            return fn(_SqliteTx(conn))

    async def run_grouped(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in a transaction shared with the other scripts queued in this loop turn.

        Group commit: under load one commit (the expensive part) serves many admissions. Each
        script still runs alone inside its own savepoint, so one failing script rolls back only
        itself, and scripts never interleave. With nothing else queued this is one extra loop
        turn.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._group.append((fn, future))
        if len(self._group) == 1:
            loop.call_soon(self._run_group)
        return await future

    def _run_group(self) -> None:
        group, self._group = self._group, []
        if len(group) == 1:
            # Alone in its transaction (the common case at low load): rolling the transaction back
            # undoes only this script, so it needs no savepoint (two statements fewer).
            fn, future = group[0]
            if future.done():
                return
            try:
                result = self._run(fn)
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            return
        outcomes: list[tuple[bool, object]] = []

        def script(tx: Tx) -> None:
            for fn, future in group:
                if future.cancelled():
                    outcomes.append((False, None))
                    continue
                tx.execute("SAVEPOINT grouped")
                try:
                    result = fn(tx)
                except Exception as exc:  # only this script fails
                    tx.execute("ROLLBACK TO grouped")
                    tx.execute("RELEASE grouped")
                    outcomes.append((False, exc))
                    continue
                tx.execute("RELEASE grouped")
                outcomes.append((True, result))

        try:
            self._run(script)
        except Exception as exc:  # the commit failed: nothing of the group persisted
            for _fn, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        # Results are handed out only once the commit succeeded.
        for (_fn, future), (ok, value) in zip(group, outcomes):
            if future.done():
                continue
            if ok:
                future.set_result(value)
            elif isinstance(value, BaseException):
                future.set_exception(value)
            else:
                future.cancel()

    def run_sync(self, fn: Callable[[Tx], T]) -> T:
        return self._run(fn)

    def close_sync(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=10)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def close(self) -> None:
        self.close_sync()


# --------------------------------------------------------------------------- PostgreSQL

_PLACEHOLDER = re.compile(r"\?")


class _PgTx:
    dialect = "postgresql"

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def _sql(self, sql: str) -> str:
        return _PLACEHOLDER.sub("%s", sql)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cur = self._conn.execute(self._sql(sql), params)
        return cur.rowcount

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        cur = self._conn.execute(self._sql(sql), params)
        return cur.fetchone() if cur.description is not None else None

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cur = self._conn.execute(self._sql(sql), params)
        return cur.fetchall() if cur.description is not None else []

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._conn.cursor().executemany(self._sql(sql), rows)


class PostgresDatabase:
    """A fixed pool of psycopg connections, each owned by one worker thread."""

    dialect = "postgresql"
    #: seconds to wait for a connection (psycopg's default is to wait for the OS, minutes);
    #: a ``connect_timeout`` in the URL wins
    CONNECT_TIMEOUT_S = 5

    def __init__(self, url: str, pool_size: int = 8) -> None:
        import psycopg

        self._psycopg = psycopg
        self.url = url
        self._connect_kwargs: dict[str, Any] = {"autocommit": False}
        if "connect_timeout" not in url:
            self._connect_kwargs["connect_timeout"] = self.CONNECT_TIMEOUT_S
        self._pool: queue.Queue[Any] = queue.Queue()
        # Outage detection: a call that finds its connection broken bumps `_suspect`; every
        # other pooled connection, verified at an older value, is pinged before its next use
        # and replaced if it broke too. One failed call per outage instead of one per pooled
        # connection (psycopg only learns a connection broke when it next uses it).
        self._suspect = 0
        self._verified: dict[int, int] = {}
        self._lock = threading.Lock()
        for _ in range(pool_size):
            self._pool.put(self._connect())
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="pura-pg")
        self._closed = threading.Event()

    def _connect(self) -> Any:
        conn = self._psycopg.connect(self.url, **self._connect_kwargs)
        with self._lock:
            self._verified[id(conn)] = self._suspect
        return conn

    def _usable(self, conn: Any) -> Any:
        """``conn``, or a new connection when it is broken or, after a suspected outage,
        fails a ping. Raises psycopg's ``OperationalError`` when the server is unreachable."""
        with self._lock:
            stale = self._verified.get(id(conn), -1) < self._suspect
            suspect = self._suspect
        if not (conn.closed or conn.broken) and stale:
            try:
                conn.execute("SELECT 1")
                conn.rollback()
            except self._psycopg.Error:
                pass  # broken now: replaced below
            else:
                with self._lock:
                    self._verified[id(conn)] = suspect
        if conn.closed or conn.broken:
            fresh = self._connect()
            with self._lock:
                self._verified.pop(id(conn), None)
            conn.close()
            return fresh
        return conn

    def _run(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in a transaction; a deadlock or serialization failure (the server
        aborted the transaction, nothing of it persisted) runs it again, up to three times.
        Scripts are plain functions of the database, so running one again is safe.

        A connection that broke (server restarted, network cut, backend terminated) is
        replaced when it is next taken from the pool, and the others are pinged before their
        next use (see ``_suspect``); if the server is still unreachable the call fails with
        psycopg's ``OperationalError`` and the broken connection goes back to be replaced on
        a later call. A failed call is never retried here: whether its COMMIT landed is
        unknown to this layer (the settlement queue resolves that, ``Store.find_settled``)."""
        errors = self._psycopg.errors
        conn = self._pool.get()
        try:
            conn = self._usable(conn)
            for attempt in range(3):
                try:
                    with conn.transaction():
                        return fn(_PgTx(conn))
                except (errors.DeadlockDetected, errors.SerializationFailure):
                    if attempt == 2:
                        raise
                except self._psycopg.OperationalError:
                    if conn.broken:
                        with self._lock:
                            self._suspect += 1
                    raise
            raise AssertionError("unreachable")
        finally:
            self._pool.put(conn)

    async def run(self, fn: Callable[[Tx], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, fn)

    async def read(self, fn: Callable[[Tx], T]) -> T:
        """A read-only script (same as :meth:`run` here: READ COMMITTED takes no locks)."""
        return await self.run(fn)

    def run_sync(self, fn: Callable[[Tx], T]) -> T:
        return self._executor.submit(self._run, fn).result()

    def close_sync(self) -> None:
        self._executor.shutdown(wait=True)
        while not self._pool.empty():
            self._pool.get().close()

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close_sync)


# --------------------------------------------------------------------------- factory + migrations


def open_database(url: str) -> SqliteDatabase | PostgresDatabase:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite://:memory:`` or a
    ``postgresql://`` URL."""
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if rest in (":memory:", "/:memory:"):
            return SqliteDatabase(":memory:")
        return SqliteDatabase(rest[1:] if rest.startswith("/") else rest)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    raise ValueError(f"unsupported database URL: {url!r}")


def _load_migrations() -> list[tuple[int, str, str]]:
    found = []
    folder = resources.files("gateway.accounting") / "migrations"
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d{4})_([a-z0-9_]+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migration versions must be 1..N without gaps, got {versions}")
    return found


def _statements(sql: str) -> list[str]:
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def migrate(db: SqliteDatabase | PostgresDatabase) -> list[int]:
    """Apply pending migrations in order; returns the versions applied now."""
    import time

    migrations = _load_migrations()

    def script(tx: Tx) -> list[int]:
        if tx.dialect == "postgresql":
            tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK_ID,))
        tx.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms BIGINT NOT NULL)"
        )
        done = {row[0] for row in tx.all("SELECT version FROM schema_migrations")}
        applied = []
        for version, name, sql in migrations:
            if version in done:
                continue
            for statement in _statements(sql):
                tx.execute(statement)
            tx.execute(
                "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (?, ?, ?)",
                (version, name, int(time.time() * 1000)),
            )
            applied.append(version)
        return applied

    return db.run_sync(script)
