"""Poisson batches for DP-SGD: over a site's patients (patient level) or its examples."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from fedsynth.common.config import PrivacyConfig
from fedsynth.common.privacy.plan import NoisePlan, steps_per_epoch

if TYPE_CHECKING:
    from fedsynth.common.data.datasets import PatientSlices, TrainingSlices

logger = logging.getLogger(__name__)


def poisson_loader(
    dataset: Dataset[Any], plan: NoisePlan, *, seed: int, num_workers: int = 0
) -> DataLoader[Any]:
    """Opacus' Poisson-sampling loader: ``1 / q`` batches, each example in with probability ``q``.

    Batches vary in size and may be empty (the trainer then takes a pure-noise step).
    """
    from opacus.data_loader import DPDataLoader

    return DPDataLoader(
        dataset,
        sample_rate=plan.sample_rate,
        generator=torch.Generator().manual_seed(seed),
        num_workers=num_workers,
    )


class PatientPoissonLoader:
    """Poisson sampling over patients: each step draws every patient with probability ``q``.

    A drawn patient gives one example, :meth:`~fedsynth.common.data.datasets.PatientSlices.example`
    for draw ``(epoch, step)``; a patient is never in a batch twice. ``1 / q`` steps make an epoch,
    as in Opacus' ``UniformWithReplacementSampler`` (the same draws, ``rand < q`` per patient). An
    empty batch comes out as ``{}``: the trainer then takes a pure-noise step.

    Args:
        patients: the site's patients.
        plan: the noise plan (its ``sample_rate`` is over patients).
        seed: the seed of this epoch's draws.
        epoch: the epoch, part of each patient's draw of which slice it gives.
    """

    def __init__(self, patients: PatientSlices, plan: NoisePlan, *, seed: int, epoch: int = 0):
        if plan.unit != "patient":
            raise ValueError(f"the noise plan samples {plan.unit}s, not patients")
        self.dataset = patients  # the trainer calls its set_epoch, as for a DataLoader
        self.sample_rate = plan.sample_rate
        self.seed = seed
        self.epoch = epoch
        self.steps = steps_per_epoch(plan.sample_rate)

    def __len__(self) -> int:
        return self.steps

    def batches(self) -> Iterator[list[int]]:
        """The patients (indices) of each step's batch."""
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            drawn = torch.rand(len(self.dataset), generator=generator) < self.sample_rate
            yield drawn.nonzero().flatten().tolist()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for step, chosen in enumerate(self.batches()):
            if not chosen:
                yield {}
                continue
            items = [self.dataset.example(i, (self.epoch, step)) for i in chosen]
            yield default_collate(items)


def private_population(
    dataset: TrainingSlices, privacy: PrivacyConfig
) -> TrainingSlices | PatientSlices:
    """What DP-SGD samples from: the site's patients (level ``"patient"``) or its examples.

    Without patient-level DP the examples as they are (nothing is grouped, nothing logged)."""
    if not privacy.patient_level:
        return dataset
    from fedsynth.common.data.datasets import PatientSlices

    patients = PatientSlices(dataset)
    if patients.left_out:
        logger.info(
            "patient-level DP: %d patient(s) with one modality only are left out of training "
            "(an unpaired example would mix two patients): %s",
            len(patients.left_out),
            ", ".join(patients.left_out[:10]) + (" ..." if len(patients.left_out) > 10 else ""),
        )
    return patients


def population_unit(privacy: PrivacyConfig) -> str:
    return "patient" if privacy.level == "patient" else "example"


def private_loader(
    population: TrainingSlices | PatientSlices,
    plan: NoisePlan,
    *,
    seed: int,
    epoch: int,
    num_workers: int = 0,
) -> Iterable[Any]:
    """One epoch of Poisson batches over ``population`` (patients or examples)."""
    from fedsynth.common.data.datasets import PatientSlices

    if isinstance(population, PatientSlices):
        return PatientPoissonLoader(population, plan, seed=seed, epoch=epoch)
    return poisson_loader(population, plan, seed=seed, num_workers=num_workers)
