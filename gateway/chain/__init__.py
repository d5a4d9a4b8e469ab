"""The gateway's on-chain half: weights from the pools, dual-signed receipts, keepers.

Data flows one way: a completed request -> :mod:`receipts` (an EIP-712 receipt, signed by
the provider's sink and by the gateway as source) -> :mod:`outbox` (durable, in the gateway's
database, before the answer is sent) -> :mod:`batcher` (CompletionTracker batches, confirmed
from events) -> the chain. :mod:`keeper` funds the pools and rebalances when an epoch is due;
:mod:`weights` reads the pools back into routing. :mod:`service` owns all of it.
"""
