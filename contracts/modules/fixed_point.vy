# pragma version ~=0.4.3
"""
@title Fixed-point helpers (WAD = 1e18)
@custom:contract-name fixed_point
@notice Pure helpers shared by the Pura contracts. Every function states its
        rounding direction; callers pick the direction that favours the protocol.
"""

WAD: constant(uint256) = 10**18
BPS: constant(uint256) = 10_000


@internal
@pure
def _pow_wad(base_wad: uint256, n: uint256) -> uint256:
    """
    @dev base^n in WAD, by binary exponentiation, each product rounded down.
         `base_wad` must be <= 2**128 (so that squares fit 256 bits); callers pass
         factors in [0, 2 * WAD]. Exponents above 2**32 - 1 are rejected by the
         bounded loop (32 rounds cover every epoch count a uint32 can hold).
    @param base_wad The base in WAD.
    @param n The exponent.
    @return The power in WAD, rounded down.
    """
    assert n < 2**32, "fixed_point: exponent too large"
    result: uint256 = WAD
    b: uint256 = base_wad
    e: uint256 = n
    for _: uint256 in range(32):
        if e == 0:
            break
        if e & 1 == 1:
            result = result * b // WAD
        e = e >> 1
        if e != 0:
            b = b * b // WAD
    return result


@internal
@pure
def _min(a: uint256, b: uint256) -> uint256:
    if a < b:
        return a
    return b
