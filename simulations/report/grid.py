"""The grid report: one page comparing the cells of a grid of experiments."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from fedsynth.common.io import READABLE, atomic_write_text
from fedsynth.simulations.report.extract import (
    PSNR,
    SSIM,
    _metric,
    _privacy_on,
    _smallest_local,
    _total_seconds,
    _trained,
    _unit,
    _worst_epsilon,
)
from fedsynth.simulations.report.figures import (
    _FIXED_COLOURS,
    _METRIC_TITLES,
    _crop_bottom,
    _cycle,
    _figure_legend,
    _FigureWriter,
    _grouped_bars,
    _new_figure,
)
from fedsynth.simulations.report.markdown import _FOOTNOTE, REPORT_NAME
from fedsynth.simulations.report.tables import (
    MISSING,
    _best_indices,
    _bold,
    _escape,
    _fmt,
    _fmt_seconds,
    _link,
    markdown_table,
)
from fedsynth.simulations.results import (
    CONSTANT,
    FEDERATED,
    HISTOGRAM,
    LOOKUP_TABLE,
    POOLED,
    RESULTS_NAME,
    STARTING_POINT,
    UNTRAINED,
    ExperimentResults,
    ModelResult,
)

logger = logging.getLogger(__name__)


def write_grid_report(folder: Path, cells: Sequence[tuple[str, Path]]) -> Path:
    """Write ``folder/report.md`` comparing the cells of a grid of experiments.

    Args:
        folder: Where the grid report and its ``figures/`` go.
        cells: ``(label, experiment folder)`` per cell, in the order to show them. A cell whose
            ``results.json`` is missing or unreadable is listed as "not run / failed".

    Returns:
        The path of the report written.
    """
    folder = Path(folder)
    loaded = [_load_cell(label, Path(cell_folder)) for label, cell_folder in cells]
    figures = _FigureWriter(folder)
    lines = [f"# Grid report: {folder.name}", ""]
    present = [cell for cell in loaded if cell.results is not None]
    lines.append(f"{len(loaded)} cells, {len(present)} with results.")
    lines.append("")
    if loaded:
        lines += _grid_table(loaded, folder)
        lines.append("")
        best = _best_cell(loaded)
        if best is None:
            lines.append("No cell has a federated result to rank by.")
        else:
            psnr = _metric(best.results.model(FEDERATED) if best.results else None, PSNR)
            lines.append(
                f"Best cell by federated mean masked PSNR: **{_escape(best.label)}** "
                f"({_fmt(psnr, 2)} dB)."
            )
        lines.append("")
        figure = _grid_figure(loaded, figures)
        if figure is None:
            lines += ["_No cell has a masked PSNR to plot._", ""]
        else:
            lines += [f"![Mean masked PSNR per cell]({figure})", ""]
    else:
        lines += ["_The grid has no cells._", ""]
    lines += _FOOTNOTE
    figures.remove_stale()
    path = folder / REPORT_NAME
    atomic_write_text(path, "\n".join(lines) + "\n", READABLE)
    logger.info("grid report written: %s (%d cells, %d present)", path, len(loaded), len(present))
    return path


@dataclass
class _Cell:
    label: str
    folder: Path
    results: ExperimentResults | None
    error: str | None = None


def _load_cell(label: str, folder: Path) -> _Cell:
    path = folder / RESULTS_NAME
    if not path.is_file():
        logger.warning("grid cell %r: no %s", label, path)
        return _Cell(label, folder, None, f"no {RESULTS_NAME}")
    try:
        return _Cell(label, folder, ExperimentResults.read(path))
    except (OSError, ValueError, ValidationError) as error:
        logger.warning("grid cell %r: unreadable %s: %s", label, path, error)
        return _Cell(label, folder, None, f"unreadable {RESULTS_NAME}")


_GRID_MODELS = (
    "federated",
    STARTING_POINT,
    "pooled",
    "local (smallest site)",
    LOOKUP_TABLE,
    HISTOGRAM,
    CONSTANT,
    "untrained",
)


def _grid_models(results: ExperimentResults) -> list[ModelResult | None]:
    return [
        _trained(results.model(FEDERATED)),
        _trained(results.model(STARTING_POINT)),
        _trained(results.model(POOLED)),
        _smallest_local(results),
        _trained(results.model(LOOKUP_TABLE)),
        _trained(results.model(HISTOGRAM)),
        _trained(results.model(CONSTANT)),
        _trained(results.model(UNTRAINED)),
    ]


def _grid_table(cells: Sequence[_Cell], folder: Path) -> list[str]:
    header = ["Cell"]
    for name in _GRID_MODELS:
        header += [f"{name.capitalize()} PSNR", "SSIM"]
    header += ["Worst ε", "Total time (s)", "Report"]
    values: list[list[float]] = []  # per cell: PSNR, SSIM per model
    for cell in cells:
        row_values: list[float] = []
        models = (
            _grid_models(cell.results) if cell.results is not None else [None] * len(_GRID_MODELS)
        )
        for model in models:
            row_values += [_metric(model, PSNR), _metric(model, SSIM)]
        values.append(row_values)
    best = [
        _best_indices([row[column] for row in values], higher=True)
        for column in range(2 * len(_GRID_MODELS))
    ]
    rows = []
    for index, (cell, row_values) in enumerate(zip(cells, values, strict=True)):
        row = [_escape(cell.label)]
        for column, value in enumerate(row_values):
            text = _fmt(value, 2 if column % 2 == 0 else 3)
            row.append(_bold(text, index in best[column]))
        if cell.results is None:
            row += [MISSING, MISSING, f"not run / failed ({cell.error})"]
        else:
            worst = _worst_epsilon(cell.results) if _privacy_on(cell.results) else None
            row.append(
                f"{_fmt(worst, 2)} ({_unit(cell.results.privacy)})" if worst is not None else "off"
            )
            row.append(_fmt_seconds(_total_seconds(cell.results.timing)))
            report = cell.folder / REPORT_NAME
            if report.is_file():
                relative = Path(os.path.relpath(report, folder)).as_posix()
                row.append(_link(REPORT_NAME, relative))
            else:
                row.append("no report")
        rows.append(row)
    return markdown_table(header, rows, align="l" + "r" * (2 * len(_GRID_MODELS) + 2) + "l")


def _best_cell(cells: Sequence[_Cell]) -> _Cell | None:
    scored = [
        (_metric(cell.results.model(FEDERATED), PSNR), cell)
        for cell in cells
        if cell.results is not None and _trained(cell.results.model(FEDERATED)) is not None
    ]
    scored = [(value, cell) for value, cell in scored if not math.isnan(value)]
    if not scored:
        return None
    return max(scored, key=lambda item: item[0])[1]


def _grid_figure(cells: Sequence[_Cell], figures: _FigureWriter) -> str | None:
    series: list[tuple[str, list[float]]] = []
    for position, name in enumerate(_GRID_MODELS):
        heights = []
        for cell in cells:
            model = _grid_models(cell.results)[position] if cell.results is not None else None
            heights.append(_metric(model, PSNR))
        series.append((name, heights))
    if not any(math.isfinite(h) for _, heights in series for h in heights):
        return None
    groups = [
        cell.label if cell.results is not None else f"{cell.label}\n(not run)" for cell in cells
    ]
    fig, axes = _new_figure(max(6.0, 1.3 * len(cells) + 2.5), 3.4, 1)
    colours = [
        _FIXED_COLOURS[FEDERATED],
        _FIXED_COLOURS[STARTING_POINT],
        _FIXED_COLOURS[POOLED],
        _cycle(0),
        _FIXED_COLOURS[LOOKUP_TABLE],
        _FIXED_COLOURS[HISTOGRAM],
        _FIXED_COLOURS[CONSTANT],
        _FIXED_COLOURS[UNTRAINED],
    ]
    _grouped_bars(axes[0], groups, series, colours)
    axes[0].set_title(_METRIC_TITLES[PSNR] + " per cell", fontsize=9)
    _crop_bottom(axes[0], [h for _, heights in series for h in heights])
    if len(cells) > 4:
        axes[0].tick_params(axis="x", labelrotation=30)
    _figure_legend(fig, axes)
    return figures.save(fig, "grid.png")
