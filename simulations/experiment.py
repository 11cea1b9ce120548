"""One simulated experiment, end to end: split, federate, train the baselines, evaluate, report.

``fedsynth simulate`` (:mod:`fedsynth.simulations.cli`) runs :func:`run_experiment` (or
:func:`fedsynth.simulations.grid.run_grid` for a grid). The phases, each recorded in
``<experiment>/phases.json`` when it completes so that ``--resume`` skips it
(:mod:`fedsynth.simulations.phases`):

1. **pool**: the phantom consortium (one scanner per site) or the real ``--site`` folders;
2. **split**: :mod:`fedsynth.simulations.partition` deals subjects to simulated hospitals, holds out
   test subjects, applies the unpaired fraction and missing domains, and links each site's files
   (:mod:`fedsynth.simulations.split`);
3. **federated**: one SuperNode per site on the engine ``simulation.engine`` names
   (:mod:`fedsynth.simulations.engines`): Flower's simulation engine (Ray), the same ServerApp and
   ClientApp as a deployment, or the same code in this process;
4. **local** / **pooled** baselines on the same split with the same compute: each site alone for
   ``rounds x local_epochs`` epochs, and all sites' data pooled for as many epochs (the number of
   examples processed then equals the federation's; :mod:`fedsynth.simulations.training`);
5. **evaluate**: every model (untrained, the federated model after every round, the baselines) on
   every site's held-out test subjects, plus one sample slice per site; beside them the naive
   baselines (constant, histogram matching, lookup table: :mod:`fedsynth.common.baselines`), fitted
   from the training sites' intensity statistics, each computed from the site's own training
   subjects and summed as a coordinator would (no image pooled), scored on the same subjects
   (:mod:`fedsynth.simulations.evaluation`, :mod:`fedsynth.simulations.scoring`);
6. **report**: ``results.json`` and ``report.md`` with figures (:mod:`fedsynth.simulations.report`).
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsynth.common.config import RunConfig, write_resolved_config
from fedsynth.simulations.errors import ExperimentError
from fedsynth.simulations.evaluation import TestSets
from fedsynth.simulations.partition import materialize
from fedsynth.simulations.phases import Phases, phase, prepare_folder
from fedsynth.simulations.report import headline_lines, write_report
from fedsynth.simulations.results import ExperimentResults, ModelResult, RoundPoint, SplitSummary
from fedsynth.simulations.scoring import Scores, evaluate_models
from fedsynth.simulations.split import (
    Split,
    count_slices,
    make_split,
    most_severe,
    site_folders,
    split_lines,
)
from fedsynth.simulations.training import run_federated, train_baselines

logger = logging.getLogger(__name__)


def _refuse_trained_eval_sites(pool_sites: Sequence[Path], eval_sites: Sequence[Path]) -> None:
    """An unseen site (``--eval-site``) must not also be a training site."""
    trained_on = {Path(p).resolve() for p in pool_sites}
    for site_dir in eval_sites:
        if Path(site_dir).resolve() in trained_on:
            raise ExperimentError(
                f"--eval-site {site_dir} is also a training --site: an unseen site must not be "
                "trained on"
            )


def _split_phase(
    config: RunConfig,
    folder: Path,
    pool_sites: Sequence[Path],
    pool_dir: Path | None,
    phases: Phases,
    cache: Path,
    echo: Callable[[str], None],
) -> Split:
    """The pool and split phases: the plan (rebuilt on resume), the sites' linked folders, and
    each site's training slices."""
    with phase(phases, "split", echo, "pool and split") as run:
        plan = make_split(config, folder, pool_sites, pool_dir=pool_dir, echo=echo)
        if run:
            materialize(plan, folder / "split")
    folders = site_folders(plan, folder / "split")
    slices, unusable = count_slices(config, folders, cache)
    return Split(plan, folders, slices, unusable)


def _check_sites(config: RunConfig, split: Split) -> None:
    """Refuse a split with fewer sites, or fewer sites that can train, than a federation needs."""
    sites, needed = split.plan.sites, config.federation.min_sites
    if len(sites) < needed:
        raise ExperimentError(
            f"{len(sites)} site(s) in the split, federation.min_sites is {needed}"
        )
    if len(split.trainable) < needed:
        raise ExperimentError(
            f"only {len(split.trainable)} site(s) can train (the others lack a domain or hold "
            "unusable files), "
            f"federation.min_sites is {needed}"
        )


def _federation_config(config: RunConfig, misalignment: Sequence[str]) -> RunConfig:
    """The configuration the federation and the baselines train with."""
    # The sites score every round on their own validation data (never on the test subjects):
    # the coordinator keeps the best round by that score, and that round is what is reported.
    if config.data.misalignment == "none" and any(m != "none" for m in misalignment):
        # Registration (training.registration = "auto") follows the data's misalignment; the
        # most severe site decides, so every site trains the same networks.
        return config.model_copy(
            update={
                "data": config.data.model_copy(update={"misalignment": most_severe(misalignment)})
            }
        )
    return config


def _privacy(config: RunConfig, rounds: Sequence[RoundPoint]) -> dict[str, Any]:
    """The privacy settings for the results, with the worst site's epsilon at the end."""
    privacy: dict[str, Any] = {"enabled": config.privacy.enabled}
    if config.privacy.enabled:
        privacy |= {
            "level": config.privacy.level,
            "delta": config.privacy.delta,
            "target_epsilon": config.privacy.target_epsilon,
            "noise_multiplier": config.privacy.noise_multiplier,
            "budget_epsilon": config.privacy.budget_epsilon,
            "max_grad_norm": config.privacy.max_grad_norm,
        }
        if rounds and rounds[-1].epsilon:
            privacy["worst_epsilon"] = max(rounds[-1].epsilon.values())
    return privacy


def _headline(models: Sequence[ModelResult]) -> dict[str, float]:
    out = {}
    for model in models:
        for key in ("psnr_masked", "ssim_masked", "mae_masked"):
            if key in model.mean:
                out[f"{model.name}/{key}"] = model.mean[key]
    return out


def _results(
    config: RunConfig,
    variant: Mapping[str, Any] | None,
    summary: SplitSummary,
    scores: Scores,
    phases: Phases,
) -> ExperimentResults:
    """What the experiment measured, as ``results.json`` records it."""
    return ExperimentResults(
        name=config.name,
        direction=config.data.direction,
        preset=config.preset,
        variant=dict(variant or {}),
        split=summary,
        models=scores.models,
        rounds=scores.rounds,
        samples=scores.samples,
        privacy=_privacy(config, scores.rounds),
        timing={k: round(v, 2) for k, v in phases.done.items()},
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{platform.python_implementation()} {platform.python_version()}",
        headline=_headline(scores.models),
        naive={"sites": scores.naive.sites, "statistics": scores.naive.statistics.to_dict()},
    )


def run_experiment(
    config: RunConfig,
    *,
    folder: Path | None = None,
    pool_sites: Sequence[Path] = (),
    resume: bool = False,
    overwrite: bool = False,
    state_root: Path | None = None,
    pool_dir: Path | None = None,
    cache_dir: Path | None = None,
    variant: Mapping[str, Any] | None = None,
    eval_sites: Sequence[Path] = (),
    echo: Callable[[str], None] = print,
) -> ExperimentResults:
    """Run (or, with ``resume``, finish) one experiment; return what it measured.

    Args:
        config: the run configuration (``simulation`` describes the split and baselines).
        folder: the experiment folder (default ``config.run_dir``).
        pool_sites: real site folders to split (default: the phantom).
        resume: skip the phases ``phases.json`` marks complete.
        overwrite: delete an earlier experiment in ``folder`` first.
        state_root: keep each simulated site's state on disk here (default: in Flower's memory).
        pool_dir: where the phantom pool lives (a grid shares one between its cells).
        cache_dir: the preprocessed-slice cache (content-keyed, so a grid's cells share one).
        variant: a grid cell's settings, shown in the report.
        eval_sites: real sites that take no part in training, every subject of which is
            evaluated like a held-out subject (named ``unseen-<folder>``): leave one site out.
    """
    folder = Path(folder or config.run_dir)
    _refuse_trained_eval_sites(pool_sites, eval_sites)
    prepare_folder(folder, resume=resume, overwrite=overwrite)
    phases = Phases.open(folder)
    write_resolved_config(config, folder)
    cache = Path(cache_dir) if cache_dir is not None else folder / "cache"
    start = time.perf_counter()

    split = _split_phase(config, folder, pool_sites, pool_dir, phases, cache, echo)
    tests = TestSets(config, split.folders, cache, unseen=eval_sites)
    summary = split.plan.summary(
        {
            name: {**counts, "test": tests.slices.get(name, 0)}
            for name, counts in split.slices.items()
        }
    )
    for line in split_lines(summary.sites):
        echo(line)
    for name, reason in split.unusable.items():
        echo(f"{name}: {reason} (the log names them); it cannot train")
    _check_sites(config, split)
    fed_config = _federation_config(config, split.misalignment)

    with phase(
        phases, "federated", echo, f"federated: {len(split.plan.sites)} simulated sites"
    ) as run:
        if run:
            run_federated(
                fed_config,
                folder,
                [split.train_dir(s.name) for s in split.plan.sites],
                split.misalignment,
                resume=resume,
                state_root=state_root,
                cache=cache,
                echo=echo,
            )
    skipped = train_baselines(fed_config, split, folder / "baselines", phases, cache, echo)
    scores = evaluate_models(config, folder, split, tests, skipped, phases, cache, echo)

    results = _results(config, variant, summary, scores, phases)
    results.write(folder)
    report = write_report(folder, results)
    echo(f"experiment finished in {time.perf_counter() - start:.0f} s")
    for line in headline_lines(results):
        echo(line)
    echo(f"report: {report}")
    return results
