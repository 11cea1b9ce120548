"""Paired evaluation of a checkpoint on a site's co-registered subjects (``fedsynth evaluate``).

For every subject that has both modalities of the checkpoint's direction, the source slices
usable in both volumes are translated and compared with the true target (see
:mod:`fedsynth.common.metrics`; intensities on [0, 1]):

* per slice, then averaged over the subject's slices: PSNR, SSIM (2D Gaussian window), MAE, NMSE,
  each over the whole slice and inside the target's foreground mask, and the k-space band errors;
* inside the lesion mask, when the site's BIDS derivatives hold one for the subject
  (``derivatives/*/sub-X/anat/sub-X*_label-lesion_mask.nii.gz``, as the phantom writes):
  ``lesion_psnr``, ``lesion_ssim``, ``lesion_mae``, averaged over the slices with lesion;
* per volume (``vol_*``): PSNR, MAE, NMSE over all the subject's evaluated voxels at once (one
  MSE for the volume), whole and foreground. (3D SSIM needs contiguous slices, which a paired
  stack need not be, so SSIM is reported per slice only.)

Preprocessing is the checkpoint's own, so the numbers describe the model as it was trained. One row
per subject plus the mean over subjects; written as JSON. When the checkpoint carries the training
sites' intensity statistics (:mod:`fedsynth.common.baselines`), the naive baselines are scored on
the same subjects, slices and mask beside the model (:func:`add_baselines`; the report's
``baselines`` section).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedsynth.common.config import DataConfig
from fedsynth.common.data.datasets import PairedSlices
from fedsynth.common.data.discovery import find_lesion_mask
from fedsynth.common.data.errors import ScanError
from fedsynth.common.data.preprocess import preprocess_label
from fedsynth.common.data.site import SiteData, load_site
from fedsynth.common.io import atomic_write_text
from fedsynth.common.metrics import image_metrics, mae, mean_metrics, nmse, psnr, to_unit

logger = logging.getLogger(__name__)

Translate = Callable[[np.ndarray], np.ndarray]
# A predictor that is given the evaluation mask too (the naive baselines of
# fedsynth.common.baselines).
Predict = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class SubjectResult:
    subject: str
    slices: int
    metrics: dict[str, float]


@dataclass
class BaselineScores:
    """A naive baseline on the same subjects as the model."""

    subjects: list[SubjectResult] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)


@dataclass
class EvaluationReport:
    site: str
    direction: str
    subjects: list[SubjectResult] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, BaselineScores] = field(default_factory=dict)

    def to_json(self) -> str:
        def clean(value: object) -> object:
            if isinstance(value, float) and not math.isfinite(value):
                return str(value)  # JSON has no inf/nan: keep them readable
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return json.dumps(clean(asdict(self)), indent=2) + "\n"

    def write(self, path: Path) -> Path:
        atomic_write_text(path, self.to_json())
        return path


def evaluate_pairs(
    site_name: str,
    direction: str,
    pairs: list[tuple[str, PairedSlices]],
    translate: Translate,
) -> EvaluationReport:
    """Score ``translate`` on each subject's paired slices (model scale, (n, H, W) arrays)."""
    return evaluate_predictor(site_name, direction, pairs, lambda source, _: translate(source))


def evaluate_predictor(
    site_name: str,
    direction: str,
    pairs: list[tuple[str, PairedSlices]],
    predict: Predict,
) -> EvaluationReport:
    """Score ``predict(source, mask)`` on each subject's paired slices; the mask is the one the
    metrics are computed in (``paired.masks``)."""
    report = EvaluationReport(site_name, direction)
    report.subjects, report.mean = score_pairs(pairs, predict)
    return report


def score_pairs(
    pairs: list[tuple[str, PairedSlices]], predict: Predict
) -> tuple[list[SubjectResult], dict[str, float]]:
    """Per subject, :func:`subject_metrics` of ``predict(paired.a, paired.masks)``; and the mean
    over subjects (empty without subjects)."""
    subjects = []
    for subject, paired in pairs:
        masks = paired.masks.astype(bool)
        predicted = predict(paired.a, masks)
        metrics = subject_metrics(predicted, paired.b, masks, paired.lesions)
        subjects.append(SubjectResult(subject, len(paired), metrics))
    mean = _headline(mean_metrics([s.metrics for s in subjects])) if subjects else {}
    return subjects, mean


def add_baselines(
    report: EvaluationReport,
    pairs: list[tuple[str, PairedSlices]],
    baselines: Mapping[str, Predict],
) -> EvaluationReport:
    """Score each baseline on the same ``pairs`` the model was scored on; into
    ``report.baselines``."""
    for name, predict in baselines.items():
        subjects, mean = score_pairs(pairs, predict)
        report.baselines[name] = BaselineScores(subjects, mean)
    return report


def _headline(metrics: dict[str, float]) -> dict[str, float]:
    """Drop the bookkeeping counts of :func:`mean_metrics`; when every value of a metric was
    infinite (a perfect PSNR on every slice) the mean is ``inf``, not "no value"."""
    out = {}
    for key, value in metrics.items():
        if key.endswith("_n") or key.endswith("_n_inf"):
            continue
        if (
            math.isnan(value)
            and metrics.get(f"{key}_n") == 0
            and metrics.get(f"{key}_n_inf", 0) > 0
        ):
            value = math.inf
        out[key] = value
    return out


def subject_metrics(
    predicted: np.ndarray,
    target: np.ndarray,
    masks: np.ndarray,
    lesions: np.ndarray | None = None,
) -> dict[str, float]:
    """Slice-averaged and whole-volume metrics of one subject's (n, H, W) model-scale stacks.

    With ``lesions`` ((n, H, W) bool), ``lesion_psnr`` / ``lesion_ssim`` / ``lesion_mae`` are the
    means over the slices that contain lesion (the survey's Challenge 2).
    """
    lesion_list = list(lesions) if lesions is not None else [None] * len(predicted)
    per_slice = [
        image_metrics(p, t, mask=m if m.any() else None, lesion=les)
        for p, t, m, les in zip(predicted, target, masks, lesion_list, strict=True)
    ]
    metrics = _headline(mean_metrics(per_slice))
    pred_unit, target_unit = to_unit(predicted), to_unit(target)
    metrics["vol_psnr"] = psnr(pred_unit, target_unit)
    metrics["vol_mae"] = mae(pred_unit, target_unit)
    metrics["vol_nmse"] = nmse(pred_unit, target_unit)
    if masks.any():
        metrics["vol_psnr_masked"] = psnr(pred_unit, target_unit, mask=masks)
        metrics["vol_mae_masked"] = mae(pred_unit, target_unit, mask=masks)
        metrics["vol_nmse_masked"] = nmse(pred_unit, target_unit, mask=masks)
    return metrics


def site_pairs(
    site_dir: Path, data_config: DataConfig, cache_dir: Path | None = None
) -> tuple[str, list[tuple[str, PairedSlices]]]:
    """Load a site and group its paired slices per subject (session).

    The target of a session is on its source's grid and inside its source's mask (see
    :mod:`fedsynth.common.data.pairing`), so every model and baseline is scored on one region.
    """
    site = load_site(site_dir, data_config, cache_dir=cache_dir)
    return site.name, pairs_by_subject(site, site_dir, data_config)


def pairs_by_subject(
    site: SiteData, site_dir: Path, data_config: DataConfig
) -> list[tuple[str, PairedSlices]]:
    """A loaded site's paired slices per subject (session), with lesion masks where found.

    Raises:
        ValueError: the site has no subject with both contrasts.
    """
    if not site.paired:
        raise ValueError(
            f"site {site_dir} has no subject with both {site.direction.source.value} and "
            f"{site.direction.target.value}: nothing to evaluate on true pairs"
        )
    grouped = []
    for a, b in site.paired:
        label = a.scan.subject + (f" {a.scan.session}" if a.scan.session else "")
        mask_path = find_lesion_mask(site_dir, a.scan.subject, a.scan.session)
        lesion = None
        if mask_path is not None:
            try:
                lesion = preprocess_label(mask_path, data_config)
            except ScanError as exc:
                logger.warning("ignoring lesion mask: %s", exc)
        grouped.append((label, PairedSlices([(a, b)], lesions=[lesion])))
    return grouped
