"""Relayed EIP-712 capacity attestations: batch semantics and the attacks on them."""

import ape
from ape import chain
from eth_utils import keccak

from .conftest import CHEAP, PREMIUM, USDC, WAD, own_events

EXPIRED, NOT_REGISTERED, STALE, BAD_SIG = 1, 2, 3, 4


def rejected(tx, registry):
    return [(e.sink, e.nonce, e.reason) for e in registry.AttestationRejected.from_receipt(tx)]


def test_digest_matches_eth_account(registry, signer, sink_a):
    a, _ = signer.attestation(sink_a, 77, 3)
    assert registry.attestation_digest(CHEAP, sink_a, 77, 3, a.deadline) == a.digest(chain.chain_id, registry.address)
    assert registry.ATTESTATION_TYPEHASH() == keccak(
        text="CapacityAttestation(bytes32 taskType,address sink,uint256 capacity,uint256 nonce,uint256 deadline)")
    d = registry.eip712Domain()
    assert d[1] == "Pura CapacityRegistry" and d[3] == chain.chain_id and d[4] == registry.address


def test_relayed_batch_declares_for_each_sink(registry, signer, sink_a, sink_b, relayer):
    registry.register_sink(CHEAP, 200 * USDC, 10, sender=sink_a)
    registry.register_sink(CHEAP, 200 * USDC, 10, sender=sink_b)
    batch = [signer.attestation(sink_a, 150, 1)[1], signer.attestation(sink_b, 500, 1)[1]]
    assert registry.submit_attestations.call(CHEAP, batch, sender=relayer) == 2
    tx = registry.submit_attestations(CHEAP, batch, sender=relayer)
    assert own_events(tx, registry) == [
        registry.CapacityDeclared(task_type=CHEAP, sink=sink_a.address, declared=150, nonce=1),
        registry.CapacityDeclared(task_type=CHEAP, sink=sink_b.address, declared=500, nonce=1),
    ]
    assert registry.capacity_state(CHEAP, 0).declared == 150
    assert registry.capacity_state(CHEAP, 1).nonce == 1


def test_bad_entries_are_skipped_with_reasons(registry, signer, sink_a, sink_b, stranger, relayer):
    registry.register_sink(CHEAP, 200 * USDC, 10, sender=sink_a)
    now = chain.blocks.head.timestamp
    batch = [
        signer.attestation(sink_a, 20, 1, deadline=now - 1)[1],       # expired
        signer.attestation(stranger, 20, 1)[1],                        # not registered
        signer.attestation(sink_a, 20, 0)[1],                          # nonce not above 0
        signer.attestation(sink_a, 20, 2**32)[1],                      # nonce beyond 32 bits
        signer.attestation(sink_a, 20, 5, key=sink_b)[1],              # signed by someone else
        signer.attestation(sink_a, 30, 6)[1],                          # good
        signer.attestation(sink_a, 40, 6)[1],                          # same nonce again: stale
        signer.attestation(sink_a, 20, 5)[1],                          # reordered older: stale
    ]
    tx = registry.submit_attestations(CHEAP, batch, sender=relayer)
    assert rejected(tx, registry) == [
        (sink_a.address, 1, EXPIRED), (stranger.address, 1, NOT_REGISTERED), (sink_a.address, 0, STALE),
        (sink_a.address, 2**32, STALE), (sink_a.address, 5, BAD_SIG), (sink_a.address, 6, STALE),
        (sink_a.address, 5, STALE),
    ]
    st = registry.capacity_state(CHEAP, 0)
    assert (st.declared, st.nonce) == (30, 6)


def test_attestation_for_another_task_type_does_not_transfer(registry, signer, sink_a, relayer):
    registry.register_sink(CHEAP, 200 * USDC, 10, sender=sink_a)
    a, arg = signer.attestation(sink_a, 99, 1, task_type=PREMIUM)
    tx = registry.submit_attestations(PREMIUM, [arg], sender=relayer)
    assert rejected(tx, registry) == [(sink_a.address, 1, NOT_REGISTERED)]
    # relaying it under the task type the sink is registered in breaks the signature
    tx = registry.submit_attestations(CHEAP, [arg], sender=relayer)
    assert rejected(tx, registry) == [(sink_a.address, 1, BAD_SIG)]


def test_burst_of_attestations_moves_the_signal_one_step(registry, signer, sink_a, relayer, clock):
    """The anchor let k attestations in one batch move the signal by 1 - 0.7^k; here a
    burst only replaces the target, and the signal steps once per epoch."""
    registry.register_sink(CHEAP, 1000 * USDC, 100, sender=sink_a)
    clock.next_epoch(60)
    s0 = registry.smoothed_capacity_wad(CHEAP, sink_a)
    assert registry.smoothed_capacity(CHEAP, sink_a) == 100
    batch = [signer.attestation(sink_a, 1000, n)[1] for n in range(1, 11)]
    registry.submit_attestations(CHEAP, batch, sender=relayer)
    assert registry.smoothed_capacity_wad(CHEAP, sink_a) == s0
    clock.next_epoch()
    # one step: 0.3 * 1000 + 0.7 * s0 (the gap rounds toward the target)
    assert registry.smoothed_capacity_wad(CHEAP, sink_a) == 1000 * WAD - (1000 * WAD - s0) * 7 // 10


def test_attested_capacity_is_clamped_to_the_bond(registry, signer, sink_a, relayer, clock):
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    registry.submit_attestations(CHEAP, [signer.attestation(sink_a, 10**12, 1)[1]], sender=relayer)
    clock.next_epoch(80)
    assert registry.smoothed_capacity(CHEAP, sink_a) == 100


def test_malformed_signatures_are_skipped(registry, signer, sink_a, relayer):
    registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink_a)
    _, arg = signer.attestation(sink_a, 50, 1)
    sig = arg[4]
    for bad in (sig[:64], sig[:64] + b"\x1d", b"\x00" * 65, b""):
        tx = registry.submit_attestations(CHEAP, [tuple(arg[:4]) + (bad,)], sender=relayer)
        assert rejected(tx, registry) == [(sink_a.address, 1, BAD_SIG)]
