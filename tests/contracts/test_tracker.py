"""CompletionTracker: dual-signed EIP-712 receipts, relayed batches, and the attacks on them."""

import ape
import pytest
from ape import chain
from eth_account import Account
from eth_utils import keccak

from .conftest import CHEAP, PREMIUM, USDC, hot, own_events, warm_market
from pura.layout import TASK_SCALE
from pura.signing import Receipt, sign_digest

SECP_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141

# reasons (CompletionTracker constants)
ZERO, EXPIRED, SELF_DEAL, REPLAYED, BAD_SINK, BAD_SOURCE, UNREGISTERED, NOT_FUNDED = range(1, 9)


@pytest.fixture
def market(proto, sink_a, sink_b, funder, clock, keeper):
    """Two warm sinks and a funder who has streamed for half an epoch."""
    warm_market(proto, [sink_a, sink_b], [100, 100], clock, keeper)
    proto.pool.fund(CHEAP, 100 * USDC, 1000, sender=funder)
    clock.sleep(1800)
    return proto


def rejected(tx, tracker):
    return [(e.nonce, e.reason) for e in tracker.ReceiptRejected.from_receipt(tx)]


def recorded(tx, tracker):
    return [e.nonce for e in tracker.ReceiptRecorded.from_receipt(tx)]


def test_domain_and_typehash(tracker):
    d = tracker.eip712Domain()
    assert d[1] == "Pura CompletionTracker" and d[2] == "1"
    assert d[3] == chain.chain_id and d[4] == tracker.address
    assert tracker.RECEIPT_TYPEHASH() == keccak(
        text="Receipt(bytes32 taskType,address sink,address source,bytes32 taskId,uint256 amount,"
        "bytes32 responseHash,uint256 nonce,uint256 deadline)"
    )


def test_digest_matches_eth_account_typed_data(tracker, sink_a, funder):
    r = Receipt(CHEAP, sink_a.address, funder.address, b"\x01" * 32, 12345, b"\x02" * 32, 7, 10**10)
    assert tracker.receipt_digest(*[CHEAP, r.sink, r.source, r.task_id, r.amount, r.response_hash, r.nonce,
                                    r.deadline]) == r.digest(chain.chain_id, tracker.address)
    # the gateway's direct encoder agrees with eth_account's generic EIP-712 encoder
    assert r.digest(chain.chain_id, tracker.address) == r.digest_via_typed_data(chain.chain_id, tracker.address)
    # a wallet signing the typed-data dict produces a signature the contract accepts
    signed = Account.sign_typed_data(sink_a.private_key, full_message=r.typed_data(chain.chain_id, tracker.address))
    assert Account._recover_hash(r.digest(chain.chain_id, tracker.address), signature=signed.signature) == sink_a.address


def test_valid_receipt_is_recorded_and_credited(market, tracker, pool, pricing, signer, sink_a, funder, relayer):
    r, arg = signer.receipt(sink_a, funder, 250_000)
    fee = pricing.base_fee(CHEAP)
    x_before = hot(pool, CHEAP, 0)["x"]
    tx = tracker.submit_receipts(CHEAP, [arg], sender=relayer)
    assert tracker.ReceiptRecorded(task_type=CHEAP, sink=sink_a.address, source=funder.address, nonce=r.nonce,
                                   task_id=r.task_id, amount=250_000) in own_events(tx, tracker)
    assert tracker.nonce_used(funder, r.nonce)
    assert tracker.total_verified(CHEAP) == 250_000
    assert hot(pool, CHEAP, 0)["x"] == x_before - 250_000 * TASK_SCALE // fee
    assert pool.credit_of(CHEAP, funder)[1] == 250_000


def test_batch_skips_each_bad_entry_with_its_reason(market, tracker, signer, sink_a, sink_b, funder, stranger,
                                                    relayer, accounts):
    now = chain.blocks.head.timestamp
    good1 = signer.receipt(sink_a, funder, 1000, nonce=1)[1]
    zero = signer.receipt(sink_a, funder, 0, nonce=2)[1]
    expired = signer.receipt(sink_a, funder, 1000, nonce=3, deadline=now - 1)[1]
    self_deal = signer.receipt(funder, funder, 1000, nonce=4)[1]
    bad_sink = signer.receipt(sink_a, funder, 1000, nonce=5, sink_key=sink_b)[1]
    bad_source = signer.receipt(sink_a, funder, 1000, nonce=6, source_key=stranger)[1]
    unregistered = signer.receipt(accounts[12], funder, 1000, nonce=7)[1]
    not_funded = signer.receipt(sink_a, stranger, 1000, nonce=8)[1]
    good2 = signer.receipt(sink_b, funder, 2000, nonce=9)[1]
    batch = [good1, zero, expired, self_deal, bad_sink, bad_source, unregistered, not_funded, good2]
    n = tracker.submit_receipts.call(CHEAP, batch, sender=relayer)
    tx = tracker.submit_receipts(CHEAP, batch, sender=relayer)
    assert n == 2
    assert recorded(tx, tracker) == [1, 9]
    assert rejected(tx, tracker) == [(2, ZERO), (3, EXPIRED), (4, SELF_DEAL), (5, BAD_SINK), (6, BAD_SOURCE),
                                     (7, UNREGISTERED), (8, NOT_FUNDED)]


def test_empty_and_all_bad_batches_change_nothing(market, tracker, pool, signer, sink_a, stranger, relayer):
    tx = tracker.submit_receipts(CHEAP, [], sender=relayer)
    assert own_events(tx, pool) == []
    tx = tracker.submit_receipts(CHEAP, [signer.receipt(sink_a, stranger, 5)[1]], sender=relayer)
    assert own_events(tx, pool) == [] and tracker.total_verified(CHEAP) == 0


# ------------------------------------------------------------------ attacks


def test_replay_is_rejected_across_batches_and_task_types(market, tracker, signer, sink_a, funder, relayer):
    _, arg = signer.receipt(sink_a, funder, 1000, nonce=42)
    tracker.submit_receipts(CHEAP, [arg], sender=relayer)
    tx = tracker.submit_receipts(CHEAP, [arg], sender=relayer)
    assert rejected(tx, tracker) == [(42, REPLAYED)]
    # replaying into another task type: the nonce is spent for this source everywhere
    tx = tracker.submit_receipts(PREMIUM, [arg], sender=relayer)
    assert rejected(tx, tracker) == [(42, REPLAYED)]
    assert tracker.total_verified(CHEAP) == 1000


def test_receipt_signed_for_another_task_type_is_rejected(market, tracker, signer, sink_a, funder, relayer):
    _, arg = signer.receipt(sink_a, funder, 1000, nonce=1, task_type=PREMIUM)
    tx = tracker.submit_receipts(CHEAP, [arg], sender=relayer)
    assert rejected(tx, tracker) == [(1, BAD_SINK)]


def test_duplicate_in_one_batch_counts_once(market, tracker, signer, sink_a, funder, relayer):
    _, arg = signer.receipt(sink_a, funder, 1000, nonce=3)
    tx = tracker.submit_receipts(CHEAP, [arg, arg, arg], sender=relayer)
    assert recorded(tx, tracker) == [3]
    assert rejected(tx, tracker) == [(3, REPLAYED), (3, REPLAYED)]
    assert tracker.total_verified(CHEAP) == 1000


def test_relayer_reordering_is_harmless(market, tracker, signer, sink_a, funder, relayer):
    args = [signer.receipt(sink_a, funder, 100 + i, nonce=i)[1] for i in range(5)]
    tx = tracker.submit_receipts(CHEAP, list(reversed(args)), sender=relayer)
    assert recorded(tx, tracker) == [4, 3, 2, 1, 0]
    assert tracker.total_verified(CHEAP) == sum(100 + i for i in range(5))


def test_task_id_cannot_be_squatted(market, tracker, signer, pool, sink_a, sink_b, funder, funder_b, relayer):
    """A second funder front-runs with the same taskId (and even the same nonce number):
    replay keys are (signed source, nonce), so the victim's receipt still counts."""
    pool.fund(CHEAP, 10 * USDC, 1000, sender=funder_b)
    chain.mine()
    victim, victim_arg = signer.receipt(sink_a, funder, 1000, nonce=5, task_id=b"\xaa" * 32)
    _, squat_arg = signer.receipt(sink_b, funder_b, 1, nonce=5, task_id=b"\xaa" * 32)
    tracker.submit_receipts(CHEAP, [squat_arg], sender=relayer)
    tx = tracker.submit_receipts(CHEAP, [victim_arg], sender=relayer)
    assert recorded(tx, tracker) == [5]


def test_nobody_can_burn_a_sources_nonce(market, tracker, signer, sink_a, funder, stranger, relayer):
    """To consume funder's nonce 9 you need funder's signature: a forged source signature is
    rejected and the genuine receipt with that nonce still counts."""
    _, forged = signer.receipt(sink_a, funder, 1, nonce=9, source_key=stranger)
    tx = tracker.submit_receipts(CHEAP, [forged], sender=relayer)
    assert rejected(tx, tracker) == [(9, BAD_SOURCE)]
    assert not tracker.nonce_used(funder, 9)
    tx = tracker.submit_receipts(CHEAP, [signer.receipt(sink_a, funder, 1000, nonce=9)[1]], sender=relayer)
    assert recorded(tx, tracker) == [9]


@pytest.mark.parametrize("field", ["sink", "source", "task_id", "amount", "response_hash", "nonce", "deadline"])
def test_no_field_can_be_altered_after_signing(market, tracker, signer, sink_a, sink_b, funder, funder_b,
                                               relayer, field):
    _, arg = signer.receipt(sink_a, funder, 1000, nonce=11)
    arg = list(arg)
    index = ["sink", "source", "task_id", "amount", "response_hash", "nonce", "deadline"].index(field)
    alt = {
        "sink": sink_b.address,
        "source": funder_b.address,
        "task_id": b"\x99" * 32,
        "amount": 1001,
        "response_hash": b"\x98" * 32,
        "nonce": 12,
        "deadline": arg[6] + 1,
    }[field]
    arg[index] = alt
    tx = tracker.submit_receipts(CHEAP, [tuple(arg)], sender=relayer)
    assert len(recorded(tx, tracker)) == 0
    assert rejected(tx, tracker)[0][1] in (BAD_SINK, BAD_SOURCE)
    assert tracker.total_verified(CHEAP) == 0


def _malleate(sig: bytes) -> bytes:
    r, s, v = sig[:32], int.from_bytes(sig[32:64], "big"), sig[64]
    return r + (SECP_N - s).to_bytes(32, "big") + bytes([55 - v])  # 27 <-> 28


def test_high_s_signature_is_rejected(market, tracker, signer, sink_a, funder, relayer, project, owner):
    r, arg = signer.receipt(sink_a, funder, 1000, nonce=13)
    high_s = _malleate(arg[7])
    # the malleated signature is still a valid ECDSA signature for the same key...
    digest = r.digest(chain.chain_id, tracker.address)
    from eth_keys import keys
    sig = keys.Signature(vrs=(high_s[64] - 27, int.from_bytes(high_s[:32], "big"), int.from_bytes(high_s[32:64], "big")))
    assert sig.recover_public_key_from_msg_hash(digest).to_checksum_address() == sink_a.address
    # ...but the contract refuses it (and the same for the source signature)
    arg_sink = tuple(arg[:7]) + (high_s, arg[8])
    arg_source = tuple(arg[:8]) + (_malleate(arg[8]),)
    tx = tracker.submit_receipts(CHEAP, [arg_sink, arg_source], sender=relayer)
    assert rejected(tx, tracker) == [(13, BAD_SINK), (13, BAD_SOURCE)]
    # the honest encoding still works afterwards
    tx = tracker.submit_receipts(CHEAP, [arg], sender=relayer)
    assert recorded(tx, tracker) == [13]


@pytest.mark.parametrize("v", [0, 1, 26, 29, 255])
def test_wrong_v_is_rejected(market, tracker, signer, sink_a, funder, relayer, v):
    _, arg = signer.receipt(sink_a, funder, 1000, nonce=14)
    bad = arg[7][:64] + bytes([v])
    tx = tracker.submit_receipts(CHEAP, [tuple(arg[:7]) + (bad, arg[8])], sender=relayer)
    assert rejected(tx, tracker) == [(14, BAD_SINK)]


def test_compact_and_short_signatures_are_rejected(market, tracker, signer, sink_a, funder, relayer):
    r, arg = signer.receipt(sink_a, funder, 1000, nonce=15)
    sig = arg[7]
    # EIP-2098 compact (64 bytes): a second encoding of the same signature
    s = int.from_bytes(sig[32:64], "big") | ((sig[64] - 27) << 255)
    compact = sig[:32] + s.to_bytes(32, "big")
    for bad in (compact, sig[:64], b"", b"\x00" * 65):
        tx = tracker.submit_receipts(CHEAP, [tuple(arg[:7]) + (bad, arg[8])], sender=relayer)
        assert rejected(tx, tracker) == [(15, BAD_SINK)]


def test_signature_over_invalid_point_is_skipped_not_reverting(market, tracker, signer, sink_a, funder, relayer):
    """r = 1 is not the x of a curve point: ecrecover fails; the entry is skipped."""
    _, arg = signer.receipt(sink_a, funder, 1000, nonce=16)
    bad = (1).to_bytes(32, "big") + (5).to_bytes(32, "big") + bytes([27])
    good = signer.receipt(sink_a, funder, 1000, nonce=17)[1]
    tx = tracker.submit_receipts(CHEAP, [tuple(arg[:7]) + (bad, arg[8]), good], sender=relayer)
    assert rejected(tx, tracker) == [(16, BAD_SINK)] and recorded(tx, tracker) == [17]


def test_sink_cannot_self_deal(market, tracker, pool, signer, sink_a, sink_keys, relayer):
    """sink_a signs as both parties: rejected. Through a second key that never funded the
    pool: rejected. Funding the pool buys credit only up to the money put in, which the
    sink then shares with every other sink: no free credit."""
    _, arg = signer.receipt(sink_a, sink_a, 1000, nonce=1)
    tx = tracker.submit_receipts(CHEAP, [arg], sender=relayer)
    assert rejected(tx, tracker) == [(1, SELF_DEAL)]
    _, arg = signer.receipt(sink_a, sink_keys, 1000, nonce=1)
    tx = tracker.submit_receipts(CHEAP, [arg], sender=relayer)
    assert rejected(tx, tracker) == [(1, NOT_FUNDED)]
    pool.distribute(CHEAP, USDC, sender=sink_keys)
    big = signer.receipt(sink_a, sink_keys, USDC + 1, nonce=2)[1]
    exact = signer.receipt(sink_a, sink_keys, USDC, nonce=3)[1]
    more = signer.receipt(sink_a, sink_keys, 1, nonce=4)[1]
    tx = tracker.submit_receipts(CHEAP, [big, exact, more], sender=relayer)
    assert recorded(tx, tracker) == [3]
    assert rejected(tx, tracker) == [(2, NOT_FUNDED), (4, NOT_FUNDED)]
    assert pool.funder_room(CHEAP, sink_keys) == 0


def test_credit_room_spans_the_batch(market, tracker, pool, signer, sink_a, funder, relayer):
    room = pool.funder_room(CHEAP, funder)
    a = signer.receipt(sink_a, funder, room - 10, nonce=1)[1]
    b = signer.receipt(sink_a, funder, 11, nonce=2)[1]
    c = signer.receipt(sink_a, funder, 10, nonce=3)[1]
    tx = tracker.submit_receipts.call(CHEAP, [a, b, c], sender=relayer)
    assert tx >= 2  # room grows by one block of streaming when mined; b may or may not fit
    tx = tracker.submit_receipts(CHEAP, [a, b, c], sender=relayer)
    assert 1 in recorded(tx, tracker) and 3 in recorded(tx, tracker)


def test_unregistered_after_leaving(market, tracker, registry, signer, sink_b, funder, relayer):
    registry.deregister_sink(CHEAP, sender=sink_b)
    tx = tracker.submit_receipts(CHEAP, [signer.receipt(sink_b, funder, 10, nonce=1)[1]], sender=relayer)
    assert rejected(tx, tracker) == [(1, UNREGISTERED)]


# ------------------------------------------------------------------ policy, guards


def test_set_slash_params(tracker, owner, stranger):
    with ape.reverts("ownable: caller is not the owner"):
        tracker.set_slash_params(1, 10_000, sender=stranger)
    with ape.reverts("tracker: slash above 100%"):
        tracker.set_slash_params(10_001, 10_000, sender=owner)
    with ape.reverts("tracker: threshold out of range"):
        tracker.set_slash_params(1, 4_999, sender=owner)
    with ape.reverts("tracker: threshold out of range"):
        tracker.set_slash_params(1, 100_001, sender=owner)
    tx = tracker.set_slash_params(2_500, 15_000, sender=owner)
    assert own_events(tx, tracker) == [tracker.SlashParamsSet(slash_bps=2_500, slash_threshold_bps=15_000)]


def test_report_shortfall_only_pool(tracker, sink_a, owner, stranger):
    for who in (owner, stranger, sink_a):
        with ape.reverts("tracker: caller is not the pool"):
            tracker.report_shortfall(CHEAP, sink_a, 10**6, sender=who)
