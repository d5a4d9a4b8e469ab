"""EscrowBuffer: FIFO entries per funder, withdrawals, the maximum level, guards."""

import ape
from ape import chain

from .conftest import CHEAP, PREMIUM, USDC, WAD, assert_conserved, own_events
from pura.signing import task_type_id


def impersonate(address):
    chain.set_balance(address, 10**18)
    return ape.accounts[address]


def test_config(escrow, registry, owner, stranger, token):
    assert escrow.REGISTRY() == registry.address and escrow.TOKEN() == token.address
    assert escrow.queues(CHEAP).max_level == 10_000 * USDC
    assert escrow.min_deposit() == USDC
    with ape.reverts("ownable: caller is not the owner"):
        escrow.set_max_level(CHEAP, 1, sender=stranger)
    with ape.reverts("escrow: unknown task type"):
        escrow.set_max_level(task_type_id("nope"), 1, sender=owner)
    with ape.reverts("escrow: max level too large"):
        escrow.set_max_level(CHEAP, 2**96, sender=owner)
    tx = escrow.set_max_level(CHEAP, 5 * USDC, sender=owner)
    assert own_events(tx, escrow) == [escrow.MaxLevelSet(task_type=CHEAP, max_level=5 * USDC)]
    with ape.reverts("ownable: caller is not the owner"):
        escrow.set_min_deposit(1, sender=stranger)
    with ape.reverts("escrow: zero min deposit"):
        escrow.set_min_deposit(0, sender=owner)
    tx = escrow.set_min_deposit(7, sender=owner)
    assert own_events(tx, escrow) == [escrow.MinDepositSet(min_deposit=7)]


def test_wire_once(project, owner, stranger, registry, pool):
    e = owner.deploy(project.EscrowBuffer, registry, 1)
    with ape.reverts("ownable: caller is not the owner"):
        e.wire(pool, sender=stranger)
    with ape.reverts("escrow: zero address"):
        e.wire("0x" + "00" * 20, sender=owner)
    e.wire(pool, sender=owner)
    with ape.reverts("escrow: already wired"):
        e.wire(pool, sender=owner)
    with ape.reverts("escrow: zero min deposit"):
        owner.deploy(project.EscrowBuffer, registry, 0)


def test_deposit(escrow, token, funder, proto):
    before = token.balanceOf(funder)
    tx = escrow.deposit(CHEAP, 3 * USDC, sender=funder)
    assert token.balanceOf(funder) == before - 3 * USDC
    assert escrow.entry(CHEAP, 0) == (funder.address, 3 * USDC)
    assert escrow.level(CHEAP) == 3 * USDC and escrow.balance_of(CHEAP, funder) == 3 * USDC
    assert own_events(tx, escrow) == [escrow.EscrowCredited(task_type=CHEAP, funder=funder.address, entry=0,
                                                           amount=3 * USDC, level=3 * USDC)]
    # the newest entry is the same funder's: merged, same FIFO position
    escrow.deposit(CHEAP, 2 * USDC, sender=funder)
    assert escrow.queues(CHEAP).tail == 1 and escrow.entry(CHEAP, 0) == (funder.address, 5 * USDC)
    assert_conserved(proto)


def test_deposit_reverts(escrow, funder, owner):
    with ape.reverts("escrow: below min deposit"):
        escrow.deposit(CHEAP, USDC - 1, sender=funder)
    with ape.reverts("escrow: full"):
        escrow.deposit(PREMIUM, USDC, sender=funder)  # max level 0: escrow disabled
    escrow.set_max_level(CHEAP, 5 * USDC, sender=owner)
    escrow.deposit(CHEAP, 4 * USDC, sender=funder)
    with ape.reverts("escrow: full"):
        escrow.deposit(CHEAP, 2 * USDC, sender=funder)
    escrow.deposit(CHEAP, USDC, sender=funder)  # exactly full is fine
    assert escrow.room(CHEAP) == 0 and escrow.pressure_wad(CHEAP) == WAD


def test_lowering_max_below_level_only_stops_new_money(escrow, funder, owner):
    escrow.deposit(CHEAP, 4 * USDC, sender=funder)
    escrow.set_max_level(CHEAP, USDC, sender=owner)
    assert escrow.room(CHEAP) == 0 and escrow.pressure_wad(CHEAP) == 4 * WAD
    with ape.reverts("escrow: full"):
        escrow.deposit(CHEAP, USDC, sender=funder)
    escrow.withdraw(CHEAP, [0], sender=funder)


def test_withdraw_own_entries_any_time(escrow, token, funder, funder_b, proto):
    escrow.deposit(CHEAP, 3 * USDC, sender=funder)
    escrow.deposit(CHEAP, 2 * USDC, sender=funder_b)
    escrow.deposit(CHEAP, 1 * USDC, sender=funder)
    with ape.reverts("escrow: not your entry"):
        escrow.withdraw(CHEAP, [1], sender=funder)
    before = token.balanceOf(funder)
    tx = escrow.withdraw(CHEAP, [0, 2], sender=funder)
    assert token.balanceOf(funder) == before + 4 * USDC
    assert escrow.level(CHEAP) == 2 * USDC and escrow.balance_of(CHEAP, funder) == 0
    assert [e.amount for e in escrow.EscrowWithdrawn.from_receipt(tx)] == [3 * USDC, USDC]
    with ape.reverts("escrow: entry empty"):
        escrow.withdraw(CHEAP, [0], sender=funder)
    with ape.reverts("escrow: nothing to withdraw"):
        escrow.withdraw(CHEAP, [], sender=funder)
    assert_conserved(proto)


def test_release_is_fifo_and_partial(escrow, token, pool, funder, funder_b, proto):
    escrow.deposit(CHEAP, 3 * USDC, sender=funder)
    escrow.deposit(CHEAP, 2 * USDC, sender=funder_b)
    escrow.deposit(CHEAP, 4 * USDC, sender=funder)
    escrow.withdraw(CHEAP, [1], sender=funder_b)  # a hole in the queue is skipped
    p = impersonate(pool.address)
    before = token.balanceOf(pool)
    funders, amounts = escrow.release.call(CHEAP, 5 * USDC, sender=p)
    assert list(funders) == [funder.address, funder.address] and list(amounts) == [3 * USDC, 2 * USDC]
    tx = escrow.release(CHEAP, 5 * USDC, sender=p)
    assert token.balanceOf(pool) == before + 5 * USDC
    assert escrow.entry(CHEAP, 2) == (funder.address, 2 * USDC)
    assert escrow.queues(CHEAP).head == 2
    assert escrow.level(CHEAP) == 2 * USDC and escrow.total_held() == 2 * USDC
    assert [e.entry for e in escrow.EscrowReleased.from_receipt(tx)] == [0, 2]


def test_release_is_bounded_per_call(escrow, pool, owner, accounts, token):
    """At most 32 entries per call, so a queue of dust cannot make a drain run out of gas."""
    escrow.set_min_deposit(1, sender=owner)
    for i in range(34):
        escrow.deposit(CHEAP, 1, sender=accounts[11 + (i % 2)])  # alternate: no merging
    p = impersonate(pool.address)
    funders, amounts = escrow.release.call(CHEAP, 100, sender=p)
    assert len(amounts) == 32


def test_pool_only_functions(escrow, owner, stranger, funder):
    for who in (owner, stranger):
        with ape.reverts("escrow: caller is not the pool"):
            escrow.credit_overflow(CHEAP, [funder], [1], sender=who)
        with ape.reverts("escrow: caller is not the pool"):
            escrow.release(CHEAP, 1, sender=who)


def test_credit_overflow_requires_the_tokens(escrow, pool, funder, token):
    p = impersonate(pool.address)
    with ape.reverts("escrow: overflow not received"):
        escrow.credit_overflow(CHEAP, [funder], [USDC], sender=p)
    with ape.reverts("escrow: length mismatch"):
        escrow.credit_overflow(CHEAP, [funder], [], sender=p)
