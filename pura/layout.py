"""The pool's unit of work and its packed per-slot word, as BackpressurePool.vy defines them.

One place for the Python side (scripts, gateway, benches, tests) to read them from, so a
layout change is one edit here plus the contract.

Capacities, units and backlogs are tasks (per epoch) scaled by TASK_SCALE; money converts to
tasks at the fee (money per task): tasks = money * TASK_SCALE // fee.
"""

from __future__ import annotations

from dataclasses import dataclass

TASK_SCALE = 10**5

MASK49 = 2**49 - 1
MASK60 = 2**60 - 1
BIAS = 2**59


@dataclass(frozen=True, slots=True)
class HotWord:
    capacity: int  # smoothed capacity as of the last rebalance, tasks * TASK_SCALE
    units: int  # weight in force until the next rebalance, tasks * TASK_SCALE
    saturated: bool
    marked: bool
    x: int  # backlog at the last rebalance minus verified credit since (may be negative)
    unclaimed: int  # money

    @property
    def backlog(self) -> int:
        return max(0, self.x)


def decode_hot(word: int) -> HotWord:
    """BackpressurePool.hot_word(task, slot) -> its fields."""
    return HotWord(
        capacity=word & MASK49,
        units=(word >> 49) & MASK49,
        saturated=bool((word >> 98) & 1),
        marked=bool((word >> 99) & 1),
        x=((word >> 100) & MASK60) - BIAS,
        unclaimed=word >> 160,
    )


def absorbable(total_units: int, fee: int, epochs: int = 1) -> int:
    """Money the sinks absorb over `epochs` at `fee`: units * fee * epochs // TASK_SCALE."""
    return total_units * fee * epochs // TASK_SCALE
