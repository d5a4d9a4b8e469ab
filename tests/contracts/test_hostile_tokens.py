"""Hostile settlement tokens: a hook token that re-enters the protocol mid-transfer, and
a token that refuses transfers to one blacklisted address (as USDC can)."""

import ape
import pytest
from ape import chain

from .conftest import CHEAP, PARAMS, USDC, assert_conserved, hot, warm_market
from pura.deploy import deploy_protocol


def _setup(project, accounts, token):
    owner = accounts[0]
    p = deploy_protocol(project, owner, PARAMS, token=token, treasury=accounts[1].address)
    for a in list(accounts)[:16]:
        token.mint(a, 1_000_000 * USDC, sender=owner)
        for spender in (p.registry, p.pool, p.escrow):
            token.approve(spender, 2**256 - 1, sender=a)
    return p


@pytest.fixture(scope="module")
def hooked(project, accounts):
    token = accounts[0].deploy(project.HookToken)
    p = _setup(project, accounts, token)
    attacker = accounts[0].deploy(project.Reenterer)
    token.mint(attacker, 1_000_000 * USDC, sender=accounts[0])
    token.set_hook(attacker, sender=accounts[0])
    for spender in (p.registry, p.pool, p.escrow):
        attacker.call(token, token.approve.encode_input(spender, 2**256 - 1), sender=accounts[0])
    return p, attacker


@pytest.fixture(scope="module")
def blacklisted(project, accounts):
    token = accounts[0].deploy(project.BlacklistToken)
    return _setup(project, accounts, token)


def as_attacker(attacker, contract, method, *args):
    """Makes the attacker contract itself call `contract.method(*args)`."""
    return attacker.call(contract, getattr(contract, method).encode_input(*args), sender=ape.accounts.test_accounts[0])


def test_reentering_the_pool_during_funding_is_blocked(hooked):
    p, attacker = hooked
    attacker.arm(p.pool, p.pool.close_stream.encode_input(CHEAP), sender=ape.accounts.test_accounts[0])
    as_attacker(attacker, p.pool, "fund", CHEAP, 10 * USDC, 100)
    assert attacker.attempts() == 1 and not attacker.last_ok()
    assert p.pool.stream_of(CHEAP, attacker).remaining == 10 * USDC  # the stream stands
    assert_conserved(p)


def test_double_claim_through_the_hook_is_blocked(hooked, clock, accounts):
    p, attacker = hooked
    keeper, funder = accounts[7], accounts[5]
    as_attacker(attacker, p.registry, "register_sink", CHEAP, 100 * USDC, 100)
    clock.next_epoch(40)
    p.pool.rebalance(CHEAP, sender=keeper)
    p.pool.distribute(CHEAP, USDC, sender=funder)
    clock.next_epoch()
    p.pool.rebalance(CHEAP, sender=keeper)
    owed = hot(p.pool, CHEAP, 0)["unclaimed"]
    assert owed > 0
    attacker.arm(p.pool, p.pool.claim.encode_input(CHEAP), sender=accounts[0])
    before = p.token.balanceOf(attacker)
    as_attacker(attacker, p.pool, "claim", CHEAP)
    assert attacker.attempts() == 1 and not attacker.last_ok()
    assert p.token.balanceOf(attacker) == before + owed  # paid once
    assert_conserved(p)


def test_cross_contract_reentry_is_blocked(hooked, clock, accounts):
    """From inside the pool's transfer, the hook tries the tracker, which would call back
    into the (locked) pool."""
    p, attacker = hooked
    keeper, funder = accounts[7], accounts[5]
    as_attacker(attacker, p.registry, "register_sink", CHEAP, 100 * USDC, 100)
    clock.next_epoch(40)
    p.pool.rebalance(CHEAP, sender=keeper)
    p.pool.distribute(CHEAP, USDC, sender=funder)
    clock.next_epoch()
    p.pool.rebalance(CHEAP, sender=keeper)
    attacker.arm(p.pool, p.pool.rebalance.encode_input(CHEAP), sender=accounts[0])
    clock.next_epoch()  # make the rebalance due, so only the lock can stop it
    as_attacker(attacker, p.pool, "claim", CHEAP)
    assert attacker.attempts() == 1 and not attacker.last_ok()
    assert p.pool.rebalance_due(CHEAP)


def test_reentering_escrow_withdraw_is_blocked(hooked, accounts):
    p, attacker = hooked
    as_attacker(attacker, p.escrow, "deposit", CHEAP, 5 * USDC)
    attacker.arm(p.escrow, p.escrow.withdraw.encode_input(CHEAP, [0]), sender=accounts[0])
    as_attacker(attacker, p.escrow, "withdraw", CHEAP, [0])
    assert attacker.attempts() == 1 and not attacker.last_ok()
    assert p.escrow.level(CHEAP) == 0
    assert_conserved(p)


def test_reentering_unbond_withdrawal_is_blocked(hooked, accounts, clock):
    p, attacker = hooked
    as_attacker(attacker, p.registry, "register_sink", CHEAP, 200 * USDC, 100)
    as_attacker(attacker, p.registry, "request_unbond", CHEAP, 100 * USDC)
    clock.sleep(7 * 86400)
    attacker.arm(p.registry, p.registry.withdraw_unbonded.encode_input(CHEAP), sender=accounts[0])
    as_attacker(attacker, p.registry, "withdraw_unbonded", CHEAP)
    assert attacker.attempts() == 1 and not attacker.last_ok()
    assert p.registry.bonds(CHEAP, attacker).unbonding == 0
    assert_conserved(p)


# ------------------------------------------------------------------ a refusing recipient


def test_one_refusing_recipient_blocks_nobody(blacklisted, clock, accounts):
    p = blacklisted
    owner, sink_a, sink_b, funder, keeper = accounts[0], accounts[2], accounts[3], accounts[5], accounts[7]
    warm_market(p, [sink_a, sink_b], [100, 100], clock, keeper)
    p.pool.distribute(CHEAP, USDC, sender=funder)
    clock.next_epoch()
    p.pool.rebalance(CHEAP, sender=keeper)
    p.token.set_blacklisted(sink_b, True, sender=owner)
    with ape.reverts("blacklist: recipient blocked"):
        p.pool.claim(CHEAP, sender=sink_b)
    owed_b = hot(p.pool, CHEAP, 1)["unclaimed"]
    assert owed_b > 0  # nothing lost: it stays claimable
    before = p.token.balanceOf(sink_a)
    p.pool.claim(CHEAP, sender=sink_a)
    assert p.token.balanceOf(sink_a) > before
    # the market keeps running
    clock.next_epoch()
    p.pool.rebalance(CHEAP, sender=keeper)
    p.token.set_blacklisted(sink_b, False, sender=owner)
    p.pool.claim(CHEAP, sender=sink_b)
    assert_conserved(p)


def test_refusing_treasury_does_not_block_slashing(blacklisted, accounts):
    p = blacklisted
    owner, treasury = accounts[0], accounts[1]
    p.token.set_blacklisted(treasury, True, sender=owner)
    # pull payment: paying the treasury fails, the accrual itself never transfers
    sink = accounts[2]
    p.registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink)
    tracker = ape.accounts[p.tracker.address]
    chain.set_balance(p.tracker.address, 10**18)
    p.registry.slash(CHEAP, sink, 10 * USDC, sender=tracker)
    assert p.registry.treasury_accrued() == 10 * USDC
    with ape.reverts("blacklist: recipient blocked"):
        p.registry.pay_treasury(sender=owner)
    assert p.registry.treasury_accrued() == 10 * USDC
    assert_conserved(p)


def test_refusing_funder_only_blocks_its_own_escrow_withdrawal(blacklisted, accounts):
    p = blacklisted
    owner, funder, funder_b = accounts[0], accounts[5], accounts[6]
    p.escrow.deposit(CHEAP, 2 * USDC, sender=funder)
    p.escrow.deposit(CHEAP, 2 * USDC, sender=funder_b)
    p.token.set_blacklisted(funder, True, sender=owner)
    with ape.reverts("blacklist: recipient blocked"):
        p.escrow.withdraw(CHEAP, [0], sender=funder)
    p.escrow.withdraw(CHEAP, [1], sender=funder_b)
    assert p.escrow.level(CHEAP) == 2 * USDC
    assert_conserved(p)


def test_fee_on_transfer_tokens_are_rejected(project, accounts):
    """A token that delivers less than asked cannot enter any ledger."""
    token = accounts[0].deploy(project.FeeToken)
    p = _setup(project, accounts, token)
    funder, sink = accounts[5], accounts[2]
    for call in (
        lambda: p.registry.register_sink(CHEAP, 100 * USDC, 10, sender=sink),
        lambda: p.pool.fund(CHEAP, 10 * USDC, 1, sender=funder),
        lambda: p.pool.distribute(CHEAP, 10 * USDC, sender=funder),
        lambda: p.escrow.deposit(CHEAP, 10 * USDC, sender=funder),
    ):
        with ape.reverts("token_io: fee-on-transfer token"):
            call()


def test_tokens_that_return_false_are_refused(blacklisted, accounts):
    """A token may refuse by returning False instead of reverting: the pull and the push
    both notice, with their own messages, and nothing moves."""
    p = blacklisted
    owner, funder = accounts[0], accounts[5]
    p.token.set_quiet(True, sender=owner)
    p.token.set_blacklisted(funder, True, sender=owner)
    with ape.reverts("token_io: transferFrom failed"):
        p.escrow.deposit(CHEAP, 2 * USDC, sender=funder)
    p.token.set_blacklisted(funder, False, sender=owner)
    p.escrow.deposit(CHEAP, 2 * USDC, sender=funder)
    p.token.set_blacklisted(funder, True, sender=owner)
    with ape.reverts("token_io: transfer failed"):
        p.escrow.withdraw(CHEAP, [0], sender=funder)
    assert p.escrow.level(CHEAP) == 2 * USDC
    assert_conserved(p)


def test_amounts_and_balances_are_bounded(proto, accounts, owner):
    """Packed ledgers hold money in 96 bits: larger pulls, and balances that would exceed
    2**96 - 1, are refused up front."""
    whale = accounts[11]
    proto.token.mint(whale, 2**97, sender=owner)
    with ape.reverts("token_io: amount too large"):
        proto.pool.fund(CHEAP, 2**96, 1, sender=whale)
    proto.pool.fund(CHEAP, 2**96 - 1 - proto.token.balanceOf(proto.pool), 1, sender=whale)
    with ape.reverts("token_io: balance too large"):
        proto.pool.distribute(CHEAP, 1, sender=whale)


def test_zero_token_is_refused(project, accounts):
    with ape.reverts("token_io: zero token"):
        accounts[0].deploy(project.CapacityRegistry, "0x" + "00" * 20, 3600, 3 * 10**17, 1, accounts[1])
