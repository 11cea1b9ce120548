"""An intensity prior the generator corrects: a learnt lookup table from source to target value.

On real scans a lookup table from T1w intensity to T2w intensity, fitted on co-registered pairs,
beats a plain image-to-image network trained on a few subjects: the network has to relearn the
tissue contrast from scratch and fits its few subjects' anatomy instead. Giving the network the
table's output and asking only for a spatial correction (a residual) keeps what the table knows
and adds what it cannot see (partial volume, lesions, context). See DESIGN.md, "Local training".

:class:`IntensityMap` is that table, learnt with the rest: a piecewise-linear function of the
source value on ``knots`` evenly spaced points of [-1, 1]. It is part of the generator, so it is
federated with it (FedAvg averages the sites' tables) and privatised with it (its per-sample
gradient, :func:`intensity_map_grad_sample`, is exact: the map is linear in its values).
:class:`PriorGenerator` feeds ``[x, map(x)]`` to an image-to-image body and returns
``map(x) + body(...)``, clamped to the model range.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IntensityMap", "PriorGenerator", "intensity_map_grad_sample"]


class IntensityMap(nn.Module):
    """A learnt, piecewise-linear, per-pixel intensity map on [-1, 1].

    The parameter ``raw`` holds the knots' values divided by ``step_scale``: Adam moves every
    parameter by about its learning rate per step, and a table must travel across the whole range
    (T1w to T2w inverts the contrast) in a few hundred steps, so the map takes ``step_scale``
    times larger steps than the networks' weights without a second optimiser.

    Args:
        knots: number of evenly spaced knots (>= 2).
        step_scale: parametrisation scale (see above).
    """

    def __init__(self, knots: int = 33, *, step_scale: float = 50.0) -> None:
        super().__init__()
        if knots < 2:
            raise ValueError(f"an intensity map needs at least 2 knots, found {knots}")
        self.knots = knots
        self.step_scale = step_scale
        self.raw = nn.Parameter(torch.linspace(-1.0, 1.0, knots) / step_scale)  # identity

    @property
    def values(self) -> torch.Tensor:
        """The map's value at each knot."""
        return self.raw * self.step_scale

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left knot index and the right knot's interpolation weight of every value of ``x``."""
        position = (x.clamp(-1.0, 1.0) + 1.0) * (0.5 * (self.knots - 1))
        left = position.floor().clamp(max=self.knots - 2)
        return left.long(), position - left

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, weight = self.weights(x)
        values = self.values
        return values[left] * (1.0 - weight) + values[left + 1] * weight


def intensity_map_grad_sample(
    layer: IntensityMap, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus per-sample gradient of :class:`IntensityMap`'s ``raw`` (exact).

    The output is linear in the knot values: d out / d value_k is (1 - w) at pixels whose left
    knot is k and w at pixels whose right knot is k. Summing backprop x that weight per example
    (a scatter over knots) gives each example's gradient; ``step_scale`` is the chain rule's
    factor from values to ``raw``.
    """
    x = activations[0]
    n = x.shape[0]
    left, weight = layer.weights(x.to(backprops.dtype))
    grad = backprops.reshape(n, -1)
    left_flat = left.reshape(n, -1)
    weight_flat = weight.reshape(n, -1)
    per_sample = torch.zeros(n, layer.knots, dtype=backprops.dtype, device=backprops.device)
    per_sample.scatter_add_(1, left_flat, grad * (1.0 - weight_flat))
    per_sample.scatter_add_(1, left_flat + 1, grad * weight_flat)
    return {layer.raw: per_sample * layer.step_scale}


class PriorGenerator(nn.Module):
    """``clamp(map(x) + body([x, map(x)]), -1, 1)``: a generator that corrects an intensity prior.

    Args:
        body: an image-to-image network with 2 input channels and 1 output channel (the
            ResNet or U-Net generator); its tanh output is the correction.
        knots: knots of the :class:`IntensityMap`.
    """

    def __init__(self, body: nn.Module, knots: int = 33) -> None:
        super().__init__()
        self.prior = IntensityMap(knots)
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prior = self.prior(x)
        correction = self.body(torch.cat([x, prior], dim=1))
        return (prior + correction).clamp(-1.0, 1.0)
