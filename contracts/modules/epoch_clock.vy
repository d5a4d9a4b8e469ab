# pragma version ~=0.4.3
"""
@title Epoch clock
@custom:contract-name epoch_clock
@notice One clock for the whole protocol: epoch(t) = (t - GENESIS) // EPOCH_LENGTH.
        Every Pura contract initialises this module with the values the
        CapacityRegistry was deployed with, so all contracts agree on epoch numbers.
"""

GENESIS: public(immutable(uint256))
EPOCH_LENGTH: public(immutable(uint256))


@deploy
def __init__(genesis: uint256, epoch_length: uint256):
    # genesis <= block.timestamp: callers pass block.timestamp (the registry) or the
    # registry's GENESIS (everyone else), both in the past
    assert epoch_length > 0, "epoch_clock: zero epoch length"
    GENESIS = genesis
    EPOCH_LENGTH = epoch_length


@internal
@view
def _epoch() -> uint256:
    # GENESIS <= block.timestamp (see __init__) and time only moves forward.
    return unsafe_sub(block.timestamp, GENESIS) // EPOCH_LENGTH
