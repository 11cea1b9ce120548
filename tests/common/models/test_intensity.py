"""The learnt intensity prior: a piecewise-linear lookup table, and a generator correcting it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsynth.common.config import ModelConfig
from fedsynth.common.models import define_generator
from fedsynth.common.models.intensity import IntensityMap, PriorGenerator, intensity_map_grad_sample


def test_the_map_starts_at_the_identity_and_clamps_outside_the_range() -> None:
    values = torch.linspace(-1.3, 1.3, 101).reshape(1, 1, 1, -1)
    out = IntensityMap(17)(values)
    torch.testing.assert_close(out, values.clamp(-1.0, 1.0), atol=1e-6, rtol=0)


def test_the_map_is_numpys_piecewise_linear_interpolation() -> None:
    torch.manual_seed(0)
    layer = IntensityMap(9).double()
    with torch.no_grad():
        layer.raw.copy_(torch.randn(9, dtype=torch.float64))
    x = torch.rand(2, 1, 7, 5, dtype=torch.float64) * 2 - 1
    expected = np.interp(
        x.numpy().ravel(), np.linspace(-1, 1, 9), layer.values.detach().numpy()
    ).reshape(x.shape)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, atol=1e-12)


def test_per_sample_gradient_equals_one_example_at_a_time() -> None:
    generator = torch.Generator().manual_seed(1)
    layer = IntensityMap(11).double()
    with torch.no_grad():
        layer.raw.copy_(torch.randn(11, dtype=torch.float64, generator=generator))
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64, generator=generator) * 2.4 - 1.2
    upstream = torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=generator)
    found = intensity_map_grad_sample(layer, [x], upstream)[layer.raw]
    for index in range(4):
        layer.zero_grad()
        (layer(x[index : index + 1]) * upstream[index : index + 1]).sum().backward()
        assert layer.raw.grad is not None
        torch.testing.assert_close(found[index], layer.raw.grad, atol=1e-10, rtol=0)
    assert found.abs().max() > 1.0  # not trivially zero


def test_the_map_learns_an_inverted_contrast_in_a_few_hundred_steps() -> None:
    """T1w -> T2w inverts the tissue order: the table must cross the range quickly (step_scale)."""
    torch.manual_seed(0)
    layer = IntensityMap(17)
    optimizer = torch.optim.Adam(layer.parameters(), lr=5e-4)
    for _ in range(300):
        x = torch.rand(8, 1, 8, 8) * 2 - 1
        loss = (layer(x) - (-x)).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    grid = torch.linspace(-1, 1, 33).reshape(1, 1, 1, -1)
    assert float((layer(grid) + grid).abs().max()) < 0.05


@pytest.mark.parametrize("kind", ["resnet", "unet"])
def test_a_prior_generator_starts_near_its_map_and_round_trips_its_weights(kind: str) -> None:
    config = ModelConfig(generator=kind, ngf=8, n_blocks=2, unet_depth=3, intensity_prior=9)
    net = define_generator(config, 32, seed=0)
    assert isinstance(net, PriorGenerator)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    out = net(x)
    assert out.shape == x.shape and float(out.abs().max()) <= 1.0
    # The body's N(0, 0.02) start keeps the correction small: the output is about the map (x).
    assert float((out - x).abs().mean()) < 0.25
    again = define_generator(config, 32, seed=1)
    again.load_state_dict(net.state_dict())
    torch.testing.assert_close(again(x), out)


def test_one_knot_is_refused_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="intensity_prior"):
        ModelConfig(intensity_prior=1)
