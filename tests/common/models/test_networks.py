"""Networks: shapes, the PatchGAN receptive field, RegGAN's identity start, and Opacus DP-SGD."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsynth.common.config import ModelConfig
from fedsynth.common.losses import (
    cycle_loss,
    discriminator_loss,
    generator_adversarial_loss,
    identity_loss,
    registration_correction_loss,
    smoothness_loss,
)
from fedsynth.common.models import (
    PatchDiscriminator,
    RegistrationNet,
    count_parameters,
    define_discriminator,
    define_generator,
    define_registration,
    flow_to_pixels,
    init_weights,
    patch_receptive_field,
    warp,
)
from fedsynth.common.privacy.grad_samplers import install_grad_samplers

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning"),
    # Opacus' backward hooks fire on the first layer although the images need no gradient.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
]

SIZE = 32
install_grad_samplers()  # as the product does before wrapping (the intensity prior's sampler)
TINY = ModelConfig(ngf=8, n_blocks=2, ndf=8, d_layers=2, unet_depth=3, registration_filters=4)
CONV = (nn.Conv2d, nn.ConvTranspose2d)


def tiny(**changes: object) -> ModelConfig:
    return TINY.model_copy(update=changes)


NETWORKS: dict[str, Callable[[], nn.Module]] = {
    "resnet": lambda: define_generator(tiny(generator="resnet"), SIZE, seed=0),
    "unet": lambda: define_generator(tiny(generator="unet"), SIZE, seed=0),
    "resnet-prior": lambda: define_generator(
        tiny(generator="resnet", intensity_prior=9), SIZE, seed=0
    ),
    "patch-d1": lambda: define_discriminator(tiny(d_layers=1), seed=0),
    "patch-d2": lambda: define_discriminator(tiny(d_layers=2), seed=0),
    "patch-d3": lambda: define_discriminator(tiny(d_layers=3), seed=0),
    "registration": lambda: define_registration(TINY, seed=0),
}


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", ["resnet", "unet"])
@pytest.mark.parametrize("shape", [(32, 32), (48, 48), (64, 40)])
def test_generator_keeps_size_and_tanh_range(kind: str, shape: tuple[int, int]) -> None:
    net = define_generator(tiny(generator=kind), SIZE, seed=0)
    x = torch.randn(2, 1, *shape) * 50  # large inputs saturate tanh: still within [-1, 1]
    with torch.no_grad():
        out = net(x)
    assert out.shape == x.shape
    assert out.min() >= -1.0
    assert out.max() <= 1.0
    assert out.std() > 0


def test_generator_channels() -> None:
    net = define_generator(TINY, SIZE, in_channels=2, out_channels=3)
    assert net(torch.randn(1, 2, SIZE, SIZE)).shape == (1, 3, SIZE, SIZE)


def test_unet_size_error_names_image_size_and_depth() -> None:
    with pytest.raises(ValueError, match=r"image_size = 36, unet_depth = 3"):
        define_generator(tiny(generator="unet"), 36)
    net = define_generator(tiny(generator="unet"), SIZE)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*unet_depth = 8"):
        net(torch.randn(1, 1, 36, 36))


def test_resnet_size_error() -> None:
    with pytest.raises(ValueError, match="divisible by 4, found 30"):
        define_generator(TINY, 30)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_discriminator_output_shape(layers: int) -> None:
    net = define_discriminator(tiny(d_layers=layers))
    scores = net(torch.randn(2, 1, 64, 64))
    side = 64 // 2**layers - 2  # stride-2 4x4 convs halve; each stride-1 4x4 conv loses 1
    assert scores.shape == (2, 1, side, side)


# --------------------------------------------------------------------------- receptive field


def _receptive_region(layers: int) -> torch.Tensor:
    """Input pixels that one central output score depends on, with positive constant weights.

    Instance normalisation mixes all pixels of a channel (its mean and variance), so it is
    replaced by the identity: what is measured is the convolutions' geometric patch.
    """
    net = PatchDiscriminator(1, ndf=4, n_layers=layers).double()
    for block in net.modules():
        if isinstance(block, nn.Sequential):
            for index, child in enumerate(block):
                if isinstance(child, nn.InstanceNorm2d):
                    block[index] = nn.Identity()
    with torch.no_grad():
        for conv in net.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight.fill_(1.0 / conv.weight[0].numel())
                if conv.bias is not None:
                    conv.bias.fill_(0.0)
    size = 2 * patch_receptive_field(layers)
    image = torch.ones(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    scores = net(image)
    centre = scores.shape[-1] // 2
    scores[0, 0, centre, centre].backward()
    assert image.grad is not None
    return image.grad[0, 0] != 0


@pytest.mark.parametrize(("layers", "expected"), [(1, 16), (2, 34), (3, 70)])
def test_patch_receptive_field(layers: int, expected: int) -> None:
    assert patch_receptive_field(layers) == expected
    region = _receptive_region(layers)
    rows = region.any(dim=1).nonzero().flatten()
    cols = region.any(dim=0).nonzero().flatten()
    assert rows[-1] - rows[0] + 1 == expected
    assert cols[-1] - cols[0] + 1 == expected
    assert int(region.sum()) == expected * expected  # a full square
    assert int(rows[0]) > 0 and int(rows[-1]) < region.shape[0] - 1  # not clipped by a border


# --------------------------------------------------------------------------- Opacus structure


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_opacus_validator_accepts(name: str) -> None:
    assert ModuleValidator.validate(NETWORKS[name](), strict=True) == []


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_no_inplace_no_batchnorm_no_dead_bias(name: str) -> None:
    net = NETWORKS[name]()
    norms = 0
    for module in net.modules():
        assert not getattr(module, "inplace", False), f"{module} is in place"
        assert not isinstance(module, nn.modules.batchnorm._BatchNorm)
        if isinstance(module, nn.InstanceNorm2d):
            norms += 1
            assert not module.track_running_stats
            assert module.affine
        if isinstance(module, nn.Sequential):
            for before, after in zip(module, list(module)[1:], strict=False):
                if isinstance(before, CONV) and isinstance(after, nn.InstanceNorm2d):
                    assert before.bias is None, f"{before} feeds an affine IN but has a bias"
    assert norms > 0


# --------------------------------------------------------------------------- DP-SGD


TrainingLoss = Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]


def _training_loss(name: str) -> TrainingLoss:
    """The loss a network is trained with, on a batch of two image tensors."""
    if name.startswith("patch"):

        def d_loss(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            real, fake = batch
            return discriminator_loss("lsgan", net(real), net(fake))

        return d_loss
    if name == "registration":

        def r_loss(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
            moving, fixed = batch
            warped, flow = net(moving, fixed)
            return registration_correction_loss(warped, fixed) + smoothness_loss(flow)

        return r_loss

    def g_loss(net: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        a, b = batch
        return cycle_loss(net(a), b) + identity_loss(net(b), b)

    return g_loss


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_one_dp_sgd_step(name: str, mode: str) -> None:
    torch.manual_seed(0)
    net = NETWORKS[name]()
    loss_fn = _training_loss(name)
    data = TensorDataset(*(torch.rand(4, 1, SIZE, SIZE) * 2 - 1 for _ in range(2)))
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=2),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    batch = next(iter(loader))
    optimizer.zero_grad(set_to_none=True)
    loss_fn(private, tuple(batch)).backward()
    for param_name, param in net.named_parameters():
        grad_sample = getattr(param, "grad_sample", None)
        assert grad_sample is not None, f"{param_name} has no per-sample gradient"
        assert grad_sample.shape == (2, *param.shape), param_name
    optimizer.step()
    for param_name, param in net.named_parameters():
        assert not torch.equal(param, before[param_name]), f"{param_name} did not change"
    assert engine.get_epsilon(delta=1e-5) > 0


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize(("kind", "prior"), [("resnet", 0), ("unet", 0), ("unet", 9)])
def test_per_sample_gradients_of_a_generator_used_three_times(
    kind: str, prior: int, mode: str
) -> None:
    """CycleGAN runs G_AB three times a step: G_AB(a), G_AB(G_BA(b)), G_AB(b).

    Opacus' per-sample gradients (summed over the three uses) must match the gradients of each
    example's own loss computed one example at a time.
    """
    config = tiny(generator=kind, intensity_prior=prior)
    g_ab = define_generator(config, SIZE, seed=1).double()
    g_ba = define_generator(config, SIZE, seed=2).double()
    d_b = define_discriminator(config, seed=3).double()
    reference = copy.deepcopy(g_ab)
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, SIZE, SIZE, dtype=torch.float64, generator=generator) * 2 - 1
    b = torch.rand(3, 1, SIZE, SIZE, dtype=torch.float64, generator=generator) * 2 - 1

    def loss_of(g: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fake_b = g(a)
        return (
            generator_adversarial_loss("lsgan", d_b(fake_b))
            + 10 * cycle_loss(g_ba(fake_b), a)
            + 10 * cycle_loss(g(g_ba(b)), b)
            + 5 * identity_loss(g(b), b)
        )

    wrapped = GradSampleModule(g_ab, loss_reduction="mean", force_functorch=mode == "functorch")
    loss_of(wrapped, a, b).backward()

    params = list(reference.parameters())
    worst = 0.0
    largest = 0.0
    for index in range(a.shape[0]):
        grads = torch.autograd.grad(
            loss_of(reference, a[index : index + 1], b[index : index + 1]), params
        )
        for (name, param), expected in zip(g_ab.named_parameters(), grads, strict=True):
            found = param.grad_sample[index]  # type: ignore[attr-defined]  # set by Opacus
            worst = max(worst, float((found - expected).abs().max()))
            largest = max(largest, float(expected.abs().max()))
            assert torch.allclose(found, expected, atol=1e-5, rtol=0), name
    logging.getLogger(__name__).info("largest per-sample gradient error: %.3g", worst)
    assert worst < 1e-5
    assert largest > 1e-3  # the gradients compared are not trivially zero


# --------------------------------------------------------------------------- registration


def test_registration_starts_at_identity() -> None:
    net = define_registration(TINY, seed=0)
    init_weights(net, seed=5)  # re-initialising keeps the zero head
    moving, fixed = torch.randn(2, 1, SIZE, SIZE), torch.randn(2, 1, SIZE, SIZE)
    warped, flow = net(moving, fixed)
    assert flow.shape == (2, 2, SIZE, SIZE)
    assert torch.count_nonzero(flow) == 0
    torch.testing.assert_close(warped, moving, atol=1e-5, rtol=0)
    torch.testing.assert_close(warp(moving, torch.zeros_like(flow)), moving, atol=1e-5, rtol=0)


def test_registration_any_size() -> None:
    net = RegistrationNet(1, filters=4)
    warped, flow = net(torch.randn(1, 1, 30, 22), torch.randn(1, 1, 30, 22))
    assert warped.shape == (1, 1, 30, 22)
    assert flow.shape == (1, 2, 30, 22)
    with pytest.raises(ValueError, match="same shape"):
        net(torch.randn(1, 1, 30, 22), torch.randn(1, 1, 30, 20))


def test_constant_flow_shifts_by_whole_pixels() -> None:
    """out[p] = image[p + flow(p)]: +2k/W along x moves content k pixels towards smaller x."""
    height, width, k = 12, 16, 3
    image = torch.randn(1, 1, height, width, dtype=torch.float64)
    flow = torch.zeros(1, 2, height, width, dtype=torch.float64)
    flow[:, 0] = 2 * k / width
    out = warp(image, flow)
    torch.testing.assert_close(out[..., : width - k], image[..., k:], atol=1e-5, rtol=0)
    border = image[..., -1:].expand(-1, -1, -1, k)  # border padding repeats the last column
    torch.testing.assert_close(out[..., width - k :], border, atol=1e-5, rtol=0)

    flow = torch.zeros(1, 2, height, width, dtype=torch.float64)
    flow[:, 1] = -2 * k / height  # negative y: content moves k pixels down (larger y)
    out = warp(image, flow)
    torch.testing.assert_close(out[..., k:, :], image[..., : height - k, :], atol=1e-5, rtol=0)

    flow = torch.zeros(1, 2, height, width, dtype=torch.float64)
    flow[:, 0] = 1.0 / width  # half a pixel: bilinear mean of neighbours
    out = warp(image, flow)
    expected = 0.5 * (image[..., :-1] + image[..., 1:])
    torch.testing.assert_close(out[..., :-1], expected, atol=1e-5, rtol=0)

    pixels = flow_to_pixels(torch.full((1, 2, height, width), 2 * k / width))
    assert torch.allclose(pixels[:, 0], torch.tensor(float(k)))
    assert torch.allclose(pixels[:, 1], torch.tensor(k * height / width))


# --------------------------------------------------------------------------- init and counts


def test_init_weights_is_seeded_normal_002() -> None:
    first = define_generator(TINY, SIZE, seed=7)
    second = define_generator(TINY, SIZE, seed=7)
    third = define_generator(TINY, SIZE, seed=8)
    for p, q in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)
    assert any(
        not torch.equal(p, q) for p, q in zip(first.parameters(), third.parameters(), strict=True)
    )
    weights = torch.cat(
        [m.weight.detach().flatten() for m in first.modules() if isinstance(m, CONV)]
    )
    assert abs(float(weights.std()) - 0.02) < 0.002
    for module in first.modules():
        if isinstance(module, nn.InstanceNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_count_parameters() -> None:
    conv = nn.Conv2d(1, 2, kernel_size=3)
    assert count_parameters(conv) == 2 * 9 + 2
    assert conv.bias is not None
    conv.bias.requires_grad_(False)
    assert count_parameters(conv, trainable_only=True) == 18
    # The paper-sized ResNet generator (Zhu et al.: 11.378 M with 3 channels, biases and
    # non-affine IN) has 11 370 881 parameters with one channel, no dead biases and affine IN.
    assert count_parameters(define_generator(ModelConfig(), 256)) == 11_370_881
