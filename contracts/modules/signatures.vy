# pragma version ~=0.4.3
"""
@title Non-reverting signature recovery for relayed batches
@custom:contract-name signatures
@notice Recovers the signer of a 65-byte r || s || v signature over an EIP-712 digest,
        returning the zero address instead of reverting, so one malformed entry in a
        relayed batch is skipped rather than reverting the whole batch.
@dev The acceptance rules are snekmate's `ecdsa` rules (the `s <= n/2` bound is
     snekmate's own `_MALLEABILITY_THRESHOLD`), plus: exactly 65 bytes (no EIP-2098
     compact form, which would make a second encoding of the same signature) and
     v in {27, 28}. snekmate's `_recover_sig` asserts on failure, which would let one bad
     entry revert a batch; that is the only reason this wrapper exists.
"""

from snekmate.utils import ecdsa


@internal
@pure
def _recover(digest: bytes32, signature: Bytes[65]) -> address:
    if len(signature) != 65:
        return empty(address)
    r: uint256 = extract32(signature, 0, output_type=uint256)
    s: uint256 = extract32(signature, 32, output_type=uint256)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    if v != 27 and v != 28:
        return empty(address)
    if s > ecdsa._MALLEABILITY_THRESHOLD or s == 0 or r == 0:
        return empty(address)
    # the precompile returns no data (-> empty address) for an invalid point
    return ecrecover(digest, v, r, s)
