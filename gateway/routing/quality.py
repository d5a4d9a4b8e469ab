"""Per-upstream health over sliding windows, the quality score, and degradation.

Each (provider, model) route keeps a ring of one-second buckets covering ``window_s`` seconds.
A bucket is tagged with the second it belongs to; reading skips buckets older than the window,
and writing into a bucket whose tag is stale resets it first. The window therefore slides every
second (the seed reset whole buckets only after an idle period, which under steady traffic made
its "1h" figure a lifetime average), and memory is constant.

Successes *and* failures are recorded (the seed recorded only successes), with the latency of the
attempt (time to first byte for streams, to the complete body otherwise).

quality = 0.6 x success_rate + 0.4 x latency_score, where latency_score is 1 at or below 500 ms
and falls linearly to 0 at 10 s. With no samples the score is 1.0 (optimistic, so a new route
receives traffic), and the success rate is smoothed by one virtual success so that one early
failure does not zero a route.

These windows live in the process (the app's lifespan owns them): each replica measures the same
upstreams from its own side, which is what its own routing should react to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class WindowStats:
    requests: int = 0
    failures: int = 0
    latency_ms_sum: float = 0.0

    @property
    def success_rate(self) -> float:
        return 1.0 if self.requests == 0 else (self.requests - self.failures) / self.requests

    @property
    def error_rate(self) -> float:
        return 0.0 if self.requests == 0 else self.failures / self.requests

    @property
    def avg_latency_ms(self) -> float:
        return 0.0 if self.requests == 0 else self.latency_ms_sum / self.requests


class SlidingWindow:
    """Counts and latency sums over the last ``window_s`` seconds, in 1-second buckets.

    Totals are kept incrementally: reading expires the buckets that left the window since the
    last call (amortised O(1)), so a read does not walk all ``window_s`` buckets. Time must not
    go backwards (monotonic clock, or explicit increasing ``now`` in tests).
    """

    __slots__ = ("window_s", "_tags", "_req", "_fail", "_lat", "_expired_through", "_last_seen",
                 "requests", "failures", "latency_ms_sum")

    def __init__(self, window_s: int) -> None:
        self.window_s = window_s
        self._tags = [-1] * window_s
        self._req = [0] * window_s
        self._fail = [0] * window_s
        self._lat = [0.0] * window_s
        self._expired_through = -(2**62)  # every second <= this has been expired
        self._last_seen = -(2**62)
        self.requests = 0
        self.failures = 0
        self.latency_ms_sum = 0.0

    def _advance(self, second: int) -> None:
        cutoff = second - self.window_s  # buckets tagged <= cutoff are outside the window
        if cutoff > self._expired_through:
            if cutoff >= self._last_seen:
                # nothing recorded inside the window: clear everything at once
                w = self.window_s
                self._tags, self._req, self._fail, self._lat = [-1] * w, [0] * w, [0] * w, [0.0] * w
                self.requests, self.failures, self.latency_ms_sum = 0, 0, 0.0
            else:
                for s in range(self._expired_through + 1, cutoff + 1):
                    i = s % self.window_s
                    if self._tags[i] == s:
                        self.requests -= self._req[i]
                        self.failures -= self._fail[i]
                        self.latency_ms_sum -= self._lat[i]
                        self._tags[i], self._req[i], self._fail[i], self._lat[i] = -1, 0, 0, 0.0
            self._expired_through = cutoff
        if second > self._last_seen:
            self._last_seen = second

    def record(self, ok: bool, latency_ms: float, now: float | None = None) -> None:
        second = int(time.monotonic() if now is None else now)
        self._advance(second)
        i = second % self.window_s
        if self._tags[i] != second:
            self._tags[i], self._req[i], self._fail[i], self._lat[i] = second, 0, 0, 0.0
        self._req[i] += 1
        self.requests += 1
        if not ok:
            self._fail[i] += 1
            self.failures += 1
        self._lat[i] += latency_ms
        self.latency_ms_sum += latency_ms

    def stats(self, now: float | None = None) -> WindowStats:
        self._advance(int(time.monotonic() if now is None else now))
        return WindowStats(self.requests, self.failures, max(0.0, self.latency_ms_sum))


def latency_score(avg_latency_ms: float) -> float:
    return min(1.0, max(0.0, 1.0 - (avg_latency_ms - 500.0) / 9500.0))


def quality_score(stats: WindowStats) -> float:
    if stats.requests == 0:
        return 1.0
    smoothed_success = (stats.requests - stats.failures + 1) / (stats.requests + 1)
    return 0.6 * smoothed_success + 0.4 * latency_score(stats.avg_latency_ms)


class HealthBook:
    """Sliding windows for every route, keyed by ``provider/model``."""

    def __init__(
        self,
        window_s: int = 300,
        degraded_error_rate: float = 0.2,
        degraded_latency_ms: float = 5000.0,
        min_samples: int = 5,
    ) -> None:
        self.window_s = window_s
        self.degraded_error_rate = degraded_error_rate
        self.degraded_latency_ms = degraded_latency_ms
        self.min_samples = min_samples
        self._windows: dict[str, SlidingWindow] = {}

    def _window(self, route: str) -> SlidingWindow:
        window = self._windows.get(route)
        if window is None:
            window = self._windows[route] = SlidingWindow(self.window_s)
        return window

    def record(self, route: str, ok: bool, latency_ms: float, now: float | None = None) -> None:
        self._window(route).record(ok, latency_ms, now)

    def stats(self, route: str, now: float | None = None) -> WindowStats:
        window = self._windows.get(route)
        return WindowStats() if window is None else window.stats(now)

    def quality(self, route: str, now: float | None = None) -> float:
        return quality_score(self.stats(route, now))

    def is_degraded(self, route: str, now: float | None = None) -> bool:
        s = self.stats(route, now)
        if s.requests < self.min_samples:
            return False
        return s.error_rate > self.degraded_error_rate or s.avg_latency_ms > self.degraded_latency_ms

    def any_degraded(self, now: float | None = None) -> bool:
        return any(self.is_degraded(route, now) for route in self._windows)

    def clear(self) -> None:
        """Forget every measurement (operator reset; tests)."""
        self._windows.clear()

    def routes(self) -> list[str]:
        return sorted(self._windows)
