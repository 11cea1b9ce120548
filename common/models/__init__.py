"""Networks of fedsynth: CycleGAN generators, PatchGAN discriminators, RegGAN's registration net.

Build them with :func:`define_generator`, :func:`define_discriminator` and
:func:`define_registration`; every one is Opacus-compatible (DP-SGD) as built.
"""

from __future__ import annotations

from fedsynth.common.models.discriminators import PatchDiscriminator, patch_receptive_field
from fedsynth.common.models.factory import (
    count_parameters,
    define_cyclegan,
    define_discriminator,
    define_generator,
    define_registration,
    freeze_encoder,
    init_weights,
)
from fedsynth.common.models.generators import ResidualBlock, ResnetGenerator, UnetGenerator
from fedsynth.common.models.registration import RegistrationNet, flow_to_pixels, identity_grid, warp

__all__ = [
    "PatchDiscriminator",
    "RegistrationNet",
    "ResidualBlock",
    "ResnetGenerator",
    "UnetGenerator",
    "count_parameters",
    "define_cyclegan",
    "define_discriminator",
    "define_generator",
    "define_registration",
    "flow_to_pixels",
    "freeze_encoder",
    "identity_grid",
    "init_weights",
    "patch_receptive_field",
    "warp",
]
