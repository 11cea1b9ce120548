"""fedsynth.cli: the ``fedsynth`` command, every role's sub-commands in one place.

Each role keeps its own commands beside its code (``fedsynth.common.cli``, ``fedsynth.client.cli``,
``fedsynth.server.cli``, ``fedsynth.simulations.cli``); :mod:`fedsynth.cli.main` gathers them and
sets up logging. It is the one package that imports all four.
"""

from fedsynth.cli.main import app, main

__all__ = ["app", "main"]
