# pragma version ~=0.4.3
"""
@title Once-per-epoch EWMA, evaluated lazily
@custom:contract-name ewma
@notice s_e = target + (s_e0 - target) * (1 - alpha)^(e - e0)
        i.e. exactly one EWMA step  s <- alpha * target + (1 - alpha) * s  per elapsed epoch,
        however many declarations happened in between (only the last one is the target).
        WAD fixed point; the gap is rounded toward zero, so the signal never overshoots and
        reaches the target exactly once the gap falls below one wei of WAD (the anchor's
        integer floor stalled up to 3 units short).
"""


WAD: constant(uint256) = 10**18
MAX_STEPS: constant(uint256) = 2**32 - 1


@internal
@pure
def _advance(s_wad: uint256, target_wad: uint256, epochs: uint256, decay_wad: uint256) -> uint256:
    """
    @param s_wad The signal at the last materialised epoch.
    @param target_wad The target (declared capacity, capped), WAD.
    @param epochs Epochs elapsed since then.
    @param decay_wad 1 - alpha, WAD.
    @return The signal now.
    """
    if epochs == 0 or s_wad == target_wad:
        return s_wad
    return self._step(s_wad, target_wad, self._decay(epochs, decay_wad))


@internal
@pure
def _decay(epochs: uint256, decay_wad: uint256) -> uint256:
    """
    @dev (1 - alpha)^epochs in WAD, by binary exponentiation, each product rounded down;
         0 beyond 2**32 - 1 epochs (the signal is at its target by then). The decay is at
         most WAD (asserted), so every operand stays <= WAD and every product < 2**120:
         the arithmetic is unchecked by construction. 32 rounds cover every uint32.
    """
    if epochs == 1:
        return decay_wad  # the common case: no exponentiation
    if epochs > MAX_STEPS:
        return 0
    assert decay_wad <= WAD, "ewma: decay above one"
    result: uint256 = WAD
    b: uint256 = decay_wad
    e: uint256 = epochs
    for _: uint256 in range(32):
        if e == 0:
            break
        if e & 1 == 1:
            result = unsafe_div(unsafe_mul(result, b), WAD)
        e = e >> 1
        if e != 0:
            b = unsafe_div(unsafe_mul(b, b), WAD)
    return result


@internal
@pure
def _step(s_wad: uint256, target_wad: uint256, f_wad: uint256) -> uint256:
    """
    @dev target + (s - target) * f, the gap rounded toward zero (never overshoots).
         Unchecked: callers pass signals < 2**96 and f <= WAD (a power of a decay), so the
         product is < 2**156 and the result lies between s and target.
    """
    if s_wad > target_wad:
        return unsafe_add(target_wad, unsafe_div(unsafe_mul(unsafe_sub(s_wad, target_wad), f_wad), WAD))
    return unsafe_sub(target_wad, unsafe_div(unsafe_mul(unsafe_sub(target_wad, s_wad), f_wad), WAD))
