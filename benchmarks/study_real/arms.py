"""The arms of one fold: a leave-one-site-out experiment (federated, local-only, pooled and
the variants) and the naive baselines fitted on its training sites."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.study_real.settings import VARIANT_SETTINGS, Study, slug
from fedsynth.common.baselines import Predictor
from fedsynth.common.data.datasets import PairedSlices
from fedsynth.common.evaluation import evaluate_predictor, site_pairs
from fedsynth.simulations.evaluation import naive_baselines
from fedsynth.simulations.experiment import run_experiment
from fedsynth.simulations.results import RESULTS_NAME


def experiment_dir(study: Study, direction: str, fold: str, variant: str | None = None) -> Path:
    name = f"fold-{fold}" + (f"-{variant}" if variant else "")
    return study.out / slug(direction) / name


def run_fold(study: Study, direction: str, fold: str, variant: str | None = None) -> Path:
    """One leave-one-site-out experiment; a finished one (its results.json) is kept."""
    folder = experiment_dir(study, direction, fold, variant)
    label = f"{direction}, {fold} left out" + (f", {variant}" if variant else "")
    if (folder / RESULTS_NAME).exists():
        study.echo(f"== {label}: finished earlier")
        return folder
    study.echo(f"== {label}")
    train = [path for name, path in study.sites.items() if name != fold]
    config = study.config(
        direction,
        f"{slug(direction)}-{folder.name}",
        VARIANT_SETTINGS[variant] if variant else (),
    )
    run_experiment(
        config,
        folder=folder,
        pool_sites=train,
        resume=True,
        cache_dir=study.cache,
        eval_sites=[study.test_site(fold)],
        echo=lambda line: study.echo(f"   {line}"),
    )
    return folder


@dataclass
class NaiveArms:
    """The naive baselines of one fold: fitted on its training sites, scored on the left-out
    site's pairs (kept, with the predictors, for the image grid)."""

    metrics: dict[str, dict[str, float]]  # baseline -> mean over the left-out site's subjects
    predictors: dict[str, Predictor]
    pairs: list[tuple[str, PairedSlices]]
    sites: list[str]  # the training sites whose statistics were summed


def naive_arms(study: Study, direction: str, fold: str) -> NaiveArms:
    """The constant, histogram matching and lookup table arms of a fold, from the training
    sites' summed statistics (model scale, as training sees the data); scored on the left-out
    site's true pairs, in the mask the models are scored in."""
    if (direction, fold) in study.naive:
        return study.naive[direction, fold]
    folder = experiment_dir(study, direction, fold)
    config = study.config(direction, "naive")
    train = {d.name: d for d in sorted((folder / "split" / "train").iterdir()) if d.is_dir()}
    naive = naive_baselines(config, train, study.cache)
    name, pairs = site_pairs(study.test_site(fold), config.data, study.cache)
    metrics = {
        arm: dict(evaluate_predictor(name, direction, pairs, predict).mean)
        for arm, predict in naive.predictors.items()
    }
    for arm, reason in naive.skipped.items():
        study.echo(f"   {arm}: not fitted ({reason})")
    study.naive[direction, fold] = NaiveArms(metrics, naive.predictors, pairs, naive.sites)
    return study.naive[direction, fold]
