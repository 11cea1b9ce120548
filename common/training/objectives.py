"""The generators' objective per kind of training example: weakly paired or unpaired.

A site's batch may mix two kinds of example (DESIGN.md, "Data flow" 3-4), and each kind gets the
objective built for it:

* **unpaired** (independent slices, often of different subjects): CycleGAN (Zhu et al., ICCV
  2017): both generators' adversarial losses + cycle consistency (+ identity when
  ``lambda_identity > 0``);
* **weakly paired** (two contrasts of one session at one anatomical position, a little
  misaligned): both adversarial losses (weight 1) + a supervised L1, no cycle and no identity
  (pix2pix, Isola et al., CVPR 2017, and RegGAN's "NC" modes, Kong et al., NeurIPS 2021: with
  a real target the cycle only repeats what the L1 says, at two more generator passes).
  Registration off: pix2pix's L1 ``G_AB(a)`` vs ``b`` and ``G_BA(b)`` vs ``a`` (x
  ``lambda_paired``). Registration on, RegGAN NC+R for A->B: R warps ``G_AB(a)`` onto ``b``,
  L1 after the warp (x ``lambda_registration``) + smoothness of R's field (x ``lambda_smooth``);
  for B->A (RegGAN trains one direction only) R's field, held fixed, brings ``a`` and its mask
  onto ``b``'s grid, and ``G_BA(b)`` is compared with that (x ``lambda_registration``): the
  supervision of the pair without its misalignment, and no second registration network.
  Measured on a misaligned phantom (32 px, independent shifts of up to 3 px, 600 steps, two
  seeds), held-out B->A L1: 0.144 / 0.146 this way, 0.184 / 0.177 with the plain L1 at the same
  weight, 0.150 / 0.155 with the plain L1 x 100.

Defaults: ``lambda_paired = 100`` as in pix2pix (on the phantom 10 and 100 learn alike);
``background_weight = 0.1``, so that with 67-81 % of a slice outside the head the background
carries 17-30 % of its loss: enough to keep it dark, too little to outweigh the anatomy.

R and the correction loss never see an unpaired example, not even in a forward pass: between
unrelated slices they reward a blurred mean image. Every L1 comparison (cycle, identity, paired,
correction) weighs a pixel by ``mask + background_weight * (1 - mask)`` of the image it compares
against and is normalised per example (:func:`fedsynth.common.losses.weighted_l1_loss`); adversarial
losses are unweighted. Each objective is computed on its own sub-batch only, and a mixed batch's
loss is ``(n_p * L_paired + n_u * L_unpaired) / N``: still the mean of the examples' own losses,
which Opacus' ``loss_reduction="mean"`` relies on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedsynth.common.config import TrainingConfig
from fedsynth.common.losses import (
    cycle_loss,
    generator_adversarial_loss,
    identity_loss,
    paired_l1_loss,
    pixel_weights,
    registration_correction_loss,
    smoothness_loss,
)
from fedsynth.common.models import flow_to_pixels, warp

__all__ = [
    "Batch",
    "Examples",
    "Objective",
    "batch_size",
    "generator_objective",
    "merge_metrics",
    "one_way_objective",
    "paired_objective",
    "unpaired_objective",
]

Nets = Mapping[str, nn.Module]
Batch = Mapping[str, torch.Tensor]  # a loader's batch (see Examples.from_batch)


def batch_size(batch: Batch | object) -> int:
    """The examples in a loader's batch (0 for an empty Poisson batch, which may hold nothing)."""
    return int(batch["a"].shape[0]) if isinstance(batch, Mapping) and "a" in batch else 0


@dataclass(frozen=True)
class Examples:
    """A batch (or sub-batch) of training examples on the training device.

    Args:
        a: ``(N, 1, H, W)`` domain-A images in [-1, 1].
        b: ``(N, 1, H, W)`` domain-B images.
        a_mask: ``(N, 1, H, W)`` 0/1 head mask of ``a``, or ``None`` (all ones).
        b_mask: the same for ``b``.
        paired: ``(N,)`` bool on the CPU, True for a weakly paired example; ``None``: all unpaired.
    """

    a: torch.Tensor
    b: torch.Tensor
    a_mask: torch.Tensor | None = None
    b_mask: torch.Tensor | None = None
    paired: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, batch: Batch, device: torch.device) -> Examples:
        """A loader's batch: ``"a"``, ``"b"``, optional ``"a_mask"``, ``"b_mask"``, ``"paired"``."""

        def moved(key: str) -> torch.Tensor | None:
            value = batch.get(key)
            return None if value is None else value.to(device, non_blocking=True)

        paired = batch.get("paired")
        return cls(
            a=batch["a"].to(device, non_blocking=True),
            b=batch["b"].to(device, non_blocking=True),
            a_mask=moved("a_mask"),
            b_mask=moved("b_mask"),
            paired=None if paired is None else paired.detach().cpu().reshape(-1) > 0.5,
        )

    def __len__(self) -> int:
        return int(self.a.shape[0])

    @property
    def paired_count(self) -> int:
        return 0 if self.paired is None else int(self.paired.sum())

    def select(self, index: torch.Tensor | slice) -> Examples:
        """The examples at ``index`` (a CPU index tensor or a slice), in that order."""
        if isinstance(index, slice):
            at: torch.Tensor | slice = index
        else:
            at = index.to(self.a.device)

        def pick(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value[at]

        return Examples(
            a=self.a[at],
            b=self.b[at],
            a_mask=pick(self.a_mask),
            b_mask=pick(self.b_mask),
            paired=None if self.paired is None else self.paired[index],
        )

    def by_kind(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The positions of the paired and of the unpaired examples (CPU ``long`` tensors)."""
        if self.paired is None:
            return torch.zeros(0, dtype=torch.long), torch.arange(len(self))
        return self.paired.nonzero().flatten(), (~self.paired).nonzero().flatten()

    def kinds(self) -> tuple[Examples | None, Examples | None]:
        """``(paired, unpaired)`` sub-batches; ``None`` for a kind with no example.

        A batch of one kind is returned as it is (no copy).
        """
        paired = self.paired_count
        if paired == 0:
            return None, self
        if paired == len(self):
            return self, None
        paired_index, unpaired_index = self.by_kind()
        return self.select(paired_index), self.select(unpaired_index)

    def chunks(self, size: int) -> list[Examples]:
        """Consecutive sub-batches of at most ``size`` examples, each of a single kind.

        Under DP-SGD every chunk is one backward pass (an Opacus hook sees one batch size per
        module and pass); the chunks of one step are summed before its one noisy release.
        """
        out = []
        for part in self.kinds():
            if part is None:
                continue
            if len(part) <= size:
                out.append(part)
                continue
            out.extend(part.select(slice(s, s + size)) for s in range(0, len(part), size))
        return out


@dataclass(frozen=True)
class Objective:
    """The generators' loss on some examples, what it was made of, and what it ran.

    Args:
        loss: the scalar to back-propagate (without the FedProx term).
        fake_a: ``G_BA(b)`` for every example, in the examples' order; ``None`` for a one-way
            objective (G_BA does not run).
        fake_b: ``G_AB(a)`` likewise.
        metrics: the loss terms, each a mean over the examples that have it.
        used: the networks that ran a forward pass (``"r"`` only with a paired example).
        examples: how many examples the loss is the mean over.
    """

    loss: torch.Tensor
    fake_a: torch.Tensor | None
    fake_b: torch.Tensor
    metrics: dict[str, float]
    used: frozenset[str]
    examples: int


def _adversarial(
    nets: Nets, config: TrainingConfig, fake_a: torch.Tensor, fake_b: torch.Tensor
) -> torch.Tensor:
    """Both generators' adversarial losses (D_B scores G_AB(a), D_A scores G_BA(b)), weight 1."""
    return generator_adversarial_loss(
        config.gan_loss, nets["d_b"](fake_b)
    ) + generator_adversarial_loss(config.gan_loss, nets["d_a"](fake_a))


def _weights(
    examples: Examples, config: TrainingConfig
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (
        pixel_weights(examples.a_mask, config.background_weight),
        pixel_weights(examples.b_mask, config.background_weight),
    )


def unpaired_objective(nets: Nets, examples: Examples, config: TrainingConfig) -> Objective:
    """CycleGAN on unpaired examples: adversarial + cycle (+ identity); never touches R.

    ``lambda_cycle * (|G_BA(G_AB(a)) - a|_wa + |G_AB(G_BA(b)) - b|_wb)`` and, when
    ``lambda_identity > 0``, ``lambda_identity * (|G_AB(b) - b|_wb + |G_BA(a) - a|_wa)``, where
    ``|.|_w`` is the per-example weighted L1 with the weights of the real image compared against.
    """
    real_a, real_b = examples.a, examples.b
    weight_a, weight_b = _weights(examples, config)
    g_ab, g_ba = nets["g_ab"], nets["g_ba"]
    fake_b = g_ab(real_a)
    fake_a = g_ba(real_b)
    loss_gan = _adversarial(nets, config, fake_a, fake_b)
    loss_cycle = cycle_loss(g_ba(fake_b), real_a, weight_a) + cycle_loss(
        g_ab(fake_a), real_b, weight_b
    )
    loss = loss_gan + config.lambda_cycle * loss_cycle
    metrics = {"loss_gan": _value(loss_gan), "loss_cycle": _value(loss_cycle)}
    if config.lambda_identity > 0:
        loss_idt = identity_loss(g_ab(real_b), real_b, weight_b) + identity_loss(
            g_ba(real_a), real_a, weight_a
        )
        loss = loss + config.lambda_identity * loss_idt
        metrics["loss_identity"] = _value(loss_idt)
    metrics["paired_fraction"] = 0.0
    return Objective(
        loss, fake_a, fake_b, metrics, frozenset(("g_ab", "g_ba", "d_a", "d_b")), len(examples)
    )


def one_way_objective(
    nets: Nets, examples: Examples, config: TrainingConfig, *, registration: bool
) -> Objective:
    """The A->B half of :func:`paired_objective`: G_AB, D_B and R only.

    Off: ``adv_B + lambda_paired * |G_AB(a) - b|_wb``. On: ``adv_B + lambda_registration *
    |R(G_AB(a), b) - b|_wb + lambda_smooth * smooth(flow)``. What patient-level DP-SGD trains
    by default (``privacy.networks = "objective"``): the direction that is asked for, and two or
    three private networks instead of four or five, so each carries less noise.
    """
    real_a, real_b = examples.a, examples.b
    weight_b = pixel_weights(examples.b_mask, config.background_weight)
    fake_b = nets["g_ab"](real_a)
    loss_gan = generator_adversarial_loss(config.gan_loss, nets["d_b"](fake_b))
    used = {"g_ab", "d_b"}
    metrics = {"loss_gan": _value(loss_gan)}
    if not registration:
        loss_paired = paired_l1_loss(fake_b, real_b, weight_b)
        loss = loss_gan + config.lambda_paired * loss_paired
    else:
        used.add("r")
        _, loss_paired, loss_smooth = _correction(nets, fake_b, real_b, weight_b, metrics)
        loss = (
            loss_gan + config.lambda_registration * loss_paired + config.lambda_smooth * loss_smooth
        )
    metrics["paired_l1"] = _value(loss_paired)
    metrics["paired_fraction"] = 1.0
    return Objective(loss, None, fake_b, metrics, frozenset(used), len(examples))


def paired_objective(
    nets: Nets, examples: Examples, config: TrainingConfig, *, registration: bool
) -> Objective:
    """pix2pix (registration off) or RegGAN NC+R (on) on weakly paired examples.

    Off: ``adv + lambda_paired * (|G_AB(a) - b|_wb + |G_BA(b) - a|_wa)``. On: with
    ``(warped, flow) = R(G_AB(a), b)``, ``adv + lambda_registration * |warped - b|_wb +
    lambda_smooth * smooth(flow) + lambda_registration * |G_BA(b) - warp(a, flow)|_warp(wa)``,
    the last with the flow detached (R learns from the A->B correction only). The metric
    ``paired_l1`` is the sum of both directions' L1 (after the warps when registration is on).
    """
    real_a, real_b = examples.a, examples.b
    weight_a, weight_b = _weights(examples, config)
    fake_b = nets["g_ab"](real_a)
    fake_a = nets["g_ba"](real_b)
    loss_gan = _adversarial(nets, config, fake_a, fake_b)
    used = {"g_ab", "g_ba", "d_a", "d_b"}
    metrics = {"loss_gan": _value(loss_gan)}
    if not registration:
        loss_paired = paired_l1_loss(fake_b, real_b, weight_b) + paired_l1_loss(
            fake_a, real_a, weight_a
        )
        loss = loss_gan + config.lambda_paired * loss_paired
    else:
        used.add("r")
        flow, loss_reg, loss_smooth = _correction(nets, fake_b, real_b, weight_b, metrics)
        # R's field maps b's grid onto a's (G_AB keeps a's geometry): a, seen from b's grid.
        with torch.no_grad():
            fixed = flow.detach().to(real_a.dtype)
            aligned_a = warp(real_a, fixed)
            aligned_weight = None if weight_a is None else warp(weight_a, fixed)
        loss_ba = paired_l1_loss(fake_a, aligned_a, aligned_weight)
        loss_paired = loss_reg + loss_ba
        loss = (
            loss_gan
            + config.lambda_registration * (loss_reg + loss_ba)
            + config.lambda_smooth * loss_smooth
        )
    metrics["paired_l1"] = _value(loss_paired)
    metrics["paired_fraction"] = 1.0
    return Objective(loss, fake_a, fake_b, metrics, frozenset(used), len(examples))


def _correction(
    nets: Nets,
    fake_b: torch.Tensor,
    real_b: torch.Tensor,
    weight_b: torch.Tensor | None,
    metrics: dict[str, float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RegGAN's correction of ``G_AB(a)`` towards ``b``: R's flow, the corrected L1, smoothness.

    Records ``loss_registration`` and ``loss_smooth`` in ``metrics``.
    """
    warped, flow = nets["r"](fake_b, real_b)
    loss_reg = registration_correction_loss(warped, real_b, weight_b)
    # R predicts normalised offsets; RegGAN's smoothness weight is for pixel units.
    loss_smooth = smoothness_loss(flow_to_pixels(flow))
    metrics["loss_registration"] = _value(loss_reg)
    metrics["loss_smooth"] = _value(loss_smooth)
    return flow, loss_reg, loss_smooth


def generator_objective(
    nets: Nets,
    examples: Examples,
    config: TrainingConfig,
    *,
    registration: bool,
    one_way: bool = False,
) -> Objective:
    """The objective of a batch of either kind or both: each on its own sub-batch, then mixed.

    ``loss = (n_p * L_paired + n_u * L_unpaired) / N``; the fakes come back in the batch's order.
    ``one_way``: :func:`one_way_objective`, for batches of weakly paired examples only.
    """
    if one_way:
        if examples.paired_count != len(examples):
            raise ValueError(
                "the one-way (A->B) objective trains on weakly paired examples only; this "
                f"batch holds {len(examples) - examples.paired_count} unpaired"
            )
        return one_way_objective(nets, examples, config, registration=registration)
    paired, unpaired = examples.kinds()
    parts = []
    if paired is not None:
        parts.append(paired_objective(nets, paired, config, registration=registration))
    if unpaired is not None:
        parts.append(unpaired_objective(nets, unpaired, config))
    if len(parts) == 1:
        return parts[0]
    total = len(examples)
    loss = sum((part.examples / total) * part.loss for part in parts)
    assert isinstance(loss, torch.Tensor)
    paired_index, unpaired_index = examples.by_kind()
    # Position k of the concatenation [paired..., unpaired...] holds example order[k].
    order = torch.cat([paired_index, unpaired_index])
    inverse = torch.argsort(order).to(examples.a.device)
    return Objective(
        loss=loss,
        fake_a=torch.cat([_present(part.fake_a) for part in parts])[inverse],
        fake_b=torch.cat([part.fake_b for part in parts])[inverse],
        metrics=merge_metrics((part.examples, part.metrics) for part in parts),
        used=frozenset().union(*(part.used for part in parts)),
        examples=total,
    )


def merge_metrics(parts: Iterable[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """Each metric's mean over the examples of the parts that report it.

    ``parts`` holds ``(examples, metrics)`` of sub-batches; a term only one kind of example has
    (``loss_cycle``, ``loss_registration``) stays that kind's mean, one both have
    (``loss_gan``, ``loss_g``) becomes the whole batch's mean.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for count, metrics in parts:
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + count * value
            counts[key] = counts.get(key, 0) + count
    return {key: sums[key] / counts[key] for key in sums if counts[key] > 0}


def _present(fake: torch.Tensor | None) -> torch.Tensor:
    assert fake is not None, "both kinds of example run G_BA"
    return fake


def _value(loss: torch.Tensor) -> float:
    return float(loss.detach().item())
