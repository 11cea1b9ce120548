"""DP-SGD at a site, checked against slow obvious computations.

Per-sample gradients against a batch-of-one autograd loop, clipping against its definition,
sensitivity against the clipping bound, epsilon against Opacus' analysis functions, and coverage
of every trainable parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch import nn

from fedsynth.common.config import ModelConfig, PrivacyConfig, TrainingConfig
from fedsynth.common.models import define_cyclegan
from fedsynth.common.privacy.accounting import RDP_ORDERS, SiteAccountant, patient_epsilon
from fedsynth.common.privacy.grad_samplers import conv2d_grad_sample, conv_transpose2d_grad_sample
from fedsynth.common.privacy.plan import BudgetSpentError, NoisePlan, check_budget, plan_noise
from fedsynth.common.training.state import unwrap
from fedsynth.common.training.trainer import CycleGANTrainer

TINY = ModelConfig(ngf=4, n_blocks=1, ndf=4, d_layers=1)
SIZE = 16
BATCH = 3


def _training(**changes: object) -> TrainingConfig:
    base = {"device": "cpu", "batch_size": BATCH, "epochs": 2, "decay_epochs": 0, "seed": 5}
    base.update(changes)
    return TrainingConfig.model_validate(base)


def _privacy(**changes: object) -> PrivacyConfig:
    # Slice-level DP (level "example") over random examples of either kind, every network.
    base: dict[str, object] = {
        "enabled": True,
        "level": "example",
        "noise_multiplier": 0.0,
        "max_grad_norm": 0.05,
    }
    base.update(changes)
    return PrivacyConfig.model_validate(base)


def _private(
    privacy: PrivacyConfig, *, registration: bool = False, **training: object
) -> CycleGANTrainer:
    trainer = CycleGANTrainer(
        TINY, _training(**training), SIZE, registration=registration, privacy=privacy
    )
    plan = plan_noise(
        privacy,
        examples=30,
        batch_size=BATCH,
        networks=len(trainer.nets),
        steps_per_round=None,
        epochs_per_round=1,
        rounds=1,
    )
    trainer.make_private(plan)
    return trainer


def _examples(
    count: int, seed: int = 0, paired: list[float] | None = None
) -> dict[str, torch.Tensor]:
    """Random examples; with ``paired``, that kind per example and random head masks too."""
    generator = torch.Generator().manual_seed(seed)
    batch = {
        "a": torch.rand(count, 1, SIZE, SIZE, generator=generator) * 2 - 1,
        "b": torch.rand(count, 1, SIZE, SIZE, generator=generator) * 2 - 1,
    }
    if paired is not None:
        assert len(paired) == count
        batch["paired"] = torch.tensor(paired)
        for key in ("a_mask", "b_mask"):
            batch[key] = (torch.rand(count, 1, SIZE, SIZE, generator=generator) < 0.4).float()
    return batch


# A mixed batch: R's chunk (the paired examples) and a chunk without R in one noisy step.
MIXED = [1.0, 0.0, 1.0]


def _capture(trainer: CycleGANTrainer) -> dict[str, list[torch.Tensor]]:
    """Record each network's privatised gradient (after clip, sum, noise, scale) at every step."""
    seen: dict[str, list[torch.Tensor]] = {}

    def hook(name: str) -> Callable[[DPOptimizer], None]:
        def record(optimizer: DPOptimizer) -> None:
            seen[name] = [p.grad.detach().clone() for p in optimizer.params]

        return record

    for name, optimizer in trainer.optimizers.items():
        assert isinstance(optimizer, DPOptimizer)
        optimizer.attach_step_hook(hook(name))
    return seen


def _per_example_grads(
    trainer: CycleGANTrainer, batch: dict[str, torch.Tensor]
) -> dict[str, list[list[torch.Tensor]]]:
    """Each example's gradient, one autograd call per example, on plain (unwrapped) networks.

    ``trainer`` is a non-private trainer with the private one's initial weights.
    """
    grads: dict[str, list[list[torch.Tensor]]] = {name: [] for name in trainer.nets}
    generators = [n for n in trainer.nets if not n.startswith("d_")]
    for i in range(batch["a"].shape[0]):
        one = {key: value[i : i + 1] for key, value in batch.items()}
        a, b = one["a"], one["b"]
        objective = trainer.generator_loss(one)
        loss, fake_a, fake_b = objective.loss, objective.fake_a, objective.fake_b
        for name in generators:
            params = list(trainer.nets[name].parameters())
            got = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            # R has no part in an unpaired example's loss: its gradient there is zero.
            grads[name].append(
                [torch.zeros_like(p) if g is None else g for p, g in zip(params, got, strict=True)]
            )
        for name, real, fake in (("d_b", b, fake_b.detach()), ("d_a", a, fake_a.detach())):
            params = list(trainer.nets[name].parameters())
            loss_d = trainer.discriminator_loss(name, real, fake)
            grads[name].append(list(torch.autograd.grad(loss_d, params)))
    return grads


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


@pytest.mark.parametrize("registration", [False, True])
@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_clipped_sum_equals_a_batch_of_one_loop(registration: bool, clip: float) -> None:
    """Opacus' clipped per-sample sum (noise 0) against clipping each example's own gradient.

    ``clip = 0.05`` clips every example; ``1e6`` clips none, so the per-sample gradients
    themselves (three uses of each generator per step) are checked too. With registration the
    batch mixes paired and unpaired examples (two chunks of one noisy step, R in one of them).
    """
    batch = _examples(BATCH, paired=MIXED) if registration else _examples(BATCH)
    private = _private(_privacy(max_grad_norm=clip), registration=registration)
    plain = CycleGANTrainer(TINY, _training(), SIZE, registration=registration)
    reference = _per_example_grads(plain, batch)
    seen = _capture(private)
    private.train_step(batch)

    assert set(seen) == set(private.nets)
    for name, per_example in reference.items():
        clipped = []
        for grad in per_example:
            norm = _norm(grad)
            factor = min(1.0, clip / norm) if norm > 0 else 1.0
            assert norm * factor <= clip * (1 + 1e-6), name
            clipped.append([g.double() * factor for g in grad])
        if clip < 1:
            # Every example is clipped, except R's unpaired ones: exactly zero, R never saw them.
            unpaired = {i for i, p in enumerate(MIXED) if not p} if name == "r" else set()
            assert all(_norm(g) == 0 for i, g in enumerate(per_example) if i in unpaired), name
            assert all(_norm(g) > clip for i, g in enumerate(per_example) if i not in unpaired), (
                f"{name}: no clipping happened"
            )
        expected = [sum(parts) / BATCH for parts in zip(*clipped, strict=True)]
        for got, want in zip(seen[name], expected, strict=True):
            # float32 sums of many terms: tolerance relative to the tensor's scale
            scale = float(want.abs().max())
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_each_clipped_example_is_within_the_bound() -> None:
    """One example at a time with no noise: the privatised gradient is that example, clipped."""
    clip = 0.05
    private = _private(_privacy(max_grad_norm=clip))
    seen = _capture(private)
    batch = _examples(4, seed=1)
    for i in range(4):
        private.train_step({"a": batch["a"][i : i + 1], "b": batch["b"][i : i + 1]})
        for name, grads in seen.items():
            # p.grad = clipped / expected batch size
            assert _norm(grads) * BATCH <= clip * (1 + 1e-5), name
            assert _norm(grads) * BATCH > 0.5 * clip, f"{name}: expected an active clip"


def test_one_more_example_moves_each_update_by_at_most_the_bound() -> None:
    """Same seeds and noise draws, batches B and B + {x}: per step, per network, <= C."""
    clip = 0.05
    batch = _examples(BATCH + 1, seed=2)
    smaller = {k: v[:BATCH] for k, v in batch.items()}
    sums = []
    for data in (smaller, batch):
        private = _private(_privacy(max_grad_norm=clip, noise_multiplier=1.3))
        seen = _capture(private)
        torch.manual_seed(11)  # the noise draws
        private.train_step(data)
        sums.append({n: [g * BATCH for g in grads] for n, grads in seen.items()})
    for name in sums[0]:
        difference = [b - a for a, b in zip(sums[0][name], sums[1][name], strict=True)]
        moved = _norm(difference)
        assert moved <= clip * (1 + 1e-5), name
        assert moved > 0.5 * clip, f"{name}: the extra example should count"


def test_every_trainable_parameter_is_under_per_sample_processing() -> None:
    """Fails if a network (or a parameter) that reads a real image escapes DP-SGD."""
    private = _private(_privacy(), registration=True)
    # Every network the model factory builds is in the trainer, and nothing else is.
    built = define_cyclegan(TINY, SIZE, seed=0, registration=True)
    assert set(private.nets) == set(built)
    modules = {id(m) for m in private.nets.values()}
    for attribute, value in vars(private).items():
        if isinstance(value, nn.Module):
            assert id(value) in modules, f"trainer.{attribute} is a network outside DP-SGD"
    grad_samples: dict[str, list[bool]] = {}

    def hook(name: str) -> Callable[[DPOptimizer], None]:
        def record(optimizer: DPOptimizer) -> None:
            grad_samples[name] = [p.summed_grad is not None for p in optimizer.params]

        return record

    for name, net in private.nets.items():
        assert isinstance(net, GradSampleModule), name
        optimizer = private.optimizers[name]
        assert isinstance(optimizer, DPOptimizer), name
        trainable = [p for p in unwrap(net).parameters() if p.requires_grad]
        assert {id(p) for p in optimizer.params} == {id(p) for p in trainable}, name
        assert optimizer.noise_multiplier == private.plan.noise_multiplier  # type: ignore[union-attr]
        optimizer.attach_step_hook(hook(name))
    private.train_step(_examples(BATCH, paired=MIXED))  # R gets the paired examples
    assert set(grad_samples) == set(private.nets)
    for name, flags in grad_samples.items():
        assert flags and all(flags), f"{name}: a parameter got no per-sample gradient"


def test_dp_turns_the_image_pool_off_and_an_empty_batch_still_noises() -> None:
    private = _private(_privacy(noise_multiplier=1.0), pool_size=50)
    assert all(pool.size == 0 for pool in private.pools.values())
    before = {
        n: [p.detach().clone() for p in unwrap(m).parameters()] for n, m in private.nets.items()
    }
    private.train_step({"a": torch.zeros(0, 1, SIZE, SIZE), "b": torch.zeros(0, 1, SIZE, SIZE)})
    assert private.accountant is not None and private.accountant.steps == 1
    for name, net in private.nets.items():
        after = list(unwrap(net).parameters())
        assert any(not torch.equal(x, y) for x, y in zip(before[name], after, strict=True)), name


@pytest.mark.parametrize(
    ("layer", "sampler"),
    [
        (nn.Conv2d(3, 5, 7, stride=1, padding=3, bias=True), conv2d_grad_sample),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, bias=False), conv2d_grad_sample),
        (nn.Conv2d(2, 3, 4, stride=2, padding=1, dilation=2, bias=True), conv2d_grad_sample),
        (
            nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, bias=True),
            conv_transpose2d_grad_sample,
        ),
        (
            nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1, bias=False),
            conv_transpose2d_grad_sample,
        ),
    ],
)
def test_grouped_convolution_samplers_match_a_loop(
    layer: nn.Module, sampler: Callable[..., dict[nn.Parameter, torch.Tensor]]
) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, layer.in_channels, 12, 12, dtype=torch.float64)
    layer = layer.double()
    grad_out = torch.randn_like(layer(x))
    got = sampler(layer, [x], grad_out)
    for i in range(3):
        params = [p for p in layer.parameters()]
        want = torch.autograd.grad((layer(x[i : i + 1]) * grad_out[i : i + 1]).sum(), params)
        for param, expected in zip(params, want, strict=True):
            torch.testing.assert_close(got[param][i], expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------- accounting


def _opacus_rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=RDP_ORDERS)
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def test_one_accountant_step_per_batch_with_the_joint_noise() -> None:
    privacy = _privacy(noise_multiplier=1.2, accountant="rdp")
    private = _private(privacy)
    for i in range(3):
        private.train_step(_examples(BATCH, seed=i))
    plan = private.plan
    assert plan is not None and plan.networks == 4
    assert private.accountant is not None and private.accountant.steps == 3
    # Four releases on one Poisson batch = one subsampled Gaussian with sigma / sqrt(4).
    expected = _opacus_rdp_epsilon(1.2 / 2, BATCH / 30, 3, privacy.delta)
    assert private.epsilon() == pytest.approx(expected, rel=1e-12)
    # Counting the four as independent subsampled mechanisms would claim less:
    naive = _opacus_rdp_epsilon(1.2, BATCH / 30, 12, privacy.delta)
    assert naive < expected


def test_target_epsilon_calibration_is_reached_over_the_planned_steps() -> None:
    privacy = PrivacyConfig(enabled=True, target_epsilon=4.0, delta=1e-5, accountant="rdp")
    plan = plan_noise(
        privacy,
        examples=200,
        batch_size=8,
        networks=5,
        steps_per_round=None,
        epochs_per_round=2,
        rounds=3,
    )
    assert plan.sample_rate == 8 / 200
    assert plan.steps_per_round == 2 * 25 and plan.planned_steps == 150
    eps = _opacus_rdp_epsilon(plan.noise_multiplier / math.sqrt(5), 0.04, 150, 1e-5)
    assert 3.98 <= eps <= 4.0
    effective = get_noise_multiplier(
        target_epsilon=4.0, target_delta=1e-5, sample_rate=0.04, steps=150, accountant="rdp"
    )
    assert plan.effective_noise == pytest.approx(effective, rel=0.02)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_accountant_state_round_trips_and_composes(mechanism: str) -> None:
    plan = NoisePlan(0.05, 1.6, 4, 10, 30, 80)
    whole = SiteAccountant(mechanism, 1e-5)
    for _ in range(20):
        whole.step(plan)
    first = SiteAccountant(mechanism, 1e-5)
    for _ in range(10):
        first.step(plan)
    resumed = SiteAccountant(mechanism, 1e-5)
    resumed.load_state_dict(first.state_dict())
    for _ in range(10):
        resumed.step(plan)
    assert resumed.epsilon() == pytest.approx(whole.epsilon(), abs=1e-6)
    assert first.epsilon(10, plan) == pytest.approx(whole.epsilon(), abs=1e-6)
    with pytest.raises(ValueError, match="cannot change during a run"):
        SiteAccountant("rdp" if mechanism == "prv" else "prv", 1e-5).load_state_dict(
            first.state_dict()
        )


def test_budget_check_refuses_the_round_that_would_pass_it() -> None:
    plan = NoisePlan(0.05, 1.0, 4, 20, 60, 80)
    accountant = SiteAccountant("rdp", 1e-5)
    one_round = _opacus_rdp_epsilon(0.5, 0.05, 20, 1e-5)
    two_rounds = _opacus_rdp_epsilon(0.5, 0.05, 40, 1e-5)
    budget = (one_round + two_rounds) / 2
    assert check_budget(accountant, plan, budget) == pytest.approx(one_round)
    for _ in range(20):
        accountant.step(plan)
    with pytest.raises(BudgetSpentError, match=r"privacy\.budget_epsilon"):
        check_budget(accountant, plan, budget)


def test_patient_epsilon_is_the_group_bound_and_grows_with_the_group() -> None:
    plan = NoisePlan(0.02, 2.0, 4, 50, 50, 200)
    single = patient_epsilon(plan, 50, 1, 1e-5)
    assert single == pytest.approx(_opacus_rdp_epsilon(1.0, 0.02, 50, 1e-5), rel=1e-9)
    group = patient_epsilon(plan, 50, 5, 1e-5)
    q5 = 1 - 0.98**5
    assert group == pytest.approx(_opacus_rdp_epsilon(1.0 / 5, q5, 50, 1e-5), rel=1e-9)
    assert group > single


def test_fedprox_term_is_added_to_the_private_gradient_after_the_noise() -> None:
    """Under DP the data-free proximal gradient mu (w - w_round) joins the noisy gradient."""
    mu = 0.7
    grads = []
    for proximal in (0.0, mu):
        private = _private(_privacy(noise_multiplier=0.5))
        private.set_proximal(proximal)
        with torch.no_grad():  # move G_AB away from the round's weights, the same way each time
            for p in unwrap(private.nets["g_ab"]).parameters():
                p.add_(0.01)
        optimizer = private.optimizers["g_ab"]
        assert isinstance(optimizer, DPOptimizer)
        seen: list[torch.Tensor] = []
        inner_step = optimizer.original_optimizer.step

        def record(
            *args: object,
            _seen: list[torch.Tensor] = seen,
            _optimizer: DPOptimizer = optimizer,
            _step: Callable[..., object] = inner_step,
            **kwargs: object,
        ) -> object:
            _seen.extend(p.grad.detach().clone() for p in _optimizer.params)
            return _step(*args, **kwargs)

        optimizer.original_optimizer.step = record  # type: ignore[method-assign]
        torch.manual_seed(3)
        private.train_step(_examples(BATCH))
        grads.append(seen)
    for plain, proximal in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(proximal - plain, torch.full_like(plain, mu * 0.01))
