# pragma version ~=0.4.3
"""
@title Non-reverting signature recovery for relayed batches
@custom:contract-name signatures
@notice Recovers the signer of an EIP-712 digest, returning the zero address instead of
        reverting, so one malformed entry in a relayed batch is skipped rather than
        reverting the whole batch. Two encodings, each the ONLY one accepted where it is
        used (so no signature has a second valid encoding):
        - `_recover`: 65 bytes r || s || v, v in {27, 28} (receipts);
        - `_recover_compact`: EIP-2098 (r, vs), vs = (v - 27) << 255 | s (attestations,
          64 bytes of calldata instead of 65 padded to 96 plus offset and length;
          CapacityRegistry.submit_attestations inlines this rule in its hot loop).
@dev The acceptance rules are snekmate's `ecdsa` rules (the `s <= n/2` bound is
     snekmate's own `_MALLEABILITY_THRESHOLD`), plus r != 0 and s != 0. snekmate's
     `_recover_sig` asserts on failure, which would let one bad entry revert a batch; that
     is the only reason this wrapper exists.
"""

from snekmate.utils import ecdsa

S_MASK: constant(uint256) = 2**255 - 1


@internal
@pure
def _recover(digest: bytes32, signature: Bytes[65]) -> address:
    if len(signature) != 65:
        return empty(address)
    v: uint256 = convert(slice(signature, 64, 1), uint256)
    s: uint256 = extract32(signature, 32, output_type=uint256)
    # the bound also keeps s below 2**255, so it fits the compact form
    if (v != 27 and v != 28) or s > ecdsa._MALLEABILITY_THRESHOLD:
        return empty(address)
    return self._recover_compact(digest, extract32(signature, 0, output_type=uint256), ((v - 27) << 255) | s)


@internal
@pure
def _recover_compact(digest: bytes32, r: uint256, vs: uint256) -> address:
    s: uint256 = vs & S_MASK
    if s > ecdsa._MALLEABILITY_THRESHOLD or s == 0 or r == 0:
        return empty(address)
    # the precompile returns no data (-> empty address) for an invalid point
    return ecrecover(digest, unsafe_add(vs >> 255, 27), r, s)
