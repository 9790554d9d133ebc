"""Pure math and crypto: models, trainers, strategies, secure aggregation, DP.

Imports nothing from ``wharf.coordinator`` or ``wharf.node``.
"""
