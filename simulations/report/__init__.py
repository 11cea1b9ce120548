"""Markdown reports with PNG figures, drawn from an experiment's ``results.json``.

:func:`write_report` turns one experiment folder (``runs/<name>/results.json``, see
:mod:`fedsynth.simulations.results`) into ``report.md`` plus ``figures/*.png``;
:func:`write_grid_report` compares the cells of a grid of experiments in one page;
:func:`headline_lines` gives the few lines a terminal shows at the end of a run. Nothing here needs
the images or the models: only the results file and the sample ``.npz`` slices it points to.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state),
so reports can be written from worker threads and headless machines alike.

Modules: ``markdown`` (:func:`write_report`, the page's order and footnote), ``headline`` (the
headline table and :func:`headline_lines`), ``sections`` (the other sections of the page),
``grid`` (:func:`write_grid_report`), ``figures`` (saving, axes, bars, sample panels, colours),
``extract`` (what is read out of the results) and ``tables`` (Markdown tables, number formats).
"""

from __future__ import annotations

from fedsynth.simulations.report.figures import DPI, FIGURES_DIR, figure_grid, save_png
from fedsynth.simulations.report.grid import write_grid_report
from fedsynth.simulations.report.headline import headline_lines
from fedsynth.simulations.report.markdown import REPORT_NAME, write_report
from fedsynth.simulations.report.tables import MISSING, markdown_table

__all__ = [
    "DPI",
    "FIGURES_DIR",
    "MISSING",
    "REPORT_NAME",
    "figure_grid",
    "headline_lines",
    "markdown_table",
    "save_png",
    "write_grid_report",
    "write_report",
]
