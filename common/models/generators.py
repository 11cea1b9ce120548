"""CycleGAN generators: the ResNet generator of Zhu et al. (2017) and a pix2pix-style U-Net.

Both are Opacus-compatible by construction (no BatchNorm, no running statistics, nothing in place).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "ResidualBlock",
    "ResnetGenerator",
    "UnetGenerator",
    "check_unet_size",
    "instance_norm",
]


def instance_norm(channels: int) -> nn.InstanceNorm2d:
    """The one normalisation of every fedsynth network.

    Affine (a learnt per-channel scale and shift) and without running statistics: Opacus rejects
    BatchNorm (it mixes the examples of a batch) and InstanceNorm that tracks running statistics
    (they would be a second, unaccounted release of the data). A convolution right before it
    needs no bias: the normalisation subtracts the per-channel mean, so that bias's gradient is
    exactly zero (under DP-SGD it would only collect noise).
    """
    return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)


class ResidualBlock(nn.Module):
    """``x + F(x)`` with F = pad, 3x3 conv, IN, ReLU, pad, 3x3 conv, IN (He et al. 2016).

    Reflection padding as in Zhu et al. (2017) avoids border artefacts; the sum is out of place,
    because Opacus' backward hooks need every activation they saw to stay unmodified.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3, bias=False),
            instance_norm(channels),
            nn.ReLU(inplace=False),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, kernel_size=3, bias=False),
            instance_norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """ResNet generator of CycleGAN (Zhu et al., ICCV 2017, after Johnson et al., ECCV 2016).

    c7s1-ngf, d(2 ngf), d(4 ngf), ``n_blocks`` x R(4 ngf), u(2 ngf), u(ngf), c7s1-out, tanh.
    Two stride-2 down-samplings: the height and width must be divisible by 4, and then the output
    has the input's size. Zhu et al. use 9 blocks at 256x256 and 6 at 128x128.

    Args:
        in_channels: Channels of the input image (1 for one MR contrast).
        out_channels: Channels of the output image.
        ngf: Filters of the first layer (Zhu et al.: 64).
        n_blocks: Residual blocks at the bottleneck (Zhu et al.: 9).
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 1, *, ngf: int = 64, n_blocks: int = 9
    ) -> None:
        super().__init__()
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be at least 1, found {n_blocks}")
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, kernel_size=7, bias=False),
            instance_norm(ngf),
            nn.ReLU(inplace=False),
        ]
        channels = ngf
        for _ in range(2):  # down-sampling: d(2 ngf), d(4 ngf)
            layers += [
                nn.Conv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False),
                instance_norm(2 * channels),
                nn.ReLU(inplace=False),
            ]
            channels *= 2
        layers += [ResidualBlock(channels) for _ in range(n_blocks)]
        for _ in range(2):  # up-sampling: u(2 ngf), u(ngf)
            layers += [
                nn.ConvTranspose2d(
                    channels,
                    channels // 2,
                    kernel_size=3,
                    stride=2,
                    padding=1,
                    output_padding=1,
                    bias=False,
                ),
                instance_norm(channels // 2),
                nn.ReLU(inplace=False),
            ]
            channels //= 2
        layers += [
            nn.ReflectionPad2d(3),
            nn.Conv2d(channels, out_channels, kernel_size=7),
            nn.Tanh(),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if height % 4 or width % 4:
            raise ValueError(
                f"the ResNet generator needs height and width divisible by 4, "
                f"found {height}x{width}"
            )
        return self.model(x)


def check_unet_size(image_size: int, depth: int) -> None:
    """Raise a ``ValueError`` unless ``image_size`` is divisible by ``2**depth``."""
    if image_size < 1 or image_size % (2**depth):
        raise ValueError(
            f"the U-Net generator needs image_size divisible by 2**unet_depth: "
            f"image_size = {image_size}, unet_depth = {depth} (2**{depth} = {2**depth}); "
            f"choose a size that is a multiple of {2**depth} or a smaller unet_depth"
        )


class UnetGenerator(nn.Module):
    """U-Net generator of pix2pix (Isola et al., CVPR 2017; Ronneberger et al., MICCAI 2015).

    ``depth`` 4x4 stride-2 convolutions down (LeakyReLU 0.2 before each but the first, IN after
    each but the outermost and the innermost), the mirror image up with 4x4 stride-2 transposed
    convolutions (ReLU before, IN after each but the outermost), and at every level the encoder's
    features concatenated to the decoder's (skip connections); tanh at the output. Filters double
    per level from ``ngf`` up to ``8 ngf``. No dropout (CycleGAN's default).

    Args:
        in_channels: Channels of the input image.
        out_channels: Channels of the output image.
        ngf: Filters of the outermost layer.
        depth: Down-samplings; height and width must be divisible by ``2**depth``.
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 1, *, ngf: int = 64, depth: int = 6
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"unet_depth must be at least 2, found {depth}")
        self.depth = depth
        widths = [ngf * min(2**level, 8) for level in range(depth)]
        self.down = nn.ModuleList()
        for level in range(depth):
            has_norm = 0 < level < depth - 1
            block: list[nn.Module] = []
            if level > 0:
                block.append(nn.LeakyReLU(0.2, inplace=False))
            source = in_channels if level == 0 else widths[level - 1]
            block.append(
                nn.Conv2d(
                    source, widths[level], kernel_size=4, stride=2, padding=1, bias=not has_norm
                )
            )
            if has_norm:
                block.append(instance_norm(widths[level]))
            self.down.append(nn.Sequential(*block))
        self.up = nn.ModuleList()
        for level in range(depth):
            source = widths[level] if level == depth - 1 else 2 * widths[level]
            outermost = level == 0
            target = out_channels if outermost else widths[level - 1]
            block = [
                nn.ReLU(inplace=False),
                nn.ConvTranspose2d(
                    source, target, kernel_size=4, stride=2, padding=1, bias=outermost
                ),
                nn.Tanh() if outermost else instance_norm(target),
            ]
            self.up.append(nn.Sequential(*block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        factor = 2**self.depth
        if height % factor or width % factor:
            raise ValueError(
                f"the U-Net generator needs height and width divisible by 2**unet_depth = "
                f"{factor}, found {height}x{width} (unet_depth = {self.depth})"
            )
        features: list[torch.Tensor] = []
        h = x
        for block in self.down:
            h = block(h)
            features.append(h)
        h = self.up[self.depth - 1](features[-1])
        for level in range(self.depth - 2, -1, -1):
            h = self.up[level](torch.cat([features[level], h], dim=1))
        return h
