"""fedsynth.common: what the hospitals and the coordinator both need.

- ``config/`` (the run's settings and their layers), ``data/`` (a site's scans: discovery,
  bounded reading, preprocessing, datasets), ``phantom/`` (the built-in brain phantom);
- ``models/``, ``losses.py``, ``training/`` (the CycleGAN trainer: the sites train with it, the
  coordinator trains its warm start with it), ``privacy/`` (DP-SGD, noise plans, accounting);
- ``metrics/``, ``baselines.py``, ``evaluation.py``, ``checkpoint.py``, ``synthesis.py``;
- ``messages.py`` and ``wire.py`` (what travels), ``flower_processes.py`` and ``flower_waits.py``
  (Flower's processes), ``io.py``, ``logs.py``, ``device.py``, ``cli.py``.

Nothing here imports from ``fedsynth.client``, ``fedsynth.server`` or ``fedsynth.simulations``.

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
