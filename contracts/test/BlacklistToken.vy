# pragma version ~=0.4.3
"""
@title BlacklistToken
@custom:contract-name BlacklistToken
@notice TEST ONLY. An ERC-20 that refuses transfers to blacklisted addresses (as USDC
        can), to show that one refusing recipient blocks nobody else. With `quiet` set it
        refuses by returning False instead of reverting (as some tokens do).
"""

from ethereum.ercs import IERC20

implements: IERC20

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
totalSupply: public(uint256)
blacklisted: public(HashMap[address, bool])
quiet: public(bool)
decimals: public(constant(uint8)) = 6

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
def set_blacklisted(who: address, flag: bool):
    self.blacklisted[who] = flag


@external
def set_quiet(flag: bool):
    self.quiet = flag


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@external
def transfer(to: address, amount: uint256) -> bool:
    if self.quiet and (self.blacklisted[to] or self.blacklisted[msg.sender]):
        return False
    self._move(msg.sender, to, amount)
    return True


@external
def transferFrom(owner: address, to: address, amount: uint256) -> bool:
    if self.quiet and (self.blacklisted[to] or self.blacklisted[owner]):
        return False
    self.allowance[owner][msg.sender] -= amount
    self._move(owner, to, amount)
    return True


@internal
def _move(owner: address, to: address, amount: uint256):
    assert not self.blacklisted[to], "blacklist: recipient blocked"
    assert not self.blacklisted[owner], "blacklist: sender blocked"
    self.balanceOf[owner] -= amount
    self.balanceOf[to] += amount
    log Transfer(sender=owner, receiver=to, value=amount)
