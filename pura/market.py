"""Read-side helpers for a running market, shared by the demo, the benchmarks and tests."""

from __future__ import annotations

from pura.layout import absorbable


def expected_pay(pool, pricing, task: bytes, sinks, funders, seconds_ahead: int) -> list[int]:
    """What each of `sinks` will be paid by a rebalance `seconds_ahead` from the latest block,
    from views only: the pot (pending + the funders' unsettled streaming up to then), capped
    by what the units in force absorb at the current fee, split by units. Ignores departures
    and streams that end in between (good enough to size honest receipts)."""
    pot = pool.pools(task).pending
    for f in funders:
        j = _slot(pool, task, f)
        if j < 0:
            continue
        live = pool.stream_of(task, f)  # unsettled streaming moved into contrib
        raw = pool.streams(task, j)
        pot += (live.contrib - raw.contrib) + min(live.remaining, live.rate * seconds_ahead)
    units = [pool.position(task, s).units for s in sinks]
    total = sum(units)
    if total == 0:
        return [0] * len(sinks)
    to_sinks = min(pot, absorbable(total, pricing.base_fee(task)))
    return [to_sinks * u // total for u in units]


def _slot(pool, task: bytes, funder) -> int:
    address = getattr(funder, "address", funder)
    for j in range(pool.stream_count(task)):
        if pool.streams(task, j).funder == address:
            return j
    return -1
