"""Pura gateway: an OpenAI-compatible routing service.

Clients change only their ``base_url``. Requests flow one way:
HTTP (``gateway.app``) -> routing (``gateway.routing``) -> upstream (``gateway.upstreams``)
-> accounting (``gateway.accounting``) -> completion records (the hook the on-chain receipt
outbox consumes).
"""

__version__ = "0.1.0"
