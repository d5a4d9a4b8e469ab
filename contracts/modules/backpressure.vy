# pragma version ~=0.4.3
"""
@title Backpressure weight
@custom:contract-name backpressure
@notice For sink k, per epoch:
            Q_k <- min(max(0, Q_k + paid_k - verified_k), H * E_k)
            E_k  = Cbar_k * fee                        (money per epoch at full capacity)
            w_k  = Cbar_k * max(0, 1 - (Q_k / E_k) / H) = max(0, Cbar_k - Q_k / (H * fee))
        Units are w_k in tasks per epoch scaled by 1e9. A sink that is not paid gains no
        backlog (never penalised while idle); backlog beyond H epochs carries no more
        information (the weight is already 0), so it is capped there and handled by slashing.
"""

WAD: constant(uint256) = 10**18
BPS: constant(uint256) = 10_000
UNIT_DIV: constant(uint256) = 10**9


@internal
@pure
def _epoch_value(s_wad: uint256, fee: uint256) -> uint256:
    """
    @dev E_k: money one epoch at capacity `s_wad` is worth at `fee` per task (rounded down).
    """
    return s_wad * fee // WAD


@internal
@pure
def _backlog_cap(epoch_value: uint256, tolerance_bps: uint256) -> uint256:
    """
    @dev H * E_k, rounded down.
    """
    return epoch_value * tolerance_bps // BPS


@internal
@pure
def _units(s_wad: uint256, backlog: uint256, fee: uint256, tolerance_bps: uint256) -> uint256:
    """
    @dev w_k * 1e9 = (Cbar_k - Q_k / (H * fee)) in WAD, divided by 1e9, rounded down.
         The penalty is rounded down too (in the sink's favour by < 1e-18 task).
    """
    penalty: uint256 = backlog * WAD * BPS // (fee * tolerance_bps)
    if s_wad <= penalty:
        return 0
    return unsafe_sub(s_wad, penalty) // UNIT_DIV  # s_wad > penalty
