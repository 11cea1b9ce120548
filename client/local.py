"""Training without federation: one site (local-only baseline) or several pooled (centralized).

Both baselines use the very trainer the federated client uses, on the same preprocessing, so
their numbers are comparable with a federated run's. A run folder holds the resolved config,
``metrics.jsonl`` (one line per epoch), the resumable trainer state, the checkpoint (rewritten
after every epoch, atomically) and, when the sites have paired subjects, ``evaluation.json``.

Every site keeps a validation part of its weakly paired data out of training
(:func:`fedsynth.common.data.validation.hold_out`, ``data.validation_fraction``, seeded by
``training.seed``, the same split a federated site makes). After every epoch the generators are
scored on it (masked PSNR, the mean over each site's validation sessions, weighted across sites
by validation slices, as the coordinator weights its sites); the best epoch's generators are
kept in ``checkpoint-best/`` (same format as ``checkpoint/``, its metadata carrying the score)
and described in ``best.json``. A resumed run keeps the best so far. Ties keep the earlier epoch.

With ``privacy.level = "patient"`` (or ``"example"``) the run is DP-SGD
(:mod:`fedsynth.common.privacy`) with the noise planned for ``training.epochs`` epochs of ``1 / q``
Poisson batches; each epoch's line and the checkpoint carry the cumulative epsilon, and training
stops early, with a warning, at the epoch that would pass ``privacy.budget_epsilon``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsynth.client.private_training import make_trainer_private
from fedsynth.common.baselines import baseline_statistics
from fedsynth.common.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    read_metadata,
    save_checkpoint,
)
from fedsynth.common.config import RunConfig, write_resolved_config
from fedsynth.common.data.datasets import (
    PairedSlices,
    PatientSlices,
    TrainingSlices,
    training_set,
)
from fedsynth.common.data.site import SiteData
from fedsynth.common.data.validation import hold_out, validation_pairs
from fedsynth.common.evaluation import EvaluationReport, evaluate_pairs, pairs_by_subject
from fedsynth.common.io import atomic_write_text
from fedsynth.common.privacy.accounting import patient_epsilon
from fedsynth.common.privacy.plan import BudgetSpentError, NoisePlan, check_budget
from fedsynth.common.privacy.sampling import private_loader, private_population
from fedsynth.common.training.data import load_sites, make_loader, output_scale
from fedsynth.common.training.trainer import CycleGANTrainer

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
CHECKPOINT_DIR = "checkpoint"
BEST_CHECKPOINT_DIR = "checkpoint-best"
BEST_NAME = "best.json"
VALIDATION_METRIC = "val_psnr_masked"  # the key in metrics.jsonl and the checkpoints' metrics
VALIDATION_SOURCE = "the sites' validation data"


@dataclass
class LocalRun:
    run_dir: Path
    checkpoint: Path
    history: list[dict[str, float]]
    evaluations: list[EvaluationReport]
    best_checkpoint: Path | None = None  # checkpoint-best/, None when nothing validated
    best_epoch: int | None = None


@dataclass
class BestEpoch:
    """The epoch whose generators ``checkpoint-best/`` holds (``best.json``).

    Attributes:
        epoch: the number of epochs trained when the checkpoint was taken (1-based).
        score: its validation masked PSNR (dB), weighted across sites by validation slices.
        per_site: each site's own validation masked PSNR at that epoch.
        examples: each site's validation slices (the weights).
        last_epoch: the last epoch considered.
    """

    epoch: int
    score: float
    per_site: dict[str, float]
    examples: dict[str, float]
    last_epoch: int = 0
    metric: str = VALIDATION_METRIC
    source: str = VALIDATION_SOURCE


def training_sites(sites: Sequence[SiteData], config: RunConfig) -> list[SiteData]:
    """Each site with its validation part held out, as a federated site holds it out."""
    return [hold_out(s, config.data.validation_fraction, config.training.seed) for s in sites]


def best_epoch(run_dir: Path) -> int | None:
    """The epoch ``checkpoint-best/`` holds, from its metadata; None when there is none."""
    best = _read_best(Path(run_dir))
    return best.epoch if best is not None else None


def _read_best(run_dir: Path) -> BestEpoch | None:
    """The best epoch so far. The checkpoint's metadata is the truth (it is written before
    ``best.json``); ``best.json`` adds the per-site detail when it describes the same epoch."""
    folder = run_dir / BEST_CHECKPOINT_DIR
    try:
        meta = read_metadata(folder)
    except CheckpointError:
        return None
    if meta.epoch is None or VALIDATION_METRIC not in meta.metrics:
        return None
    best = BestEpoch(meta.epoch, float(meta.metrics[VALIDATION_METRIC]), {}, {}, meta.epoch)
    path = run_dir / BEST_NAME
    if path.exists():
        try:
            saved = BestEpoch(**json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            saved = None
        if saved is not None and saved.epoch == best.epoch:
            best.per_site, best.examples = saved.per_site, saved.examples
            best.last_epoch = max(best.last_epoch, saved.last_epoch)
    return best


def slices_translator(
    trainer: CycleGANTrainer, config: RunConfig
) -> Callable[[np.ndarray], np.ndarray]:
    """``(n, H, W)`` model-scale slices -> G_AB's output, in chunks of 4 batches."""
    chunk = 4 * config.training.batch_size

    def translate(slices: np.ndarray) -> np.ndarray:
        parts = [
            trainer.translate(torch.from_numpy(slices[i : i + chunk])[:, None])[:, 0]
            for i in range(0, len(slices), chunk)
        ]
        return torch.cat(parts).numpy()

    return translate


def validate(
    trainer: CycleGANTrainer,
    config: RunConfig,
    validation: Mapping[str, list[tuple[str, PairedSlices]]],
) -> tuple[float, dict[str, float], dict[str, float]]:
    """Score the generators on each site's validation sessions.

    Returns:
        (the slice-weighted mean over sites of each site's masked PSNR, per site that PSNR,
        per site its validation slices).
    """
    translate = slices_translator(trainer, config)
    per_site: dict[str, float] = {}
    examples: dict[str, float] = {}
    for name, pairs in validation.items():
        report = evaluate_pairs(name, config.data.direction, pairs, translate)
        value = report.mean.get("psnr_masked", float("nan"))
        if not np.isfinite(value):
            continue
        per_site[name] = float(value)
        examples[name] = float(sum(s.slices for s in report.subjects))
    total = sum(examples.values())
    score = sum(per_site[n] * examples[n] for n in per_site) / total if total > 0 else float("nan")
    return score, per_site, examples


def train_local(
    site_dirs: Sequence[Path],
    config: RunConfig,
    *,
    resume: bool = False,
    progress: bool = False,
    evaluate: bool = True,
    site_misalignment: Sequence[str] | None = None,
) -> LocalRun:
    """Train on one site or on several pooled; write everything into ``config.run_dir``.

    ``site_misalignment`` (simulation): one misalignment level per site, in place of
    ``config.data.misalignment`` (pooled sites that are misaligned differently).
    """
    if not site_dirs:
        raise ValueError("train-local needs at least one --site")
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_resolved_config(config, run_dir)
    loaded, sites, validation, dataset = _training_data(site_dirs, config, site_misalignment)
    job = _restore_trainer(config, dataset, validation, resume)
    job.metadata = _checkpoint_metadata(config, sites)
    job.best = _read_best(run_dir) if resume else None
    if validation:
        best = job.best
        logger.info(
            "choosing the best epoch on %d site(s)' validation data%s",
            len(validation),
            f" (best so far: epoch {best.epoch}, {best.score:.2f} dB)" if best else "",
        )
    history = _train_epochs(job, progress)
    evaluations = _evaluate_sites(job, site_dirs, loaded) if evaluate else []
    return LocalRun(
        run_dir,
        job.checkpoint,
        history,
        evaluations,
        best_checkpoint=job.best_folder if job.best is not None else None,
        best_epoch=job.best.epoch if job.best is not None else None,
    )


@dataclass
class _LocalJob:
    """What the phases of a local or pooled run share."""

    config: RunConfig
    dataset: TrainingSlices
    validation: dict[str, list[tuple[str, PairedSlices]]]
    trainer: CycleGANTrainer
    population: TrainingSlices | PatientSlices
    plan: NoisePlan | None  # None without DP-SGD
    metadata: CheckpointMetadata = field(init=False)
    best: BestEpoch | None = None

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    @property
    def best_folder(self) -> Path:
        return self.run_dir / BEST_CHECKPOINT_DIR


def _training_data(
    site_dirs: Sequence[Path], config: RunConfig, site_misalignment: Sequence[str] | None
) -> tuple[
    list[SiteData], list[SiteData], dict[str, list[tuple[str, PairedSlices]]], TrainingSlices
]:
    """The sites as loaded, their training parts, their validation sessions, the training set."""
    cache_dir = config.data.cache_dir or config.run_dir / "cache"
    loaded = load_sites(site_dirs, config, cache_dir)  # read once, for training and evaluation
    sites = training_sites(loaded, config)
    validation = _validation_sets(sites)
    misalignment: str | list[str] = config.data.misalignment
    if site_misalignment is not None:
        if len(site_misalignment) != len(sites):
            raise ValueError(f"{len(site_misalignment)} misalignment levels for {len(sites)} sites")
        misalignment = list(site_misalignment)
    dataset = training_set(
        sites,
        misalignment=misalignment,
        augment_gamma=config.data.augment_gamma,
        seed=config.training.seed,
    )
    logger.info(
        "%s: %d weakly paired and %d unpaired examples from %d site(s)",
        config.data.direction,
        dataset.paired_count,
        dataset.unpaired_count,
        len(sites),
    )
    return loaded, sites, validation, dataset


def _restore_trainer(
    config: RunConfig,
    dataset: TrainingSlices,
    validation: dict[str, list[tuple[str, PairedSlices]]],
    resume: bool,
) -> _LocalJob:
    """A trainer, private under DP-SGD, restored from the run folder's state when resuming."""
    trainer = CycleGANTrainer(
        config.model,
        config.training.model_copy(update={"lr": config.site_lr}),  # privacy.lr under DP-SGD
        config.data.image_size,
        registration=config.registration_enabled,
        privacy=config.privacy,
    )
    state_path = config.run_dir / STATE_NAME
    state = (
        torch.load(state_path, map_location=trainer.device, weights_only=True)
        if resume and state_path.exists()
        else None
    )
    plan = None
    population = private_population(dataset, config.privacy)
    if config.privacy.dp_sgd:
        plan = make_trainer_private(
            trainer,
            config,
            population,
            state,
            steps_per_round=None,
            epochs_per_round=1,
            rounds=config.training.epochs,
        )
    elif config.privacy.site_level:
        raise ValueError(
            "privacy.level = 'site' protects a site's contribution to a federation; a local or "
            "pooled run has none: use privacy.level = 'patient'"
        )
    if state is not None:
        trainer.load_state_dict(state)
        logger.info("resumed %s at epoch %d (step %d)", config.run_dir, trainer.epoch, trainer.step)
    return _LocalJob(config, dataset, validation, trainer, population, plan)


def _checkpoint_metadata(config: RunConfig, sites: Sequence[SiteData]) -> CheckpointMetadata:
    """The checkpoints' metadata before the first epoch (counters and metrics come per epoch)."""
    return CheckpointMetadata(
        kind="local" if len(sites) == 1 else "pooled",
        direction=config.data.direction,
        model=config.model,
        data=config.data,
        output_scale=output_scale([v for s in sites for v in s.domain_b]),
        sites=[s.name for s in sites],
        # The training parts' intensity statistics: `fedsynth evaluate` scores the naive
        # baselines beside this model from them (no image, see fedsynth.common.baselines).
        baselines=baseline_statistics(sites),
    )


def _train_epochs(job: _LocalJob, progress: bool) -> list[dict[str, float]]:
    """Train up to ``training.epochs`` (or until the privacy budget), one record per epoch."""
    history: list[dict[str, float]] = []
    while job.trainer.epoch < job.config.training.epochs:
        loader = _epoch_loader(job)
        if loader is None:
            break
        history += job.trainer.fit(loader, 1, progress=progress)
        _record_epoch(job, history[-1])
    return history


def _epoch_loader(job: _LocalJob) -> Iterable[Any] | None:
    """The next epoch's batches (Poisson ones under DP-SGD); None once the budget is spent."""
    config, trainer, plan = job.config, job.trainer, job.plan
    if plan is None:
        return make_loader(job.dataset, config, trainer.epoch)
    assert trainer.accountant is not None
    try:
        check_budget(trainer.accountant, plan, config.privacy.budget_epsilon)
    except BudgetSpentError as exc:
        logger.warning("stopping after epoch %d: %s", trainer.epoch, exc)
        return None
    return private_loader(
        job.population,
        plan,
        seed=config.training.seed * 100_003 + trainer.epoch,
        epoch=trainer.epoch,
        num_workers=config.training.num_workers,
    )


def _record_epoch(job: _LocalJob, line: dict[str, float]) -> None:
    """Score the epoch, append its line, save the state and the checkpoints (best included)."""
    config, trainer, plan, metadata = job.config, job.trainer, job.plan, job.metadata
    if plan is not None:
        line.update(epsilon=trainer.epsilon(), delta=config.privacy.delta)
    score, per_site, examples = (
        validate(trainer, config, job.validation) if job.validation else (float("nan"), {}, {})
    )
    if per_site:
        line[VALIDATION_METRIC] = score
    _append_jsonl(job.run_dir / "metrics.jsonl", line)
    trainer.save_state(job.run_dir / STATE_NAME)
    metadata.epoch, metadata.step = trainer.epoch, trainer.step
    metadata.metrics = {k: v for k, v in line.items() if k.startswith("loss_")}
    if per_site:
        metadata.metrics[VALIDATION_METRIC] = score
        metadata.metrics.update({f"{n}/{VALIDATION_METRIC}": v for n, v in per_site.items()})
    if plan is not None:
        metadata.privacy = _privacy_record(trainer, plan, config, job.dataset)
    save_checkpoint(job.checkpoint, trainer.generators(), metadata)
    if per_site and (job.best is None or score > job.best.score):
        save_checkpoint(job.best_folder, trainer.generators(), metadata)
        job.best = BestEpoch(trainer.epoch, score, per_site, examples)
        logger.info("epoch %d: best so far, %.2f dB on %s", trainer.epoch, score, job.best.source)
    if job.best is not None:
        job.best.last_epoch = trainer.epoch
        atomic_write_text(
            job.run_dir / BEST_NAME, json.dumps(asdict(job.best), indent=2, sort_keys=True) + "\n"
        )


def _evaluate_sites(
    job: _LocalJob, site_dirs: Sequence[Path], loaded: Sequence[SiteData]
) -> list[EvaluationReport]:
    """Paired evaluation of the final generators on each whole site, kept in the checkpoint."""
    evaluations: list[EvaluationReport] = []
    config = job.config
    translate = slices_translator(job.trainer, config)
    for site_dir, site in zip(site_dirs, loaded, strict=True):
        try:
            pairs = pairs_by_subject(site, Path(site_dir), config.data)
        except ValueError as exc:
            logger.info("no paired evaluation: %s", exc)
            continue
        report = evaluate_pairs(site.name, config.data.direction, pairs, translate)
        report.write(job.run_dir / f"evaluation-{site.name}.json")
        evaluations.append(report)
    if evaluations:
        job.metadata.metrics.update(
            {f"{r.site}/{k}": v for r in evaluations for k, v in r.mean.items()}
        )
        save_checkpoint(job.checkpoint, job.trainer.generators(), job.metadata)
    return evaluations


def _validation_sets(sites: Sequence[SiteData]) -> dict[str, list[tuple[str, PairedSlices]]]:
    """Each site's validation sessions, by site name (sites without any left out)."""
    out: dict[str, list[tuple[str, PairedSlices]]] = {}
    for index, site in enumerate(sites):
        pairs = validation_pairs(site)
        if pairs:
            name = site.name if site.name not in out else f"{site.name}-{index}"
            out[name] = pairs
    return out


def _append_jsonl(path: Path, values: dict[str, float]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(values, sort_keys=True) + "\n")


def _privacy_record(
    trainer: CycleGANTrainer,
    plan: NoisePlan,
    config: RunConfig,
    dataset: TrainingSlices,
) -> dict[str, float | int | str]:
    """What a local DP run spent, for its checkpoint (a pooled run is one data holder)."""
    assert trainer.accountant is not None
    steps = trainer.accountant.steps
    if plan.unit == "patient":
        # The accountant's epsilon is the patient's: no group bound to add.
        group, whole_patient = 1, trainer.epsilon()
    else:
        group = dataset.max_examples_per_subject()
        whole_patient = patient_epsilon(plan, steps, group, config.privacy.delta)
    return {
        "level": plan.unit,
        "patients" if plan.unit == "patient" else "examples": plan.examples,
        "epsilon": trainer.epsilon(),
        "delta": config.privacy.delta,
        "accountant": config.privacy.accountant,
        "noise_multiplier": plan.noise_multiplier,
        "effective_noise_multiplier": plan.effective_noise,
        "sample_rate": plan.sample_rate,
        "steps": steps,
        "max_grad_norm": config.privacy.max_grad_norm,
        "examples_per_patient": group,
        "patient_epsilon": whole_patient,
    }
