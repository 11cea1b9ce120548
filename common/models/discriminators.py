"""PatchGAN discriminator of pix2pix and CycleGAN: one real/fake score per overlapping patch.

Opacus-compatible by construction (no BatchNorm, no running statistics, nothing in place).
"""

from __future__ import annotations

import torch
from torch import nn

from fedsynth.common.models.generators import instance_norm

__all__ = ["PatchDiscriminator", "patch_receptive_field"]

_KERNEL = 4


def patch_receptive_field(n_layers: int) -> int:
    """Side in pixels of the input patch that one output score of :class:`PatchDiscriminator` sees.

    ``n_layers`` stride-2 4x4 convolutions followed by two stride-1 4x4 convolutions:

    ========  =====
    n_layers  patch
    ========  =====
    1         16
    2         34
    3         70  (the 70x70 PatchGAN of Isola et al. 2017 and Zhu et al. 2017)
    4         142
    5         286
    6         574
    ========  =====
    """
    if n_layers < 1:
        raise ValueError(f"d_layers must be at least 1, found {n_layers}")
    strides = [2] * n_layers + [1, 1]
    field = 1
    for stride in reversed(strides):
        field = (field - 1) * stride + _KERNEL
    return field


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (Isola et al., CVPR 2017; used by Zhu et al., ICCV 2017) for ``n_layers=3``.

    C64 - C128 - C256 - C512 - 1 at the paper's sizes: 4x4 convolutions, the first ``n_layers``
    with stride 2 and the next with stride 1, each followed by instance normalisation (all but
    the first) and LeakyReLU(0.2); a last stride-1 4x4 convolution maps to one channel of raw
    scores (logits: no sigmoid; the loss decides how to read them). Filters double per layer
    up to ``8 ndf``. See :func:`patch_receptive_field` for the patch size of each depth.

    Args:
        in_channels: Channels of the image being judged.
        ndf: Filters of the first layer (Zhu et al.: 64).
        n_layers: Stride-2 layers (``ModelConfig.d_layers``; 3 gives 70x70 patches).
    """

    def __init__(self, in_channels: int = 1, *, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        self.receptive_field = patch_receptive_field(n_layers)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=_KERNEL, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=False),
        ]
        channels = ndf
        for index in range(1, n_layers + 1):
            stride = 2 if index < n_layers else 1
            target = ndf * min(2**index, 8)
            layers += [
                nn.Conv2d(
                    channels, target, kernel_size=_KERNEL, stride=stride, padding=1, bias=False
                ),
                instance_norm(target),
                nn.LeakyReLU(0.2, inplace=False),
            ]
            channels = target
        layers.append(nn.Conv2d(channels, 1, kernel_size=_KERNEL, stride=1, padding=1))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores of shape ``(batch, 1, h, w)``, one per patch (about ``H/2**n_layers - 2``)."""
        return self.model(x)
