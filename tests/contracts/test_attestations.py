"""Relayed EIP-712 capacity attestations: batch semantics and the attacks on them."""

import ape
import pytest
from ape import chain
from eth_utils import keccak

from pura.signing import Attestation

from .conftest import CHEAP, PREMIUM, USDC, WAD, own_events, smoothed
from pura.layout import TASK_SCALE

EXPIRED, NOT_REGISTERED, STALE, BAD_SIG = 1, 2, 3, 4


def rejected(tx, registry):
    return [(e.sink, e.nonce, e.reason) for e in registry.AttestationRejected.from_receipt(tx)]


def test_digest_matches_eth_account(registry, signer, sink_a):
    a, _ = signer.attestation(sink_a, 77, 3)
    assert registry.attestation_digest(CHEAP, sink_a, 77, 3, a.deadline) == a.digest(chain.chain_id, registry.address)
    assert registry.ATTESTATION_TYPEHASH() == keccak(
        text="CapacityAttestation(bytes32 taskType,address sink,uint32 capacity,uint32 nonce,uint32 deadline)")
    d = registry.eip712Domain()
    assert d[1] == "Pura CapacityRegistry" and d[3] == chain.chain_id and d[4] == registry.address


def test_relayed_batch_declares_for_each_sink(registry, signer, sink_a, sink_b, relayer):
    registry.register_sink(CHEAP, 200 * USDC, 10, sender=sink_a)
    registry.register_sink(CHEAP, 200 * USDC, 10, sender=sink_b)
    batch = [signer.attestation(sink_a, 150, 1)[1], signer.attestation(sink_b, 500, 1)[1]]
    assert registry.submit_attestations.call(CHEAP, batch, sender=relayer) == 2
    tx = registry.submit_attestations(CHEAP, batch, sender=relayer)
    # one event for the batch, listing each accepted attestation's head as submitted
    assert own_events(tx, registry) == [
        registry.CapacitiesAttested(task_type=CHEAP, heads=[batch[0][0], batch[1][0]]),
    ]
    assert [Attestation.unpack_head(h)[:3] for h in own_events(tx, registry)[0].heads] == [
        (sink_a.address, 150, 1), (sink_b.address, 500, 1)]
    assert registry.sink_state(CHEAP, sink_a) == (1, 150, 200, 1, 0)
    assert registry.sink_state(CHEAP, sink_b) == (2, 500, 200, 1, 0)
    # the published targets: 150 under the cap of 200; 500 clamped to the cap, which binds (hard)
    assert registry.target_of(CHEAP, 0) == (150, 1, False)
    assert registry.target_of(CHEAP, 1) == (200, 1, True)


def test_bad_entries_are_skipped_with_reasons(registry, signer, sink_a, sink_b, stranger, relayer):
    registry.register_sink(CHEAP, 200 * USDC, 10, sender=sink_a)
    now = chain.blocks.head.timestamp
    batch = [
        signer.attestation(sink_a, 20, 1, deadline=now - 1)[1],       # expired
        signer.attestation(stranger, 20, 1)[1],                        # not registered
        signer.attestation(sink_a, 20, 0)[1],                          # nonce not above 0
        signer.attestation(sink_a, 20, 5, key=sink_b)[1],              # signed by someone else
        signer.attestation(sink_a, 30, 6)[1],                          # good
        signer.attestation(sink_a, 40, 6)[1],                          # same nonce again: stale
        signer.attestation(sink_a, 20, 5)[1],                          # reordered older: stale
    ]
    tx = registry.submit_attestations(CHEAP, batch, sender=relayer)
    assert rejected(tx, registry) == [
        (sink_a.address, 1, EXPIRED), (stranger.address, 1, NOT_REGISTERED), (sink_a.address, 0, STALE),
        (sink_a.address, 5, BAD_SIG), (sink_a.address, 6, STALE),
        (sink_a.address, 5, STALE),
    ]
    st = registry.sink_state(CHEAP, sink_a)
    assert (st.declared, st.nonce) == (30, 6)
    assert registry.target_of(CHEAP, 0) == (30, 1, False)


def test_attestation_for_another_task_type_does_not_transfer(registry, signer, sink_a, relayer):
    registry.register_sink(CHEAP, 200 * USDC, 10, sender=sink_a)
    a, arg = signer.attestation(sink_a, 99, 1, task_type=PREMIUM)
    tx = registry.submit_attestations(PREMIUM, [arg], sender=relayer)
    assert rejected(tx, registry) == [(sink_a.address, 1, NOT_REGISTERED)]
    # relaying it under the task type the sink is registered in breaks the signature
    tx = registry.submit_attestations(CHEAP, [arg], sender=relayer)
    assert rejected(tx, registry) == [(sink_a.address, 1, BAD_SIG)]


def test_burst_of_attestations_moves_the_signal_one_step(registry, pool, signer, sink_a, relayer, clock, keeper):
    """The anchor let k attestations in one batch move the signal by 1 - 0.7^k; here a
    burst only replaces the target, and the signal steps once per epoch."""
    registry.register_sink(CHEAP, 1000 * USDC, 100, sender=sink_a)
    clock.next_epoch(200)
    pool.rebalance(CHEAP, sender=keeper)
    s0 = smoothed(pool, sink_a)
    assert s0 == 100 * TASK_SCALE
    batch = [signer.attestation(sink_a, 1000, n)[1] for n in range(1, 11)]
    registry.submit_attestations(CHEAP, batch, sender=relayer)
    assert smoothed(pool, sink_a) == s0
    clock.next_epoch()
    pool.rebalance(CHEAP, sender=keeper)
    # one step: 0.3 * 1000 + 0.7 * s0 (the gap rounds toward the target)
    assert smoothed(pool, sink_a) == 1000 * TASK_SCALE - (1000 * TASK_SCALE - s0) * 7 // 10


def test_attested_capacity_is_clamped_to_the_bond(registry, pool, signer, sink_a, relayer, clock, keeper):
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    registry.submit_attestations(CHEAP, [signer.attestation(sink_a, 2**32 - 1, 1)[1]], sender=relayer)
    assert registry.target_of(CHEAP, 0) == (100, 1, True)
    clock.next_epoch(200)
    pool.rebalance(CHEAP, sender=keeper)
    assert smoothed(pool, sink_a) == 100 * TASK_SCALE


def test_nonce_survives_leaving_so_old_attestations_cannot_be_replayed(registry, pool, signer, sink_a,
                                                                       relayer, keeper, clock):
    """A sink that leaves and comes back keeps its last accepted nonce: an attestation it
    signed in its earlier membership (still within its deadline) is stale, not replayable."""
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    _, old = signer.attestation(sink_a, 90, 3)
    assert registry.submit_attestations.call(CHEAP, [old], sender=relayer) == 1
    registry.submit_attestations(CHEAP, [old], sender=relayer)
    registry.deregister_sink(CHEAP, sender=sink_a)
    assert registry.sink_state(CHEAP, sink_a) == (0, 0, 0, 3, 0)
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    assert registry.sink_state(CHEAP, sink_a).nonce == 3
    tx = registry.submit_attestations(CHEAP, [old], sender=relayer)
    assert rejected(tx, registry) == [(sink_a.address, 3, STALE)]
    assert registry.sink_state(CHEAP, sink_a).declared == 10


def test_fields_beyond_32_bits_cannot_be_signed_for_relay(sink_a):
    """The signed type says uint32; the client refuses what the packed entry cannot carry
    rather than relaying a different value than the one signed."""
    for fields in ((2**32, 1, 1), (1, 2**32, 1), (1, 1, 2**32)):
        with pytest.raises(ValueError, match="does not fit a uint32"):
            Attestation(CHEAP, sink_a.address, *fields).head


SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def test_malformed_and_malleable_signatures_are_skipped(registry, signer, sink_a, relayer):
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    _, (head, r, vs) = signer.attestation(sink_a, 50, 1)
    s, v_bit = vs & (2**255 - 1), vs >> 255
    # the malleable twin (n - s, other v) recovers the same signer with a bare ecrecover
    twin = ((1 - v_bit) << 255) | (SECP256K1_N - s)
    for bad_r, bad_vs in ((r, twin), (r, vs ^ (1 << 255)), (0, vs), (r, v_bit << 255), (r + 1, vs)):
        tx = registry.submit_attestations(CHEAP, [(head, bad_r, bad_vs)], sender=relayer)
        assert rejected(tx, registry) == [(sink_a.address, 1, BAD_SIG)]
    # the well-formed one still goes through afterwards: nothing above consumed the nonce
    assert registry.submit_attestations.call(CHEAP, [(head, r, vs)], sender=relayer) == 1


def test_a_relayer_cannot_alter_a_packed_field(registry, signer, sink_a, relayer):
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    _, (head, r, vs) = signer.attestation(sink_a, 50, 1)
    for flip in (1 << 64, 1 << 33, 1 << 8, 1 << 96):  # capacity, nonce, deadline, sink
        tx = registry.submit_attestations(CHEAP, [(head ^ flip, r, vs)], sender=relayer)
        assert [e.reason for e in registry.AttestationRejected.from_receipt(tx)] in ([BAD_SIG], [NOT_REGISTERED])
    assert registry.sink_state(CHEAP, sink_a).nonce == 0
