"""The local trainer: determinism, exact resume, schedules, pool, clipping, registration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedsynth.common.config import ModelConfig, TrainingConfig
from fedsynth.common.training.pool import ImagePool
from fedsynth.common.training.schedule import linear_decay
from fedsynth.common.training.trainer import CycleGANTrainer

TINY = ModelConfig(ngf=8, n_blocks=1, ndf=8, d_layers=1)
SIZE = 32


def _training(**changes: object) -> TrainingConfig:
    base = {"device": "cpu", "batch_size": 2, "epochs": 4, "decay_epochs": 2, "seed": 3}
    base.update(changes)
    return TrainingConfig.model_validate(base)


def _batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "a": torch.rand(2, 1, SIZE, SIZE, generator=generator) * 2 - 1,
            "b": torch.rand(2, 1, SIZE, SIZE, generator=generator) * 2 - 1,
        }
        for _ in range(count)
    ]


def _weights(trainer: CycleGANTrainer) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.clone()
        for name, net in trainer.nets.items()
        for k, v in net.state_dict().items()
    }


def _assert_same(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> None:
    assert left.keys() == right.keys()
    for key in left:
        torch.testing.assert_close(left[key], right[key], rtol=0, atol=0, msg=key)


def test_same_seed_same_weights_and_losses() -> None:
    runs = []
    for _ in range(2):
        trainer = CycleGANTrainer(TINY, _training(), SIZE)
        losses = [trainer.train_step(b) for b in _batches(3)]
        runs.append((_weights(trainer), losses))
    _assert_same(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    other = CycleGANTrainer(TINY, _training(seed=4), SIZE)
    first = next(iter(other.nets["g_ab"].parameters()))
    assert not torch.equal(
        first, next(iter(CycleGANTrainer(TINY, _training(), SIZE).g_ab.parameters()))
    )


def test_training_changes_every_network_and_keeps_d_out_of_the_g_step() -> None:
    trainer = CycleGANTrainer(TINY, _training(), SIZE)
    before = _weights(trainer)
    metrics = trainer.train_step(_batches(1)[0])
    after = _weights(trainer)
    for name in ("g_ab", "g_ba", "d_a", "d_b"):
        changed = [
            k for k in before if k.startswith(f"{name}.") and not torch.equal(before[k], after[k])
        ]
        assert changed, name
    # The freezing context restores the discriminators' gradients for their own step.
    assert all(p.requires_grad for p in trainer.nets["d_a"].parameters())
    assert {"loss_g", "loss_cycle", "loss_gan", "loss_identity", "loss_d_a", "loss_d_b"} <= set(
        metrics
    )
    assert trainer.step == 1


def test_resume_from_state_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    batches = _batches(5)
    straight = CycleGANTrainer(TINY, _training(), SIZE)
    for batch in batches[:3]:
        straight.train_step(batch)
    straight.end_epoch()
    for batch in batches[3:]:
        straight.train_step(batch)

    first = CycleGANTrainer(TINY, _training(), SIZE)
    for batch in batches[:3]:
        first.train_step(batch)
    first.end_epoch()
    first.save_state(tmp_path / "state.pt")
    del first
    torch.manual_seed(12345)  # disturb the global RNG: the state must restore it
    resumed = CycleGANTrainer(TINY, _training(), SIZE)
    resumed.load_state(tmp_path / "state.pt")
    assert (resumed.step, resumed.epoch) == (3, 1)
    for batch in batches[3:]:
        resumed.train_step(batch)
    _assert_same(_weights(straight), _weights(resumed))
    assert resumed.lr == straight.lr
    assert [t.shape for t in resumed.pools["b"].images] == [
        t.shape for t in straight.pools["b"].images
    ]
    assert list(tmp_path.iterdir()) == [tmp_path / "state.pt"]  # no temporary files left


def test_state_with_other_networks_is_refused(tmp_path: Path) -> None:
    plain = CycleGANTrainer(TINY, _training(), SIZE)
    plain.save_state(tmp_path / "state.pt")
    with_r = CycleGANTrainer(TINY, _training(), SIZE, registration=True)
    with pytest.raises(ValueError, match="registration on in one"):
        with_r.load_state(tmp_path / "state.pt")


@pytest.mark.parametrize(("epochs", "decay"), [(4, 2), (10, 10), (5, 0), (200, 100)])
def test_linear_decay_matches_zhu_et_al(epochs: int, decay: int) -> None:
    factor = linear_decay(epochs, decay)
    start = epochs - decay
    for epoch in range(epochs):
        expected = 1.0 if epoch < start else 1.0 - (epoch - start + 1) / (decay + 1)
        assert factor(epoch) == pytest.approx(expected)
    if decay:
        assert factor(epochs - 1) == pytest.approx(1 / (decay + 1))  # last epoch still learns


@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler\.step\(\)` before")
def test_scheduler_follows_the_schedule() -> None:
    trainer = CycleGANTrainer(TINY, _training(lr=1e-3, epochs=4, decay_epochs=2), SIZE)
    seen = []
    for _ in range(4):
        seen.append(trainer.lr)
        trainer.end_epoch()
    assert seen == pytest.approx([1e-3, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])


def test_image_pool() -> None:
    off = ImagePool(0)
    images = torch.randn(3, 1, 4, 4)
    assert off.query(images) is images
    pool = ImagePool(4, seed=0)
    seen = []
    for _ in range(20):
        batch = torch.randn(2, 1, 4, 4)
        seen.append(batch)
        out = pool.query(batch)
        assert out.shape == batch.shape
        known = torch.cat(seen)
        for image in out:  # every returned image is one that was generated before
            assert any(torch.equal(image, k) for k in known)
    assert len(pool.images) == 4


def test_gradient_clipping_bounds_every_network() -> None:
    trainer = CycleGANTrainer(TINY, _training(max_grad_norm=1e-3), SIZE)
    captured: dict[str, float] = {}

    def spy(name: str, optimizer: torch.optim.Optimizer) -> None:
        step = optimizer.step

        def checked(*args: object, **kwargs: object) -> object:
            grads = [
                p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
            ]
            captured[name] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            return step(*args, **kwargs)

        optimizer.step = checked  # type: ignore[method-assign]

    for name, optimizer in trainer.optimizers.items():
        spy(name, optimizer)
    metrics = trainer.train_step(_batches(1)[0])
    assert set(captured) == {"g_ab", "g_ba", "d_a", "d_b"}
    for name, norm in captured.items():
        assert norm <= 1e-3 * (1 + 1e-4), name
        assert metrics[f"grad_norm_{name}"] > 1e-3  # the raw norm was larger: clipping acted


def test_registration_trains_r_with_its_losses_on_paired_examples_only() -> None:
    trainer = CycleGANTrainer(TINY, _training(registration="on"), SIZE)
    assert "r" in trainer.nets and trainer.registration
    before = [p.clone() for p in trainer.nets["r"].parameters()]
    # Unpaired examples (no "paired" key): R and its losses stay out of the step.
    metrics = trainer.train_step(_batches(1)[0])
    assert "loss_registration" not in metrics and "loss_smooth" not in metrics
    assert all(
        torch.equal(b, p) for b, p in zip(before, trainer.nets["r"].parameters(), strict=True)
    )
    paired = {**_batches(1, seed=1)[0], "paired": torch.ones(2)}
    metrics = trainer.train_step(paired)
    assert metrics["loss_registration"] > 0 and metrics["loss_smooth"] >= 0
    assert any(
        not torch.equal(b, p) for b, p in zip(before, trainer.nets["r"].parameters(), strict=True)
    )
    assert "r" not in trainer.generators()  # R never leaves the site


def test_fit_writes_one_json_line_per_epoch(tmp_path: Path) -> None:
    import json

    trainer = CycleGANTrainer(TINY, _training(), SIZE)
    history = trainer.fit(_batches(2), 2, metrics_path=tmp_path / "metrics.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1.0, 2.0]
    assert lines[-1]["step"] == 4.0 and lines[0]["samples"] == 4.0
    assert lines[0]["samples_per_s"] > 0
    assert history[-1]["loss_g"] == lines[-1]["loss_g"]
