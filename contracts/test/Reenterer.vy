# pragma version ~=0.4.3
"""
@title Reenterer
@custom:contract-name Reenterer
@notice TEST ONLY. Receives HookToken transfers and, from inside the hook, calls an
        arbitrary target with arbitrary calldata, recording whether the call succeeded.
"""

target: public(address)
payload: public(Bytes[1024])
armed: public(bool)
attempts: public(uint256)
last_ok: public(bool)
last_revert: public(Bytes[256])


@external
def arm(target: address, payload: Bytes[1024]):
    self.target = target
    self.payload = payload
    self.armed = True


@external
def on_token_transfer(sender: address, receiver: address, amount: uint256):
    if not self.armed:
        return
    self.armed = False
    self.attempts += 1
    ok: bool = False
    out: Bytes[256] = b""
    ok, out = raw_call(self.target, self.payload, max_outsize=256, revert_on_failure=False)
    self.last_ok = ok
    self.last_revert = out


@external
def call(target: address, data: Bytes[1024]) -> Bytes[256]:
    return raw_call(target, data, max_outsize=256)
