# pragma version ~=0.4.3
"""
@title Backpressure weight
@custom:contract-name backpressure
@notice For sink k, per epoch, with every quantity in TASKS (scaled by 1e5, the unit of
        pool units):
            Q_k <- min(max(0, Q_k + paid_k / fee - verified_k / fee'), H * Cbar_k)
            w_k  = Cbar_k * max(0, 1 - (Q_k / Cbar_k) / H) = max(0, Cbar_k - Q_k / H)
        Money is converted to tasks at the fee in force when it is paid (fee) or credited
        (fee'). Measuring the backlog in tasks, not money, matters: a dead sink makes
        capacity scarce, scarcity raises the fee, and a money backlog would shrink in
        epochs as the fee rises, handing the dead sink its share back.
        A sink that is not paid gains no backlog (never penalised while idle); backlog beyond
        H epochs carries no more information (the weight is already 0), so it is capped
        there and handled by slashing.
"""

BPS: constant(uint256) = 10_000
TASK_SCALE: constant(uint256) = 10**5


@internal
@pure
def _to_tasks(amount: uint256, fee: uint256) -> uint256:
    """
    @dev Money -> tasks * 1e5 at `fee` money per task, rounded down. Unchecked: callers
         pass amount < 2**128 (money; token_io caps balances at 2**96) and fee >= 1.
    """
    return unsafe_div(unsafe_mul(amount, TASK_SCALE), fee)


@internal
@pure
def _to_money(tasks: uint256, fee: uint256) -> uint256:
    """
    @dev Tasks * 1e5 -> money at `fee` money per task, rounded down.
    """
    return tasks * fee // TASK_SCALE


@internal
@pure
def _backlog_cap(capacity: uint256, tolerance_bps: uint256) -> uint256:
    """
    @dev H * Cbar_k (tasks * 1e5), rounded down. Unchecked: capacity < 2**49 and
         tolerance_bps <= 100_000 (the pool's bounds).
    """
    return unsafe_div(unsafe_mul(capacity, tolerance_bps), BPS)


@internal
@pure
def _units(capacity: uint256, backlog: uint256, tolerance_bps: uint256) -> uint256:
    """
    @dev w_k = Cbar_k - Q_k / H (tasks * 1e5), floored at 0; the penalty rounds down.
         Unchecked: backlog < 2**96 and tolerance_bps >= 1_000 (the pool's bounds).
    """
    penalty: uint256 = unsafe_div(unsafe_mul(backlog, BPS), tolerance_bps)
    if capacity <= penalty:
        return 0
    return unsafe_sub(capacity, penalty)  # capacity > penalty
