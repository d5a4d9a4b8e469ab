"""Python tooling for the Pura contracts: deployment, EIP-712 signing, parameters.

Used by the ape scripts (`scripts/`), the tests, the benchmarks and the gateway.
"""
