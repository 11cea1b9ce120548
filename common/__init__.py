"""fedsynth.common: what the hospital client and the coordinator both need.

Configuration models, site data discovery and preprocessing, the built-in brain phantom,
networks, losses, metrics and weight I/O. Nothing here imports from ``client``, ``server``
or ``simulations``.

Importing it switches off Flower's telemetry and update check for this process (and the
processes it starts) unless the operator chose otherwise: Flower reads the first once, when its
telemetry module is imported, and every fedsynth entry point imports ``common`` before Flower.
"""

import os

__version__ = "0.1.0"

# Flower reports platform details to its telemetry endpoint and checks PyPI for updates unless
# told not to; a hospital product sends nothing its operator did not choose to send.
PRIVATE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
for _key, _value in PRIVATE_ENV.items():
    os.environ.setdefault(_key, _value)
