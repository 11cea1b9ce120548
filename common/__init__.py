"""fedsynth.common: what the hospital client and the coordinator both need.

Configuration models, site data discovery and preprocessing, the built-in brain phantom,
networks, losses, metrics and weight I/O. Nothing here imports from ``client``, ``server``
or ``simulations``.
"""

__version__ = "0.1.0"
