"""The study's image grids: each left-out site's sample slice by every arm, the variants, and
the synthetic CTs beside the real one."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from benchmarks.study_real.arms import experiment_dir, naive_arms
from benchmarks.study_real.ct import _voxels, brain_mask, intracranial
from benchmarks.study_real.settings import VARIANT_LABELS, Study
from fedsynth.common.baselines import BASELINE_NAMES
from fedsynth.common.modalities import Direction
from fedsynth.simulations.evaluation import unseen_name
from fedsynth.simulations.report import figure_grid, save_png
from fedsynth.simulations.results import (
    FEDERATED,
    LOCAL_PREFIX,
    POOLED,
    UNTRAINED,
    ExperimentResults,
    sample_key,
)


def _figure(rows: int, columns: int) -> tuple[Figure, np.ndarray]:
    """A grid of image panels, each about 1.5 inches square."""
    return figure_grid(1.45 * columns + 0.3, 1.55 * rows + 0.4, rows, columns)


def _save(fig: Figure, path: Path) -> str:
    save_png(fig, path)
    return path.name


def mri_grid(study: Study, direction: str, path: Path, variants: bool = False) -> str | None:
    """One row per fold: the left-out site's sample slice, every arm's synthesis, the truth."""
    panels: list[list[tuple[str, np.ndarray | None]]] = []
    folds = study.folds[:1] if variants else study.folds
    for fold in folds:
        folder = experiment_dir(study, direction, fold)
        sample = folder / "samples" / f"{unseen_name(study.test_site(fold))}.npz"
        if not sample.exists():
            continue
        with np.load(sample, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
        results = ExperimentResults.read(folder)
        sources = {s.site: ", ".join(s.source) for s in results.split.sites}
        row: list[tuple[str, np.ndarray | None]] = [(f"{fold}: T1w", arrays["source"])]
        if variants:
            row.append((FEDERATED, arrays.get(sample_key(FEDERATED))))
            for variant in study.variants:
                other = experiment_dir(study, direction, fold, variant) / "samples" / sample.name
                image = None
                if other.exists():
                    with np.load(other, allow_pickle=False) as data:
                        image = np.asarray(data[sample_key(FEDERATED)])
                row.append((VARIANT_LABELS[variant], image))
        else:
            for arm, image in naive_panels(study, direction, fold, results, arrays).items():
                row.append((arm, image))
            for key in sorted(k for k in arrays if k.startswith(sample_key(LOCAL_PREFIX))):
                site = key.removeprefix(sample_key(LOCAL_PREFIX))
                row.append((f"local {sources.get(site, site)}", arrays[key]))
            row.append((POOLED, arrays.get(POOLED)))
            row.append((FEDERATED, arrays.get(sample_key(FEDERATED))))
            row.append((UNTRAINED, arrays.get(UNTRAINED)))
        row.append((f"true {Direction.parse(direction).target.value}", arrays["target"]))
        panels.append(row)
    if not panels:
        return None
    columns = max(len(row) for row in panels)
    fig, axes = _figure(len(panels), columns)
    for r, row in enumerate(panels):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_axis_off()
            if c >= len(row):
                continue
            title, image = row[c]
            ax.set_title(title, fontsize=6.5)
            if image is not None:
                ax.imshow(np.squeeze(image), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    fig.suptitle(f"{direction}: each row a left-out hospital, never seen in training", fontsize=8)
    return _save(fig, path)


def naive_panels(
    study: Study,
    direction: str,
    fold: str,
    results: ExperimentResults,
    arrays: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The naive baselines' prediction of the fold's sample slice, each computed on the whole
    subject as it was scored (histogram matching takes the subject's quantiles)."""
    naive = naive_arms(study, direction, fold)
    unseen = unseen_name(study.test_site(fold))
    sample = next((s for s in results.samples if s.site == unseen), None)
    paired = next((p for label, p in naive.pairs if sample and label == sample.subject), None)
    panels = {}
    for arm in BASELINE_NAMES:
        predict = naive.predictors.get(arm)
        if predict is None:
            continue
        if sample is not None and paired is not None and sample.slice_index < len(paired):
            image = predict(paired.a, paired.masks.astype(bool))[sample.slice_index]
        else:  # a sample drawn otherwise: the slice alone
            image = predict(arrays["source"][None], np.asarray(arrays["mask"], bool)[None])[0]
        panels[arm] = image
    return panels


def ct_grid(study: Study, ct: Mapping[str, Any], path: Path) -> str:
    """Per MRI subject: T1w, synthetic CT in a brain and a bone window; last row, the real CT."""
    windows = [("0 to 80 HU", 0.0, 80.0), ("-200 to 1800 HU", -200.0, 1800.0)]
    rows: list[list[tuple[str, np.ndarray | None, float, float]]] = []
    for subject in ct["subjects"]:
        t1 = _voxels(subject["t1w"], np.float32)
        synthetic = _voxels(subject["synthetic"], np.float32)
        z = int(np.argmax(brain_mask(t1).reshape(-1, t1.shape[2]).sum(axis=0)))
        high = float(np.percentile(t1[t1 > 0], 99)) if np.any(t1 > 0) else 1.0
        rows.append(
            [(f"{subject['subject']}: T1w", np.rot90(t1[:, :, z]), 0.0, high)]
            + [
                (f"synthetic CT, {w}", np.rot90(synthetic[:, :, z]), lo, hi)
                for w, lo, hi in windows
            ]
        )
    real = _voxels(ct["real"]["path"], np.float32)
    z = int(np.argmax(intracranial(real).reshape(-1, real.shape[2]).sum(axis=0)))
    rows.append(
        [("real CT (another person)", None, 0.0, 1.0)]
        + [(f"real CT, {w}", np.rot90(real[:, :, z]), lo, hi) for w, lo, hi in windows]
    )
    fig, axes = _figure(len(rows), 3)
    for r, row in enumerate(rows):
        for c, (title, image, low, high) in enumerate(row):
            ax = axes[r, c]
            ax.set_axis_off()
            ax.set_title(title, fontsize=6.5)
            if image is not None:
                ax.imshow(image, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    fig.suptitle("T1w -> CT: synthetic CT of each MRI subject, and the real CT", fontsize=8)
    return _save(fig, path)
