"""Replaying the settlement dead-letter file: ``pura settlements replay`` (gateway.cli) and the
``PURA_SETTLEMENT_*`` settings.

The dead letters are made for real: a :class:`SettlementQueue` on a real :class:`Store` (a
temporary SQLite file) shuts down while another connection holds the database's write lock, so
everything it was settling is dead-lettered. The command then runs as an operator runs it, from
a new process's point of view (a new ``Store``, without the carves the gateway held in memory).
What must hold: each record is in the database once, billed exactly as settling the same records
directly would; replaying again changes nothing and says so; what fails or is malformed is
reported, kept for the next replay and makes the exit status non-zero; an interrupted replay
loses nothing and bills nothing twice; ``--dry-run`` writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

import gateway.cli
from gateway.accounting.db import migrate, open_database
from gateway.accounting.settlement import (
    DEAD_LETTER_NAME,
    Settlement,
    SettlementQueue,
    read_dead_letter,
    replay_dead_letters,
)
from gateway.accounting.store import Store, now_ms
from gateway.app import build_services
from gateway.cli import main as cli
from gateway.config import GatewaySettings, RoutingConfig
from recordkit import completion_record, locked

T0 = 1_790_000_000_000  # a fixed day
TTL_MS = 900_000  # the sweeper's (PURA_RESERVATION_TTL_S)
BUDGET = 100_000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings these tests rely on are the defaults, whatever the environment says."""
    for name in list(os.environ):
        if name.startswith("PURA_SETTLEMENT_") or name == "PURA_RESERVATION_TTL_S":
            monkeypatch.delenv(name)


class Key(NamedTuple):
    raw: str
    id: str


@pytest.fixture()
def key(tmp_path: Path) -> Key:
    with opened(tmp_path / "acct.db") as store:
        raw, info = store.create_key_sync("", BUDGET, 1_000_000)
    return Key(raw, info.id)


@contextlib.contextmanager
def opened(db_path: Path) -> Iterator[Store]:
    """A store of the test's own (the gateway's, the reference's), its clock on a fixed day, its
    busy timeout cut to 20 ms."""
    db = open_database(f"sqlite:///{db_path}")
    migrate(db)
    db._conn.execute("PRAGMA busy_timeout=20")
    try:
        yield Store(db, clock=Clock(), lease_factor=4)
    finally:
        db.close_sync()


def dead_letter(
    db_path: Path, key: Key, settlements: list[Settlement], before=None, at: int = T0
) -> None:
    """Admit each settlement's request at ``at``, then shut the queue down during an outage: all
    are dead-lettered, to the default file next to the database. ``before(store)`` runs first."""
    with opened(db_path) as store:
        store.clock.now = at
        queue = SettlementQueue(store, [], delay_ms=1, retry_ms=5, retry_max_ms=40)

        async def scenario() -> None:
            if before is not None:
                await before(store)
            queue.start()
            for s in settlements:
                assert (await store.admit(key.raw, 100, s.record.request_id)).status == "ok"
            with locked(db_path):
                for s in settlements:
                    queue.submit(s)
                await asyncio.wait_for(queue.flush(), 5)
                await asyncio.wait_for(queue.close(), 5)

        asyncio.run(scenario())
        assert queue.health == {"retrying": 0, "dead_lettered": len(settlements)}


def settlement(key: Key, rid: str, cost: int, cap: int = BUDGET, ts: int = T0) -> Settlement:
    return Settlement(rid, completion_record(key.id, rid, cost, ts), cap)


def replay(db_path: Path, *args: str) -> int:
    return cli(["--database-url", f"sqlite:///{db_path}", "settlements", "replay", *args])


def rows(db_path: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return conn.execute(sql).fetchall()


def state(db_path: Path) -> dict[str, list[tuple]]:
    """What settling writes: the records, their attempts, the books and the reservations."""
    return {
        table: rows(db_path, f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("usage_records", "usage_attempts", "budget_days", "reservations")
    }


def billed(db_path: Path) -> dict[str, int]:
    return dict(rows(db_path, "SELECT request_id, billed_micros FROM usage_records"))


def books(db_path: Path, key_id: str) -> tuple[int, int]:
    (row,) = rows(db_path, f"SELECT spent_micros, reserved_micros FROM budget_days WHERE key_id = '{key_id}'")
    return row


def copy_database(src: Path, dst: Path) -> None:
    with contextlib.closing(sqlite3.connect(src)) as a, contextlib.closing(sqlite3.connect(dst)) as b:
        a.backup(b)


def settle_directly(db_path: Path, reference: Path, lines: list[bytes]) -> None:
    """The reference: the dead-lettered settlements settled directly on a copy of the database,
    by a new process (its clock the real one), after its sweeper ran."""
    copy_database(db_path, reference)
    with opened(reference) as store:
        store.clock.now = now_ms()
        asyncio.run(store.release_stale(TTL_MS))
        for line in lines:
            asyncio.run(store.settle(*read_dead_letter(line).item))


def sweep(db_path: Path, at: int) -> None:
    """The gateway's sweeper at ``at``."""
    with opened(db_path) as store:
        store.clock.now = at
        asyncio.run(store.release_stale(TTL_MS))


def archives(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob(f"{DEAD_LETTER_NAME}.replayed-*"))


# ---------------------------------------------------------------------------------------------


def test_replay_bills_each_record_once_as_settling_it_directly_would(
    key: Key, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path, dead = tmp_path / "acct.db", tmp_path / DEAD_LETTER_NAME
    costs = {f"req_{i:02d}": 70 + i for i in range(12)}
    submitted = [settlement(key, rid, cost) for rid, cost in costs.items()]
    dead_letter(db_path, key, submitted)
    original = dead.read_bytes()
    lines = original.splitlines()
    # the lines rebuild the settlements exactly, nested attempts included
    assert [read_dead_letter(line) for line in lines] == submitted
    assert billed(db_path) == {}
    # The stopped gateway's lease still holds their carves; the command's sweeper releases it
    # (made on the test's fixed day, long past the TTL by the real clock the command runs on).
    assert books(db_path, key.id)[1] >= 1_200
    reference = tmp_path / "reference.db"
    settle_directly(db_path, reference, lines)

    assert replay(db_path, str(dead)) == 0
    out = capsys.readouterr().out
    assert "released 1 reservation(s) older than PURA_RESERVATION_TTL_S (900 s)" in out
    assert "replayed 12, already settled 0, failed 0, malformed 0; billed 0.000906 USD" in out
    assert state(db_path) == state(reference)
    assert billed(db_path) == costs  # each once, at its cost
    assert rows(db_path, "SELECT COUNT(*) FROM usage_attempts") == [(12,)]
    assert books(db_path, key.id) == (sum(costs.values()), 0)  # nothing held any more
    # Nothing to keep; the input is archived as it was.
    assert not dead.exists()
    (archive,) = archives(tmp_path)
    assert archive.read_bytes() == original
    assert "kept" not in out and str(archive) in out

    # Replayed again (the operator puts the lines back): reported as already settled, nothing
    # changes.
    before = state(db_path)
    dead.write_bytes(original)
    assert replay(db_path) == 0  # (the default file: next to the SQLite file)
    out = capsys.readouterr().out
    assert "replayed 0, already settled 12, failed 0, malformed 0; billed 0.000000 USD" in out
    assert out.count("already settled") == 13
    assert state(db_path) == before
    assert not dead.exists() and len(archives(tmp_path)) == 2


def test_lines_that_fail_or_are_malformed_are_reported_kept_and_fail_the_command(
    key: Key, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path, dead = tmp_path / "acct.db", tmp_path / DEAD_LETTER_NAME

    async def settle_the_first_req_dup(store: Store) -> None:
        assert (await store.admit(key.raw, 100, "req_dup")).status == "ok"
        await store.settle("req_dup", completion_record(key.id, "req_dup", 100, T0), BUDGET)

    dead_letter(db_path, key, [
        settlement(key, "req_0", 10),
        settlement(key, "req_big", 2**63),  # more than SQLite stores: never commits
        settlement(key, "req_dup", 150),  # a bug gave another request the same request id
        settlement(key, "req_3", 30),
    ], before=settle_the_first_req_dup)
    good = dead.read_bytes().splitlines()
    wrong_type = json.loads(good[3])
    wrong_type["record"]["cost_micros"] = "30"
    wrong_type["record"]["request_id"] = "req_4"
    bad = [b'{"reservation_id": "req_9", "cap_micros": 1', json.dumps(wrong_type).encode()]
    dead.write_bytes(b"\n".join([*good[:2], bad[0], *good[2:], b"", bad[1]]) + b"\n")

    assert replay(db_path) == 1
    out = capsys.readouterr().out
    report = {line.split()[0]: line for line in out.splitlines() if line.split()[0].isdigit()}
    assert report["1"].split()[1:3] == ["replayed", "req_0"]
    assert report["2"].split()[1:3] == ["failed", "req_big"] and "OverflowError" in report["2"]
    assert report["3"].split()[1] == "malformed" and "Invalid JSON" in report["3"]
    assert report["4"].split()[1:3] == ["failed", "req_dup"]
    assert "another record holds its request id" in report["4"]
    assert report["5"].split()[1:3] == ["replayed", "req_3"]
    assert report["7"].split()[1] == "malformed"  # (line 6 is blank)
    assert "record.cost_micros: Input should be a valid integer" in report["7"]
    assert "replayed 2, already settled 0, failed 2, malformed 2" in out
    assert f"kept 4 line(s) for another replay in {dead}" in out
    assert billed(db_path) == {"req_dup": 100, "req_0": 10, "req_3": 30}  # the first req_dup untouched
    # the kept lines wait in the dead-letter file, once each, as they were
    kept = [good[1], bad[0], good[2], bad[1]]
    assert dead.read_bytes().splitlines() == kept

    before = state(db_path)
    assert replay(db_path) == 1  # they fail again, and are kept again, once
    assert "replayed 0, already settled 0, failed 2, malformed 2" in capsys.readouterr().out
    assert dead.read_bytes().splitlines() == kept
    assert state(db_path) == before
    assert len(archives(tmp_path)) == 2


def test_an_interrupted_replay_is_resumed_without_losing_or_billing_twice(
    key: Key, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The states a crash can leave (see ``gateway.cli._replay_file``), made by hand."""
    db_path, dead = tmp_path / "acct.db", tmp_path / DEAD_LETTER_NAME
    work = dead.with_name(dead.name + ".replaying")
    costs = {f"req_{i:02d}": 40 + i for i in range(8)}
    first = [settlement(key, rid, costs[rid]) for rid in list(costs)[:4]]
    second = [settlement(key, rid, costs[rid]) for rid in list(costs)[4:]]

    # 1. Interrupted between the claim's link and unlink: both names are the one file.
    dead_letter(db_path, key, first)
    lines = dead.read_bytes()
    os.link(dead, work)
    assert replay(db_path, "--dry-run") == 0  # (a dry run reads the claimed file)
    assert "to replay 4" in capsys.readouterr().out
    assert replay(db_path) == 0
    out = capsys.readouterr().out
    assert f"resuming an interrupted replay: {work}\n" in out  # (nothing waits: one file)
    assert "replayed 4, already settled 0" in out
    assert not dead.exists() and not work.exists()  # each line replayed once, none kept
    assert [a.read_bytes() for a in archives(tmp_path)] == [lines]

    # 2. Interrupted after the replay had settled two lines, or after it had kept a malformed
    # line (appended it to the dead-letter file): both at once here. Then the gateway
    # dead-lettered another settlement.
    dead_letter(db_path, key, second)
    lines = dead.read_bytes() + b"garbage\n"
    dead.rename(work)
    work.write_bytes(lines)
    with opened(db_path) as store:
        for line in lines.splitlines()[:2]:
            asyncio.run(store.settle(*read_dead_letter(line).item))
    dead.write_bytes(b"garbage\n")
    dead_letter(db_path, key, [settlement(key, "req_later", 99)])
    later = dead.read_bytes()

    assert replay(db_path) == 1  # (the malformed line)
    out = capsys.readouterr().out
    assert f"resuming an interrupted replay: {work} ({dead} waits for the next run)" in out
    assert "replayed 2, already settled 2, failed 0, malformed 1" in out
    assert not work.exists() and dead.read_bytes() == later  # the kept line not kept twice
    assert replay(db_path) == 1
    assert "replayed 1, already settled 0, failed 0, malformed 1" in capsys.readouterr().out
    assert dead.read_bytes() == b"garbage\n"
    assert billed(db_path) == {**costs, "req_later": 99}
    assert [a.read_bytes() for a in archives(tmp_path)][1:] == [lines, later]


def test_a_replay_in_progress_is_left_alone(
    key: Key, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path, dead = tmp_path / "acct.db", tmp_path / DEAD_LETTER_NAME
    work = dead.with_name(dead.name + ".replaying")
    dead_letter(db_path, key, [settlement(key, "req_a", 10)])
    dead.rename(work)
    with work.open("rb") as running:
        fcntl.flock(running, fcntl.LOCK_EX)  # (what a replay in progress holds)
        assert replay(db_path) == 1
        assert f"another replay of {dead} is running" in capsys.readouterr().err
        assert work.exists() and billed(db_path) == {}
    assert replay(db_path) == 0
    assert billed(db_path) == {"req_a": 10}


def test_a_line_the_gateway_appends_while_the_file_is_claimed_is_replayed_too(
    key: Key, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway that opened the file just before the claim writes into the claimed file: the
    command reads it to its end again before archiving it."""
    db_path, dead = tmp_path / "acct.db", tmp_path / DEAD_LETTER_NAME
    dead_letter(db_path, key, [settlement(key, "req_a", 10), settlement(key, "req_late", 20)])
    first, late = dead.read_bytes().splitlines()
    dead.write_bytes(first + b"\n")
    real = gateway.cli.replay_dead_letters

    async def replay_while_the_gateway_appends(store, lines):
        lines = list(lines)
        if lines[0][1] == first:
            with dead.with_name(dead.name + ".replaying").open("ab") as out:
                out.write(late + b"\n")
        return await real(store, lines)

    monkeypatch.setattr(gateway.cli, "replay_dead_letters", replay_while_the_gateway_appends)
    assert replay(db_path) == 0
    assert "replayed 2, already settled 0" in capsys.readouterr().out
    assert billed(db_path) == {"req_a": 10, "req_late": 20}
    assert [a.read_bytes() for a in archives(tmp_path)] == [first + b"\n" + late + b"\n"]


def test_a_replay_while_the_dead_gateway_still_holds_its_lease_bills_only_what_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The carves of the dead-lettered requests live on in their stopped gateway's lease until
    the sweeper's TTL: a replay before then bills what fits under the cap beside that lease,
    never more, as settling directly would, and says which bills were clamped."""
    db_path, cap, now = tmp_path / "acct.db", 1_000, now_ms()
    with opened(db_path) as store:
        raw, info = store.create_key_sync("", cap, 1_000_000)
    key = Key(raw, info.id)
    costs = {f"req_{i}": 90 for i in range(8)}
    dead_letter(db_path, key, [settlement(key, rid, cost, cap, now) for rid, cost in costs.items()], at=now)
    reference = tmp_path / "reference.db"
    settle_directly(db_path, reference, (tmp_path / DEAD_LETTER_NAME).read_bytes().splitlines())

    assert replay(db_path) == 0
    out = capsys.readouterr().out
    assert state(db_path) == state(reference)
    spent, reserved = books(db_path, key.id)
    assert spent < sum(costs.values()) and spent + reserved <= cap
    clamped = [line.split()[2] for line in out.splitlines() if line.endswith("clamped to what its budget allowed")]
    assert clamped and sorted(rid for rid, b in billed(db_path).items() if b < costs[rid]) == sorted(clamped)
    sweep(db_path, now + TTL_MS + 1)
    assert books(db_path, key.id) == (spent, 0)


def test_dry_run_reports_and_writes_nothing(
    key: Key, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_path, dead = tmp_path / "acct.db", tmp_path / DEAD_LETTER_NAME
    dead_letter(db_path, key, [settlement(key, "req_a", 10), settlement(key, "req_b", 20)])
    with opened(db_path) as store:
        asyncio.run(store.settle(*read_dead_letter(dead.read_bytes().splitlines()[0]).item))
    with dead.open("ab") as out:
        out.write(b"not json\n")

    def files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.name.startswith("acct.db")}

    before_files, before_db = files(), state(db_path)
    assert replay(db_path, "--dry-run") == 1  # a malformed line
    out = capsys.readouterr().out
    assert "to replay 1, already settled 1, failed 0, malformed 1  (dry run: nothing written)" in out
    assert files() == before_files and state(db_path) == before_db
    # and then for real, without the malformed line: 0
    dead.write_bytes(b"\n".join(dead.read_bytes().splitlines()[:2]) + b"\n")
    assert replay(db_path) == 0
    assert billed(db_path) == {"req_a": 10, "req_b": 20}


def test_once_the_database_is_unavailable_the_rest_is_not_tried(key: Key, tmp_path: Path) -> None:
    """On SQLite each try would wait out the busy timeout: the first that finds the database
    locked fails, the others are failed without a try (and kept)."""
    db_path = tmp_path / "acct.db"
    dead_letter(db_path, key, [settlement(key, "req_x", 5), settlement(key, "req_y", 6)])
    lines = (tmp_path / DEAD_LETTER_NAME).read_bytes().splitlines()
    with opened(db_path) as store, locked(db_path):
        results = asyncio.run(replay_dead_letters(store, enumerate(lines, 1)))
    assert [(r.status, r.request_id) for r in results] == [("failed", "req_x"), ("failed", "req_y")]
    assert results[0].detail == "OperationalError: database is locked"
    assert results[1].detail == "not tried: OperationalError: database is locked"
    assert billed(db_path) == {}


def test_settings_reach_the_queue_and_the_replay_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = tmp_path / "elsewhere" / "dead.jsonl"
    monkeypatch.setenv("PURA_DATABASE_URL", f"sqlite:///{tmp_path / 'acct.db'}")
    monkeypatch.setenv("PURA_SETTLEMENT_DEAD_LETTER", str(dead))
    monkeypatch.setenv("PURA_SETTLEMENT_MAX_FAILURES", "7")
    monkeypatch.setenv("PURA_SETTLEMENT_RETRY_MS", "25")
    monkeypatch.setenv("PURA_SETTLEMENT_RETRY_MAX_MS", "2500")
    services = build_services(GatewaySettings(), RoutingConfig())
    try:
        queue = services.pipeline.settlement
        assert (queue.max_failures, queue.retry_s, queue.retry_max_s) == (7, 0.025, 2.5)
        assert queue.dead_letter_path == dead
    finally:
        services.db.close_sync()
    # the replay command reads the same file by default
    dead.parent.mkdir()
    dead.write_bytes(b"not json\n")
    assert cli(["settlements", "replay", "--dry-run"]) == 1
    assert f"{dead}: to replay 0, already settled 0, failed 0, malformed 1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"PURA_SETTLEMENT_RETRY_MS": "0"}, "settlement_retry_ms\n  Input should be greater than 0"),
        ({"PURA_SETTLEMENT_RETRY_MS": "soon"}, "settlement_retry_ms\n  Input should be a valid number"),
        ({"PURA_SETTLEMENT_RETRY_MAX_MS": "inf"}, "settlement_retry_max_ms\n  Input should be a finite number"),
        ({"PURA_SETTLEMENT_MAX_FAILURES": "0"},
         "settlement_max_failures\n  Input should be greater than or equal to 1"),
        ({"PURA_SETTLEMENT_RETRY_MS": "500", "PURA_SETTLEMENT_RETRY_MAX_MS": "100"},
         "PURA_SETTLEMENT_RETRY_MAX_MS (100) must be >= PURA_SETTLEMENT_RETRY_MS (500)"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_error(
    env: dict[str, str], error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as refused:
        GatewaySettings()
    assert error in str(refused.value)


def test_a_dead_letter_written_while_a_replay_claims_the_file_is_written_again(tmp_path: Path, monkeypatch) -> None:
    """The gateway appends to the file it opened; if a replay claimed the file (linked it
    away and unlinked the name) meanwhile, the lines may have gone into the claimed file after
    the replay's last read: they are written again under the name, for the next replay."""
    import os

    from gateway.accounting import settlement as settlement_module

    path = tmp_path / "dead.jsonl"
    claimed = tmp_path / "dead.jsonl.replaying"
    path.write_text('{"old": 1}\n', "utf-8")
    real_fsync = os.fsync
    calls = []

    def claim_during_the_first_write(fd: int) -> None:
        real_fsync(fd)
        calls.append(fd)
        if len(calls) == 1:  # a replay claims the file between this append's open and its check
            os.link(path, claimed)
            os.unlink(path)

    monkeypatch.setattr(settlement_module.os, "fsync", claim_during_the_first_write)
    settlement_module._append_synced(path, ['{"new": 2}'])
    assert claimed.read_text("utf-8") == '{"old": 1}\n{"new": 2}\n'
    assert path.read_text("utf-8") == '{"new": 2}\n'
    assert len(calls) == 2
