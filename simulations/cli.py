"""``fedsynth simulate``: the command that runs one simulated experiment, or a grid of them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedsynth.common.cli import ConfigOption, PresetOption, SetOption, fail, resolve_config
from fedsynth.common.config import ConfigError
from fedsynth.common.flower_processes import FlowerError
from fedsynth.simulations.errors import ExperimentError
from fedsynth.simulations.experiment import run_experiment
from fedsynth.simulations.grid import run_grid

logger = logging.getLogger(__name__)

console = Console(soft_wrap=True)

DEFAULT_PRESET = "cpu-small"


def simulate_command(
    site: Annotated[
        list[Path] | None,
        typer.Option("--site", help="A real site folder for the pool (repeat); default: phantom."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Experiment folder (default: runs/<name>).")
    ] = None,
    grid: Annotated[
        bool, typer.Option("--grid", help="Run every cell of simulation.grid, then compare them.")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue the experiment in the folder, skipping finished phases.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Delete an earlier experiment in the folder first.")
    ] = False,
    state_root: Annotated[
        Path | None,
        typer.Option(help="Keep each simulated site's own state on disk here (default: memory)."),
    ] = None,
    eval_site: Annotated[
        list[Path] | None,
        typer.Option(
            "--eval-site",
            help="A real site that does not train, evaluated on all its subjects (repeat): "
            "leave one site out.",
        ),
    ] = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    overrides: SetOption = None,
) -> None:
    """Simulate a consortium on this machine: split, federate, baselines, evaluation, report.

    With no arguments: 4 phantom hospitals of unequal size (cpu-small preset), unpaired and
    misaligned, a few minutes on two CPU cores; the report lands in runs/<name>/report.md.
    """
    if config is None and preset is None:
        preset = DEFAULT_PRESET
    try:
        if grid:
            write = run_grid(
                config,
                preset,
                overrides or [],
                folder=run_dir,
                pool_sites=site or [],
                resume=resume,
                overwrite=overwrite,
                eval_sites=eval_site or [],
                echo=console.print,
            )
            console.print(f"done: {write}")
            return
        run = resolve_config(config, preset, overrides)
        run_experiment(
            run,
            folder=run_dir,
            pool_sites=site or [],
            resume=resume,
            overwrite=overwrite,
            state_root=state_root,
            eval_sites=eval_site or [],
            echo=console.print,
        )
    except ConfigError as exc:
        fail(exc, 2)
    except (ExperimentError, FlowerError, ValueError, FileNotFoundError, FileExistsError) as exc:
        fail(exc)
