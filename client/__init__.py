"""fedsynth.client: the hospital side, on the hospital's own machine.

- ``app.py``: the Flower ClientApp (train, evaluate); ``instruction.py`` completes the
  coordinator's instruction with the run's configuration the site keeps;
- ``site_round.py``: one federated round at the site, in named phases, with ``site_settings.py``
  (what only the hospital decides), ``site_data.py`` (its scans, its validation part),
  ``state_store.py`` (its trainer state between rounds) and ``private_training.py`` (the DP set-up
  a round and a local run share);
- ``local.py``: ``fedsynth train-local``; ``audit.py``: what left the site;
- ``daemon.py``, ``supernode.py``, ``worker.py``, ``cli.py``: ``fedsynth client``, the daemon.

Imports ``fedsynth.common`` only, never ``fedsynth.server``.
"""
