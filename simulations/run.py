"""One simulated experiment, end to end: split, federate, train the baselines, evaluate, report.

``fedsynth simulate`` runs :func:`run_experiment` (or :func:`run_grid` for a grid). The phases,
each recorded in ``<experiment>/phases.json`` when it completes so that ``--resume`` skips it:

1. **pool**: the phantom consortium (one scanner per site) or the real ``--site`` folders;
2. **split**: :mod:`fedsynth.simulations.partition` deals subjects to simulated hospitals, holds out
   test
   subjects, applies the unpaired fraction and missing domains, and links each site's files;
3. **federated**: the Flower simulation engine (Ray) with one SuperNode per site, the same
   ServerApp and ClientApp as a deployment (:func:`fedsynth.simulations.engines.flower.simulate`);
4. **local** / **pooled** baselines on the same split with the same compute: each site alone for
   ``rounds x local_epochs`` epochs, and all sites' data pooled for as many epochs (the number of
   examples processed then equals the federation's);
5. **evaluate**: every model (untrained, the federated model after every round, the baselines) on
   every site's held-out test subjects, plus one sample slice per site; beside them the naive
   baselines (constant, histogram matching, lookup table: :mod:`fedsynth.common.baselines`), fitted
   from the training sites' intensity statistics, each computed from the site's own training
   subjects and summed as a coordinator would (no image pooled), scored on the same subjects;
6. **report**: ``results.json`` and ``report.md`` with figures (:mod:`fedsynth.simulations.report`).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.console import Console

from fedsynth.client.local import BEST_CHECKPOINT_DIR, best_epoch, train_local
from fedsynth.common.baselines import (
    IntensityStats,
    Predictor,
    fit_baselines,
    site_statistics,
)
from fedsynth.common.checkpoint import read_metadata
from fedsynth.common.cli import ConfigOption, PresetOption, SetOption, fail, resolve_config
from fedsynth.common.config import ConfigError, RunConfig, load_config, write_resolved_config
from fedsynth.common.data.errors import BadScansError, ScanError
from fedsynth.common.data.site import load_site
from fedsynth.common.evaluation import EvaluationReport, evaluate_predictor, site_pairs
from fedsynth.common.flower_processes import FlowerError
from fedsynth.common.io import atomic_write_text
from fedsynth.common.modalities import Direction
from fedsynth.common.models import define_cyclegan
from fedsynth.common.phantom import draw_site_scanner, generate_consortium
from fedsynth.common.synthesis import Synthesizer
from fedsynth.server.coordinator import RUN_FILE
from fedsynth.server.round_store import (
    EMA_DIR,
    ROUND_RECORD,
    best_checkpoint,
    latest_round,
    read_best,
    round_dir,
)
from fedsynth.simulations.engines.flower import simulate
from fedsynth.simulations.engines.inprocess import simulate_in_process
from fedsynth.simulations.partition import (
    SplitPlan,
    assign,
    materialize,
    natural,
    plan_split,
    read_pool,
    site_sizes,
)
from fedsynth.simulations.report import headline_lines, write_grid_report, write_report
from fedsynth.simulations.results import (
    FEDERATED,
    LOOKUP_TABLE,
    NAIVE,
    POOLED,
    STARTING_POINT,
    UNTRAINED,
    ExperimentResults,
    ModelResult,
    RoundPoint,
    SampleSlices,
    local_model,
    sample_key,
)

logger = logging.getLogger(__name__)

console = Console(soft_wrap=True)

DEFAULT_PRESET = "cpu-small"
PHASES_NAME = "phases.json"
MADE_BY = "fedsynth simulate"
SEVERITY_ORDER = ("none", "slight", "moderate", "severe")
Translate = Callable[[np.ndarray], np.ndarray]


class ExperimentError(RuntimeError):
    """The experiment cannot go on; the message says what to change."""


# ----------------------------------------------------------------------------- bookkeeping


@dataclass
class Phases:
    """``phases.json``: which phases are complete, and how long each took."""

    path: Path
    done: dict[str, float]

    @classmethod
    def open(cls, folder: Path) -> Phases:
        path = folder / PHASES_NAME
        if path.exists():
            record = json.loads(path.read_text(encoding="utf-8"))
            return cls(path, {str(k): float(v) for k, v in record.get("done", {}).items()})
        return cls(path, {})

    def finished(self, name: str) -> bool:
        return name in self.done

    def mark(self, name: str, seconds: float) -> None:
        self.done[name] = seconds
        record = {"made_by": MADE_BY, "done": self.done}
        atomic_write_text(self.path, json.dumps(record, indent=2) + "\n")


@contextmanager
def _phase(phases: Phases, name: str, echo: Callable[[str], None], what: str) -> Iterator[bool]:
    """Yield whether the phase must run; time it and mark it done when its block completes."""
    if phases.finished(name):
        echo(f"[{name}] done earlier ({phases.done[name]:.0f} s): skipped")
        yield False
        return
    echo(f"[{name}] {what}")
    start = time.perf_counter()
    yield True
    phases.mark(name, time.perf_counter() - start)


def prepare_folder(folder: Path, *, resume: bool, overwrite: bool) -> None:
    """Create the experiment folder; refuse to mix a new experiment into an old one."""
    marker = folder / PHASES_NAME
    if folder.exists() and any(folder.iterdir()):
        if overwrite:
            if not marker.exists():
                raise ExperimentError(
                    f"{folder} was not made by `{MADE_BY}` (no {PHASES_NAME}): "
                    "refusing to delete it"
                )
            shutil.rmtree(folder)
        elif not resume:
            raise ExperimentError(
                f"{folder} already holds an experiment: pass --resume to continue it, "
                "--overwrite to start again, or choose another --run-dir / --set name=..."
            )
    folder.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- split


def _most_severe(levels: Sequence[str]) -> str:
    return max(levels, key=SEVERITY_ORDER.index)


def _sizes(config: RunConfig, scheme: str, total: int) -> list[int]:
    sim = config.simulation
    return site_sizes(
        scheme,
        total,
        sim.num_sites,
        counts=sim.subjects,
        ratios=sim.ratios,
        alpha=sim.alpha,
        exponent=sim.power_exponent,
        min_size=sim.min_subjects,
        seed=sim.seed,
    )


def make_split(
    config: RunConfig,
    folder: Path,
    pool_sites: Sequence[Path],
    *,
    pool_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> SplitPlan:
    """Build (or rebuild, deterministically) the pool and the split plan; link the sites."""
    sim = config.simulation
    direction = Direction.parse(config.data.direction)
    scheme = sim.partition
    if scheme == "auto":
        scheme = "natural" if pool_sites else "counts"
    parameters: dict[str, Any] = {}
    scanners: list[dict[str, Any]] | None = None
    if pool_sites:
        pool = read_pool(pool_sites)
        if scheme == "natural":
            groups = natural(pool)
        else:
            sizes = _sizes(config, scheme, min(sim.total_subjects or len(pool), len(pool)))
            groups = assign(pool, sizes, seed=sim.seed)
            parameters["sizes"] = sizes
        pool_name = ", ".join(Path(p).name for p in pool_sites)
    else:
        if scheme == "natural":
            raise ExperimentError(
                "simulation.partition = 'natural' needs real sites (--site); the phantom has "
                "no natural split: use 'counts', 'ratios', 'dirichlet' or 'power'"
            )
        sizes = _sizes(config, scheme, sim.total_subjects or sum(sim.subjects))
        parameters["sizes"] = sizes
        # Each site's test subjects are extra phantom subjects of the same scanner.
        counts = [n + sim.holdout_subjects for n in sizes]
        pool_root = pool_dir or folder / "pool"
        record = pool_root / "pool.json"
        modalities = [direction.source.value, direction.target.value]
        wanted = {
            "sizes": counts,
            "seed": sim.seed,
            "voxel_mm": sim.phantom_voxel_mm,
            "modalities": modalities,
            "scanners": sim.scanners,
        }
        if not record.exists() or json.loads(record.read_text(encoding="utf-8")) != wanted:
            echo(f"  phantom: {len(counts)} sites, {sum(counts)} subjects -> {pool_root}")
            generate_consortium(
                pool_root,
                sites=len(counts),
                subjects=counts,
                seed=sim.seed,
                modalities=modalities,
                voxel_size=sim.phantom_voxel_mm,
                overwrite=True,
                shared_scanner=sim.scanners == "shared",
            )
            record.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
        pool = read_pool([pool_root / f"site-{k}" for k in range(1, len(counts) + 1)])
        groups = natural(pool)
        scanners = []
        for k in range(1, len(counts) + 1):
            scanner = draw_site_scanner(
                sim.seed, 1 if sim.scanners == "shared" else k, sim.phantom_voxel_mm
            )
            scanners.append(
                {
                    "field_strength_t": scanner.field_strength_t,
                    "voxel_size_mm": [round(v, 2) for v in scanner.voxel_size_mm],
                }
            )
        pool_name = "phantom"
    knob = {"ratios": "ratios", "dirichlet": "alpha", "power": "power_exponent"}.get(scheme)
    if knob is not None:
        parameters[knob] = getattr(sim, knob)
    plan = plan_split(
        groups,
        direction,
        scheme=scheme,
        parameters=parameters,
        seed=sim.seed,
        pool=pool_name,
        holdout=sim.holdout_subjects,
        unpaired_fraction=sim.unpaired_fraction,
        misalignment=config.data.misalignment if sim.misalignment is None else sim.misalignment,
        missing=sim.missing_domain,
        scanners=scanners,
    )
    return plan


def count_slices(
    config: RunConfig, folders: Mapping[str, tuple[Path, Path | None]], cache: Path
) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """Model-scale training slices per site and domain (the preprocessing is cached for the
    runs); a site that cannot load (it lacks a domain, or holds unusable files with
    ``data.skip_bad`` off) counts zero.

    Returns:
        The counts, and per site with unusable files the reason it cannot train (in the
        federation it answers every round so; local and pooled training leave it out).
    """
    counts: dict[str, dict[str, int]] = {}
    unusable: dict[str, str] = {}
    for name, (train_dir, _) in folders.items():
        counts[name] = {"a": 0, "b": 0}
        try:
            site = load_site(train_dir, config.data, cache_dir=cache, seed=config.training.seed)
            counts[name] = {"a": site.slices_a, "b": site.slices_b}
        except BadScansError as exc:
            logger.warning("%s: %s", name, exc)
            unusable[name] = exc.summary
        except (ScanError, ValueError) as exc:
            logger.info("%s: %s", name, exc)
    return counts, unusable


# ----------------------------------------------------------------------------- training


def baseline_config(
    config: RunConfig, name: str, folder: Path, slices: int | None, sites: int = 1
) -> RunConfig:
    """A local or pooled run with the federation's compute, in ``folder/name``: ``rounds x
    local_epochs`` epochs over its data, or, when rounds are counted in steps, as many epochs as
    ``rounds x local_steps x sites`` steps take on ``slices`` examples (a pooled model trains on
    ``sites`` sites' data, so it gets all of their steps); the same learning-rate decay."""
    fed, training = config.federation, config.training
    if fed.local_steps is not None and slices:
        per_epoch = max(1, math.ceil(slices / training.batch_size))
        epochs = max(1, round(fed.rounds * fed.local_steps * sites / per_epoch))
        decay_rounds = fed.decay_rounds
        if decay_rounds is None:
            decay_rounds = round(fed.rounds * training.decay_epochs / max(training.epochs, 1))
        decay = round(epochs * decay_rounds / fed.rounds)
    else:
        epochs = fed.rounds * fed.local_epochs
        decay_rounds = fed.decay_rounds
        if decay_rounds is None:
            decay_rounds = round(fed.rounds * training.decay_epochs / max(training.epochs, 1))
        decay = decay_rounds * fed.local_epochs
    update: dict[str, Any] = {
        "name": name,
        "output_dir": folder,
        "training": training.model_copy(update={"epochs": epochs, "decay_epochs": decay}),
    }
    if config.privacy.site_level:
        # Site-level DP protects a site's contribution to a federation; a run that releases
        # nothing to others has none to protect (see README, "Differential privacy").
        update["privacy"] = config.privacy.model_copy(update={"enabled": False})
    return config.model_copy(update=update)


def run_federated(
    config: RunConfig,
    folder: Path,
    train_dirs: Sequence[Path],
    misalignment: Sequence[str],
    *,
    resume: bool,
    state_root: Path | None,
    cache: Path,
    echo: Callable[[str], None],
) -> Path:
    run_dir = folder / "federated"
    done = latest_round(run_dir) if run_dir.exists() else None
    if done == config.federation.rounds:
        return run_dir
    engine = simulate_in_process if config.simulation.engine == "inprocess" else simulate
    outcome = engine(
        config,
        list(train_dirs),
        run_dir,
        resume=resume and done is not None,
        state_root=state_root,
        echo=echo,
        cache_dir=cache,
        site_misalignment=list(misalignment),
    )
    if outcome.stopped:
        echo(f"  the federation stopped early: {outcome.stopped}")
    elif outcome.status != "finished:completed":
        raise ExperimentError(
            f"Flower run {outcome.run_id} ended as {outcome.status}; see {run_dir}/superlink.log"
        )
    return run_dir


# ----------------------------------------------------------------------------- evaluation


def _untrained(config: RunConfig) -> Translate:
    generator = define_cyclegan(config.model, config.data.image_size, seed=config.training.seed)[
        "g_ab"
    ].eval()

    @torch.no_grad()
    def translate(slices: np.ndarray) -> np.ndarray:
        parts = [
            generator(torch.from_numpy(np.ascontiguousarray(slices[i : i + 32]))[:, None])[:, 0]
            for i in range(0, len(slices), 32)
        ]
        return torch.cat(parts).numpy()

    return translate


def _starting_point(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint round 1 started from (``run.json``), with what it was; None: random."""
    run_file = run_dir / RUN_FILE
    if not run_file.exists():
        return None
    run = json.loads(run_file.read_text(encoding="utf-8"))
    start = run.get("initial_generators")
    if not start:
        return None
    warm = run.get("warm_start")
    info = dict(warm or {})
    info["what"] = (
        f"the phantom warm start ({warm['steps']} steps on {warm['subjects']} phantom subjects, "
        "no site data)"
        if warm
        else f"federation.initial_generators ({start['kind']} checkpoint)"
    )
    return Path(start["path"]), info


def _checkpoint(path: Path) -> Translate:
    return Synthesizer(path, device="cpu", batch_size=32).translate_slices


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


def _selected_round(run_dir: Path, last: int, config: RunConfig) -> tuple[int, Path, str]:
    """The federated round to report: the best on the sites' validation data (the EMA weights
    of that round with ``federation.ema_decay``), else the last round, and how it was chosen."""
    best = read_best(run_dir)
    if best is None:
        return last, round_dir(run_dir, last), f"last round ({last}): no site validated"
    ema = config.federation.ema_decay is not None
    folder = best_checkpoint(run_dir, ema=ema) or round_dir(run_dir, best.round)
    how = (
        f"round {best.round} of {last}, best on the sites' validation data "
        f"({best.score:.2f} dB masked PSNR)"
    )
    return best.round, folder, how + (", EMA weights" if folder.name == EMA_DIR else "")


def _rounds(run_dir: Path, tests: TestSets, untrained: dict[str, Any]) -> list[RoundPoint]:
    points = [RoundPoint(round=0, per_site=untrained["per_site"], mean=untrained["mean"])]
    last = latest_round(run_dir) or 0
    log = {}
    rounds_log = run_dir / "rounds.jsonl"
    if rounds_log.exists():
        for line in rounds_log.read_text(encoding="utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                log[int(entry["round"])] = entry
    for number in range(1, last + 1):
        folder = round_dir(run_dir, number)
        if not (folder / ROUND_RECORD).exists():
            continue
        per_site, mean = tests.evaluate(_checkpoint(folder))
        entry = log.get(number, {})
        points.append(
            RoundPoint(
                round=number,
                per_site=per_site,
                mean=mean,
                epsilon={k: float(v) for k, v in entry.get("epsilon", {}).items()},
                bytes_up={k: int(v) for k, v in entry.get("bytes_up", {}).items()},
                bytes_down={k: int(v) for k, v in entry.get("bytes_down", {}).items()},
                seconds=float(entry.get("seconds", 0.0)),
            )
        )
    return points


# ----------------------------------------------------------------------------- the experiment


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
    trained_on = {Path(p).resolve() for p in pool_sites}
    for site_dir in eval_sites:
        if Path(site_dir).resolve() in trained_on:
            raise ExperimentError(
                f"--eval-site {site_dir} is also a training --site: an unseen site must not be "
                "trained on"
            )
    prepare_folder(folder, resume=resume, overwrite=overwrite)
    phases = Phases.open(folder)
    write_resolved_config(config, folder)
    cache = Path(cache_dir) if cache_dir is not None else folder / "cache"
    start = time.perf_counter()

    with _phase(phases, "split", echo, "pool and split") as run:
        plan = make_split(config, folder, pool_sites, pool_dir=pool_dir, echo=echo)
        if run:
            materialize(plan, folder / "split")
    folders = {
        s.name: (
            folder / "split" / "train" / s.name,
            folder / "split" / "test" / s.name if s.test else None,
        )
        for s in plan.sites
    }
    slices, unusable = count_slices(config, folders, cache)
    tests = TestSets(config, folders, cache, unseen=eval_sites)
    summary = plan.summary(
        {name: {**counts, "test": tests.slices.get(name, 0)} for name, counts in slices.items()}
    )
    for line in _split_lines(summary.sites):
        echo(line)
    for name, reason in unusable.items():
        echo(f"{name}: {reason} (the log names them); it cannot train")
    trainable = [s for s in plan.sites if s.excluded is None and s.name not in unusable]
    if len(plan.sites) < config.federation.min_sites:
        raise ExperimentError(
            f"{len(plan.sites)} site(s) in the split, federation.min_sites is "
            f"{config.federation.min_sites}"
        )
    if len(trainable) < config.federation.min_sites:
        raise ExperimentError(
            f"only {len(trainable)} site(s) can train (the others lack a domain or hold "
            "unusable files), "
            f"federation.min_sites is {config.federation.min_sites}"
        )
    misalignment = [s.misalignment for s in plan.sites]
    # The sites score every round on their own validation data (never on the test subjects):
    # the coordinator keeps the best round by that score, and that round is what is reported.
    fed_config = config
    if config.data.misalignment == "none" and any(m != "none" for m in misalignment):
        # Registration (training.registration = "auto") follows the data's misalignment; the
        # most severe site decides, so every site trains the same networks.
        fed_config = fed_config.model_copy(
            update={
                "data": config.data.model_copy(update={"misalignment": _most_severe(misalignment)})
            }
        )

    with _phase(phases, "federated", echo, f"federated: {len(plan.sites)} simulated sites") as run:
        if run:
            run_federated(
                fed_config,
                folder,
                [folders[s.name][0] for s in plan.sites],
                misalignment,
                resume=resume,
                state_root=state_root,
                cache=cache,
                echo=echo,
            )

    models: list[ModelResult] = []
    baselines = folder / "baselines"
    if "local" in config.simulation.baselines:
        for site in plan.sites:
            name = local_model(site.name)
            if site.excluded is not None or site.name in unusable:
                models.append(ModelResult(name=name, skipped=site.excluded or unusable[site.name]))
                continue
            examples = max(slices[site.name]["a"], slices[site.name]["b"])
            local = baseline_config(fed_config, f"local-{site.name}", baselines, examples)
            with _phase(phases, name, echo, f"local-only baseline at {site.name}") as run:
                if run:
                    local.run_dir.mkdir(parents=True, exist_ok=True)
                    train_local(
                        [folders[site.name][0]],
                        local.model_copy(
                            update={"data": local.data.model_copy(update={"cache_dir": cache})}
                        ),
                        resume=True,
                        evaluate=False,
                        progress=True,
                        site_misalignment=[site.misalignment],
                    )
    if "pooled" in config.simulation.baselines:
        examples = sum(max(slices[s.name]["a"], slices[s.name]["b"]) for s in trainable)
        pooled = baseline_config(fed_config, "pooled", baselines, examples, sites=len(trainable))
        with _phase(
            phases, POOLED, echo, f"pooled baseline: {len(trainable)} sites' data together"
        ) as run:
            if run:
                pooled.run_dir.mkdir(parents=True, exist_ok=True)
                train_local(
                    [folders[s.name][0] for s in trainable],
                    pooled.model_copy(
                        update={"data": pooled.data.model_copy(update={"cache_dir": cache})}
                    ),
                    resume=True,
                    evaluate=False,
                    progress=True,
                    site_misalignment=[s.misalignment for s in trainable],
                )

    echo("[evaluate] every model on every site's held-out test subjects")
    evaluate_start = time.perf_counter()
    untrained_translate = _untrained(config)
    per_site, mean = tests.evaluate(untrained_translate)
    models.insert(0, ModelResult(name=UNTRAINED, per_site=per_site, mean=mean))
    run_dir = folder / "federated"
    round_zero = {"per_site": per_site, "mean": mean}
    translators: dict[str, Translate] = {UNTRAINED: untrained_translate}
    starting = _starting_point(run_dir)
    if starting is not None:  # round 0 is what the sites received first, not random weights
        start_checkpoint, start_info = starting
        translators[STARTING_POINT] = _checkpoint(start_checkpoint)
        per_site, mean = tests.evaluate(translators[STARTING_POINT])
        round_zero = {"per_site": per_site, "mean": mean}
        models.insert(
            1,
            ModelResult(
                name=STARTING_POINT,
                per_site=per_site,
                mean=mean,
                train_seconds=float(start_info.get("seconds", 0.0)),
                steps=int(start_info.get("steps", 0)),
                checkpoint=str(start_checkpoint),
                selected=start_info["what"],
            ),
        )
    rounds = _rounds(run_dir, tests, round_zero)
    last = latest_round(run_dir)
    if last is not None:
        chosen, checkpoint, selected = _selected_round(run_dir, last, config)
        point = next((p for p in rounds if p.round == chosen), rounds[-1])
        translators[FEDERATED] = _checkpoint(checkpoint)
        per_site, mean = point.per_site, point.mean
        if checkpoint.name == EMA_DIR:
            per_site, mean = tests.evaluate(translators[FEDERATED])
        fed_seconds = sum(p.seconds for p in rounds)
        models.insert(
            1,
            ModelResult(
                name=FEDERATED,
                per_site=per_site,
                mean=mean,
                train_seconds=phases.done.get("federated", fed_seconds),
                epochs=last * config.federation.local_epochs,  # the compute; `selected` says which
                checkpoint=str(checkpoint.relative_to(folder)),
                selected=selected,
            ),
        )
    for kind, run_name in [(POOLED, "pooled")] + [
        (local_model(s.name), f"local-{s.name}") for s in plan.sites if s.excluded is None
    ]:
        checkpoint = baselines / run_name / "checkpoint"
        if not (checkpoint / "checkpoint.json").exists():
            continue
        last_epoch = read_metadata(checkpoint).epoch
        selected = f"last epoch ({last_epoch})"
        if (baselines / run_name / BEST_CHECKPOINT_DIR / "checkpoint.json").exists():
            checkpoint = baselines / run_name / BEST_CHECKPOINT_DIR
            epoch = best_epoch(baselines / run_name)
            selected = f"epoch {epoch} of {last_epoch}, best on the sites' validation data"
        meta = read_metadata(checkpoint)
        translators[kind] = _checkpoint(checkpoint)
        per_site, mean = tests.evaluate(translators[kind])
        result = ModelResult(
            name=kind,
            per_site=per_site,
            mean=mean,
            train_seconds=phases.done.get(kind, 0.0),
            epochs=last_epoch,  # the compute spent; `selected` names the epoch scored
            steps=meta.step,
            checkpoint=str(checkpoint.relative_to(folder)),
            selected=selected,
        )
        models = [m for m in models if m.name != kind]
        models.append(result)
    naive = naive_baselines(config, {s.name: folders[s.name][0] for s in trainable}, cache)
    for name in NAIVE:
        if name not in naive.predictors:
            models.append(ModelResult(name=name, skipped=naive.skipped.get(name, "not fitted")))
            continue
        per_site, mean = tests.evaluate_predictor(naive.predictors[name])
        models.append(
            ModelResult(name=name, per_site=per_site, mean=mean, train_seconds=naive.seconds)
        )
    shown = {k: v for k, v in naive.predictors.items() if k == LOOKUP_TABLE}
    samples = tests.samples(translators, folder, shown) if config.simulation.samples else []
    phases.mark("evaluate", time.perf_counter() - evaluate_start)

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
    results = ExperimentResults(
        name=config.name,
        direction=config.data.direction,
        preset=config.preset,
        variant=dict(variant or {}),
        split=summary,
        models=models,
        rounds=rounds,
        samples=samples,
        privacy=privacy,
        timing={k: round(v, 2) for k, v in phases.done.items()},
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{platform.python_implementation()} {platform.python_version()}",
        headline=_headline(models),
        naive={"sites": naive.sites, "statistics": naive.statistics.to_dict()},
    )
    results.write(folder)
    report = write_report(folder, results)
    echo(f"experiment finished in {time.perf_counter() - start:.0f} s")
    for line in headline_lines(results):
        echo(line)
    echo(f"report: {report}")
    return results


def _headline(models: Sequence[ModelResult]) -> dict[str, float]:
    out = {}
    for model in models:
        for key in ("psnr_masked", "ssim_masked", "mae_masked"):
            if key in model.mean:
                out[f"{model.name}/{key}"] = model.mean[key]
    return out


def _split_lines(sites: Sequence[Any]) -> list[str]:
    lines = ["  site      train  A    B    slices A/B   test  misalign  note"]
    for s in sites:
        note = s.excluded or ""
        lines.append(
            f"  {s.site:<9} {s.train_subjects:<6} {s.subjects_a:<4} {s.subjects_b:<4} "
            f"{s.slices_a:>4}/{s.slices_b:<6}  {s.test_subjects:<5} {s.misalignment:<9} {note}"
        )
    return lines


# ----------------------------------------------------------------------------- grids


def grid_cells(
    grid: Mapping[str, Mapping[str, Sequence[str]]],
) -> list[tuple[str, list[str], dict[str, str]]]:
    """Every combination of one cell per axis: (label, overrides, {axis: cell})."""
    if not grid:
        raise ExperimentError("simulation.grid is empty: add axes, e.g. [simulation.grid.privacy]")
    axes = list(grid.items())
    cells = []
    for choice in itertools.product(*[list(cells.items()) for _, cells in axes]):
        label = ",".join(
            f"{axis}={name}" for (axis, _), (name, _) in zip(axes, choice, strict=True)
        )
        overrides = [o for _, (_, values) in zip(axes, choice, strict=True) for o in values]
        settings = {axis: name for (axis, _), (name, _) in zip(axes, choice, strict=True)}
        cells.append((label, overrides, settings))
    return cells


def _cell_folder(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in label.replace(",", "__"))


def run_grid(
    config_path: Path | None,
    preset: str | None,
    overrides: Sequence[str],
    *,
    folder: Path | None = None,
    pool_sites: Sequence[Path] = (),
    resume: bool = False,
    overwrite: bool = False,
    eval_sites: Sequence[Path] = (),
    echo: Callable[[str], None] = print,
) -> Path:
    """Run every cell of ``simulation.grid`` one after another (a failed cell is recorded and
    the grid goes on; ``resume`` skips finished cells) and write one comparison report."""
    base = load_config(path=config_path, preset=preset, overrides=overrides)
    folder = Path(folder or base.run_dir)
    prepare_folder(folder, resume=resume, overwrite=overwrite)
    Phases.open(folder).mark("grid", 0.0)
    write_resolved_config(base, folder)
    cells = grid_cells(base.simulation.grid)
    echo(f"grid: {len(cells)} cells -> {folder}")
    done = []
    for index, (label, cell_overrides, settings) in enumerate(cells, start=1):
        cell_dir = folder / "cells" / _cell_folder(label)
        echo(f"=== cell {index}/{len(cells)}: {label}")
        if (cell_dir / "results.json").exists() and resume:
            echo("  finished earlier: skipped")
            done.append((label, cell_dir))
            continue
        try:
            config = load_config(
                path=config_path, preset=preset, overrides=[*overrides, *cell_overrides]
            )
            config = config.model_copy(update={"name": _cell_folder(label)})
            if config.federation.warm_start_cache is None:  # one warm start for all cells
                config.federation.warm_start_cache = (folder / "warm-starts").resolve()
            run_experiment(
                config,
                folder=cell_dir,
                pool_sites=pool_sites,
                resume=resume,
                pool_dir=folder / "pool",
                cache_dir=folder / "cache",
                variant=settings,
                eval_sites=eval_sites,
                echo=echo,
            )
        except Exception as exc:  # one failed cell must not lose the others
            logger.exception("cell %s failed", label)
            echo(f"  cell {label} failed: {exc}")
        done.append((label, cell_dir))
    report = write_grid_report(folder, done)
    echo(f"grid report: {report}")
    return report


# ----------------------------------------------------------------------------- the command


def simulate_command(
    site: Annotated[
        list[Path] | None,
        typer.Option("--site", help="A real site folder for the pool (repeat); default: phantom."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Experiment folder (default: runs/<name>).")
    ] = None,
    grid: Annotated[
        bool, typer.Option("--grid", help="Run every cell of simulation.grid, then compare them.")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue the experiment in the folder, skipping finished phases.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Delete an earlier experiment in the folder first.")
    ] = False,
    state_root: Annotated[
        Path | None,
        typer.Option(help="Keep each simulated site's own state on disk here (default: memory)."),
    ] = None,
    eval_site: Annotated[
        list[Path] | None,
        typer.Option(
            "--eval-site",
            help="A real site that does not train, evaluated on all its subjects (repeat): "
            "leave one site out.",
        ),
    ] = None,
    config: ConfigOption = None,
    preset: PresetOption = None,
    overrides: SetOption = None,
) -> None:
    """Simulate a consortium on this machine: split, federate, baselines, evaluation, report.

    With no arguments: 4 phantom hospitals of unequal size (cpu-small preset), unpaired and
    misaligned, a few minutes on two CPU cores; the report lands in runs/<name>/report.md.
    """
    if config is None and preset is None:
        preset = DEFAULT_PRESET
    try:
        if grid:
            write = run_grid(
                config,
                preset,
                overrides or [],
                folder=run_dir,
                pool_sites=site or [],
                resume=resume,
                overwrite=overwrite,
                eval_sites=eval_site or [],
                echo=console.print,
            )
            console.print(f"done: {write}")
            return
        run = resolve_config(config, preset, overrides)
        run_experiment(
            run,
            folder=run_dir,
            pool_sites=site or [],
            resume=resume,
            overwrite=overwrite,
            state_root=state_root,
            eval_sites=eval_site or [],
            echo=console.print,
        )
    except ConfigError as exc:
        fail(exc, 2)
    except (ExperimentError, FlowerError, ValueError, FileNotFoundError, FileExistsError) as exc:
        fail(exc)
