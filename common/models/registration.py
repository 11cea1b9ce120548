"""The registration network R of RegGAN (Kong et al., NeurIPS 2021) and the warp it drives.

R predicts a dense displacement field that aligns a generated image with its misaligned target,
so the L1 loss compares anatomy rather than position. Opacus-compatible (no BatchNorm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedsynth.common.models.generators import instance_norm

__all__ = ["RegistrationNet", "flow_to_pixels", "identity_grid", "warp"]


def identity_grid(
    batch: int, height: int, width: int, *, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Sampling grid of the identity, ``(batch, height, width, 2)``, last axis (x, y).

    Pixel centres in normalised coordinates for ``align_corners=False``: pixel ``j`` of ``W`` sits
    at ``(2 j + 1) / W - 1``, so the image spans [-1, 1] edge to edge.
    """
    xs = (2 * torch.arange(width, device=device, dtype=dtype) + 1) / width - 1
    ys = (2 * torch.arange(height, device=device, dtype=dtype) + 1) / height - 1
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).unsqueeze(0).expand(batch, -1, -1, -1)


def warp(image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Resample ``image`` at the identity grid plus ``flow`` (bilinear, border padding).

    Sign convention (backward warping, as ``grid_sample`` does): the output at pixel ``p`` is the
    input at ``p + flow(p)``. ``flow`` is ``(batch, 2, H, W)`` in normalised coordinates, channel
    0 along x (width, the last axis) and channel 1 along y (height); one pixel is ``2 / W`` in x
    and ``2 / H`` in y. A constant ``flow[:, 0] = 2 k / W`` therefore moves the content ``k``
    pixels towards smaller x: ``out[..., j] == image[..., j + k]`` (the border pixel repeats where
    ``j + k`` falls outside).

    Args:
        image: ``(batch, channels, H, W)`` images.
        flow: ``(batch, 2, H, W)`` displacements.

    Returns:
        The warped images, same shape as ``image``.
    """
    if flow.shape[1] != 2 or flow.shape[-2:] != image.shape[-2:] or flow.shape[0] != image.shape[0]:
        raise ValueError(
            f"flow must be (batch, 2, H, W) matching image {tuple(image.shape)}, "
            f"found {tuple(flow.shape)}"
        )
    batch, _, height, width = image.shape
    grid = identity_grid(batch, height, width, device=image.device, dtype=image.dtype)
    grid = grid + flow.permute(0, 2, 3, 1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flow_to_pixels(flow: torch.Tensor) -> torch.Tensor:
    """Convert a normalised ``(batch, 2, H, W)`` flow to pixel displacements (x by W/2, y by H/2).

    RegGAN's registration network outputs pixels; use this before :func:`smoothness_loss
    <fedsynth.common.losses.smoothness_loss>` to weigh the smoothness term on RegGAN's scale.
    """
    height, width = flow.shape[-2:]
    scale = torch.tensor([width / 2, height / 2], device=flow.device, dtype=flow.dtype)
    return flow * scale.view(1, 2, 1, 1)


class _ConvBlock(nn.Sequential):
    """3x3 conv (bias-free: IN follows), IN, LeakyReLU(0.2); stride 2 halves the size."""

    def __init__(self, source: int, target: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(source, target, kernel_size=3, stride=stride, padding=1, bias=False),
            instance_norm(target),
            nn.LeakyReLU(0.2, inplace=False),
        )


class RegistrationNet(nn.Module):
    """Small U-Net that maps ``concat(moving, fixed)`` to a displacement field (RegGAN's R).

    Encoder: a full-size block with ``filters`` channels and two stride-2 blocks (2, 4 x
    ``filters``); decoder: nearest up-sampling to the skip's size, concatenation, a block, twice;
    then a 3x3 convolution to the 2-channel flow (normalised coordinates, see :func:`warp`). That
    last convolution starts at zero weight and bias, so at initialisation the flow is exactly 0
    and R is the identity; any input size works (the decoder up-samples to the skip's size).

    Args:
        in_channels: Channels of one image (the network reads ``2 * in_channels``).
        filters: Filters of the first level (``ModelConfig.registration_filters``).
    """

    def __init__(self, in_channels: int = 1, *, filters: int = 16) -> None:
        super().__init__()
        f = filters
        self.enc0 = _ConvBlock(2 * in_channels, f)
        self.enc1 = _ConvBlock(f, 2 * f, stride=2)
        self.enc2 = _ConvBlock(2 * f, 4 * f, stride=2)
        self.bottleneck = _ConvBlock(4 * f, 4 * f)
        self.dec1 = _ConvBlock(4 * f + 2 * f, 2 * f)
        self.dec0 = _ConvBlock(2 * f + f, f)
        self.flow = nn.Conv2d(f, 2, kernel_size=3, padding=1)
        self.reset_flow_head()

    def reset_flow_head(self) -> None:
        """Zero the last convolution: the flow is 0 and the warp the identity."""
        nn.init.zeros_(self.flow.weight)
        if self.flow.bias is not None:
            nn.init.zeros_(self.flow.bias)

    @staticmethod
    def _up(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="nearest")

    def displacement(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The ``(batch, 2, H, W)`` flow that aligns ``moving`` with ``fixed``."""
        if moving.shape != fixed.shape:
            raise ValueError(
                f"moving and fixed images must have the same shape, found "
                f"{tuple(moving.shape)} and {tuple(fixed.shape)}"
            )
        s0 = self.enc0(torch.cat([moving, fixed], dim=1))
        s1 = self.enc1(s0)
        h = self.bottleneck(self.enc2(s1))
        h = self.dec1(torch.cat([self._up(h, s1), s1], dim=1))
        h = self.dec0(torch.cat([self._up(h, s0), s0], dim=1))
        return self.flow(h)

    def forward(
        self, moving: torch.Tensor, fixed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Register ``moving`` onto ``fixed``.

        Returns:
            ``(warped, flow)``: ``moving`` warped by :func:`warp`, and the flow itself (for the
            smoothness loss).
        """
        flow = self.displacement(moving, fixed)
        return warp(moving, flow), flow
