"""One hospital's part of a federated round, independent of how messages travel.

:class:`RoundInstruction` is what the coordinator asks for (round number, learning rate, local
epochs or steps, the FedProx weight, what to share, the wire precision, and the coordinator's
resolved configuration). :class:`SiteSettings` is what only the hospital decides: where its data is,
which device to use, where to keep its state. :func:`train_round` restores the site's own networks
and optimisers (never sent anywhere), loads the global generators, trains and returns the update of
the shared networks (trained minus received) and scalar metrics. Both hold out the same validation
part of the site's weakly paired data (:func:`fedsynth.common.data.validation.hold_out`,
``data.validation_fraction``, seeded by ``training.seed``): :func:`train_round` trains on the rest,
and :func:`evaluate_round` scores the global generators on that part only, so the coordinator can
choose a round without looking at any test site.

:func:`train_round` runs in named phases: load and split the site (:func:`_start_round`), restore
the site's state and privacy and load the global generators (:func:`_restore`), train the local
steps (:func:`_train_local_steps`), then keep the state and pack the reply. The site keeps one
state per round it trained (:mod:`fedsynth.client.state_store`), so that a coordinator that crashed
mid-round and resumed from the previous round finds the state that round started from: a resumed
run then ends with the same weights as an uninterrupted one. The hospital's own settings are in
:mod:`fedsynth.client.site_settings`; ``RoundInstruction`` and its parsing in
:mod:`fedsynth.common.messages`.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedsynth.client.local import slices_translator
from fedsynth.client.private_training import make_trainer_private
from fedsynth.client.site_data import split_site
from fedsynth.client.site_settings import SiteError, SiteSettings
from fedsynth.client.state_store import StateStore
from fedsynth.common.config import RunConfig
from fedsynth.common.data.datasets import PatientSlices, TrainingSlices, training_set
from fedsynth.common.data.validation import validation_pairs
from fedsynth.common.evaluation import evaluate_pairs
from fedsynth.common.messages import (
    EVALUATE_METRICS,
    SHARED_NETS,
    RoundInstruction,
    flatten,
    unflatten,
    update_from,
)
from fedsynth.common.privacy.accounting import patient_epsilon
from fedsynth.common.privacy.plan import BudgetSpentError, NoisePlan, check_budget
from fedsynth.common.privacy.sampling import population_unit, private_loader, private_population
from fedsynth.common.privacy.site_level import clip_update
from fedsynth.common.training.state import unwrap
from fedsynth.common.training.trainer import CycleGANTrainer

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # a line in the hospital's log while a round trains


def _trainer(settings: SiteSettings, config: RunConfig) -> CycleGANTrainer:
    return CycleGANTrainer(
        config.model,
        config.training,
        config.data.image_size,
        registration=config.registration_enabled,
        device=settings.device,
        privacy=config.privacy,
    )


def _load_global(
    trainer: CycleGANTrainer, global_state: Mapping[str, torch.Tensor], share: str
) -> None:
    nets = unflatten(global_state)
    expected = set(SHARED_NETS[share])
    if set(nets) != expected:
        raise SiteError(
            f"the coordinator sent networks {sorted(nets)}, expected {sorted(expected)}"
        )
    for name, state in nets.items():
        moved = {k: v.to(trainer.device) for k, v in state.items()}
        unwrap(trainer.nets[name]).load_state_dict(moved)


def _loader_seed(config: RunConfig, round_number: int, epoch: int) -> int:
    return config.training.seed * 100_003 + round_number * 1_009 + epoch


def _loader(
    dataset: TrainingSlices, config: RunConfig, round_number: int, epoch: int
) -> DataLoader:
    batch = config.training.batch_size
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(_loader_seed(config, round_number, epoch)),
        num_workers=config.training.num_workers,
        drop_last=len(dataset) > batch,
    )


def _corrupt(state: dict[str, torch.Tensor], fault: str) -> dict[str, torch.Tensor]:
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    if fault == "nan":
        state[key] = state[key].clone()
        state[key].view(-1)[0] = math.nan
    else:
        state[key] = state[key][..., :-1].clone()
    logger.warning("fault injection (%s) on %s: this update will be refused", fault, key)
    return state


def train_round(
    settings: SiteSettings,
    instruction: RoundInstruction,
    global_state: Mapping[str, torch.Tensor],
    store: StateStore,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train this site for one round; return the shared networks' update (flat) and metrics."""
    start = time.perf_counter()
    config = instruction.config()
    _require_site_dp(settings, config)
    job = _start_round(settings, instruction, config)
    _restore(job, global_state, store)
    tally = _train_local_steps(job)
    buffer = io.BytesIO()
    torch.save(job.trainer.state_dict(), buffer)
    store.save(instruction.run_key, instruction.round, buffer.getvalue())
    shared = _shared_update(job, global_state)
    seconds = time.perf_counter() - start
    return shared, _round_metrics(job, tally, seconds)


@dataclass
class _SiteRound:
    """What the phases of one round share: who asks, what it trains on, the trainer."""

    settings: SiteSettings
    instruction: RoundInstruction
    config: RunConfig
    dataset: TrainingSlices
    trainer: CycleGANTrainer
    population: TrainingSlices | PatientSlices | None = None
    plan: NoisePlan | None = None  # None without DP-SGD at the site


@dataclass
class _Tally:
    """The local steps' totals: step-weighted loss sums, steps and samples."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0


def _require_site_dp(settings: SiteSettings, config: RunConfig) -> None:
    """A hospital with its own epsilon cap trains only under DP-SGD at the site."""
    if settings.max_epsilon is not None and not config.privacy.dp_sgd:
        raise BudgetSpentError(
            f"this hospital trains only under DP-SGD at the site (its cap is epsilon "
            f"{settings.max_epsilon:g}); the coordinator's configuration has "
            + ("privacy off" if not config.privacy.enabled else "privacy.level = 'site'")
        )


def _start_round(
    settings: SiteSettings, instruction: RoundInstruction, config: RunConfig
) -> _SiteRound:
    """Load and split the site, build its training set and a fresh trainer."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    site = split_site(settings, config)  # train on the training part only
    dataset = training_set(
        [site],
        misalignment=settings.misalignment or config.data.misalignment,
        augment_gamma=config.data.augment_gamma,
        seed=config.training.seed,
    )
    trainer = _trainer(settings, config)
    logger.info(
        "round %d: training %s on %d weakly paired and %d unpaired examples, %s, lr %.2g, on %s",
        instruction.round,
        config.data.direction,
        dataset.paired_count,
        dataset.unpaired_count,
        f"{instruction.local_steps} steps"
        if instruction.local_steps
        else f"{instruction.local_epochs} local epoch(s)",
        instruction.lr,
        trainer.device,
    )
    return _SiteRound(settings, instruction, config, dataset, trainer)


def _restore(job: _SiteRound, global_state: Mapping[str, torch.Tensor], store: StateStore) -> None:
    """Restore the site's own state and its privacy, then load the round's global generators."""
    config, instruction, trainer = job.config, job.instruction, job.trainer
    blob = store.load(instruction.run_key, instruction.round)
    state = (
        None
        if blob is None
        else torch.load(io.BytesIO(blob), map_location=trainer.device, weights_only=True)
    )
    job.population = private_population(job.dataset, config.privacy)
    if config.privacy.dp_sgd:
        if len(job.population) == 0:
            raise SiteError(
                "patient-level differential privacy trains on patients with both modalities "
                "and this site has none in its training part"
            )
        job.plan = make_trainer_private(
            trainer,
            config,
            job.population,
            state,
            steps_per_round=instruction.local_steps or None,
            epochs_per_round=instruction.local_epochs,
            rounds=config.federation.rounds,
            check=functools.partial(_check_plan, config, len(job.population)),
        )
    if state is not None:
        trainer.load_state_dict(state)
    if job.plan is not None:
        assert trainer.accountant is not None
        caps = [
            c for c in (config.privacy.budget_epsilon, job.settings.max_epsilon) if c is not None
        ]
        check_budget(trainer.accountant, job.plan, min(caps) if caps else None)
    _load_global(trainer, global_state, instruction.share)
    trainer.set_lr(instruction.lr)
    trainer.set_proximal(instruction.proximal_mu)


def _check_plan(config: RunConfig, population: int, plan: NoisePlan) -> None:
    """A saved plan must sample the unit the run asks for; a changed population is only noted."""
    unit = population_unit(config.privacy)
    if plan.unit != unit:
        raise SiteError(
            f"this site's saved privacy state samples {plan.unit}s and the run now asks "
            f"for privacy.level = {config.privacy.level!r}: the unit cannot change in a run"
        )
    if plan.examples != population:
        logger.warning(
            "the site now has %d training %ss, its noise plan was made for %d: the "
            "sample rate stays %.5f (the guarantee holds; batches are larger or smaller)",
            population,
            unit,
            plan.examples,
            plan.sample_rate,
        )


def _train_local_steps(job: _SiteRound) -> _Tally:
    """Train ``local_steps`` steps, or else ``local_epochs`` epochs, and total the losses."""
    instruction, trainer = job.instruction, job.trainer
    tally = _Tally()
    epoch = 0
    budget = instruction.local_steps or None
    while True:
        if budget is None and epoch >= instruction.local_epochs:
            break
        if budget is not None and tally.steps >= budget:
            break
        trainer.epoch = (instruction.round - 1) * max(instruction.local_epochs, 1) + epoch
        summary = trainer.train_epoch(
            _epoch_loader(job, epoch),
            max_steps=None if budget is None else budget - tally.steps,
            report=functools.partial(
                _report_progress, instruction.round, epoch, budget, tally.steps
            ),
            report_every_s=PROGRESS_EVERY_S,
        )
        done = int(summary["steps"])
        for key, value in summary.items():
            if key.startswith("loss_"):
                tally.sums[key] = tally.sums.get(key, 0.0) + value * done
        tally.steps += done
        tally.samples += int(summary["samples"])
        epoch += 1
        if done == 0:
            raise SiteError("the site's data yields no training batch")
    trainer.epoch = instruction.round * max(instruction.local_epochs, 1)
    return tally


def _epoch_loader(job: _SiteRound, epoch: int) -> Iterable[Any]:
    """The round's loader for one local epoch: shuffled batches, or Poisson ones under DP-SGD."""
    config, instruction = job.config, job.instruction
    if job.plan is None:
        return _loader(job.dataset, config, instruction.round, epoch)
    assert job.population is not None
    return private_loader(
        job.population,
        job.plan,
        seed=_loader_seed(config, instruction.round, epoch),
        epoch=job.trainer.epoch,
        num_workers=config.training.num_workers,
    )


def _shared_update(
    job: _SiteRound, global_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Trained minus received for the shared networks (clipped under site-level DP)."""
    trained = flatten(job.trainer.nets, SHARED_NETS[job.instruction.share])
    shared = update_from(trained, global_state)
    if job.config.privacy.site_level:
        shared = clip_update(shared, job.config.privacy.site_clip_norm)
    if job.settings.fault is not None:
        shared = _corrupt(shared, job.settings.fault)
    return shared


def _round_metrics(job: _SiteRound, tally: _Tally, seconds: float) -> dict[str, float]:
    """The reply's scalars (no training loss under DP); the site's own log gets the losses."""
    config, instruction = job.config, job.instruction
    steps, samples = tally.steps, tally.samples
    # Under DP the training losses stay home: they are computed from the examples without noise,
    # so the guarantee would not cover them. Counts, timings and epsilon remain.
    metrics = (
        {} if config.privacy.enabled else {key: value / steps for key, value in tally.sums.items()}
    )
    metrics.update(
        {
            "num-examples": float(samples),
            "steps": float(steps),
            "seconds": seconds,
            "samples-per-s": samples / seconds if seconds > 0 else 0.0,
            "lr": instruction.lr,
        }
    )
    if job.plan is not None:
        metrics["epsilon"] = job.trainer.epsilon()
        metrics["delta"] = config.privacy.delta
        _log_privacy(job, metrics["epsilon"])
    if job.settings.partition_id is not None:
        metrics["partition-id"] = float(job.settings.partition_id)
    logger.info(
        "round %d: %d steps, %d samples in %.1f s (G %.4f, cycle %.4f)",
        instruction.round,
        steps,
        samples,
        seconds,
        tally.sums.get("loss_g", math.nan) / max(steps, 1),  # the site's own log keeps the losses
        tally.sums.get("loss_cycle", math.nan) / max(steps, 1),
    )
    return metrics


def _log_privacy(job: _SiteRound, epsilon: float) -> None:
    """The round's epsilon line: a patient's, or a slice's with the whole patient's bound."""
    plan, accountant, delta = job.plan, job.trainer.accountant, job.config.privacy.delta
    assert plan is not None and accountant is not None
    if plan.unit == "patient":
        logger.info(
            "round %d: patient-level epsilon %.3f at delta %g after %d DP steps over %d "
            "patients (sigma %.3f per network x %d networks, q %.5f)",
            job.instruction.round,
            epsilon,
            delta,
            accountant.steps,
            plan.examples,
            plan.noise_multiplier,
            plan.networks,
            plan.sample_rate,
        )
    else:
        group = job.dataset.max_examples_per_subject()
        logger.info(
            "round %d: slice-level epsilon %.3f at delta %g after %d DP steps (sigma %.3f, "
            "q %.5f); a whole patient (up to %d examples): epsilon %.1f (group privacy, "
            "stays at this site)",
            job.instruction.round,
            epsilon,
            delta,
            accountant.steps,
            plan.noise_multiplier,
            plan.sample_rate,
            group,
            patient_epsilon(plan, accountant.steps, group, delta),
        )


def _report_progress(
    round_number: int,
    epoch: int,
    budget: int | None,
    done_before: int,
    steps: int,
    total: int | None,
    rate: float,
    losses: Mapping[str, float],
) -> None:
    """One line of a round's progress for the hospital's log (there is no terminal to draw on)."""
    if budget is not None:
        where = f"step {done_before + steps}/{budget}"
    else:
        where = f"epoch {epoch + 1}, step {steps}" + (f"/{total}" if total else "")
    logger.info(
        "round %d: %s, %.1f samples/s, G %.3f",
        round_number,
        where,
        rate,
        losses.get("loss_g", math.nan),
    )


def evaluate_round(
    settings: SiteSettings,
    instruction: RoundInstruction,
    global_state: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """Paired evaluation of the global generators on this site's validation part only.

    ``num-examples`` is the number of validation slice positions scored (the coordinator's
    weight); the metrics are means over the validation sessions, as :func:`evaluate_pairs` gives.
    """
    start = time.perf_counter()
    config = instruction.config()
    site = split_site(settings, config)
    if not site.paired and not site.validation:
        logger.info("no paired subjects at this site: nothing to evaluate")
        raise SiteError("no subject with both modalities: nothing to evaluate")
    pairs = validation_pairs(site)
    if not pairs:
        logger.info(
            "no validation data held out (data.validation_fraction = %g): nothing to evaluate",
            config.data.validation_fraction,
        )
        raise SiteError("no validation data held out at this site: nothing to evaluate")
    name = site.name
    trainer = _trainer(settings, config)
    _load_global(trainer, global_state, instruction.share)
    translate = slices_translator(trainer, config)
    report = evaluate_pairs(name, config.data.direction, pairs, translate)
    metrics = {k: float(v) for k, v in report.mean.items() if k in EVALUATE_METRICS}
    metrics["num-subjects"] = float(len(report.subjects))
    metrics["num-examples"] = float(sum(s.slices for s in report.subjects))
    metrics["seconds"] = time.perf_counter() - start
    if settings.partition_id is not None:
        metrics["partition-id"] = float(settings.partition_id)
    return metrics
