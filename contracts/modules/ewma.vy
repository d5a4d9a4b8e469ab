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

from . import fixed_point

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
    @dev (1 - alpha)^epochs in WAD; 0 beyond 2**32 - 1 epochs (the signal is at its target).
    """
    if epochs == 1:
        return decay_wad  # the common case: no exponentiation
    if epochs > MAX_STEPS:
        return 0
    return fixed_point._pow_wad(decay_wad, epochs)


@internal
@pure
def _step(s_wad: uint256, target_wad: uint256, f_wad: uint256) -> uint256:
    """
    @dev target + (s - target) * f, the gap rounded toward zero (never overshoots).
    """
    if s_wad > target_wad:
        return target_wad + unsafe_sub(s_wad, target_wad) * f_wad // WAD
    return target_wad - unsafe_sub(target_wad, s_wad) * f_wad // WAD
