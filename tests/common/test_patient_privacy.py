"""Patient-level DP-SGD: the patient is the unit, checked against its definition and Opacus.

Sites are built from synthetic slice stacks whose every pixel names its subject, so where each
example comes from can be read off the image.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.optimizers import DPOptimizer
from torch.utils.data import default_collate

from fedsynth.common.config import ModelConfig, PrivacyConfig, TrainingConfig
from fedsynth.common.data.datasets import PatientSlices, TrainingSlices
from fedsynth.common.data.discovery import Scan
from fedsynth.common.data.preprocess import SliceStack
from fedsynth.common.data.site import Volume
from fedsynth.common.modalities import Modality
from fedsynth.common.models import freeze_encoder
from fedsynth.common.privacy.accounting import RDP_ORDERS
from fedsynth.common.privacy.plan import plan_noise
from fedsynth.common.privacy.sampling import (
    PatientPoissonLoader,
    private_loader,
    private_population,
)
from fedsynth.common.training.trainer import CycleGANTrainer

SIZE = 16
TINY = ModelConfig(generator="unet", unet_depth=3, ngf=4, ndf=4, d_layers=1, intensity_prior=5)


def _volume(subject: str, modality: str, slices: int, session: str | None = None) -> Volume:
    """A stack whose pixels all hold the subject's number (a: +, b: -), so a row names its
    patient; masks cover a random half of each slice."""
    number = int(subject.split("-")[1])
    value = number / 100 if modality == "T1w" else -number / 100
    rng = np.random.default_rng([number, slices])
    stack = SliceStack(
        slices=np.full((slices, SIZE, SIZE), value, dtype=np.float32),
        masks=rng.random((slices, SIZE, SIZE)) < 0.5,
        z=np.arange(slices),
        mapping=None,  # type: ignore[arg-type]
        affine=np.eye(4),
        depth=slices,
        foreground_clipped=0.0,
    )
    name = f"{subject}_{session or 'x'}_{modality}.nii.gz"
    return Volume(Scan(Path(name), subject, Modality(modality), session), stack)


def _pair(subject: str, slices: int, session: str | None = None) -> tuple[Volume, Volume]:
    return _volume(subject, "T1w", slices, session), _volume(subject, "T2w", slices, session)


def _site(*, without: str | None = None) -> TrainingSlices:
    """sub-01: two sessions (5 and 9 slices); sub-02..sub-06 one session; sub-07 T1w only;
    sub-08 T2w only."""
    pairs = [_pair("sub-01", 5, "ses-1"), _pair("sub-01", 9, "ses-2")]
    pairs += [_pair(f"sub-{n:02d}", 2 + n) for n in range(2, 7)]
    pairs = [p for p in pairs if p[0].scan.subject != without]
    return TrainingSlices(
        pairs,
        [_volume("sub-07", "T1w", 4)],
        [_volume("sub-08", "T2w", 3)],
        misalignment="slight",
        seed=3,
    )


def _subject_of(item: dict[str, torch.Tensor]) -> str:
    return f"sub-{round(float(item['a'].max()) * 100):02d}"  # -1 where an affine moved it


def _privacy(**changes: object) -> PrivacyConfig:
    base: dict[str, object] = {
        "enabled": True,
        "noise_multiplier": 0.0,
        "max_grad_norm": 0.05,
        "accountant": "rdp",
    }
    base.update(changes)
    return PrivacyConfig.model_validate(base)


def _trainer(privacy: PrivacyConfig, patients: int, **training: object) -> CycleGANTrainer:
    config = TrainingConfig.model_validate(
        {"device": "cpu", "batch_size": 2, "epochs": 1, "decay_epochs": 0, "seed": 5, **training}
    )
    trainer = CycleGANTrainer(TINY, config, SIZE, registration=False, privacy=privacy)
    plan = plan_noise(
        privacy,
        examples=patients,
        batch_size=privacy.batch_size or config.batch_size,
        networks=len(trainer.trained_names),
        steps_per_round=None,
        epochs_per_round=1,
        rounds=1,
        unit="patient",
    )
    trainer.make_private(plan)
    return trainer


def test_sessions_of_a_subject_are_one_patient_and_one_modality_subjects_are_left_out() -> None:
    site = _site()
    patients = PatientSlices(site)
    assert patients.patients == [f"sub-{n:02d}" for n in range(1, 7)]
    assert patients.left_out == ["sub-07", "sub-08"]
    assert len(patients.rows[0]) == 5 + 9  # both sessions of sub-01
    # Every example a patient gives is its own, paired, and all of its slices can come up.
    seen = set()
    for draw in range(200):
        item = patients.example(0, (0, draw))
        assert _subject_of(item) == "sub-01"
        assert float(item["paired"]) == 1.0
        assert float(item["b"].max()) == pytest.approx(-0.01, abs=1e-5)
        seen.add(float(item["a_mask"].sum()))
    assert len(seen) > 9  # slices of both sessions (the masks differ per slice)


def test_a_patients_draws_do_not_depend_on_the_other_patients() -> None:
    """Removing a patient leaves every other patient's example unchanged (the adjacency)."""
    whole, smaller = PatientSlices(_site()), PatientSlices(_site(without="sub-03"))
    assert "sub-03" not in smaller.patients
    for name in smaller.patients:
        i, j = whole.patients.index(name), smaller.patients.index(name)
        for draw in ((0, 0), (2, 7)):
            a, b = whole.example(i, draw), smaller.example(j, draw)
            assert all(torch.equal(a[key], b[key]) for key in a)


def test_each_step_draws_each_patient_at_most_once_at_rate_q() -> None:
    privacy = _privacy(batch_size=2)
    patients = PatientSlices(_site())
    plan = plan_noise(
        privacy,
        examples=len(patients),
        batch_size=2,
        networks=2,
        steps_per_round=None,
        epochs_per_round=1,
        rounds=1,
        unit="patient",
    )
    assert plan.sample_rate == 2 / 6 and plan.unit == "patient"
    loader = private_loader(patients, plan, seed=4, epoch=0)
    assert isinstance(loader, PatientPoissonLoader) and len(loader) == 3
    counts = np.zeros(len(patients))
    draws = 0
    for seed in range(400):
        for chosen in PatientPoissonLoader(patients, plan, seed=seed).batches():
            assert len(chosen) == len(set(chosen))
            counts[chosen] += 1
            draws += 1
    # Each patient is in a batch with probability q, independently of how many slices it has.
    frequency = counts / draws
    assert np.all(np.abs(frequency - 1 / 3) < 4 * math.sqrt((1 / 3) * (2 / 3) / draws))
    # The batches themselves: one row per drawn patient, and an empty draw is an empty batch.
    for chosen, batch in zip(loader.batches(), loader, strict=True):
        if not chosen:
            assert batch == {}
            continue
        rows = [_subject_of({"a": a}) for a in batch["a"]]
        assert rows == [patients.patients[i] for i in chosen]


def test_private_population_is_patients_at_patient_level_and_examples_otherwise() -> None:
    site = _site()
    assert isinstance(private_population(site, _privacy()), PatientSlices)
    assert private_population(site, _privacy(level="example")) is site
    assert private_population(site, _privacy(enabled=False)) is site  # no DP: nothing grouped


def _clipped_sums(trainer: CycleGANTrainer, batch: dict[str, torch.Tensor]) -> dict:
    """Each private network's sum of clipped per-sample gradients (noise 0) after one step."""
    seen: dict[str, list[torch.Tensor]] = {}
    for name in trainer.trained_names:
        optimizer = trainer.optimizers[name]
        assert isinstance(optimizer, DPOptimizer)

        def record(opt: DPOptimizer, name: str = name) -> None:
            # grad = clipped sum / expected batch (Opacus' mean reduction): undo the scale.
            seen[name] = [p.grad.detach().clone() * opt.expected_batch_size for p in opt.params]

        optimizer.attach_step_hook(record)
    trainer.train_step(batch)
    return seen


def test_one_patient_moves_a_steps_clipped_sum_by_at_most_the_bound() -> None:
    """sub-01 has two sessions and 14 slices: with or without it, each network's clipped sum
    differs by at most C (one row), and by a clearly active amount."""
    clip = 0.05
    whole = PatientSlices(_site())
    others = [whole.example(i, (0, 0)) for i in range(1, len(whole))]
    batch_without = default_collate(others)
    batch_with = default_collate([*others, whole.example(0, (0, 0))])
    sums = []
    for batch in (batch_without, batch_with):
        trainer = _trainer(_privacy(max_grad_norm=clip), len(whole))
        sums.append(_clipped_sums(trainer, batch))
    assert set(sums[0]) == {"g_ab", "d_b"}
    for name in sums[0]:
        moved = math.sqrt(
            sum(
                float(((b - a).double() ** 2).sum())
                for a, b in zip(sums[0][name], sums[1][name], strict=True)
            )
        )
        assert moved <= clip * (1 + 1e-5), name
        assert moved > 0.5 * clip, f"{name}: the patient's row should count"


def test_patient_level_epsilon_is_opacus_over_patients_noise_and_steps() -> None:
    sigma = 1.3
    patients = PatientSlices(_site())
    privacy = _privacy(noise_multiplier=sigma, batch_size=2, max_grad_norm=1.0)
    trainer = _trainer(privacy, len(patients))
    assert trainer.plan is not None and trainer.plan.networks == 2  # G_AB and D_B
    steps = 0
    for epoch in range(2):
        loader = PatientPoissonLoader(patients, trainer.plan, seed=epoch, epoch=epoch)
        steps += trainer.train_epoch(loader)["steps"]
    assert steps == 2 * 3
    # Independently: a Poisson-subsampled Gaussian at q = patients per batch / patients, the two
    # releases on one batch composed as noise sigma / sqrt(2), over the steps taken.
    rdp = rdp_analysis.compute_rdp(
        q=2 / 6, noise_multiplier=sigma / math.sqrt(2), steps=int(steps), orders=RDP_ORDERS
    )
    expected, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=1e-5)
    assert trainer.epsilon() == pytest.approx(float(expected), rel=1e-12)


def test_patient_level_trains_only_the_a_to_b_networks() -> None:
    patients = PatientSlices(_site())
    trainer = _trainer(_privacy(noise_multiplier=1.0), len(patients))
    before = {
        name: [p.detach().clone() for p in trainer.nets[name].parameters()] for name in trainer.nets
    }
    batch = default_collate([patients.example(i, (0, 0)) for i in range(len(patients))])
    trainer.train_step(batch)
    assert trainer.frozen_names == ["g_ba", "d_a"]
    for name, params in before.items():
        changed = any(
            not torch.equal(a, b)
            for a, b in zip(params, trainer.nets[name].parameters(), strict=True)
        )
        assert changed == (name in ("g_ab", "d_b")), name
    # "all" keeps both directions private.
    both = CycleGANTrainer(
        TINY,
        TrainingConfig(device="cpu"),
        SIZE,
        registration=True,
        privacy=_privacy(networks="all"),
    )
    assert both.trained_names == ["g_ab", "g_ba", "r", "d_b", "d_a"]
    one_way = CycleGANTrainer(
        TINY, TrainingConfig(device="cpu"), SIZE, registration=True, privacy=_privacy()
    )
    assert one_way.trained_names == ["g_ab", "r", "d_b"]


def test_decoder_fine_tuning_keeps_the_encoder_and_trains_the_rest() -> None:
    patients = PatientSlices(_site())
    trainer = _trainer(_privacy(noise_multiplier=1.0, trainable="decoder"), len(patients))
    g_ab = trainer.generators()["g_ab"]
    named = dict(g_ab.named_parameters())
    encoder = {
        k for k in named if k.startswith("body.down.") and ".weight" in k and named[k].dim() == 4
    }
    assert encoder and all(not named[k].requires_grad for k in encoder)
    trained = {k for k, p in named.items() if p.requires_grad}
    assert any(k.startswith("body.up.") for k in trained) and "prior.raw" in trained
    assert any(k.startswith("body.down.") for k in trained)  # the encoder's normalisation
    before = {k: p.detach().clone() for k, p in named.items()}
    batch = default_collate([patients.example(i, (0, 0)) for i in range(len(patients))])
    trainer.train_step(batch)
    for key, param in g_ab.named_parameters():
        assert torch.equal(before[key], param.detach()) == (key not in trained), key
    with pytest.raises(ValueError, match=r"needs model\.generator = 'unet'"):
        from fedsynth.common.models import define_generator

        freeze_encoder(define_generator(ModelConfig(generator="resnet"), SIZE))
