"""Accounting and access: keys, budgets, rate limits, usage records and reports.

Money unit everywhere in this package: integer **micro-USD** (1 = 0.000001 USD), the same
scale as a 6-decimal settlement token such as USDC, so issue 5 can use the integers as token
base units for USDC without conversion (and must scale explicitly for an 18-decimal token).
"""
