"""Losses on inputs with values worked out by hand, and the mean-over-batch property."""

from __future__ import annotations

import math
import typing
from collections.abc import Callable

import pytest
import torch

from fedsynth.common.config import TrainingConfig
from fedsynth.common.losses import (
    GanLossKind,
    cycle_loss,
    discriminator_loss,
    generator_adversarial_loss,
    identity_loss,
    registration_correction_loss,
    smoothness_loss,
)


def full(value: float, shape: tuple[int, ...] = (2, 1, 4, 4)) -> torch.Tensor:
    return torch.full(shape, value)


def test_kinds_match_the_config() -> None:
    allowed = typing.get_args(TrainingConfig.model_fields["gan_loss"].annotation)
    assert set(allowed) == {kind.value for kind in GanLossKind}
    assert GanLossKind.parse("hinge") is GanLossKind.HINGE
    assert GanLossKind.parse(GanLossKind.LSGAN) is GanLossKind.LSGAN


def test_unknown_kind_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown GAN loss 'wgan'.*lsgan, vanilla, hinge"):
        discriminator_loss("wgan", full(1.0), full(0.0))
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_adversarial_loss("wgan", full(1.0))


def test_lsgan() -> None:
    assert discriminator_loss("lsgan", full(1.0), full(0.0)).item() == 0.0
    assert discriminator_loss("lsgan", full(0.0), full(1.0)).item() == 1.0  # 0.5 * (1 + 1)
    assert discriminator_loss("lsgan", full(0.5), full(0.5)).item() == 0.25  # 0.5 * (.25 + .25)
    assert generator_adversarial_loss("lsgan", full(1.0)).item() == 0.0
    assert generator_adversarial_loss("lsgan", full(3.0)).item() == 4.0


def test_vanilla_reads_logits() -> None:
    log2 = math.log(2.0)
    assert discriminator_loss("vanilla", full(0.0), full(0.0)).item() == pytest.approx(log2)
    assert discriminator_loss("vanilla", full(30.0), full(-30.0)).item() == pytest.approx(
        0, abs=1e-9
    )
    # real score 2: -log(sigmoid(2)) = log(1 + e^-2);
    # fake score 1: -log(1 - sigmoid(1)) = log(1 + e).
    expected = 0.5 * (math.log1p(math.exp(-2.0)) + math.log1p(math.e))
    assert discriminator_loss("vanilla", full(2.0), full(1.0)).item() == pytest.approx(expected)
    assert generator_adversarial_loss("vanilla", full(0.0)).item() == pytest.approx(log2)


def test_hinge() -> None:
    real = torch.tensor([2.0, 0.5])  # relu(1 - real) = [0, 0.5], mean 0.25
    fake = torch.tensor([-2.0, 0.5])  # relu(1 + fake) = [0, 1.5], mean 0.75
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(0.5)
    assert discriminator_loss("hinge", full(1.0), full(-1.0)).item() == 0.0
    assert generator_adversarial_loss("hinge", torch.tensor([1.0, 3.0])).item() == -2.0


def test_l1_losses_by_hand() -> None:
    original = torch.tensor([[[[0.0, 1.0], [-1.0, 0.5]]]])
    other = torch.tensor([[[[1.0, 1.0], [1.0, -0.5]]]])  # |diff| = 1, 0, 2, 1: mean 1
    assert cycle_loss(other, original).item() == 1.0
    assert identity_loss(other, original).item() == 1.0
    assert registration_correction_loss(other, original).item() == 1.0
    assert cycle_loss(original, original).item() == 0.0


def test_smoothness_of_ramps() -> None:
    height, width, slope = 6, 8, 0.3
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    ramp_x = (slope * xs).expand(2, 2, height, width)
    assert smoothness_loss(ramp_x).item() == pytest.approx(slope**2)
    ramp_y = (slope * ys).expand(2, 2, height, width)
    assert smoothness_loss(ramp_y).item() == pytest.approx(slope**2)
    assert smoothness_loss(ramp_x + ramp_y).item() == pytest.approx(2 * slope**2)
    assert smoothness_loss(torch.full((1, 2, height, width), 0.7)).item() == 0.0
    with pytest.raises(ValueError, match="batch, 2, H, W"):
        smoothness_loss(torch.zeros(2, height, width))


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "d-lsgan": lambda x, y: discriminator_loss("lsgan", x, y),
    "d-vanilla": lambda x, y: discriminator_loss("vanilla", x, y),
    "d-hinge": lambda x, y: discriminator_loss("hinge", x, y),
    "g-lsgan": lambda x, _: generator_adversarial_loss("lsgan", x),
    "g-vanilla": lambda x, _: generator_adversarial_loss("vanilla", x),
    "g-hinge": lambda x, _: generator_adversarial_loss("hinge", x),
    "cycle": cycle_loss,
    "identity": identity_loss,
    "registration": registration_correction_loss,
    "smoothness": lambda x, _: smoothness_loss(x),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch_loss_is_mean_of_per_sample_losses(name: str) -> None:
    """Opacus' loss_reduction="mean" needs loss(batch) == mean_i loss(example i)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 6, 7, dtype=torch.float64, generator=generator)
    y = torch.randn(5, 2, 6, 7, dtype=torch.float64, generator=generator)
    loss = LOSSES[name]
    per_sample = torch.stack([loss(x[i : i + 1], y[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(loss(x, y), per_sample.mean(), atol=1e-12, rtol=1e-12)
