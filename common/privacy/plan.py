"""A site's DP-SGD plan: its Poisson rate and noise, fixed before its first round, and its budget.

The plan is made once per site (:func:`plan_noise`) and kept in the site's state with its
accountant, so every round of a run uses the same ``q`` and ``sigma`` and epsilon composes
over the whole federation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fedsynth.common.config import PrivacyConfig
from fedsynth.common.privacy.accounting import calibrate_noise

if TYPE_CHECKING:
    from fedsynth.common.privacy.accounting import SiteAccountant

logger = logging.getLogger(__name__)


class BudgetSpentError(Exception):
    """Training this round would take the site past ``privacy.budget_epsilon``."""


@dataclass(frozen=True)
class NoisePlan:
    """Sampling rate and noise of a site's DP-SGD, fixed before its first round.

    Args:
        sample_rate: Poisson sampling probability ``q`` (batch size / examples).
        noise_multiplier: ``sigma`` of each private network's optimiser (noise std / clip bound).
        networks: ``m``, the number of private networks that release a gradient each step.
        steps_per_round: training steps in one round (or one epoch of local training).
        planned_steps: steps over the whole planned run (what ``target_epsilon`` was set for).
        examples: the population the sample rate was computed from (patients or examples).
        unit: what one of ``examples`` is: ``"patient"`` or ``"example"``.
    """

    sample_rate: float
    noise_multiplier: float
    networks: int
    steps_per_round: int
    planned_steps: int
    examples: int
    unit: str = "example"

    @property
    def effective_noise(self) -> float:
        """The noise multiplier of the joint mechanism of one step: ``sigma / sqrt(m)``."""
        return self.noise_multiplier / math.sqrt(self.networks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> NoisePlan:
        return cls(
            sample_rate=float(values["sample_rate"]),
            noise_multiplier=float(values["noise_multiplier"]),
            networks=int(values["networks"]),
            steps_per_round=int(values["steps_per_round"]),
            planned_steps=int(values["planned_steps"]),
            examples=int(values["examples"]),
            unit=str(values.get("unit", "example")),
        )


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson batches in one pass: ``1 / q`` (Opacus' ``UniformWithReplacementSampler``)."""
    return max(1, int(1 / sample_rate))


def plan_noise(
    privacy: PrivacyConfig,
    *,
    examples: int,
    batch_size: int,
    networks: int,
    steps_per_round: int | None,
    epochs_per_round: int,
    rounds: int,
    unit: str = "example",
) -> NoisePlan:
    """Fix ``q`` and ``sigma`` for a site; with ``target_epsilon``, calibrate ``sigma`` now.

    ``examples`` is the population Poisson sampling runs over: the site's patients when
    ``unit = "patient"``, its training examples otherwise; ``batch_size`` is the expected batch
    in the same unit. ``steps_per_round`` (``federation.local_steps``) overrides
    ``epochs_per_round`` epochs of ``1 / q`` steps each. The calibration targets the effective
    (joint) multiplier over ``rounds`` rounds and converts it back to the per-network ``sigma``.
    """
    if examples < 1:
        raise ValueError(
            "differential privacy needs at least one patient with both modalities"
            if unit == "patient"
            else "differential privacy needs at least one training example"
        )
    sample_rate = min(1.0, batch_size / examples)
    per_round = steps_per_round or epochs_per_round * steps_per_epoch(sample_rate)
    planned = per_round * rounds
    sigma = calibrate_noise(privacy, sample_rate=sample_rate, steps=planned)
    if privacy.noise_multiplier is None:  # calibrated for the joint mechanism: back to one network
        sigma *= math.sqrt(networks)
    plan = NoisePlan(
        sample_rate=sample_rate,
        noise_multiplier=sigma,
        networks=networks,
        steps_per_round=per_round,
        planned_steps=planned,
        examples=examples,
        unit=unit,
    )
    logger.info(
        "DP-SGD plan: q = %.5f (%d %ss, expected batch %d), %d steps per round, %d planned; "
        "sigma = %.4f per network x %d networks (effective %.4f)%s",
        sample_rate,
        examples,
        unit,
        batch_size,
        per_round,
        planned,
        sigma,
        networks,
        plan.effective_noise,
        f", calibrated for epsilon {privacy.target_epsilon:g} at delta {privacy.delta:g}"
        if privacy.target_epsilon is not None
        else "",
    )
    return plan


def check_budget(accountant: SiteAccountant, plan: NoisePlan, budget: float | None) -> float:
    """The epsilon after one more round; raise :class:`BudgetSpentError` if it passes ``budget``."""
    projected = accountant.epsilon(plan.steps_per_round, plan)
    if budget is not None and projected > budget:
        raise BudgetSpentError(
            f"privacy budget spent: epsilon is {accountant.epsilon():.3f} and one more round "
            f"({plan.steps_per_round} steps) would make it {projected:.3f}, above the cap of "
            f"{budget:g} (privacy.budget_epsilon or the hospital's --max-epsilon; delta "
            f"{accountant.delta:g})"
        )
    return projected
