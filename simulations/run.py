"""Where ``fedsynth simulate``'s experiment used to live: its names, re-exported from their
modules for the code that imports them from here.

:mod:`fedsynth.simulations.experiment` runs one experiment (:func:`run_experiment`),
:mod:`fedsynth.simulations.grid` a grid of them, :mod:`fedsynth.simulations.cli` is the command.
"""

from __future__ import annotations

from fedsynth.simulations.cli import DEFAULT_PRESET, simulate_command
from fedsynth.simulations.errors import ExperimentError
from fedsynth.simulations.evaluation import (
    UNSEEN_PREFIX,
    NaiveBaselines,
    TestSets,
    Translate,
    naive_baselines,
    unseen_name,
)
from fedsynth.simulations.experiment import run_experiment
from fedsynth.simulations.grid import grid_cells, run_grid
from fedsynth.simulations.phases import MADE_BY, PHASES_NAME, Phases, prepare_folder
from fedsynth.simulations.split import SEVERITY_ORDER, count_slices, make_split
from fedsynth.simulations.training import baseline_config, run_federated

__all__ = [
    "DEFAULT_PRESET",
    "MADE_BY",
    "PHASES_NAME",
    "SEVERITY_ORDER",
    "UNSEEN_PREFIX",
    "ExperimentError",
    "NaiveBaselines",
    "Phases",
    "TestSets",
    "Translate",
    "baseline_config",
    "count_slices",
    "grid_cells",
    "make_split",
    "naive_baselines",
    "prepare_folder",
    "run_experiment",
    "run_federated",
    "run_grid",
    "simulate_command",
    "unseen_name",
]
