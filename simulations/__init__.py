"""fedsynth.simulations: many simulated hospitals on one machine, partitioners, reports, the CLI.

The one package allowed to import ``common``, ``client`` and ``server``.
"""
