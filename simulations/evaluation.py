"""The test sets of an experiment and what is scored on them: every site's held-out subjects and
the unseen sites, the slice-weighted mean over sites, and the naive baselines fitted for them."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsynth.common.baselines import (
    IntensityStats,
    Predictor,
    fit_baselines,
    site_statistics,
)
from fedsynth.common.config import RunConfig
from fedsynth.common.data.errors import ScanError
from fedsynth.common.data.site import load_site
from fedsynth.common.evaluation import EvaluationReport, evaluate_predictor, site_pairs
from fedsynth.simulations.errors import ExperimentError
from fedsynth.simulations.results import SampleSlices, sample_key

logger = logging.getLogger(__name__)

Translate = Callable[[np.ndarray], np.ndarray]


def _mean(
    per_site: Mapping[str, Mapping[str, float]], weights: Mapping[str, int]
) -> dict[str, float]:
    """Test-slice-weighted mean of each metric over the sites (NaN values are left out)."""
    keys = sorted({k for metrics in per_site.values() for k in metrics})
    out = {}
    for key in keys:
        values = [
            (metrics[key], weights.get(site, 0))
            for site, metrics in per_site.items()
            if key in metrics and math.isfinite(metrics[key])
        ]
        total = sum(w for _, w in values)
        if total > 0:
            out[key] = sum(v * w for v, w in values) / total
    return out


UNSEEN_PREFIX = "unseen-"


def unseen_name(site_dir: Path) -> str:
    """How a site outside the federation (``--eval-site``) is named in results and reports."""
    return f"{UNSEEN_PREFIX}{Path(site_dir).name}"


class TestSets:
    """Every site's held-out paired test subjects, and every subject of the unseen sites (sites
    that took no part in training: leave-one-site-out), loaded once."""

    def __init__(
        self,
        config: RunConfig,
        folders: Mapping[str, tuple[Path, Path | None]],
        cache: Path,
        unseen: Sequence[Path] = (),
    ):
        self.direction = config.data.direction
        self.pairs = {}
        for name, (_, test_dir) in folders.items():
            if test_dir is None:
                continue
            try:
                self.pairs[name] = site_pairs(test_dir, config.data, cache)[1]
            except (ScanError, ValueError) as exc:
                logger.warning("%s has no usable test subjects: %s", name, exc)
        for site_dir in unseen:
            name = unseen_name(site_dir)
            if name in self.pairs:
                raise ExperimentError(f"two evaluation sites are named {name}: rename a folder")
            try:
                self.pairs[name] = site_pairs(Path(site_dir), config.data, cache)[1]
            except (ScanError, ValueError) as exc:
                # The caller asked for this site by name: evaluating without it would report a
                # leave-one-site-out result that has no left-out site.
                raise ExperimentError(
                    f"--eval-site {site_dir} cannot be evaluated for {self.direction}: {exc}"
                ) from exc
        self.slices = {name: sum(len(p) for _, p in pairs) for name, pairs in self.pairs.items()}

    def evaluate(
        self, translate: Translate
    ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """Per site, the mean over its test subjects; and the test-slice-weighted mean."""
        return self.evaluate_predictor(lambda source, _: translate(source))

    def evaluate_predictor(
        self, predict: Predictor
    ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
        """As :meth:`evaluate`, for a predictor given the evaluation mask (a naive baseline)."""
        per_site = {}
        for name, pairs in self.pairs.items():
            report: EvaluationReport = evaluate_predictor(name, self.direction, pairs, predict)
            per_site[name] = {k: float(v) for k, v in report.mean.items()}
        return per_site, _mean(per_site, self.slices)

    def samples(
        self,
        models: Mapping[str, Translate],
        folder: Path,
        predictors: Mapping[str, Predictor] | None = None,
    ) -> list[SampleSlices]:
        """One slice per site (its first test subject's slice with the most head), every model's
        synthesis of it, saved as ``samples/<site>.npz``. A predictor (a naive baseline) is run
        on the subject's whole stack, as it was scored (histogram matching takes the quantiles
        of the whole subject), and its slice kept."""
        out = []
        (folder / "samples").mkdir(exist_ok=True)
        for name, pairs in self.pairs.items():
            subject, paired = pairs[0]
            index = int(np.argmax(paired.masks.reshape(len(paired.masks), -1).sum(axis=1)))
            arrays = {
                "source": paired.a[index],
                "target": paired.b[index],
                "mask": paired.masks[index].astype(bool),
            }
            for model, translate in models.items():
                arrays[sample_key(model)] = translate(paired.a[index : index + 1])[0]
            for model, predict in (predictors or {}).items():
                arrays[sample_key(model)] = predict(paired.a, paired.masks.astype(bool))[index]
            path = folder / "samples" / f"{name}.npz"
            np.savez_compressed(path, **arrays)
            out.append(
                SampleSlices(
                    site=name,
                    path=str(path.relative_to(folder)),
                    subject=subject,
                    slice_index=index,
                )
            )
        return out


@dataclass
class NaiveBaselines:
    """The naive baselines of an experiment and where they come from.

    Attributes:
        sites: the training sites whose statistics were summed (those that could load).
        statistics: their sum, what a coordinator would hold.
        predictors: the fitted baselines by name (:data:`fedsynth.common.baselines.BASELINE_NAMES`).
        skipped: the baselines the statistics cannot fit, with the reason.
        seconds: the time to compute the statistics and fit.
    """

    sites: list[str]
    statistics: IntensityStats
    predictors: dict[str, Predictor]
    skipped: dict[str, str]
    seconds: float


def naive_baselines(
    config: RunConfig, train_dirs: Mapping[str, Path], cache: Path | None = None
) -> NaiveBaselines:
    """Fit the naive baselines as a federation would: each training site computes its
    statistics from its own training subjects (``train_dirs``: site name -> its training
    folder; never test or unseen subjects), the coordinator sums them and fits."""
    start = time.perf_counter()
    sites, per_site = [], []
    for name, train_dir in train_dirs.items():
        try:
            site = load_site(train_dir, config.data, cache_dir=cache, seed=config.training.seed)
        except (ScanError, ValueError) as exc:
            logger.info("%s adds no baseline statistics: %s", name, exc)
            continue
        per_site.append(site_statistics(site))
        sites.append(name)
    statistics = IntensityStats.merge_all(per_site)
    predictors, skipped = fit_baselines(statistics)
    for name, reason in skipped.items():
        logger.warning("no %s baseline: %s", name, reason)
    return NaiveBaselines(sites, statistics, predictors, skipped, time.perf_counter() - start)
