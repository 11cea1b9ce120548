"""The sections of one experiment's report after its headline: title, split, per-round
curves, per-site results, privacy, samples, frequency bands, time and bytes."""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Sequence
from pathlib import Path

from fedsynth.simulations.report.extract import (
    BANDS,
    MAE,
    PSNR,
    SSIM,
    _baselines,
    _budget,
    _epsilon_series,
    _figure_models,
    _get,
    _has_total,
    _metric,
    _ordered_models,
    _ordered_sites,
    _privacy_on,
    _scanner,
    _total_seconds,
    _unit,
)
from fedsynth.simulations.report.figures import (
    _METRIC_TITLES,
    _SAMPLES_PREFIX,
    _crop_bottom,
    _cycle,
    _figure_legend,
    _FigureWriter,
    _grouped_bars,
    _new_figure,
    _palette,
    _plottable,
    _round_axis,
    _sample_figure,
)
from fedsynth.simulations.report.tables import (
    MISSING,
    _best_indices,
    _bold,
    _escape,
    _fmt,
    _fmt_delta,
    _fmt_mb,
    _fmt_seconds,
    _kv,
    _link,
    _number,
    _slug,
    _unique,
    markdown_table,
)
from fedsynth.simulations.results import (
    FEDERATED,
    NAIVE,
    ExperimentResults,
    ModelResult,
    SiteSplit,
    local_model,
)

logger = logging.getLogger(__name__)


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
    lines += markdown_table(header, rows, align="l" + "r" * 8 + "llll")
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
    lines += markdown_table(
        ["Site", "PSNR (dB)", "SSIM", "MAE", "Test slices"], rows, align="lrrrr"
    )
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
    lines += markdown_table(header, rows, align="l" + "r" * (len(header) - 1))
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
    lines += markdown_table(["Site", "Final ε", "After round"], rows, align="lrr")
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
    lines += markdown_table(["Model", "Low", "Mid", "High"], rows, align="lrrr")
    lines.append("")
    return lines


def _time_section(results: ExperimentResults) -> list[str]:
    lines = ["## Time and bytes", "", "### Time per phase", ""]
    if results.timing:
        rows = [[_escape(phase), _fmt_seconds(s)] for phase, s in results.timing.items()]
        if not _has_total(results.timing):
            rows.append(["**total**", f"**{_fmt_seconds(_total_seconds(results.timing))}**"])
        lines += markdown_table(["Phase", "Seconds"], rows, align="lr")
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
    lines += markdown_table(["Round", "Up (MB)", "Down (MB)", "Seconds"], rows, align="rrrr")
    lines += ["", "Summed over sites; 1 MB = 10⁶ bytes.", ""]
    return lines
