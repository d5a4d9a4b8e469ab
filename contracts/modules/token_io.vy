# pragma version ~=0.4.3
"""
@title Settlement-token transfers
@custom:contract-name token_io
@notice Moves the one settlement ERC-20 of a deployment in and out of a Pura contract.
@custom:security Tokens that return no bool (USDT style) are accepted; tokens that take a
        fee on transfer or rebase are rejected at the pull (the received amount must equal
        the requested amount), because every ledger here counts exact base units.
        Amounts are bounded by MAX_AMOUNT (2**96 - 1) so packed ledgers cannot overflow.
"""

from ethereum.ercs import IERC20

MAX_AMOUNT: constant(uint256) = 2**96 - 1

TOKEN: public(immutable(IERC20))


@deploy
def __init__(token: IERC20):
    assert token.address != empty(address), "token_io: zero token"
    TOKEN = token


@internal
def _pull(owner: address, amount: uint256):
    """
    @dev Pulls `amount` from `owner` (who approved this contract) and checks that
         exactly `amount` arrived.
    """
    assert amount <= MAX_AMOUNT, "token_io: amount too large"
    before: uint256 = staticcall TOKEN.balanceOf(self)
    assert extcall TOKEN.transferFrom(owner, self, amount, default_return_value=True), "token_io: transferFrom failed"
    after: uint256 = staticcall TOKEN.balanceOf(self)
    assert after - before == amount, "token_io: fee-on-transfer token"
    assert after <= MAX_AMOUNT, "token_io: balance too large"


@internal
def _push(to: address, amount: uint256):
    """
    @dev Sends `amount` to `to`. Reverts if the token refuses; callers only push to
         the account that asked for its own money (pull payments), so a refusing
         recipient blocks nobody else.
    """
    assert extcall TOKEN.transfer(to, amount, default_return_value=True), "token_io: transfer failed"


@internal
@view
def _balance() -> uint256:
    return staticcall TOKEN.balanceOf(self)
