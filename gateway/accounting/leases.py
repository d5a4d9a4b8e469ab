"""Budget leases: each gateway process holds a slice of a key's daily budget in the database
and admits requests against it in memory.

Why: a budget reservation committed before every upstream call was the largest single cost of
a request at low load (a write transaction, about 130 us on the 2-core target machine, on
every request's critical path). With a lease, the common request commits nothing before its
upstream call: it *carves* its reservation out of the lease in memory, after one read that
checks the key is still active and the day's holdings still fit under its stored cap (about
6 us on SQLite). The database work moves into the settlement's group commit, which already
runs every few milliseconds off the critical path.

The budget bound does not move into memory. In the database, a lease is an ordinary row of
``reservations`` (id ``lease_<process token>_<n>``) whose amount is counted in the day's
``reserved_micros``, and every change to it is the same conditional upsert as a request's
reservation (``spent + reserved + delta <= cap``, the cap read inside the statement). So the
database still guarantees ``spent + reserved <= cap`` across every process and every
concurrent request; what the process guarantees, in one synchronous step on its event loop, is
that the requests it admits never carve more than its leases hold. Each request's bill is
clamped to its carve, so ``spent <= cap`` holds as before.

What stays immediate: revocation and a lowered cap (the read before each carve sees both, and a
request that no longer fits takes the slow path, whose upsert refuses it). What a lease costs:

* several processes sharing a key: a process can be refused (402) while another holds unspent
  lease. Each lease is at most ``factor`` times the reservation that grew it and at most a
  quarter of what was left of the budget when it grew, and it is returned after
  ``idle_ms`` without requests, so the gap is bounded and short-lived;
* a crash: the lease stays held until the sweeper releases it, like a crashed request's
  reservation did (``PURA_RESERVATION_TTL_S``); a live process refreshes its leases' age well
  within that TTL.

``factor = 0`` grows a lease by exactly what a request needs and gives it back as each request
settles: the database then holds exactly the requests in flight, as before leases.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field

from gateway.accounting.db import Tx

# The key's current cap, or NULL when the key is revoked (or gone).
ACTIVE_CAP = "(SELECT daily_budget_micros FROM api_keys WHERE id = ? AND revoked_ms IS NULL)"


class LeaseLost(Exception):
    """The lease's row is gone (released by a sweeper after the TTL): its carves no longer
    hold anything in the database."""


@dataclass(slots=True, eq=False)
class Lease:
    """One process's slice of one key's budget for one UTC day."""

    key_id: str
    day: str
    row_id: str
    total: int = 0  # micro-USD held in the database (the row's amount)
    used: int = 0  # carved by requests not settled yet
    last_carve_ms: int = 0
    refreshed_ms: int = 0  # when the row's age (created_ms) was last reset
    growing: int = 0  # transactions (grows, reads before a carve) in flight
    open: int = 0  # carves not settled yet (zero-amount ones included)
    has_row: bool = False  # a grow has committed, so the database has its row
    lost: bool = False  # the row is gone: carves settle without releasing anything
    retired: bool = False  # no new carves; returned once nothing is carved

    @property
    def free(self) -> int:
        return self.total - self.used


@dataclass(slots=True, eq=False)
class Carve:
    lease: Lease
    amount: int
    ts: int  # when the request was admitted


@dataclass(slots=True)
class LeaseBook:
    """The process's leases and carves. Touched only from the event loop."""

    factor: int = 0
    idle_ms: int = 1_000
    token: str = field(default_factory=lambda: secrets.token_hex(6))
    leases: dict[tuple[str, str], Lease] = field(default_factory=dict)
    retired: list[Lease] = field(default_factory=list)
    carves: dict[str, Carve] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=itertools.count)

    def lease(self, key_id: str, day: str) -> Lease:
        lease = self.leases.get((key_id, day))
        if lease is None:
            lease = Lease(key_id, day, f"lease_{self.token}_{next(self._ids)}")
            self.leases[(key_id, day)] = lease
        return lease

    def retire(self, lease: Lease) -> None:
        """No new carves from ``lease``; it is returned once its carves have settled."""
        if self.leases.get((lease.key_id, lease.day)) is lease:
            del self.leases[(lease.key_id, lease.day)]
        if not lease.retired:
            lease.retired = True
            self.retired.append(lease)

    def carve(self, lease: Lease, request_id: str, amount: int, ts: int) -> None:
        assert 0 <= amount <= lease.free
        lease.used += amount
        lease.last_carve_ms = ts
        carve = self.carves.get(request_id)
        if carve is None:
            self.carves[request_id] = Carve(lease, amount, ts)
            lease.open += 1
        else:  # an escalation grows the request's carve (always from the same lease)
            assert carve.lease is lease
            carve.amount += amount

    def uncarve(self, request_id: str, amount: int, drop: bool) -> None:
        """Undo a carve of ``amount`` (a grow that failed after part was carved); ``drop``: the
        carve was made for this attempt alone (an admission, not an escalation)."""
        carve = self.carves[request_id]
        carve.amount -= amount
        carve.lease.used -= amount
        if drop:
            assert carve.amount == 0
            self.pop(request_id)

    def pop(self, request_id: str) -> Carve | None:
        """Take a request's carve out of the book (its settlement); ``lease.used`` still counts
        it until the settlement has committed."""
        carve = self.carves.pop(request_id, None)
        if carve is not None:
            carve.lease.open -= 1
        return carve

    def put_back(self, request_id: str, carve: Carve) -> None:
        """Undo :meth:`pop` (the settlement did not commit)."""
        self.carves[request_id] = carve
        carve.lease.open += 1

    def abandon_older_than(self, ts: int) -> list[str]:
        """Forget carves of requests admitted before ``ts`` (the sweeper's TTL ago) that have not
        settled: a request that never settles must not hold its lease forever. What they carved
        stays in the lease's row until the lease goes back; if such a request settles after all,
        it is billed like one whose reservation the sweeper released."""
        old = [rid for rid, carve in self.carves.items() if carve.ts < ts]
        for rid in old:
            carve = self.pop(rid)
            assert carve is not None
            carve.lease.used -= carve.amount
        return old

    def returnable(self, now: int) -> list[Lease]:
        """Leases with nothing carved that are retired or idle: retire them, hand them back."""
        for lease in list(self.leases.values()):
            if lease.open == 0 and lease.used == 0 and lease.growing == 0 and now - lease.last_carve_ms >= self.idle_ms:
                self.retire(lease)
        ready = [lease for lease in self.retired if lease.open == lease.used == lease.growing == 0]
        self.retired = [lease for lease in self.retired if lease not in ready]
        return [lease for lease in ready if lease.has_row and not lease.lost]


# ----------------------------------------------------------------------------- scripts


def budget_view(tx: Tx, key_id: str, day: str) -> tuple[int | None, int]:
    """(the key's active cap or None when revoked, spent + reserved today)."""
    row = tx.one(
        f"SELECT {ACTIVE_CAP}, (SELECT spent_micros + reserved_micros FROM budget_days"
        " WHERE key_id = ? AND day = ?)",
        (key_id, key_id, day),
    )
    if row is None or row[0] is None:
        return None, 0
    return int(row[0]), int(row[1] or 0)


def hold(tx: Tx, key_id: str, day: str, amount: int) -> tuple[str, int, int]:
    """Add ``amount`` to the day's reserved total if it fits under the key's stored cap, in one
    statement: ("ok" | "unauthorized" | "budget_exhausted", cap, cap - spent - reserved)."""
    row = tx.one(
        "INSERT INTO budget_days (key_id, day, spent_micros, reserved_micros)"
        f" SELECT ?, ?, 0, ? WHERE ? <= {ACTIVE_CAP}"
        " ON CONFLICT (key_id, day) DO UPDATE"
        " SET reserved_micros = budget_days.reserved_micros + excluded.reserved_micros"
        " WHERE budget_days.spent_micros + budget_days.reserved_micros"
        f" + excluded.reserved_micros <= {ACTIVE_CAP}"
        f" RETURNING spent_micros + reserved_micros, {ACTIVE_CAP}",
        (key_id, day, amount, amount, key_id, key_id, key_id),
    )
    if row is not None:
        cap = int(row[1])
        return "ok", cap, cap - int(row[0])
    cap, used = budget_view(tx, key_id, day)
    if cap is None:
        return "unauthorized", 0, 0
    return "budget_exhausted", cap, max(0, cap - used)


def grow(
    tx: Tx, lease_row: str, exists: bool, key_id: str, day: str, need: int, extra: int, ts: int
) -> tuple[str, int, int, int]:
    """Grow a lease by ``need`` plus up to ``extra`` (at most a quarter of what the budget has
    left beyond ``need``): (status, cap, remaining after, amount grown). ``exists``: a grow of
    this lease has committed before, so its row must be there; if it is not (a sweeper released
    it), raises :class:`LeaseLost`, which rolls the transaction back."""
    # The lease's row first, then the day's budget: the order every script that touches both
    # uses (settlement, give-back, the sweeper), so that PostgreSQL's row locks cannot deadlock.
    if exists:
        if tx.one(
            "UPDATE reservations SET created_ms = ? WHERE id = ? RETURNING amount_micros",
            (ts, lease_row),
        ) is None:
            raise LeaseLost(lease_row)
    else:  # (an upsert: concurrent first grows of one lease meet on its row)
        tx.execute(
            "INSERT INTO reservations (id, key_id, day, amount_micros, created_ms)"
            " VALUES (?, ?, ?, 0, ?) ON CONFLICT (id) DO UPDATE SET created_ms = excluded.created_ms",
            (lease_row, key_id, day, ts),
        )
    if extra > 0:
        cap, used = budget_view(tx, key_id, day)
        extra = 0 if cap is None else max(0, min(extra, (cap - used - need) // 4))
    status, cap, remaining = hold(tx, key_id, day, need + extra)
    amount = need + extra
    if status == "budget_exhausted" and extra > 0:
        status, cap, remaining = hold(tx, key_id, day, need)
        amount = need
    if status != "ok":
        if not exists:  # nothing held: no empty row left behind (unless a concurrent grow's)
            tx.execute("DELETE FROM reservations WHERE id = ? AND amount_micros = 0", (lease_row,))
        return status, cap, remaining, 0
    tx.execute(
        "UPDATE reservations SET amount_micros = amount_micros + ? WHERE id = ?", (amount, lease_row)
    )
    return status, cap, remaining, amount


def hold_again(tx: Tx, key_id: str, day: str, amount: int) -> bool:
    """A settlement holds ``amount`` again for a lease, all of it or nothing, only if it is at
    most a quarter of what the budget has left (the bound a grow keeps too): one statement."""
    return tx.one(
        "UPDATE budget_days SET reserved_micros = reserved_micros + ?"
        " WHERE key_id = ? AND day = ?"
        f" AND spent_micros + reserved_micros + 4 * ? <= {ACTIVE_CAP} RETURNING 1",
        (amount, key_id, day, amount, key_id),
    ) is not None


def give_back(tx: Tx, lease_rows: list[str]) -> int:
    """Return leases to their budgets (what their rows hold, which is what the database counts);
    a row already released by a sweeper returns nothing. Returns the amount returned."""
    total = 0
    for row_id in lease_rows:
        row = tx.one(
            "DELETE FROM reservations WHERE id = ? RETURNING key_id, day, amount_micros", (row_id,)
        )
        if row is None:
            continue
        key_id, day, amount = row
        tx.execute(
            "UPDATE budget_days SET reserved_micros = reserved_micros - ?"
            " WHERE key_id = ? AND day = ?",
            (amount, key_id, day),
        )
        total += int(amount)
    return total


def refresh(tx: Tx, lease_rows: list[str], ts: int) -> set[str]:
    """Reset the rows' age so that no sweeper takes a live lease; returns the rows found."""
    found = set()
    for row_id in lease_rows:
        if tx.one("UPDATE reservations SET created_ms = ? WHERE id = ? RETURNING id", (ts, row_id)):
            found.add(row_id)
    return found
