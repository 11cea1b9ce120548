"""Differential privacy at a site: DP-SGD on every network that reads a real image, one accountant.

CycleGAN's generators read real images (cycle, identity and registration losses), so the usual
"the generator is private by post-processing" argument does not hold: G_AB, G_BA, D_A, D_B and R
are all trained with per-sample clipping and Gaussian noise (Abadi et al. 2016) through Opacus.

**What one step releases.** A training step draws a Poisson batch (each example independently
with probability ``q``), then makes ``m`` noisy gradient releases on that same batch: one per
private network, each clipped per example to ``C`` and noised with ``N(0, (sigma C)^2)``. The
releases share one sample, so they are *not* ``m`` independently subsampled mechanisms (counting
them that way would under-state the cost: amplification by subsampling happens once per batch).
Jointly they are one Gaussian mechanism with L2 sensitivity ``sqrt(m) C`` and per-coordinate
noise ``sigma C`` (adaptive composition of Gaussians, Dong et al. 2022), i.e. a Poisson-subsampled
Gaussian with noise multiplier ``sigma / sqrt(m)``. The accountant records exactly that: one
step per training step with the *effective* multiplier. The D step after the G step sees fakes
made from the same examples, so it adds no new example to the batch.

**Unit of privacy.** With ``privacy.level = "patient"`` (the default), a patient: every session of
one subject. A step draws each of the site's patients independently with probability ``q``
(:class:`PatientPoissonLoader`), and a drawn patient gives exactly one of its own weakly paired
slices (:class:`~fedsynth.common.data.datasets.PatientSlices`), so one row of the batch is one
patient and per-sample clipping bounds a patient's whole part of the step by ``C`` per network,
whatever the patient's sessions and slices. Adding or removing a patient is then the add/remove-one
adjacency the Poisson-subsampled Gaussian analysis assumes, and the accountant's epsilon is the
patient's. With ``privacy.level = "example"`` the unit is one training example (the A slice and B
slice at one index of :class:`~fedsynth.common.data.datasets.TrainingSlices`); a patient then fills
many examples and :func:`patient_epsilon` gives only a group-privacy bound over them
(:meth:`~fedsynth.common.data.datasets.TrainingSlices.max_examples_per_subject`), which is vacuous
at any useful noise.

The accountant (``rdp`` or ``prv``, Opacus) and the noise plan persist in the site's state
between rounds, so epsilon is cumulative over the whole federation.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, default_collate

from fedsynth.common.accounting import RDP_ORDERS, epsilon_of
from fedsynth.common.config import PrivacyConfig
from fedsynth.common.models.intensity import IntensityMap, intensity_map_grad_sample

if TYPE_CHECKING:
    from opacus.optimizers import DPOptimizer

    from fedsynth.common.data.datasets import PatientSlices, TrainingSlices

# Opacus is imported where DP needs it, not with this module: it costs about 1.5 s of CPU per
# import, and a site without DP (or the coordinator reading a budget) should not pay for it in
# every ClientApp process.

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
    if privacy.noise_multiplier is not None:
        sigma = float(privacy.noise_multiplier)
    else:
        assert privacy.target_epsilon is not None
        from opacus.accountants.utils import get_noise_multiplier

        effective = get_noise_multiplier(
            target_epsilon=privacy.target_epsilon,
            target_delta=privacy.delta,
            sample_rate=sample_rate,
            steps=planned,
            accountant=privacy.accountant,
            epsilon_tolerance=0.005,
        )
        sigma = effective * math.sqrt(networks)
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


class SiteAccountant:
    """The one privacy accountant of a site: every DP-SGD step of every round, composed.

    Args:
        mechanism: ``"rdp"`` (Mironov 2017; Mironov et al. 2019) or ``"prv"`` (Gopi et al. 2021).
        delta: the delta epsilon is reported at.
    """

    def __init__(self, mechanism: str, delta: float):
        self.mechanism = mechanism
        self.delta = delta
        from opacus.accountants import create_accountant

        self.accountant = create_accountant(mechanism=mechanism)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``(effective noise multiplier, sample rate, steps)`` runs, oldest first."""
        return list(self.accountant.history)

    @property
    def steps(self) -> int:
        return sum(int(s) for _, _, s in self.accountant.history)

    def step(self, plan: NoisePlan) -> None:
        """Record one training step (all ``plan.networks`` releases on one Poisson batch)."""
        self.accountant.step(noise_multiplier=plan.effective_noise, sample_rate=plan.sample_rate)

    def epsilon(self, extra_steps: int = 0, plan: NoisePlan | None = None) -> float:
        """Cumulative epsilon at ``delta``; with ``extra_steps`` of ``plan``, the projection."""
        history = self.history
        if extra_steps:
            assert plan is not None
            history.append((plan.effective_noise, plan.sample_rate, extra_steps))
        return epsilon_of(history, self.delta, self.mechanism)

    def state_dict(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "delta": self.delta,
            "history": [[float(n), float(q), int(s)] for n, q, s in self.accountant.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["mechanism"] != self.mechanism:
            raise ValueError(
                f"the site's saved accountant is {state['mechanism']!r}, the run asks for "
                f"{self.mechanism!r}: privacy.accountant cannot change during a run"
            )
        self.accountant.history = [(float(n), float(q), int(s)) for n, q, s in state["history"]]


def patient_epsilon(
    plan: NoisePlan, steps: int, group: int, delta: float, orders: Iterable[float] = RDP_ORDERS
) -> float:
    """Epsilon for a whole patient (``group`` examples), by an RDP group bound.

    At each step the number ``J`` of the patient's examples in the batch is Binomial(k, q) and
    the noisy sum moves by at most ``J * C`` (per network). Writing the output distribution as a
    mixture over ``J >= 1`` of ``(1 - q') N(0) + q' N(mu_J)`` with ``q' = 1 - (1 - q)^k`` and
    using the joint quasi-convexity of Renyi divergence, every order is bounded by the subsampled
    Gaussian with rate ``q'`` and sensitivity ``k C``, i.e. noise multiplier ``sigma_eff / k``.
    Loose for large ``k``: that is the honest price of slice-level DP for a patient.
    """
    if steps == 0:
        return 0.0
    from opacus.accountants.analysis import rdp as rdp_analysis

    q_group = 1.0 - (1.0 - plan.sample_rate) ** group
    orders = list(orders)
    rdp = rdp_analysis.compute_rdp(
        q=q_group, noise_multiplier=plan.effective_noise / group, steps=steps, orders=orders
    )
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ``Conv2d`` as one grouped convolution (Rochette et al. 2019).

    The weight gradient of example ``n`` is the correlation of its input with its output
    gradient; with the batch moved to the channel axis and ``groups = N`` one convolution gives
    all of them. Opacus' default unfolds the input instead, which costs ``k^2`` times the input's
    memory: 20x slower for the 7x7 output layer of a ResNet generator. Grouped layers fall back to
    Opacus' sampler. Checked against a batch-of-one loop in the tests.
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if layer.groups != 1 or n == 0 or isinstance(layer.padding, str):
        from opacus.grad_sample.conv import compute_conv_grad_sample

        return compute_conv_grad_sample(layer, activations, backprops)
    # (C_in, N, H, W) correlated with (N * C_out, 1, H', W'): C_in plays the batch.
    return _grouped_grad_sample(layer, x.transpose(0, 1), backprops, backprops)


def conv_transpose2d_grad_sample(
    layer: nn.ConvTranspose2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a ``ConvTranspose2d``, the same grouped-convolution way.

    Opacus has no sampler for it and falls back to functorch (5x slower here).
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    if layer.groups != 1 or n == 0:
        from opacus.grad_sample.functorch import ft_compute_per_sample_gradient

        return ft_compute_per_sample_gradient(layer, activations, backprops)
    # (C_out, N, H', W') correlated with (N * C_in, 1, H, W): C_out plays the batch.
    return _grouped_grad_sample(layer, backprops.transpose(0, 1), x, backprops)


def _grouped_grad_sample(
    layer: nn.Conv2d | nn.ConvTranspose2d,
    inputs: torch.Tensor,
    kernels: torch.Tensor,
    backprops: torch.Tensor,
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample weight (and bias) gradients as one convolution with ``groups = N``.

    ``inputs`` is (C, N, H, W) with the batch on the channel axis; ``kernels`` is (N, K, h, w),
    one kernel per example and channel. The layer's stride becomes the dilation and vice versa.
    Conv2d's weight is (C_out, C_in, kh, kw) and ConvTranspose2d's (C_in, C_out, kh, kw): in both
    cases ``(K, C)`` is the weight's leading pair.
    """
    n = kernels.shape[0]
    out: dict[Any, torch.Tensor] = {}
    if layer.weight.requires_grad:
        kh, kw = layer.kernel_size
        grads = F.conv2d(
            inputs,
            kernels.reshape(n * kernels.shape[1], 1, *kernels.shape[2:]),
            stride=layer.dilation,
            padding=layer.padding,
            dilation=layer.stride,
            groups=n,
        )[:, :, :kh, :kw]
        out[layer.weight] = grads.reshape(inputs.shape[0], n, kernels.shape[1], kh, kw).permute(
            1, 2, 0, 3, 4
        )
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


def install_grad_samplers() -> None:
    """Use the grouped-convolution samplers for every ``Conv2d`` / ``ConvTranspose2d``, and
    register the intensity prior's exact sampler (:mod:`fedsynth.common.models.intensity`)."""
    from opacus.grad_sample import GradSampleModule as _GradSampleModule

    _GradSampleModule.GRAD_SAMPLERS[nn.Conv2d] = conv2d_grad_sample
    _GradSampleModule.GRAD_SAMPLERS[nn.ConvTranspose2d] = conv_transpose2d_grad_sample
    _GradSampleModule.GRAD_SAMPLERS[IntensityMap] = intensity_map_grad_sample


def make_private(
    nets: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    privacy: PrivacyConfig,
    plan: NoisePlan,
    batch_size: int,
) -> tuple[dict[str, nn.Module], dict[str, DPOptimizer]]:
    """Wrap every network in a ``GradSampleModule`` and its optimiser in a ``DPOptimizer``.

    The optimisers get no accountant hook: :class:`SiteAccountant` records one joint step per
    training step instead (see the module docstring). Noise comes from torch's global generator,
    so it is part of the trainer's saved RNG state (resume stays bit-exact).
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    install_grad_samplers()
    # Opacus' full backward hooks fire on the first layer, whose input needs no gradient: benign.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")
    wrapped_nets: dict[str, nn.Module] = {}
    wrapped_opts: dict[str, DPOptimizer] = {}
    for name, net in nets.items():
        module = (
            net
            if isinstance(net, GradSampleModule)
            else GradSampleModule(
                net,
                batch_first=True,
                loss_reduction="mean",
                strict=True,
                force_functorch=privacy.grad_sample_mode == "functorch",
            )
        )
        wrapped_nets[name] = module
        optimizer = optimizers[name]
        inner = optimizer.original_optimizer if isinstance(optimizer, DPOptimizer) else optimizer
        wrapped_opts[name] = DPOptimizer(
            inner,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=privacy.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
        )
    return wrapped_nets, wrapped_opts


def mark_empty_batch(optimizer: DPOptimizer) -> None:
    """Give every parameter an empty per-sample gradient: an empty Poisson batch still noises.

    Skipping the step would reveal that no example was drawn; the mechanism instead releases
    pure noise, as the analysis assumes.
    """
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


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


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """Site-level DP: scale a round's update (trained - received) to L2 norm <= ``clip_norm``."""
    norm = math.sqrt(
        sum(float((v.double() ** 2).sum()) for v in update.values() if v.is_floating_point())
    )
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    logger.info(
        "site-level DP: update norm %.4g, clipped to %g (scale %.4g)", norm, clip_norm, scale
    )
    return {k: (v * scale if v.is_floating_point() else v) for k, v in update.items()}
