"""``python -m fedsynth.cli``: the ``fedsynth`` command."""

from fedsynth.cli.main import main

main()
