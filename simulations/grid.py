"""Experiment grids (``fedsynth simulate --grid``): every combination of one cell per axis of
``simulation.grid``, each an experiment of its own, then one comparison report."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedsynth.common.config import load_config, write_resolved_config
from fedsynth.simulations.errors import ExperimentError
from fedsynth.simulations.experiment import run_experiment
from fedsynth.simulations.phases import Phases, prepare_folder
from fedsynth.simulations.report import write_grid_report

logger = logging.getLogger(__name__)


def grid_cells(
    grid: Mapping[str, Mapping[str, Sequence[str]]],
) -> list[tuple[str, list[str], dict[str, str]]]:
    """Every combination of one cell per axis: (label, overrides, {axis: cell})."""
    if not grid:
        raise ExperimentError("simulation.grid is empty: add axes, e.g. [simulation.grid.privacy]")
    axes = list(grid.items())
    cells = []
    for choice in itertools.product(*[list(cells.items()) for _, cells in axes]):
        label = ",".join(
            f"{axis}={name}" for (axis, _), (name, _) in zip(axes, choice, strict=True)
        )
        overrides = [o for _, (_, values) in zip(axes, choice, strict=True) for o in values]
        settings = {axis: name for (axis, _), (name, _) in zip(axes, choice, strict=True)}
        cells.append((label, overrides, settings))
    return cells


def _cell_folder(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label.replace(",", "__"))


def run_grid(
    config_path: Path | None,
    preset: str | None,
    overrides: Sequence[str],
    *,
    folder: Path | None = None,
    pool_sites: Sequence[Path] = (),
    resume: bool = False,
    overwrite: bool = False,
    eval_sites: Sequence[Path] = (),
    echo: Callable[[str], None] = print,
) -> Path:
    """Run every cell of ``simulation.grid`` one after another (a failed cell is recorded and
    the grid goes on; ``resume`` skips finished cells) and write one comparison report."""
    base = load_config(path=config_path, preset=preset, overrides=overrides)
    folder = Path(folder or base.run_dir)
    prepare_folder(folder, resume=resume, overwrite=overwrite)
    Phases.open(folder).mark("grid", 0.0)
    write_resolved_config(base, folder)
    cells = grid_cells(base.simulation.grid)
    echo(f"grid: {len(cells)} cells -> {folder}")
    done = []
    for index, (label, cell_overrides, settings) in enumerate(cells, start=1):
        cell_dir = folder / "cells" / _cell_folder(label)
        echo(f"=== cell {index}/{len(cells)}: {label}")
        if (cell_dir / "results.json").exists() and resume:
            echo("  finished earlier: skipped")
            done.append((label, cell_dir))
            continue
        try:
            config = load_config(
                path=config_path, preset=preset, overrides=[*overrides, *cell_overrides]
            )
            config = config.model_copy(update={"name": _cell_folder(label)})
            if config.federation.warm_start_cache is None:  # one warm start for all cells
                config.federation.warm_start_cache = (folder / "warm-starts").resolve()
            run_experiment(
                config,
                folder=cell_dir,
                pool_sites=pool_sites,
                resume=resume,
                pool_dir=folder / "pool",
                cache_dir=folder / "cache",
                variant=settings,
                eval_sites=eval_sites,
                echo=echo,
            )
        except Exception as exc:  # one failed cell must not lose the others
            logger.exception("cell %s failed", label)
            echo(f"  cell {label} failed: {exc}")
        done.append((label, cell_dir))
    report = write_grid_report(folder, done)
    echo(f"grid report: {report}")
    return report
