"""Objectives per example kind: R never sees an unpaired example, masks weigh every L1 loss.

Masked losses against NumPy, the mixed batch against a one-example-at-a-time loop, DP steps on
mixed Poisson batches, and a tiny paired run that learns a contrast inversion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

import fedsynth.common.training.objectives
from fedsynth.common.config import ModelConfig, PrivacyConfig, TrainingConfig
from fedsynth.common.losses import (
    cycle_loss,
    identity_loss,
    paired_l1_loss,
    pixel_weights,
    registration_correction_loss,
    weighted_l1_loss,
)
from fedsynth.common.privacy.plan import plan_noise
from fedsynth.common.training.objectives import Examples, generator_objective, merge_metrics
from fedsynth.common.training.state import unwrap as _target
from fedsynth.common.training.trainer import CycleGANTrainer

TINY = ModelConfig(ngf=4, n_blocks=1, ndf=4, d_layers=1, registration_filters=4)
SIZE = 16


def _training(**changes: object) -> TrainingConfig:
    base = {"device": "cpu", "batch_size": 4, "epochs": 2, "decay_epochs": 0, "seed": 7}
    base.update(changes)
    return TrainingConfig.model_validate(base)


def _disk(size: int, radius: float, centre: tuple[float, float] | None = None) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = centre if centre is not None else ((size - 1) / 2, (size - 1) / 2)
    return (((ys - cy) ** 2 + (xs - cx) ** 2) <= radius**2).float()


def _batch(paired: list[float], seed: int = 0, size: int = SIZE) -> dict[str, torch.Tensor]:
    """Random images, each with its own disk mask (background -1), and the given kinds."""
    generator = torch.Generator().manual_seed(seed)
    n = len(paired)
    masks = {}
    for key in ("a_mask", "b_mask"):
        radii = 0.25 * size + 0.15 * size * torch.rand(n, generator=generator)
        masks[key] = torch.stack([_disk(size, float(r))[None] for r in radii])
    images = {
        key: torch.where(
            masks[f"{key}_mask"] > 0,
            torch.rand(n, 1, size, size, generator=generator) * 2 - 1,
            -1.0,
        )
        for key in ("a", "b")
    }
    return {**images, **masks, "paired": torch.tensor(paired)}


def _record_r(net: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (moving, fixed) pair R's forward receives."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
        seen.append((inputs[0].detach().clone(), inputs[1].detach().clone()))

    _target(net).register_forward_hook(hook)
    return seen


# --------------------------------------------------------------------- R sees paired examples only


def _record_correction_targets(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every target the registration-corrected loss is computed against, from now on."""
    corrected: list[torch.Tensor] = []
    original = fedsynth.common.training.objectives.registration_correction_loss

    def spy(warped: torch.Tensor, target: torch.Tensor, weight: Any = None) -> torch.Tensor:
        corrected.append(target.detach().clone())
        return original(warped, target, weight)

    monkeypatch.setattr(fedsynth.common.training.objectives, "registration_correction_loss", spy)
    return corrected


def test_an_unpaired_batch_never_reaches_r_or_the_correction_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer = CycleGANTrainer(TINY, _training(), SIZE, registration=True)
    seen = _record_r(trainer.nets["r"])
    corrected = _record_correction_targets(monkeypatch)
    before = [p.detach().clone() for p in trainer.nets["r"].parameters()]
    flagged = _batch([0.0, 0.0, 0.0], seed=1)
    unflagged = {k: v for k, v in _batch([0.0] * 3).items() if k != "paired"}  # unpaired too
    bare = {"a": unflagged["a"], "b": unflagged["b"]}  # no masks either
    for batch in (flagged, unflagged, bare):
        metrics = trainer.train_step(batch)
        assert "loss_registration" not in metrics and metrics["paired_fraction"] == 0.0
    assert seen == [] and corrected == []
    assert all(
        torch.equal(b, p) for b, p in zip(before, trainer.nets["r"].parameters(), strict=True)
    )


def test_a_mixed_batch_gives_r_exactly_its_paired_examples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer = CycleGANTrainer(TINY, _training(), SIZE, registration=True)
    seen = _record_r(trainer.nets["r"])
    corrected = _record_correction_targets(monkeypatch)
    kinds = [0.0, 1.0, 0.0, 1.0, 1.0]
    batch = _batch(kinds, seed=2)
    index = torch.tensor([i for i, k in enumerate(kinds) if k])
    with torch.no_grad():
        expected_moving = trainer.g_ab(batch["a"][index])
    metrics = trainer.train_step(batch)
    assert len(seen) == 1 and len(corrected) == 1
    moving, fixed = seen[0]
    torch.testing.assert_close(fixed, batch["b"][index], rtol=0, atol=0)
    torch.testing.assert_close(corrected[0], batch["b"][index], rtol=0, atol=0)
    torch.testing.assert_close(moving, expected_moving)  # G_AB of the paired a's, nothing else
    assert metrics["paired_fraction"] == pytest.approx(3 / 5)
    assert {"loss_registration", "loss_smooth", "paired_l1", "loss_cycle"} <= set(metrics)


# --------------------------------------------------------------------------------- masked losses


def test_weighted_l1_equals_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (3, 2, 5, 6))
    y = rng.uniform(-1, 1, (3, 2, 5, 6))
    mask = (rng.uniform(size=(3, 1, 5, 6)) < 0.5).astype(np.float64)
    mask[2] = 0.0  # an empty mask: only background counts
    for background in (0.0, 0.1, 1.0):
        per_example = []
        for n in range(3):
            w = np.broadcast_to(mask[n] + background * (1 - mask[n]), x[n].shape)
            per_example.append((w * np.abs(x[n] - y[n])).sum() / w.sum() if w.sum() else 0.0)
        weight = pixel_weights(torch.from_numpy(mask), background)
        got = weighted_l1_loss(torch.from_numpy(x), torch.from_numpy(y), weight)
        assert float(got) == pytest.approx(float(np.mean(per_example)), rel=1e-6)
    # No mask: the plain mean over every element.
    got = weighted_l1_loss(torch.from_numpy(x), torch.from_numpy(y), pixel_weights(None, 0.1))
    assert float(got) == pytest.approx(float(np.abs(x - y).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="background_weight"):
        pixel_weights(torch.from_numpy(mask), 1.5)


@pytest.mark.parametrize(
    "loss", [cycle_loss, identity_loss, paired_l1_loss, registration_correction_loss]
)
def test_a_background_pixel_has_no_influence_at_background_weight_zero(
    loss: Callable[..., torch.Tensor],
) -> None:
    generator = torch.Generator().manual_seed(3)
    prediction = (torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1).requires_grad_(True)
    target = torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1
    mask = _disk(8, 2.5).expand(2, 1, 8, 8).contiguous()
    assert mask[0, 0, 0, 0] == 0  # a corner is background
    value = loss(prediction, target, pixel_weights(mask, 0.0))
    (grad,) = torch.autograd.grad(value, prediction)
    assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1] != 0)
    moved = target.clone()
    moved[0, 0, 0, 0] += 5.0  # a different background leaves the loss unchanged
    assert torch.equal(loss(prediction, moved, pixel_weights(mask, 0.0)), value)
    (grad,) = torch.autograd.grad(loss(prediction, target, pixel_weights(mask, 0.1)), prediction)
    assert torch.all(grad[mask == 0] != 0)  # with a background weight it counts again


@pytest.mark.parametrize("registration", [False, True])
def test_a_mixed_batch_loss_is_the_mean_of_its_examples_own_losses(registration: bool) -> None:
    trainer = CycleGANTrainer(TINY, _training(), SIZE, registration=registration)
    kinds = [1.0, 0.0, 0.0, 1.0, 0.0]
    batch = _batch(kinds, seed=4)
    examples = Examples.from_batch(batch, torch.device("cpu"))
    whole = generator_objective(trainer.nets, examples, trainer.config, registration=registration)
    alone = [
        generator_objective(
            trainer.nets,
            examples.select(torch.tensor([i])),
            trainer.config,
            registration=registration,
        )
        for i in range(len(kinds))
    ]
    expected = torch.stack([o.loss for o in alone]).mean()
    torch.testing.assert_close(whole.loss, expected, rtol=1e-5, atol=1e-6)
    # The fakes come back in the batch's order.
    torch.testing.assert_close(whole.fake_b, torch.cat([o.fake_b for o in alone]))
    torch.testing.assert_close(whole.fake_a, torch.cat([o.fake_a for o in alone]))
    # A term only unpaired examples have is their mean; one both kinds have, everyone's.
    unpaired = [o for o, k in zip(alone, kinds, strict=True) if not k]
    assert whole.metrics["loss_cycle"] == pytest.approx(
        np.mean([o.metrics["loss_cycle"] for o in unpaired]), rel=1e-5
    )
    assert whole.metrics["loss_gan"] == pytest.approx(
        np.mean([o.metrics["loss_gan"] for o in alone]), rel=1e-5
    )
    assert whole.used == ({"g_ab", "g_ba", "d_a", "d_b"} | ({"r"} if registration else set()))
    assert merge_metrics([(1, {"x": 1.0}), (3, {"x": 2.0, "y": 5.0})]) == {"x": 1.75, "y": 5.0}


# -------------------------------------------------------------------------------- under DP-SGD


def _private(noise: float, max_physical: int | None = None) -> CycleGANTrainer:
    privacy = PrivacyConfig.model_validate(
        {  # slice-level: mixed batches of both kinds, every network
            "enabled": True,
            "level": "example",
            "noise_multiplier": noise,
            "max_grad_norm": 0.5,
            "grad_sample_mode": "hooks",
            "accountant": "rdp",
            "max_physical_batch_size": max_physical,
        }
    )
    trainer = CycleGANTrainer(TINY, _training(), SIZE, registration=True, privacy=privacy)
    plan = plan_noise(
        privacy,
        examples=40,
        batch_size=4,
        networks=len(trainer.nets),
        steps_per_round=None,
        epochs_per_round=1,
        rounds=1,
    )
    trainer.make_private(plan)
    return trainer


def _params(trainer: CycleGANTrainer) -> dict[str, list[torch.Tensor]]:
    return {
        name: [p.detach().clone() for p in _target(net).parameters()]
        for name, net in trainer.nets.items()
    }


@pytest.mark.parametrize(
    ("kinds", "max_physical"),
    [([1.0, 0.0, 0.0, 1.0, 0.0], None), ([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0], 2)],
)
def test_dp_step_on_a_mixed_poisson_batch_trains_every_network(
    kinds: list[float], max_physical: int | None
) -> None:
    trainer = _private(1.0, max_physical)
    seen = _record_r(trainer.nets["r"])
    before = _params(trainer)
    metrics = trainer.train_step(_batch(kinds, seed=5))
    assert trainer.accountant is not None and trainer.accountant.steps == 1
    after = _params(trainer)
    for name in trainer.nets:
        assert any(not torch.equal(x, y) for x, y in zip(before[name], after[name], strict=True)), (
            name
        )
    paired = _batch(kinds, seed=5)["b"][torch.tensor(kinds) > 0]
    torch.testing.assert_close(torch.cat([fixed for _, fixed in seen]), paired, rtol=0, atol=0)
    assert metrics["paired_fraction"] == pytest.approx(sum(kinds) / len(kinds))
    assert metrics["batch_size"] == len(kinds)


def test_dp_step_without_a_paired_example_still_noises_r_and_leaks_nothing_into_it() -> None:
    kinds = [0.0, 0.0, 0.0]
    trainer = _private(1.0)
    seen = _record_r(trainer.nets["r"])
    before = _params(trainer)
    trainer.train_step(_batch(kinds, seed=6))
    assert seen == []
    assert trainer.accountant is not None and trainer.accountant.steps == 1
    after = _params(trainer)
    for name in trainer.nets:  # R too: its pure-noise release
        assert any(not torch.equal(x, y) for x, y in zip(before[name], after[name], strict=True)), (
            name
        )
    # Without noise R's privatised gradient is exactly zero: no unpaired example reached it.
    quiet = _private(0.0)
    grads: list[torch.Tensor] = []
    optimizer = quiet.optimizers["r"]
    assert isinstance(optimizer, DPOptimizer)

    def record(opt: DPOptimizer) -> None:
        grads.extend(p.grad.detach().clone() for p in opt.params if p.grad is not None)

    optimizer.attach_step_hook(record)
    quiet.train_step(_batch(kinds, seed=6))
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


# ------------------------------------------------------------------------------ a paired run learns


def _phantom(count: int, seed: int, size: int = 32) -> dict[str, torch.Tensor]:
    """Smooth random 'anatomy' in a disk (background -1); B is A's contrast inversion there."""
    generator = torch.Generator().manual_seed(seed)
    mask = _disk(size, 0.4 * size).expand(count, 1, size, size).contiguous()
    coarse = torch.rand(count, 1, 4, 4, generator=generator) * 2 - 1
    texture = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    a = torch.where(mask > 0, 0.8 * texture, -1.0)
    b = torch.where(mask > 0, -0.8 * texture, -1.0)
    return {"a": a, "b": b, "a_mask": mask, "b_mask": mask.clone(), "paired": torch.ones(count)}


def _held_out_l1(trainer: CycleGANTrainer, data: dict[str, torch.Tensor]) -> float:
    fake = trainer.translate(data["a"])
    weight = pixel_weights(data["b_mask"], 0.0)
    return float(weighted_l1_loss(fake, data["b"], weight))


def _train(kind: float, steps: int = 100) -> CycleGANTrainer:
    model = ModelConfig(ngf=8, n_blocks=1, ndf=8, d_layers=1)
    trainer = CycleGANTrainer(model, _training(lr=2e-3, pool_size=0), 32, registration=False)
    for step in range(steps):
        batch = _phantom(4, seed=step)
        batch["paired"] = torch.full((4,), kind)
        trainer.train_step(batch)
    return trainer


def test_a_tiny_paired_run_learns_the_contrast_inversion() -> None:
    """100 steps of each (about 8 s): the paired objective beats the untrained G and CycleGAN.

    The same examples, flagged unpaired, train plain CycleGAN for comparison: the supervised
    term, not the adversarial one, is what learns here.
    """
    held_out = _phantom(16, seed=100)
    model = ModelConfig(ngf=8, n_blocks=1, ndf=8, d_layers=1)
    untrained = _held_out_l1(CycleGANTrainer(model, _training(), 32), held_out)
    paired = _held_out_l1(_train(1.0), held_out)
    unpaired = _held_out_l1(_train(0.0), held_out)
    assert paired < 0.5 * untrained, (paired, untrained)
    assert paired < 0.5 * unpaired, (paired, unpaired)
