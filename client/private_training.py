"""How a hospital makes its trainer private: one rule for a federated round and a local run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fedsynth.common.config import RunConfig
from fedsynth.common.privacy.plan import NoisePlan, plan_noise
from fedsynth.common.privacy.sampling import population_unit
from fedsynth.common.training.trainer import CycleGANTrainer

if TYPE_CHECKING:
    from fedsynth.common.data.datasets import PatientSlices, TrainingSlices


def make_trainer_private(
    trainer: CycleGANTrainer,
    config: RunConfig,
    population: TrainingSlices | PatientSlices,
    state: Mapping[str, Any] | None,
    *,
    steps_per_round: int | None,
    epochs_per_round: int,
    rounds: int,
    check: Callable[[NoisePlan], None] | None = None,
) -> NoisePlan:
    """Plan the noise (or keep the plan ``state`` was trained under) and make ``trainer`` private.

    The noise is fixed before the first round (or epoch) and kept: recalibrating later would
    change the plan the budget was set for. ``population`` is what Poisson sampling runs over
    (:func:`fedsynth.common.privacy.sampling.private_population`); ``check`` may refuse the plan
    before the trainer becomes private.
    """
    plan = CycleGANTrainer.saved_plan(state) or plan_noise(
        config.privacy,
        examples=len(population),
        batch_size=config.privacy.batch_size or config.training.batch_size,
        networks=len(trainer.trained_names),
        steps_per_round=steps_per_round,
        epochs_per_round=epochs_per_round,
        rounds=rounds,
        unit=population_unit(config.privacy),
    )
    if check is not None:
        check(plan)
    trainer.make_private(plan)
    return plan
