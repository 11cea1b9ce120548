"""The headline of a report: the table of every model's mean scores, where the federated model
stands against the best naive baseline, and the few lines a terminal shows."""

from __future__ import annotations

import math

from fedsynth.simulations.report.extract import (
    MAE,
    PSNR,
    SSIM,
    _best_naive,
    _budget,
    _metric,
    _ordered_models,
    _privacy_on,
    _site_of,
    _smallest_local,
    _total_seconds,
    _train_subjects,
    _trained,
    _unit,
    _worst_epsilon,
)
from fedsynth.simulations.report.tables import (
    MISSING,
    _best_indices,
    _bold,
    _duration,
    _escape,
    _fmt,
    _fmt_delta,
    _fmt_seconds,
    markdown_table,
)
from fedsynth.simulations.results import (
    FEDERATED,
    POOLED,
    UNTRAINED,
    ExperimentResults,
    ModelResult,
)


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
    lines += markdown_table(header, rows, align="l" + "r" * 6 + ("l" if any_skipped else ""))
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
