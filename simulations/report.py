"""Markdown reports with PNG figures, drawn from an experiment's ``results.json``.

:func:`write_report` turns one experiment folder (``runs/<name>/results.json``, see
:mod:`fedsynth.simulations.results`) into ``report.md`` plus ``figures/*.png``;
:func:`write_grid_report` compares the cells of a grid of experiments in one page;
:func:`headline_lines` gives the few lines a terminal shows at the end of a run. Nothing here needs
the images or the models: only the results file and the sample ``.npz`` slices it points to.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state),
so reports can be written from worker threads and headless machines alike.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pydantic import ValidationError

from fedsynth.common.io import READABLE, atomic_save, atomic_write_text
from fedsynth.simulations.results import (
    CONSTANT,
    FEDERATED,
    HISTOGRAM,
    LOCAL_PREFIX,
    LOOKUP_TABLE,
    NAIVE,
    POOLED,
    RESULTS_NAME,
    STARTING_POINT,
    UNTRAINED,
    ExperimentResults,
    ModelResult,
    RoundPoint,
    SampleSlices,
    SiteSplit,
    local_model,
    sample_key,
)

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
FIGURES_DIR = "figures"
DPI = 110
MISSING = "–"  # what a table shows for a value that is absent or NaN
MAX_LOCAL_LINES = 6  # above this many local models, figures show the smallest and largest only

PSNR = "psnr_masked"
SSIM = "ssim_masked"
MAE = "mae_masked"
BANDS = ("kspace_low", "kspace_mid", "kspace_high")

# The figure names this module writes; stale ones from an earlier report are removed.
_FIXED_FIGURES = frozenset({"curves.png", "sites.png", "epsilon.png", "kspace.png", "grid.png"})
_SAMPLES_PREFIX = "samples-"

_FIXED_COLOURS = {
    UNTRAINED: "tab:gray",
    FEDERATED: "tab:blue",
    STARTING_POINT: "tab:cyan",
    POOLED: "tab:green",
    CONSTANT: "silver",
    HISTOGRAM: "sienna",
    LOOKUP_TABLE: "black",
}
_OTHER_COLOURS = (
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:red",
)
_METRIC_TITLES = {PSNR: "Masked PSNR (dB)", SSIM: "Masked SSIM", MAE: "Masked MAE"}

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


# ---------------------------------------------------------------------------- public API


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


def headline_lines(results: ExperimentResults) -> list[str]:
    """A few plain-text lines summing up an experiment, for the terminal.

    Mean masked PSNR / SSIM of the federated, pooled, untrained and smallest site's local-only
    models (those present), the federated gain over the untrained model and over the best naive
    baseline, the worst final epsilon when privacy is on, and the total time.

    Args:
        results: The experiment's results.

    Returns:
        Between 3 and 6 lines, without trailing newlines.
    """
    title = f"{results.name} ({results.direction}"
    if results.preset:
        title += f", preset {results.preset}"
    lines = [title + "): mean masked PSNR / SSIM on the held-out test slices"]
    untrained = _trained(results.model(UNTRAINED))
    smallest = _smallest_local(results)
    entries: list[tuple[str, ModelResult | None]] = [
        ("federated", _trained(results.model(FEDERATED))),
        ("pooled", _trained(results.model(POOLED))),
        ("untrained", untrained),
    ]
    if smallest is not None:
        site = _site_of(smallest)
        size = _train_subjects(results).get(site)
        subjects = "" if size is None else f", {size} subject{'' if size == 1 else 's'}"
        entries.append((f"local-only, smallest site {site}{subjects}", smallest))
    for label, model in entries:
        if model is None:
            continue
        psnr = _metric(model, PSNR)
        text = f"  {label}: PSNR {_fmt(psnr, 2)} dB, SSIM {_fmt(_metric(model, SSIM), 3)}"
        if label == "federated":
            versus = []
            if untrained is not None:
                versus.append(f"{_fmt_delta(psnr - _metric(untrained, PSNR))} dB vs untrained")
            best = _best_naive(results)
            if best is not None:
                versus.append(f"{_fmt_delta(psnr - _metric(best, PSNR))} dB vs {best.name}")
            if versus:
                text += f" ({', '.join(versus)})"
        lines.append(text)
    if len(lines) == 1:
        lines.append("  no model was evaluated")
    tail = []
    if _privacy_on(results):
        worst = _worst_epsilon(results)
        budget = _budget(results.privacy)
        text = f"privacy: worst {_unit(results.privacy)} epsilon {_fmt(worst, 2)}"
        if budget is not None:
            text += f" (budget {_fmt(budget, 2)})"
        tail.append(text)
    tail.append(f"time: {_duration(_total_seconds(results.timing))}")
    lines.append("  " + "; ".join(tail))
    return lines


# ---------------------------------------------------------------------------- report sections


def _title_section(results: ExperimentResults) -> list[str]:
    lines = [f"# {results.name}: {results.direction}", ""]
    lines.append(f"- Direction: {results.direction}")
    lines.append(f"- Preset: {results.preset or MISSING}")
    if results.variant:
        lines.append(f"- Variant: {_kv(results.variant)}")
    lines.append(f"- Machine: {results.machine or MISSING}")
    config = Path(results.config_path).as_posix()
    lines.append(f"- Config: {_link(config, config)}")
    lines.append("")
    return lines


def _headline_section(results: ExperimentResults) -> list[str]:
    lines = ["## Headline", ""]
    models = _ordered_models(results)
    if not models:
        return [*lines, "_No model was evaluated._", ""]
    lines.append(
        "Mean over all sites' held-out test slices. Best value per metric in bold; "
        "Δ is the masked PSNR gain over the untrained model."
    )
    lines.append("")
    # Skipped models count as NaN, so they never take the bold.
    best = {
        key: _best_indices([_metric(_trained(m), key) for m in models], higher=key != MAE)
        for key in (PSNR, SSIM, MAE)
    }
    untrained = _trained(results.model(UNTRAINED))
    reference = _metric(untrained, PSNR) if untrained is not None else math.nan
    any_skipped = any(m.skipped is not None for m in models)
    header = ["Model", "PSNR (dB)", "SSIM", "MAE", "Train time (s)", "Epochs", "Δ PSNR (dB)"]
    if any_skipped:
        header.append("Note")
    rows = []
    for index, model in enumerate(models):
        if model.skipped is not None:
            row = [f"`{model.name}`"] + [MISSING] * 6
            row.append(f"skipped: {_escape(model.skipped)}")
            rows.append(row)
            continue
        row = [f"`{model.name}`"]
        for key, decimals in ((PSNR, 2), (SSIM, 3), (MAE, 4)):
            row.append(_bold(_fmt(_metric(model, key), decimals), index in best[key]))
        row.append(_fmt_seconds(model.train_seconds))
        row.append(str(model.epochs))
        if model.name == UNTRAINED:
            row.append("(reference)")
        else:
            row.append(_fmt_delta(_metric(model, PSNR) - reference))
        if any_skipped:
            row.append("")
        rows.append(row)
    lines += _table(header, rows, align="l" + "r" * 6 + ("l" if any_skipped else ""))
    lines.append("")
    chosen = [m for m in models if m.selected and m.skipped is None]
    if chosen:
        lines.append(
            "Which checkpoint is scored (chosen on the training sites' own validation data, "
            "never on a test site): "
            + "; ".join(f"`{m.name}` {_escape(m.selected or '')}" for m in chosen)
            + "."
        )
        lines.append("")
    standing = _standing(results)
    if standing is not None:
        lines += [standing, ""]
    return lines


def _best_naive(results: ExperimentResults) -> ModelResult | None:
    """The naive baseline with the best mean masked PSNR (None when none was scored)."""
    scored = [
        model
        for name in NAIVE
        if (model := _trained(results.model(name))) is not None
        and math.isfinite(_metric(model, PSNR))
    ]
    return max(scored, key=lambda model: _metric(model, PSNR), default=None)


def _standing(results: ExperimentResults) -> str | None:
    """One sentence: where the federated model stands against the best naive baseline."""
    federated = _trained(results.model(FEDERATED))
    if federated is None:
        return None
    best = _best_naive(results)
    if best is None:
        return (
            "No naive baseline was scored, so nothing says whether the federated model beats one."
        )
    gap = _metric(federated, PSNR) - _metric(best, PSNR)
    if not math.isfinite(gap):
        return None
    side = "above" if gap >= 0 else "below"
    return (
        f"**The federated model is {abs(gap):.2f} dB {side} the {best.name}**, the best naive "
        f"baseline (mean masked PSNR; SSIM {_fmt(_metric(federated, SSIM), 3)} against "
        f"{_fmt(_metric(best, SSIM), 3)})."
    )


def _split_section(results: ExperimentResults) -> list[str]:
    split = results.split
    lines = ["## Split", ""]
    parameters = f" ({_kv(split.parameters)})" if split.parameters else ""
    lines.append(
        f"Scheme: `{split.scheme}`{parameters}; seed {split.seed}; pool: {_escape(split.pool)}."
    )
    lines.append("")
    if not split.sites:
        return [*lines, "_The split has no sites._", ""]
    header = [
        "Site",
        "Train subjects",
        "With A",
        "With B",
        "Slices A",
        "Slices B",
        "Test subjects",
        "Test slices",
        "Unpaired",
        "Misalignment",
        "Missing",
        "Scanner",
        "Excluded",
    ]
    rows = [_split_row(site) for site in split.sites]
    lines += _table(header, rows, align="l" + "r" * 8 + "llll")
    lines.append("")
    return lines


def _split_row(site: SiteSplit) -> list[str]:
    return [
        _escape(site.site),
        str(site.train_subjects),
        str(site.subjects_a),
        str(site.subjects_b),
        str(site.slices_a),
        str(site.slices_b),
        str(site.test_subjects),
        str(site.test_slices),
        _fmt(site.unpaired_fraction, 2),
        _escape(site.misalignment),
        ", ".join(site.missing) or "none",
        _escape(_scanner(site.scanner)),
        _escape(site.excluded) if site.excluded else "no",
    ]


def _curves_section(results: ExperimentResults, figures: _FigureWriter) -> list[str]:
    lines = ["## Per-round curves", ""]
    rounds = sorted(results.rounds, key=lambda point: point.round)
    if not rounds:
        return [*lines, "_No per-round evaluation was recorded (no federated rounds)._", ""]
    baselines, trimmed = _baselines(results)
    palette = _palette(results)
    fig, axes = _new_figure(10.5, 3.2, 3)
    xs = [point.round for point in rounds]
    for ax, key in zip(axes, (PSNR, SSIM, MAE), strict=True):
        ys = [_plottable(point.mean.get(key)) for point in rounds]
        ax.plot(xs, ys, marker="o", color=palette[FEDERATED], label=FEDERATED)
        for model in baselines:
            value = _metric(model, key)
            if math.isfinite(value):
                ax.axhline(
                    value,
                    linestyle="--",
                    linewidth=1.2,
                    color=palette[model.name],
                    label=model.name,
                )
        ax.set_title(_METRIC_TITLES[key], fontsize=9)
        _round_axis(ax)
    _figure_legend(fig, axes)
    lines.append(f"![Federated model per round]({figures.save(fig, 'curves.png')})")
    lines.append("")
    note = "Solid: the federated model after each round (round 0: before training). "
    note += "Dashed: the other models, trained once."
    if trimmed:
        note += " Local-only models: the smallest and largest sites only."
    lines += [note, ""]
    last = rounds[-1]
    lines += [f"### Federated model after round {last.round}, per site", ""]
    if not last.per_site:
        return [*lines, "_No per-site metrics in the last round._", ""]
    test_slices = {site.site: site.test_slices for site in results.split.sites}
    rows = []
    for site in _ordered_sites(results, last.per_site):
        metrics = last.per_site[site]
        slices = test_slices.get(site)
        rows.append(
            [
                _escape(site),
                _fmt(_get(metrics, PSNR), 2),
                _fmt(_get(metrics, SSIM), 3),
                _fmt(_get(metrics, MAE), 4),
                str(slices) if slices is not None else MISSING,
            ]
        )
    lines += _table(["Site", "PSNR (dB)", "SSIM", "MAE", "Test slices"], rows, align="lrrrr")
    lines.append("")
    return lines


def _sites_section(results: ExperimentResults, figures: _FigureWriter) -> list[str]:
    lines = ["## Per-site results", ""]
    models, trimmed = _figure_models(results, lambda m: bool(m.per_site))
    sites = _ordered_sites(results, *(m.per_site for m in models))
    if not models or not sites:
        return [*lines, "_No per-site test metrics were recorded._", ""]
    palette = _palette(results)
    fig, axes = _new_figure(max(7.0, 1.1 * len(sites) * 2 + 2.0), 3.2, 2)
    for ax, key in zip(axes, (PSNR, SSIM), strict=True):
        _grouped_bars(
            ax,
            groups=sites,
            series=[(m.name, [_get(m.per_site.get(site), key) for site in sites]) for m in models],
            colours=[palette[m.name] for m in models],
        )
        ax.set_title(_METRIC_TITLES[key], fontsize=9)
        if key == SSIM:
            ax.set_ylim(0.0, 1.0)
        else:
            _crop_bottom(ax, [_get(m.per_site.get(s), key) for m in models for s in sites])
    _figure_legend(fig, axes)
    lines.append(f"![Masked PSNR and SSIM per site]({figures.save(fig, 'sites.png')})")
    lines.append("")
    note = "Each site's held-out test slices, scored by every model."
    if trimmed:
        note += " Local-only models: the smallest and largest sites only."
    lines += [note + " The PSNR axis does not start at zero.", ""]
    lines += _sites_table(results, models, sites)
    return lines


def _sites_table(
    results: ExperimentResults, models: Sequence[ModelResult], sites: Sequence[str]
) -> list[str]:
    """Masked PSNR / SSIM per site and model (best PSNR of a site in bold), and the federated
    model's PSNR gap to the best naive baseline at that site."""
    naive = [m for m in models if m.name in NAIVE]
    federated = next((m for m in models if m.name == FEDERATED), None)
    gap = federated is not None and bool(naive)
    header = ["Site", *(f"`{m.name}`" for m in models)]
    if gap:
        header.append("Federated − best naive (dB)")
    rows = []
    for site in sites:
        psnrs = [_get(m.per_site.get(site), PSNR) for m in models]
        best = _best_indices(psnrs, higher=True)
        row = [_escape(site)]
        for index, (model, psnr) in enumerate(zip(models, psnrs, strict=True)):
            ssim = _get(model.per_site.get(site), SSIM)
            cell = f"{_fmt(psnr, 2)} / {_fmt(ssim, 3)}"
            row.append(f"**{cell}**" if index in best else cell)
        if gap:
            assert federated is not None
            baseline = max(
                (_get(m.per_site.get(site), PSNR) for m in naive),
                key=lambda value: value if math.isfinite(value) else -math.inf,
            )
            row.append(_fmt_delta(_get(federated.per_site.get(site), PSNR) - baseline))
        rows.append(row)
    lines = ["Masked PSNR (dB) / SSIM per site; the best PSNR of each site in bold.", ""]
    lines += _table(header, rows, align="l" + "r" * (len(header) - 1))
    lines.append("")
    return lines


def _privacy_section(results: ExperimentResults, figures: _FigureWriter) -> list[str]:
    lines = ["## Privacy", ""]
    privacy = results.privacy
    if not _privacy_on(results):
        return [*lines, "_Differential privacy was off for this experiment._", ""]
    facts = [f"unit: **{_escape(_unit(privacy))}**"]
    facts.append(f"δ = {_number(privacy.get('delta'))}")
    if "noise_multiplier" in privacy:
        facts.append(f"noise multiplier σ = {_number(privacy['noise_multiplier'])}")
    if "patient_epsilon" in privacy:
        facts.append(f"patient-level ε = {_number(privacy['patient_epsilon'], 2)}")
    budget = _budget(privacy)
    if budget is not None:
        facts.append(f"budget ε = {_fmt(budget, 2)}")
    lines += ["Differential privacy on: " + "; ".join(facts) + ".", ""]
    series = _epsilon_series(results)
    if not series:
        return [*lines, "_No per-round epsilon was recorded._", ""]
    fig, axes = _new_figure(6.0, 3.2, 1)
    ax = axes[0]
    palette = _palette(results)
    for index, (site, points) in enumerate(series.items()):
        ax.plot(
            [r for r, _ in points],
            [_plottable(e) for _, e in points],
            marker="o",
            markersize=3,
            color=palette.get(local_model(site), _cycle(index)),
            label=site,
        )
    if budget is not None and math.isfinite(budget):
        ax.axhline(budget, linestyle="--", color="black", linewidth=1, label="budget")
    ax.set_ylabel("cumulative ε", fontsize=8)
    _round_axis(ax)
    _figure_legend(fig, axes)
    lines.append(f"![Cumulative epsilon per site]({figures.save(fig, 'epsilon.png')})")
    lines.append("")
    rows = [
        [_escape(site), _fmt(points[-1][1], 2), str(points[-1][0])]
        for site, points in series.items()
    ]
    lines += _table(["Site", "Final ε", "After round"], rows, align="lrr")
    lines.append("")
    return lines


def _samples_section(results: ExperimentResults, folder: Path, figures: _FigureWriter) -> list[str]:
    lines = ["## Samples", ""]
    if not results.samples:
        return [*lines, "_No sample slices were saved._", ""]
    lines += [
        "Model-scale intensities shown on [-1, 1]; the error map is |model − target| in [0, 1] "
        "intensity units, with the head mask outlined.",
        "",
    ]
    used: set[str] = set()
    for sample in results.samples:
        lines.append(
            f"### {_escape(sample.site)} ({_escape(sample.subject)}, slice {sample.slice_index})"
        )
        lines.append("")
        try:
            fig = _sample_figure(results, folder, sample)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            logger.warning("sample %s: %s", folder / sample.path, error)
            lines += [f"_Sample not drawn: {_escape(str(error))}._", ""]
            continue
        name = _unique(f"{_SAMPLES_PREFIX}{_slug(sample.site)}", used) + ".png"
        lines += [f"![Sample slice, {_escape(sample.site)}]({figures.save(fig, name)})", ""]
    return lines


def _kspace_section(results: ExperimentResults, figures: _FigureWriter) -> list[str]:
    lines = ["## Frequency bands", ""]
    models = [
        m
        for m in _ordered_models(results)
        if m.skipped is None and any(key in m.mean for key in BANDS)
    ]
    if not models:
        return [*lines, "_No k-space band errors were recorded._", ""]
    shown, trimmed = _figure_models(results, lambda m: any(key in m.mean for key in BANDS))
    fig, axes = _new_figure(6.5, 3.2, 1)
    labels = [key.removeprefix("kspace_") for key in BANDS]
    _grouped_bars(
        axes[0],
        groups=labels,
        series=[(m.name, [_metric(m, key) for key in BANDS]) for m in shown],
        colours=[_palette(results)[m.name] for m in shown],
    )
    axes[0].set_title("k-space band error (lower is better)", fontsize=9)
    _figure_legend(fig, axes)
    lines.append(f"![k-space band errors]({figures.save(fig, 'kspace.png')})")
    lines.append("")
    note = "Mean absolute log-amplitude error per frequency band, mean over the sites."
    if trimmed:
        note += " Figure: local-only models of the smallest and largest sites only."
    lines += [note + " Best per band in bold.", ""]
    best = {key: _best_indices([_metric(m, key) for m in models], higher=False) for key in BANDS}
    rows = [
        [f"`{m.name}`"] + [_bold(_fmt(_metric(m, key), 3), index in best[key]) for key in BANDS]
        for index, m in enumerate(models)
    ]
    lines += _table(["Model", "Low", "Mid", "High"], rows, align="lrrr")
    lines.append("")
    return lines


def _time_section(results: ExperimentResults) -> list[str]:
    lines = ["## Time and bytes", "", "### Time per phase", ""]
    if results.timing:
        rows = [[_escape(phase), _fmt_seconds(s)] for phase, s in results.timing.items()]
        if not _has_total(results.timing):
            rows.append(["**total**", f"**{_fmt_seconds(_total_seconds(results.timing))}**"])
        lines += _table(["Phase", "Seconds"], rows, align="lr")
    else:
        lines.append("_No timing was recorded._")
    lines += ["", "### Bytes moved per round", ""]
    rounds = [
        point
        for point in sorted(results.rounds, key=lambda p: p.round)
        if point.bytes_up or point.bytes_down or point.seconds > 0
    ]
    if not rounds:
        return [*lines, "_No federated traffic was recorded._", ""]
    rows = []
    for point in rounds:
        rows.append(
            [
                str(point.round),
                _fmt_mb(sum(point.bytes_up.values())),
                _fmt_mb(sum(point.bytes_down.values())),
                _fmt_seconds(point.seconds),
            ]
        )
    up = sum(sum(point.bytes_up.values()) for point in rounds)
    down = sum(sum(point.bytes_down.values()) for point in rounds)
    seconds = sum(point.seconds for point in rounds)
    rows.append(
        ["**total**", f"**{_fmt_mb(up)}**", f"**{_fmt_mb(down)}**", f"**{_fmt_seconds(seconds)}**"]
    )
    lines += _table(["Round", "Up (MB)", "Down (MB)", "Seconds"], rows, align="rrrr")
    lines += ["", "Summed over sites; 1 MB = 10⁶ bytes.", ""]
    return lines


# ---------------------------------------------------------------------------- grid


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
    return _table(header, rows, align="l" + "r" * (2 * len(_GRID_MODELS) + 2) + "l")


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


# ---------------------------------------------------------------------------- figures


class _FigureWriter:
    """Saves figures under ``<folder>/figures/`` and remembers which, to drop stale ones."""

    def __init__(self, folder: Path) -> None:
        self.directory = folder / FIGURES_DIR
        self.written: list[str] = []

    def save(self, fig: Figure, name: str) -> str:
        """Write ``fig`` as ``name`` (PNG, atomically); return its path relative to the report."""
        path = self.directory / name
        atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI), READABLE)
        fig.clear()
        self.written.append(name)
        return f"{FIGURES_DIR}/{name}"

    def remove_stale(self) -> None:
        """Remove the figures an earlier report drew that this one did not (e.g. privacy off)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.glob("*.png"):
            ours = path.name in _FIXED_FIGURES or path.name.startswith(_SAMPLES_PREFIX)
            if ours and path.name not in self.written:
                logger.debug("removing stale figure %s", path)
                path.unlink()


def _round_axis(ax: Axes) -> None:
    """A per-round plot's x axis: whole rounds, small ticks, a light grid."""
    ax.set_xlabel("round", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _new_figure(width: float, height: float, ncols: int) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _figure_legend(fig: Figure, axes: Iterable[Axes]) -> None:
    """One legend for the figure, right of the panels, without repeated labels."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles.keys()),
            loc="outside right upper",
            fontsize=7,
            frameon=False,
        )


def _grouped_bars(
    ax: Axes,
    groups: Sequence[str],
    series: Sequence[tuple[str, Sequence[float]]],
    colours: Sequence[str],
) -> None:
    """Bars of each series side by side within each group; NaN values leave a gap."""
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        points = [(g + offset, v) for g, v in enumerate(values) if math.isfinite(v)]
        ax.bar(
            [x for x, _ in points],
            [v for _, v in points],
            width=width,
            color=colours[index],
            label=name,
        )
    ax.set_xticks(range(len(groups)), list(groups), fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _crop_bottom(ax: Axes, values: Iterable[float]) -> None:
    """Start a PSNR axis a little below the smallest bar, so differences stay visible."""
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        ax.set_ylim(bottom=max(0.0, math.floor(low - max(1.0, 0.2 * (high - low)))))


def _sample_figure(results: ExperimentResults, folder: Path, sample: SampleSlices) -> Figure:
    """source | each model | target | |model - target| of one saved slice."""
    with np.load(folder / sample.path, allow_pickle=False) as data:
        arrays = {key: np.asarray(data[key], dtype=np.float64) for key in data.files}
    for key in ("source", "target"):
        if key not in arrays:
            raise KeyError(f"{sample.path} has no {key!r} array (has {sorted(arrays)})")
    source, target = _image(arrays["source"]), _image(arrays["target"])
    mask = _image(arrays["mask"]) if "mask" in arrays else None
    synthesised: list[tuple[str, np.ndarray]] = []
    for model in _ordered_models(results):
        for key in (model.name, sample_key(model.name)):
            if key in arrays:
                synthesised.append((model.name, _image(arrays[key])))
                break
    error_of = next((item for item in synthesised if item[0] == FEDERATED), None)
    if error_of is None and synthesised:
        error_of = synthesised[0]
    panels = [("source", source), *synthesised, ("target", target)]
    columns = len(panels) + (1 if error_of is not None else 0)
    fig, axes = _new_figure(1.7 * columns + 0.6, 2.2, columns)
    for ax, (title, image) in zip(axes, panels, strict=False):
        ax.imshow(image, cmap="gray", vmin=-1.0, vmax=1.0, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    if error_of is not None:
        ax = axes[-1]
        name, prediction = error_of
        if prediction.shape != target.shape:
            raise ValueError(f"{name} is {prediction.shape}, the target {target.shape}")
        error = np.abs(prediction - target) / 2.0  # model scale [-1, 1] -> [0, 1] units
        vmax = float(np.clip(np.percentile(error, 99), 0.05, 1.0))
        shown = ax.imshow(error, cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
        if mask is not None and mask.shape == target.shape and np.count_nonzero(mask) > 0:
            ax.contour(mask > 0.5, levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(f"|{name} − target|", fontsize=8)
        ax.set_axis_off()
        colorbar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        colorbar.ax.tick_params(labelsize=6)
    fig.suptitle(f"{sample.site}: {sample.subject}, slice {sample.slice_index}", fontsize=9)
    return fig


def _image(array: np.ndarray) -> np.ndarray:
    image = np.squeeze(array)
    if image.ndim != 2:
        raise ValueError(f"expected a 2D slice, found shape {array.shape}")
    return image


def _cycle(index: int) -> str:
    return _OTHER_COLOURS[index % len(_OTHER_COLOURS)]


def _palette(results: ExperimentResults) -> dict[str, str]:
    """One colour per model, the same in every figure; a site's epsilon curve takes the colour
    of its local-only model."""
    palette = dict(_FIXED_COLOURS)
    names = [local_model(site.site) for site in results.split.sites]
    names += [m.name for m in _ordered_models(results) if m.name not in names]
    for name in names:
        if name not in palette:
            palette[name] = _cycle(len(palette) - len(_FIXED_COLOURS))
    return palette


def _plottable(value: float | None) -> float:
    """A value a line plot can take: NaN for missing or infinite ones."""
    if value is None or not math.isfinite(value):
        return math.nan
    return float(value)


# ---------------------------------------------------------------------------- results helpers


def _ordered_models(results: ExperimentResults) -> list[ModelResult]:
    """Untrained, the naive baselines (weakest first), federated, pooled, then local models in
    split order, then anything else."""
    fixed = {name: index for index, name in enumerate((UNTRAINED, *NAIVE, FEDERATED, POOLED))}
    site_rank = {site.site: index for index, site in enumerate(results.split.sites)}

    def key(model: ModelResult) -> tuple[int, int, str]:
        if model.name in fixed:
            return (0, fixed[model.name], "")
        if model.name.startswith(LOCAL_PREFIX):
            site = _site_of(model)
            return (1, site_rank.get(site, len(site_rank)), site)
        return (2, 0, model.name)

    return sorted(results.models, key=key)


def _trained(model: ModelResult | None) -> ModelResult | None:
    return model if model is not None and model.skipped is None else None


def _site_of(model: ModelResult) -> str:
    return model.name.removeprefix(LOCAL_PREFIX)


def _train_subjects(results: ExperimentResults) -> dict[str, int]:
    return {site.site: site.train_subjects for site in results.split.sites}


def _local_models(results: ExperimentResults) -> list[ModelResult]:
    return [
        m for m in _ordered_models(results) if m.name.startswith(LOCAL_PREFIX) and m.skipped is None
    ]


def _by_size(results: ExperimentResults, models: Sequence[ModelResult]) -> list[ModelResult]:
    """Local models from the smallest site (by training subjects) to the largest."""
    sizes = _train_subjects(results)
    unknown = max(sizes.values(), default=0) + 1
    return sorted(models, key=lambda m: (sizes.get(_site_of(m), unknown), _site_of(m)))


def _smallest_local(results: ExperimentResults) -> ModelResult | None:
    ranked = _by_size(results, _local_models(results))
    return ranked[0] if ranked else None


def _shown_locals(
    results: ExperimentResults, models: Sequence[ModelResult]
) -> tuple[list[ModelResult], bool]:
    """All local models, or the smallest and largest sites' when there are too many to show."""
    if len(models) <= MAX_LOCAL_LINES:
        return list(models), False
    ranked = _by_size(results, models)
    keep = {ranked[0].name, ranked[-1].name}
    return [m for m in models if m.name in keep], True


def _baselines(results: ExperimentResults) -> tuple[list[ModelResult], bool]:
    """The models drawn as horizontal lines beside the federated curve: pooled, untrained, the
    best naive baseline and the local models."""
    fixed = [
        _trained(results.model(POOLED)),
        _trained(results.model(UNTRAINED)),
        _best_naive(results),
    ]
    local, trimmed = _shown_locals(results, _local_models(results))
    return [m for m in fixed if m is not None] + local, trimmed


def _figure_models(
    results: ExperimentResults, keep: Callable[[ModelResult], bool]
) -> tuple[list[ModelResult], bool]:
    """Trained models for which ``keep(model)`` holds, local ones trimmed as for the curves."""
    models = [m for m in _ordered_models(results) if m.skipped is None and keep(m)]
    local = [m for m in models if m.name.startswith(LOCAL_PREFIX)]
    shown, trimmed = _shown_locals(results, local)
    names = {m.name for m in shown}
    return [m for m in models if not m.name.startswith(LOCAL_PREFIX) or m.name in names], trimmed


def _ordered_sites(results: ExperimentResults, *tables: Mapping[str, Any]) -> list[str]:
    """The sites that appear in any of ``tables``, in split order, then the others sorted."""
    present = {site for table in tables for site in table}
    ordered = [site.site for site in results.split.sites if site.site in present]
    return ordered + sorted(present - set(ordered))


def _get(metrics: Mapping[str, float] | None, key: str) -> float:
    """``metrics[key]`` as a float; NaN when absent or not a number."""
    if metrics is None:
        return math.nan
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def _metric(model: ModelResult | None, key: str) -> float:
    """A model's mean over all sites' test slices; NaN when absent."""
    return _get(model.mean, key) if model is not None else math.nan


def _privacy_on(results: ExperimentResults) -> bool:
    return bool(results.privacy.get("enabled"))


def _budget(privacy: Mapping[str, Any]) -> float | None:
    for key in ("budget_epsilon", "target_epsilon"):
        value = privacy.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _unit(privacy: Mapping[str, Any]) -> str:
    """What one epsilon protects: a patient, one training slice, or a whole site."""
    level = privacy.get("level", "example")  # results written before the patient unit
    return {"patient": "patient-level", "example": "slice-level", "site": "site-level"}.get(
        str(level), str(level)
    )


def _epsilon_series(results: ExperimentResults) -> dict[str, list[tuple[int, float]]]:
    """Per site, ``(round, cumulative epsilon)`` for the rounds that record one."""
    series: dict[str, list[tuple[int, float]]] = {}
    rounds: list[RoundPoint] = sorted(results.rounds, key=lambda point: point.round)
    for site in _ordered_sites(results, *(point.epsilon for point in rounds)):
        series[site] = [
            (point.round, float(point.epsilon[site])) for point in rounds if site in point.epsilon
        ]
    return series


def _worst_epsilon(results: ExperimentResults) -> float:
    """The largest final epsilon over the sites; NaN when none was recorded."""
    finals = [points[-1][1] for points in _epsilon_series(results).values() if points]
    finals = [value for value in finals if not math.isnan(value)]
    return max(finals) if finals else math.nan


def _has_total(timing: Mapping[str, float]) -> bool:
    return any(phase.lower() == "total" for phase in timing)


def _total_seconds(timing: Mapping[str, float]) -> float:
    """The ``total`` phase when recorded, else the sum of the phases; NaN without timing."""
    for phase, seconds in timing.items():
        if phase.lower() == "total":
            return float(seconds)
    return float(sum(timing.values())) if timing else math.nan


def _scanner(scanner: Mapping[str, Any]) -> str:
    """A compact scanner description: field strength and voxel size when known."""
    parts = []
    field = scanner.get("field_strength_t")
    if field is not None:
        parts.append(f"{_short(field)} T")
    voxels = scanner.get("voxel_size_mm")
    if isinstance(voxels, list | tuple):
        parts.append("×".join(_short(v) for v in voxels) + " mm")
    elif voxels is not None:
        parts.append(f"{_short(voxels)} mm")
    if not parts and scanner:
        items = list(scanner.items())
        text = _kv(dict(items[:3]))
        return text + (", …" if len(items) > 3 else "")
    return ", ".join(parts) or MISSING


# ---------------------------------------------------------------------------- formatting


def _fmt(value: float | None, decimals: int) -> str:
    """A number with ``decimals`` decimals; ``MISSING`` for None or NaN, ∞ for infinity."""
    if value is None or math.isnan(value):
        return MISSING
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{decimals}f}"


def _fmt_delta(value: float) -> str:
    if math.isnan(value):
        return MISSING
    if math.isinf(value):
        return _fmt(value, 2)
    return f"{value:+.2f}"


def _fmt_seconds(seconds: float | None) -> str:
    """Seconds with one decimal below ten seconds, none above."""
    if seconds is None or math.isnan(seconds):
        return MISSING
    return _fmt(seconds, 1 if abs(seconds) < 10 else 0)


def _fmt_mb(n_bytes: float) -> str:
    return _fmt(n_bytes / 1e6, 2)


def _duration(seconds: float) -> str:
    """A human duration for the terminal: ``12.3 s``, ``4 min 05 s``, ``1 h 02 min``."""
    if math.isnan(seconds):
        return "not recorded"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _number(value: Any, decimals: int | None = None) -> str:
    """A privacy parameter: compact (``1e-05``) unless ``decimals`` is given."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return MISSING if value is None else _escape(str(value))
    if decimals is not None:
        return _fmt(float(value), decimals)
    return f"{value:g}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + _kv(value) + "}"
    return str(value)


def _kv(values: Mapping[str, Any]) -> str:
    return _escape(", ".join(f"{key}={_short(value)}" for key, value in values.items()))


def _bold(text: str, bold: bool) -> str:
    return f"**{text}**" if bold and text != MISSING else text


def _best_indices(values: Sequence[float], *, higher: bool) -> set[int]:
    """Indices of the best non-NaN value (all of them on a tie); none when fewer than two
    distinct values compete, as there is nothing to single out."""
    candidates = [v for v in values if not math.isnan(v)]
    if len(set(candidates)) < 2:
        return set()
    best = max(candidates) if higher else min(candidates)
    return {index for index, value in enumerate(values) if value == best}


def _escape(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _link(text: str, target: str) -> str:
    return f"[{_escape(text)}](<{target}>)" if " " in target else f"[{_escape(text)}]({target})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "site"


def _unique(stem: str, used: set[str]) -> str:
    name, counter = stem, 2
    while name in used:
        name, counter = f"{stem}-{counter}", counter + 1
    used.add(name)
    return name


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> list[str]:
    """A Markdown table; ``align`` holds one ``l`` or ``r`` per column."""
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines
