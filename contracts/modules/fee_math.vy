# pragma version ~=0.4.3
"""
@title EIP-1559-style fee step with catch-up and bounds
@custom:contract-name fee_math
@notice factor = 1 + step * (u - u*) / u*, clamped to [1 - step, 1 + step]; the fee is
        multiplied by the factor once per elapsed epoch (at most 255), clamped each time to
        [min_fee, max_fee], stopping early once a bound is reached.
"""

WAD: constant(uint256) = 10**18
BPS: constant(uint256) = 10_000
MAX_CATCH_UP: constant(uint256) = 255


@internal
@pure
def _factor(demand: uint256, capacity_value: uint256, target_bps: uint256, step_bps: uint256) -> (uint256, uint256):
    """
    @return (factor in WAD, utilisation in BPS; max uint256 when there is no capacity).
            With no capacity, any demand raises the fee by a full step and no demand lowers
            it by a full step.
    """
    step_wad: uint256 = step_bps * WAD // BPS
    if capacity_value == 0:
        if demand > 0:
            return WAD + step_wad, max_value(uint256)
        return WAD - step_wad, 0
    util_bps: uint256 = demand * BPS // capacity_value
    if util_bps >= target_bps:
        return WAD + min(step_wad * (util_bps - target_bps) // target_bps, step_wad), util_bps
    return WAD - min(step_wad * (target_bps - util_bps) // target_bps, step_wad), util_bps


@internal
@pure
def _compound(fee_in: uint256, min_fee: uint256, max_fee: uint256, factor_wad: uint256, epochs: uint256) -> uint256:
    """
    @dev Upward steps round up (a fee of a few base units can still rise), downward steps
         round down. fee <= 2**96 and factor <= 1.5 keep every product below 2**157.
    """
    fee: uint256 = max(min_fee, min(fee_in, max_fee))
    if factor_wad == WAD:
        return fee
    for k: uint256 in range(MAX_CATCH_UP):
        if k == epochs:
            break
        if factor_wad > WAD:
            fee = min((fee * factor_wad + WAD - 1) // WAD, max_fee)
            if fee == max_fee:
                break
        else:
            fee = max(fee * factor_wad // WAD, min_fee)
            if fee == min_fee:
                break
    return fee
