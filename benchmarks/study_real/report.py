"""The study's ``report.md``: a section per direction (tables, goals, figures) and one for
MRI -> CT."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks.study_real.settings import (
    BONE_HU,
    HU_WINDOWS,
    LOCAL_MEAN,
    TISSUES,
    VARIANT_LABELS,
    Study,
)
from fedsynth.common.baselines import CONSTANT, HISTOGRAM, LOOKUP_TABLE
from fedsynth.common.io import READABLE, atomic_write_text
from fedsynth.simulations.report import FIGURES_DIR, REPORT_NAME, markdown_table
from fedsynth.simulations.results import FEDERATED, POOLED, UNTRAINED


def _pm(entry: Mapping[str, float], decimals: int) -> str:
    mean, sd = entry.get("mean", math.nan), entry.get("sd", math.nan)
    if not math.isfinite(mean):
        return "-"
    return (
        f"{mean:.{decimals}f} ± {sd:.{decimals}f}" if math.isfinite(sd) else f"{mean:.{decimals}f}"
    )


ARM_ORDER = (
    FEDERATED,
    *VARIANT_LABELS.values(),
    POOLED,
    LOCAL_MEAN,
    LOOKUP_TABLE,
    HISTOGRAM,
    CONSTANT,
    UNTRAINED,
)


def direction_section(
    direction: str, entry: Mapping[str, Any], figures: Mapping[str, str]
) -> list[str]:
    summary, per_fold, folds = entry["summary"], entry["per_fold"], entry["folds"]
    arms = [a for a in ARM_ORDER if a in summary]
    lines = [f"## {direction}", ""]
    lines += [
        f"Mean ± SD over the left-out sites ({len(folds)} folds: {', '.join(folds)}); the variants "
        f"ran on {folds[0]} only. Masked to the head; intensities on [0, 1]; k-space: mean "
        "absolute log-amplitude error per frequency band (lower is better).",
        "",
    ]
    rows = []
    for arm in arms:
        m = summary[arm]
        rows.append(
            [
                arm,
                _pm(m["psnr_masked"], 2),
                _pm(m["ssim_masked"], 3),
                _pm(m["mae_masked"], 4),
                *(_pm(m[k], 3) for k in ("kspace_low", "kspace_mid", "kspace_high")),
            ]
        )
    lines += markdown_table(
        ["arm", "PSNR (dB)", "SSIM", "MAE", "k-space low", "k-space mid", "k-space high"], rows
    )
    lines += ["", "Masked PSNR (dB) per left-out site:", ""]
    rows = []
    for arm in arms:
        values = summary[arm]["psnr_masked"]["folds"]
        rows.append([arm, *(f"{values[f]:.2f}" if f in values else "-" for f in folds)])
    lines += markdown_table(["arm", *folds], rows)
    lines += ["", "Local-only models, masked PSNR (dB) on the left-out site, by training site:", ""]
    rows = []
    for fold in folds:
        models = per_fold[fold].get(LOCAL_MEAN, {}).get("models", [])
        cells = ", ".join(f"{m['site']} {m['metrics']['psnr_masked']:.2f}" for m in models)
        rows.append([fold, cells or "-"])
    lines += markdown_table(["left out", "local-only models"], rows)
    curves = entry.get("rounds", {})
    if curves:
        length = max(len(c) for arm in curves.values() for c in arm.values())
        lines += [
            "",
            "Federated models on the left-out site after each round, masked PSNR (dB); round 0 "
            "is the untrained generator:",
            "",
        ]
        rows = [
            [f"{arm}, {fold} left out", *(f"{v:.2f}" for v in values)]
            for arm, by_fold in curves.items()
            for fold, values in by_fold.items()
        ]
        lines += markdown_table(["model", *(str(r) for r in range(length))], rows)
    dp = per_fold[folds[0]].get(VARIANT_LABELS["dp"], {})
    if dp.get("epsilon"):
        spent = ", ".join(f"{s} {e:.2f}" for s, e in sorted(dp["epsilon"].items()))
        lines += [
            "",
            f"DP: cumulative patient-level epsilon per site at delta {dp.get('delta')}: "
            f"{spent}. One to five patients per site: each is in nearly every batch, so the "
            "guarantee rests on the noise alone (no amplification by sampling).",
        ]
    lines += ["", "### Goals (masked PSNR; the last one SSIM too)", ""]
    rows = []
    for goal in entry["goals"]:
        verdict = "met" if goal["met"] else f"missed by {goal['threshold'] - goal['value']:.2f} dB"
        measured = goal.get("measured", f"{goal['value']:+.2f} dB")
        rows.append([goal["goal"], measured, goal.get("verdict", verdict)])
    lines += markdown_table(["goal", "measured", "verdict"], rows)
    for key, caption in (("grid", "every arm"), ("variants", "the variants")):
        if key in figures:
            lines += ["", f"![{direction}, {caption}]({FIGURES_DIR}/{figures[key]})"]
    return [*lines, ""]


def ct_section(ct: Mapping[str, Any], figure: str | None) -> list[str]:
    lines = ["## T1w -> CT (no ground truth)", ""]
    lines += [
        f"Trained {ct['epochs']} epoch(s) on every MRI site's T1w and the CT site's CT (pooled: no "
        "site holds both domains, and a CycleGAN site needs both). Synthetic CT of each MRI "
        "subject by `fedsynth synthesize`, HU per T1w tissue class (3-class k-means inside the "
        "brain); the real CT is another person, its tissues by standard windows inside the skull.",
        "",
    ]
    rows = []
    for subject in ct["subjects"]:
        cells = [
            f"{subject['tissues'][t]['mean']:.0f} ± {subject['tissues'][t]['sd']:.0f} "
            f"({subject['tissues'][t]['in_window']:.0%} in window)"
            for t in TISSUES
        ]
        rows.append([f"synthetic, {subject['subject']}", *cells, f"{subject['bone_fraction']:.1%}"])
    real = ct["real"]
    rows.append(
        [
            "real CT, by window",
            *(
                f"{real['tissues'][t]['mean']:.0f} ± {real['tissues'][t]['sd']:.0f} "
                f"({real['tissues'][t]['share']:.0%})"
                for t in TISSUES
            ),
            f"skull {real['bone']['median']:.0f} (median)",
        ]
    )
    rows.append(
        [
            "standard window",
            *(f"{HU_WINDOWS[t][0]:.0f} to {HU_WINDOWS[t][1]:.0f}" for t in TISSUES),
            f"> {BONE_HU:.0f}",
        ]
    )
    lines += markdown_table(["HU (mean ± SD)", *TISSUES, "bone"], rows)
    lines += [
        "",
        f"Real CT inside the skull: median {real['intracranial']['median']:.0f} HU; the share "
        "of those voxels in each window is in brackets. Synthetic 'bone': the share of brain "
        "voxels above 300 HU (the MRI subjects are skull-stripped, so no skull can be learnt).",
    ]
    if figure:
        lines += ["", f"![T1w -> CT]({FIGURES_DIR}/{figure})"]
    return [*lines, ""]


def write_report(study: Study, results: Mapping[str, Any], figures: Mapping[str, Any]) -> Path:
    lines = [
        "# Quality study on real multi-site brain MRI",
        "",
        f"Preset `{study.preset}`; settings: `{'`, `'.join(results['settings'])}`"
        + (f"; overrides `{'`, `'.join(study.overrides)}`" if study.overrides else "")
        + f". Machine: {results['machine']}. Compute: "
        f"{sum(results['compute_seconds'].values()) / 60:.0f} min (every experiment's phases "
        f"and the CT model's epochs, over all invocations); this invocation "
        f"{results['seconds'] / 60:.1f} min.",
        "",
        "Protocol: benchmarks/README.md. Leave one site out: train on the other sites, evaluate "
        "on the left-out site's true pairs (unseen hospital). Every trained arm has the "
        "federation's compute (rounds x local epochs per site).",
        "",
    ]
    for direction in study.directions:
        if direction in results["directions"]:
            lines += direction_section(
                direction, results["directions"][direction], figures.get(direction, {})
            )
    if results.get("ct"):
        lines += ct_section(results["ct"], figures.get("ct"))
    path = study.out / REPORT_NAME
    atomic_write_text(path, "\n".join(lines), READABLE)
    return path
