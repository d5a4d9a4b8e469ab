# pragma version ~=0.4.3
"""
@title FormulaHarness
@custom:contract-name FormulaHarness
@notice TEST ONLY. Exposes the protocol's pure formula modules as external views so
        property tests can exercise the exact deployed arithmetic cheaply.
"""

from ..modules import ewma
from ..modules import backpressure
from ..modules import fee_math
from ..modules import signatures


@external
@pure
def pow_wad(base_wad: uint256, n: uint256) -> uint256:
    return ewma._decay(n, base_wad)


@external
@pure
def ewma_advance(s_wad: uint256, target_wad: uint256, epochs: uint256, decay_wad: uint256) -> uint256:
    return ewma._advance(s_wad, target_wad, epochs, decay_wad)


@external
@pure
def units(capacity: uint256, backlog: uint256, tolerance_bps: uint256) -> uint256:
    return backpressure._units(capacity, backlog, tolerance_bps)


@external
@pure
def backlog_cap(capacity: uint256, tolerance_bps: uint256) -> uint256:
    return backpressure._backlog_cap(capacity, tolerance_bps)


@external
@pure
def to_tasks(amount: uint256, fee: uint256) -> uint256:
    return backpressure._to_tasks(amount, fee)


@external
@pure
def fee_factor(demand: uint256, capacity_value: uint256, target_bps: uint256, step_bps: uint256) -> (uint256, uint256):
    return fee_math._factor(demand, capacity_value, target_bps, step_bps)


@external
@pure
def fee_compound(fee: uint256, min_fee: uint256, max_fee: uint256, factor_wad: uint256, epochs: uint256) -> uint256:
    return fee_math._compound(fee, min_fee, max_fee, factor_wad, epochs)


@external
@view
def recover(digest: bytes32, signature: Bytes[65]) -> address:
    return signatures._recover(digest, signature)


@external
@view
def recover_compact(digest: bytes32, r: uint256, vs: uint256) -> address:
    return signatures._recover_compact(digest, r, vs)
