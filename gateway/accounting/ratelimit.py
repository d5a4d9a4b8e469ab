"""The per-key sliding-window rate limit, counted in memory and written behind.

The window is 60 one-second buckets per key (``RATE_WINDOW_S``): a request counts in the bucket
of the second it was admitted in and stops counting 59 to 60 s later, and the work per request
does not grow with the limit.

Why in memory: checking and counting in the database cost two statements and a dirtied page in
the admission transaction, on the critical path of every request. Here the check and the count
happen on the event loop, in one synchronous step, so within one process the limit is exact
(concurrent admissions cannot both take the last slot). The counts are still written to
``rate_buckets``, in the settlement's group commit (:mod:`gateway.accounting.settlement`) a few
milliseconds later, so that a restart and the other processes sharing the database see them.

Across processes (replicas on PostgreSQL, ``uvicorn --workers N`` on one SQLite file) each
process counts its own requests exactly and learns the others' from ``rate_buckets`` whenever it
reloads the key (:meth:`KeyWindow.load`: every ``PURA_KEY_CACHE_TTL_S``, and before a 429). A
key spread over several processes can therefore exceed its limit by what the other processes
admitted since that reload (plus the few milliseconds before their counts are written); the
database-only limiter this replaces was exact across processes. See "Rate limit" in ``docs/gateway.md``.
"""

from __future__ import annotations

from collections.abc import Iterable

RATE_WINDOW_S = 60


class KeyWindow:
    """One key's window in this process: its own counts and the others' as last loaded."""

    __slots__ = ("own", "unwritten", "others")

    def __init__(self) -> None:
        self.own: dict[int, int] = {}  # second -> requests this process admitted
        self.unwritten: dict[int, int] = {}  # the part of ``own`` not yet handed to a write
        self.others: dict[int, int] = {}  # second -> other processes' requests, as last loaded

    def count(self, sec: int) -> tuple[int, int | None]:
        """(requests in the window ending at second ``sec``, the window's oldest second)."""
        start = sec - RATE_WINDOW_S
        total, oldest = 0, None
        for buckets in (self.own, self.others):
            expired = [s for s in buckets if s <= start]
            for s in expired:
                del buckets[s]
            for s, n in buckets.items():
                total += n
                if oldest is None or s < oldest:
                    oldest = s
        return total, oldest

    def load(self, stored: Iterable[tuple[int, int]]) -> None:
        """Take the other processes' counts from the stored buckets ``(second, n)``.

        The stored counts include what this process has written itself; subtracting the counts
        it has handed to a write (committed or still in flight) leaves the others' share. In a
        single process the result is always 0, whatever the timing of the writes.
        """
        self.others = {}
        for sec, n in stored:
            written = self.own.get(sec, 0) - self.unwritten.get(sec, 0)
            if n > written:
                self.others[sec] = n - written


class RateWindows:
    """Every key's :class:`KeyWindow` in this process, and which of them have counts to write."""

    def __init__(self) -> None:
        self._windows: dict[str, KeyWindow] = {}
        self._dirty: set[str] = set()

    def window(self, key_id: str) -> KeyWindow:
        window = self._windows.get(key_id)
        if window is None:
            window = self._windows[key_id] = KeyWindow()
        return window

    def add(self, key_id: str, sec: int, n: int = 1) -> None:
        """Count (``n`` > 0) or uncount (``n`` < 0) requests of this process."""
        window = self.window(key_id)
        window.own[sec] = window.own.get(sec, 0) + n
        window.unwritten[sec] = window.unwritten.get(sec, 0) + n
        self._dirty.add(key_id)

    @property
    def has_unwritten(self) -> bool:
        return bool(self._dirty)

    def take_unwritten(self) -> list[tuple[str, int, int]]:
        """Hand the counts not yet written to a write: ``(key_id, second, n)``."""
        out = []
        for key_id in self._dirty:
            window = self._windows[key_id]
            out.extend((key_id, sec, n) for sec, n in window.unwritten.items() if n)
            window.unwritten = {}
        self._dirty.clear()
        return out

    def restore_unwritten(self, counts: list[tuple[str, int, int]]) -> None:
        """Give back counts whose write failed, so that the next write carries them."""
        for key_id, sec, n in counts:
            unwritten = self.window(key_id).unwritten
            unwritten[sec] = unwritten.get(sec, 0) + n
            self._dirty.add(key_id)

    def prune(self, now_sec: int) -> None:
        """Forget the windows with nothing left in them (the sweeper's job)."""
        for key_id, window in list(self._windows.items()):
            window.count(now_sec)
            if not (window.own or window.others or key_id in self._dirty):
                del self._windows[key_id]
