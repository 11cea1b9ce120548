"""fedsynth.server: the coordinator, which only ever sees generator updates and scalars.

- ``app.py``: the Flower ServerApp; ``coordinator.py``: the round loop, with ``exchange.py`` (node
  admission, the round instruction, sending, collecting and screening replies),
  ``run_records.py`` (what a completed round writes), ``stopping.py`` (errors, signals);
- ``strategy.py``: aggregation rules and site-level DP; ``validation.py``: an update's numeric
  checks; ``warm_start.py``: the public phantom warm start; ``round_store.py``: round
  checkpoints, the best round, where to resume;
- ``service.py``, ``cli.py``, ``status.py``, ``certs.py``: ``fedsynth server``, ``status``,
  ``certs`` and ``keygen``.

Imports ``fedsynth.common`` only, never ``fedsynth.client``.
"""
