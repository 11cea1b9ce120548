"""Build a run's networks from its :class:`~fedsynth.common.config.ModelConfig`, initialised as in
CycleGAN.

Code names and the names of Zhu et al. (ICCV 2017), for domains A (source) and B (target):

=========  ===========  =====================================================
code       paper        role
=========  ===========  =====================================================
``G_AB``   G            generator A -> B (the synthesis model that is shipped)
``G_BA``   F            generator B -> A
``D_B``    D_Y          discriminator of domain B: real b vs G_AB(a)
``D_A``    D_X          discriminator of domain A: real a vs G_BA(b)
``R``      R (RegGAN)   registration network of Kong et al. (NeurIPS 2021)
=========  ===========  =====================================================
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from fedsynth.common.config import ModelConfig
from fedsynth.common.models.discriminators import PatchDiscriminator
from fedsynth.common.models.generators import ResnetGenerator, UnetGenerator, check_unet_size
from fedsynth.common.models.intensity import PriorGenerator
from fedsynth.common.models.registration import RegistrationNet

__all__ = [
    "count_parameters",
    "define_discriminator",
    "define_generator",
    "define_registration",
    "freeze_encoder",
    "init_weights",
]

logger = logging.getLogger(__name__)

_INITIALISED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def init_weights(module: nn.Module, gain: float = 0.02, seed: int | None = None) -> nn.Module:
    """Initialise weights from N(0, ``gain``) and biases to 0, as Zhu et al. (2017) do.

    Affine normalisation layers start at scale 1 and shift 0. A :class:`RegistrationNet` keeps
    its zero last layer (it must start at the identity).

    Args:
        module: The network, initialised in place.
        gain: Standard deviation of the normal weights (Zhu et al.: 0.02).
        seed: Seed of a private generator (the global torch RNG is left alone); ``None`` uses and
            advances the global RNG.

    Returns:
        ``module``, for chaining.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, _INITIALISED):
                # Drawn on the CPU so that a seed gives the same weights on any device.
                weights = torch.empty(layer.weight.shape, dtype=layer.weight.dtype)
                weights.normal_(0.0, gain, generator=generator)
                layer.weight.copy_(weights)
                if layer.bias is not None:
                    layer.bias.zero_()
            elif isinstance(layer, nn.InstanceNorm2d | nn.GroupNorm | nn.LayerNorm):
                if layer.weight is not None:
                    layer.weight.fill_(1.0)
                if layer.bias is not None:
                    layer.bias.zero_()
        for layer in module.modules():
            if isinstance(layer, RegistrationNet):
                layer.reset_flow_head()
    return module


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (only those requiring grad if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def define_generator(
    config: ModelConfig,
    image_size: int,
    in_channels: int = 1,
    out_channels: int = 1,
    *,
    seed: int | None = None,
) -> nn.Module:
    """A generator (G_AB or G_BA) as configured: ResNet (default) or U-Net.

    Args:
        config: ``generator``, ``ngf``, ``n_blocks``, ``unet_depth`` are read.
        image_size: Height = width of the slices (``DataConfig.image_size``), checked against
            the architecture: divisible by 4 (ResNet) or by ``2**unet_depth`` (U-Net).
        in_channels: Channels of the input image.
        out_channels: Channels of the output image.
        seed: Seed of the N(0, 0.02) initialisation (see :func:`init_weights`).

    Raises:
        ValueError: if ``image_size`` does not suit the architecture.
    """
    net: nn.Module
    prior = config.intensity_prior > 0
    body_in = in_channels + 1 if prior else in_channels
    if prior and in_channels != 1:
        raise ValueError("model.intensity_prior maps one channel: it needs in_channels = 1")
    if config.generator == "unet":
        check_unet_size(image_size, config.unet_depth)
        net = UnetGenerator(body_in, out_channels, ngf=config.ngf, depth=config.unet_depth)
    elif config.generator == "resnet":
        if image_size % 4:
            raise ValueError(
                f"the ResNet generator needs image_size divisible by 4, found {image_size}"
            )
        net = ResnetGenerator(body_in, out_channels, ngf=config.ngf, n_blocks=config.n_blocks)
    else:  # pragma: no cover - ModelConfig only allows the two above
        raise ValueError(f"unknown generator {config.generator!r}; allowed: resnet, unet")
    if prior:
        net = PriorGenerator(net, knots=config.intensity_prior)
    init_weights(net, seed=seed)
    logger.debug("generator %s: %d parameters", type(net).__name__, count_parameters(net))
    return net


def define_discriminator(
    config: ModelConfig, in_channels: int = 1, *, seed: int | None = None
) -> nn.Module:
    """A PatchGAN discriminator (D_A or D_B) with ``ndf`` filters and ``d_layers`` layers."""
    net = PatchDiscriminator(in_channels, ndf=config.ndf, n_layers=config.d_layers)
    init_weights(net, seed=seed)
    logger.debug(
        "discriminator: %dx%d patches, %d parameters",
        net.receptive_field,
        net.receptive_field,
        count_parameters(net),
    )
    return net


def define_registration(config: ModelConfig, *, seed: int | None = None) -> RegistrationNet:
    """RegGAN's registration network R with ``registration_filters`` filters, at the identity."""
    net = RegistrationNet(1, filters=config.registration_filters)
    init_weights(net, seed=seed)
    return net


def define_cyclegan(
    config: ModelConfig, image_size: int, *, seed: int, registration: bool = False
) -> dict[str, nn.Module]:
    """The CycleGAN networks (``g_ab``, ``g_ba``, ``d_a``, ``d_b``, and ``r`` if asked), seeded.

    The same seed gives the same weights wherever it runs, so a coordinator and every site start
    from identical networks. R keeps its zero-initialised last layer (identity at the start).
    """
    torch.manual_seed(seed)
    nets: dict[str, nn.Module] = {
        "g_ab": define_generator(config, image_size),
        "g_ba": define_generator(config, image_size),
        "d_a": define_discriminator(config),
        "d_b": define_discriminator(config),
    }
    if registration:
        nets["r"] = define_registration(config)
    for offset, (name, net) in enumerate(nets.items()):
        if name != "r":
            init_weights(net, seed=seed + offset)
    return nets


def freeze_encoder(generator: nn.Module) -> int:
    """Keep a U-Net generator's encoder at its weights; return how many parameters still train.

    What trains: the up-sampling path, every normalisation layer (also the encoder's) and the
    intensity prior, the parts that set contrast and intensity (what a new site's data shifts
    most) with about half the weights. For DP fine-tuning of a warm start: fewer private
    parameters, so less noise in all (``privacy.trainable = "decoder"``).

    Raises:
        ValueError: if the generator is not a U-Net (the ResNet has no decoder to name).
    """
    body = generator.body if isinstance(generator, PriorGenerator) else generator
    if not isinstance(body, UnetGenerator):
        raise ValueError(
            f"privacy.trainable = 'decoder' needs model.generator = 'unet', this generator is a "
            f"{type(body).__name__}"
        )
    for module in body.down.modules():
        if not isinstance(module, nn.InstanceNorm2d):
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
    return sum(p.numel() for p in generator.parameters() if p.requires_grad)
