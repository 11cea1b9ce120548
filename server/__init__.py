"""fedsynth.server: the coordinator (Flower ServerApp, aggregation strategy, checkpoints).

Imports ``common`` only, never ``client``.
"""
