"""One line per log record in every process fedsynth runs.

Importing Opacus calls ``logging.basicConfig`` (in ``opacus.utils.module_utils``), which gives the
root logger a stderr handler of its own. Every record of fedsynth's loggers (which have their own
handlers in the ClientApp and ServerApp processes) and of Flower's then reaches stderr twice, the
second time in Opacus' format: in ``flwr log``, ``docker logs`` and a simulation's output alike.
"""

from __future__ import annotations

import logging

# What opacus.utils.module_utils passes to logging.basicConfig (Opacus 1.5).
OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def drop_opacus_root_handler() -> int:
    """Remove the root handler Opacus' import installed, and only that one.

    Handlers anyone else put on the root logger (pytest's capture, an operator's own
    configuration, the ``fedsynth`` command's) stay.

    Returns:
        How many handlers were removed (0 or 1).
    """
    root = logging.getLogger()
    removed = 0
    for handler in list(root.handlers):
        formatter = handler.formatter
        if (
            type(handler) is logging.StreamHandler
            and formatter is not None
            and formatter._fmt == OPACUS_FORMAT
        ):
            root.removeHandler(handler)
            removed += 1
    return removed
