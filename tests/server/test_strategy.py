"""Aggregation rules against independent numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsynth.common.config import FederationConfig
from fedsynth.server.strategy import (
    FedAdam,
    FedMedian,
    FedTrimmedAvg,
    FedYogi,
    SiteUpdate,
    make_aggregator,
    weighted_mean,
)

rng = np.random.default_rng(0)


def _updates(n: int, examples: list[int]) -> tuple[dict[str, torch.Tensor], list[SiteUpdate]]:
    reference = {
        "g_ab.w": torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32)),
        "g_ab.b": torch.from_numpy(rng.normal(size=(4,)).astype(np.float32)),
        "g_ab.count": torch.tensor(5, dtype=torch.int64),
    }
    updates = []
    for i in range(n):
        state = {
            k: (v + torch.from_numpy(rng.normal(size=v.shape).astype(np.float32)))
            if v.is_floating_point()
            else torch.tensor(5 + i, dtype=torch.int64)
            for k, v in reference.items()
        }
        updates.append(SiteUpdate(f"site-{i}", state, examples[i]))
    return reference, updates


def test_weighted_mean_matches_numpy_and_ignores_arrival_order() -> None:
    reference, updates = _updates(3, [10, 30, 60])
    result = weighted_mean(updates, reference)
    w = np.array([10, 30, 60], dtype=np.float64) / 100
    for key in ("g_ab.w", "g_ab.b"):
        expected = sum(
            wi * u.state[key].numpy().astype(np.float64) for wi, u in zip(w, updates, strict=True)
        )
        np.testing.assert_allclose(result[key].numpy(), expected, rtol=1e-6)
        assert result[key].dtype == torch.float32
    assert int(result["g_ab.count"]) == 7  # counters: the largest
    shuffled = weighted_mean(list(reversed(updates)), reference)
    for key in result:
        assert torch.equal(result[key], shuffled[key])


def test_zero_examples_is_refused() -> None:
    reference, updates = _updates(2, [0, 5])
    with pytest.raises(ValueError, match="positive"):
        weighted_mean(updates, reference)


@pytest.mark.parametrize("n", [3, 4])
def test_median_matches_numpy(n: int) -> None:
    reference, updates = _updates(n, [1] * n)
    result = FedMedian().aggregate(reference, updates)
    stacked = np.stack([u.state["g_ab.w"].numpy() for u in updates])
    np.testing.assert_allclose(result["g_ab.w"].numpy(), np.median(stacked, axis=0), rtol=1e-6)


def test_trimmed_mean_drops_the_extremes_per_coordinate() -> None:
    reference, updates = _updates(5, [1] * 5)
    updates[0].state["g_ab.w"][0, 0] = 1e6  # an outlier the trimmed mean must ignore
    result = FedTrimmedAvg(0.2).aggregate(reference, updates)
    stacked = np.sort(np.stack([u.state["g_ab.w"].numpy() for u in updates]), axis=0)
    np.testing.assert_allclose(result["g_ab.w"].numpy(), stacked[1:4].mean(0), rtol=1e-5)
    assert abs(float(result["g_ab.w"][0, 0])) < 100


def _fedopt_reference(
    reference: np.ndarray,
    means: list[np.ndarray],
    yogi: bool,
    lr: float,
    b1: float,
    b2: float,
    tau: float,
) -> np.ndarray:
    """Reddi et al. 2021, Algorithm 2, written out with numpy."""
    x = reference.astype(np.float64)
    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for mean in means:
        delta = mean - x
        m = b1 * m + (1 - b1) * delta
        if yogi:
            v = v - (1 - b2) * delta**2 * np.sign(v - delta**2)
        else:
            v = b2 * v + (1 - b2) * delta**2
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_server_optimisers_follow_reddi_et_al_and_resume_exactly(cls: type) -> None:
    lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    reference, _ = _updates(1, [1])
    aggregator = cls(lr, b1, b2, tau)
    state = dict(reference)
    means = []
    for round_index in range(3):
        _, updates = _updates(2, [3, 1])
        means.append(weighted_mean(updates, state)["g_ab.w"].numpy().astype(np.float64))
        if round_index == 2:  # a coordinator restarted from a checkpoint before round 3
            restored = cls(lr, b1, b2, tau)
            restored.load_state_dict(aggregator.state_dict())
            aggregator = restored
        state = aggregator.aggregate(state, updates)
    expected = _fedopt_reference(
        reference["g_ab.w"].numpy(), means, cls is FedYogi, lr, b1, b2, tau
    )
    np.testing.assert_allclose(state["g_ab.w"].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_make_aggregator_reads_the_federation_section() -> None:
    trimmed = make_aggregator(FederationConfig(strategy="fedtrimmedavg", trim_fraction=0.3))
    assert isinstance(trimmed, FedTrimmedAvg) and trimmed.trim_fraction == 0.3
    adam = make_aggregator(FederationConfig(strategy="fedadam", server_lr=0.2))
    assert isinstance(adam, FedAdam) and adam.lr == 0.2
    assert make_aggregator(FederationConfig(strategy="fedprox")).name == "fedprox"
