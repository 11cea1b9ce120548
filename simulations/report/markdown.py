"""One experiment's ``report.md``: its sections in order and the note on how to read it."""

from __future__ import annotations

import logging
from pathlib import Path

from fedsynth.common.io import READABLE, atomic_write_text
from fedsynth.simulations.report.figures import _FigureWriter
from fedsynth.simulations.report.headline import _headline_section
from fedsynth.simulations.report.sections import (
    _curves_section,
    _kspace_section,
    _privacy_section,
    _samples_section,
    _sites_section,
    _split_section,
    _time_section,
    _title_section,
)
from fedsynth.simulations.report.tables import MISSING
from fedsynth.simulations.results import CONSTANT, HISTOGRAM, LOOKUP_TABLE, ExperimentResults

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"

_FOOTNOTE = [
    "## How to read this",
    "",
    "Masked metrics (PSNR, SSIM, MAE) are computed inside the target's head mask, on intensities "
    "rescaled to [0, 1]; per-site values are means over that site's held-out test slices, and "
    "headline values are means over all sites' test sets. Each site's test subjects are held "
    "out: no model ever "
    "trained on them. Higher PSNR and SSIM are better; lower MAE and lower k-space band errors "
    "(mean absolute log-amplitude error per frequency band) are better. "
    f"{MISSING} marks a value that was not measured.",
    "",
    "The naive baselines learn nothing: they are fitted from the training sites' intensity "
    "statistics (each site's own histograms, summed; never a test subject) and scored on the "
    "same subjects, slices and mask as the models, writing the background outside the mask. "
    f"`{CONSTANT}` predicts the training sites' mean target intensity inside the mask; "
    f"`{HISTOGRAM}` maps each test subject's source intensity quantiles onto the training "
    f"target quantiles (a monotone map: it cannot invert contrast); `{LOOKUP_TABLE}` maps each "
    "source intensity to the mean target intensity the training pairs have at that intensity "
    "(256 bins on the model scale, linear between bin centres).",
]


def write_report(folder: Path, results: ExperimentResults | None = None) -> Path:
    """Write ``folder/report.md`` and its figures for one experiment.

    Args:
        folder: The experiment folder; figures go to ``folder/figures/``, and sample slices are
            read from the paths (relative to it) that ``results.samples`` name.
        results: The experiment's results; read from ``folder/results.json`` when ``None``.

    Returns:
        The path of the report written.

    Raises:
        FileNotFoundError: ``results`` is ``None`` and ``folder`` holds no ``results.json``.
    """
    folder = Path(folder)
    if results is None:
        results = ExperimentResults.read(folder)
    figures = _FigureWriter(folder)
    lines: list[str] = []
    lines += _title_section(results)
    lines += _headline_section(results)
    lines += _split_section(results)
    lines += _curves_section(results, figures)
    lines += _sites_section(results, figures)
    lines += _privacy_section(results, figures)
    lines += _samples_section(results, folder, figures)
    lines += _kspace_section(results, figures)
    lines += _time_section(results)
    lines += _FOOTNOTE
    figures.remove_stale()
    path = folder / REPORT_NAME
    atomic_write_text(path, "\n".join(lines) + "\n", READABLE)
    logger.info("report written: %s (%d figures)", path, len(figures.written))
    return path
