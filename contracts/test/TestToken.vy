# pragma version ~=0.4.3
"""
@title TestToken
@custom:contract-name TestToken
@notice LOCAL CHAINS ONLY. The settlement token the deploy script creates on a local
        chain (Base Sepolia uses an existing ERC-20 such as USDC). snekmate's ERC-20 with
        configurable decimals; the deployer is the minter.
"""

from snekmate.auth import ownable
from snekmate.tokens import erc20

initializes: ownable
initializes: erc20[ownable := ownable]

exports: erc20.__interface__


@deploy
def __init__(name_: String[25], symbol_: String[5], decimals_: uint8):
    ownable.__init__()
    erc20.__init__(name_, symbol_, decimals_, name_, "1")
