"""The hospital daemon's SuperNode: Flower's ``flower-supernode``, with shorter waits.

``fedsynth client`` runs this in place of the ``flower-supernode`` command, with the same arguments.
It shortens the SuperNode's waits (:mod:`fedsynth.common.flower_waits`) and then hands over to
Flower's own entry point, which parses the arguments and runs the SuperNode unchanged.

    python -m fedsynth.client.supernode --superlink coordinator:9092 ...  # flower-supernode's
"""

from __future__ import annotations

import sys

from fedsynth.common.flower_waits import quick_object_pulls, quick_supernode_waits


def main() -> None:
    quick_object_pulls()
    quick_supernode_waits()
    from flwr.supernode.cli import flower_supernode

    sys.argv[0] = "flower-supernode"  # Flower's usage and error lines name its own command
    flower_supernode()


if __name__ == "__main__":
    main()
