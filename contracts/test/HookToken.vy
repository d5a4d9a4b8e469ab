# pragma version ~=0.4.3
"""
@title HookToken
@custom:contract-name HookToken
@notice TEST ONLY. An ERC-777-like token that calls `on_token_transfer` on a registered
        hook whenever tokens are transferred to or from it, so tests can try to re-enter
        the Pura contracts in the middle of a transfer.
"""

from ethereum.ercs import IERC20

implements: IERC20

interface IHook:
    def on_token_transfer(sender: address, receiver: address, amount: uint256): nonpayable

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
totalSupply: public(uint256)
hook: public(address)
decimals: public(constant(uint8)) = 18

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256


@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount
    self.totalSupply += amount
    log Transfer(sender=empty(address), receiver=to, value=amount)


@external
def set_hook(hook: address):
    self.hook = hook


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@external
def transfer(to: address, amount: uint256) -> bool:
    self._move(msg.sender, to, amount)
    return True


@external
def transferFrom(owner: address, to: address, amount: uint256) -> bool:
    self.allowance[owner][msg.sender] -= amount
    self._move(owner, to, amount)
    return True


@internal
def _move(owner: address, to: address, amount: uint256):
    self.balanceOf[owner] -= amount
    self.balanceOf[to] += amount
    log Transfer(sender=owner, receiver=to, value=amount)
    h: address = self.hook
    if h != empty(address) and (to == h or owner == h):
        extcall IHook(h).on_token_transfer(owner, to, amount)
