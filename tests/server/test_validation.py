"""Update checks before aggregation: every kind of bad update is refused with its reason."""

from __future__ import annotations

import math

import pytest
import torch

from fedsynth.server.validation import check_update


@pytest.fixture
def reference() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=generator),
        "conv.bias": torch.randn(4, generator=generator),
        "steps": torch.tensor(3),
    }


def test_a_clean_update_passes_and_reports_its_norm(reference: dict[str, torch.Tensor]) -> None:
    update = {k: v.clone() for k, v in reference.items()}
    update["conv.bias"] = update["conv.bias"] + torch.tensor([3.0, 0.0, 4.0, 0.0])
    verdict = check_update(update, reference, max_update_norm=5.001)
    assert verdict.ok and verdict.delta_norm == pytest.approx(5.0, rel=1e-6)
    assert not check_update(update, reference, max_update_norm=4.999).ok


def test_norm_bound(reference: dict[str, torch.Tensor]) -> None:
    update = {k: v.clone() for k, v in reference.items()}
    update["conv.weight"] = update["conv.weight"] + 1.0  # 72 entries: norm sqrt(72)
    verdict = check_update(update, reference, max_update_norm=8.0)
    assert not verdict.ok
    assert verdict.problems == [f"update norm {math.sqrt(72):.4g} exceeds the bound 8"]


def test_every_problem_is_named(reference: dict[str, torch.Tensor]) -> None:
    update = {k: v.clone() for k, v in reference.items()}
    del update["conv.bias"]
    update["extra.weight"] = torch.zeros(2)
    update["conv.weight"] = torch.zeros(4, 2, 3)
    update["steps"] = torch.tensor(3.0)
    problems = check_update(update, reference).problems
    assert "missing parameters: conv.bias" in problems
    assert "unexpected parameters: extra.weight" in problems
    assert "conv.weight: shape (4, 2, 3), expected (4, 2, 3, 3)" in problems
    assert "steps: dtype torch.float32, expected torch.int64" in problems


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values(reference: dict[str, torch.Tensor], bad: float) -> None:
    update = {k: v.clone() for k, v in reference.items()}
    update["conv.weight"][0, 0, 0, 0] = bad
    update["conv.weight"][1, 1, 1, 1] = bad
    verdict = check_update(update, reference)
    assert verdict.problems == ["conv.weight: 2 NaN or infinite value(s)"]
    assert verdict.delta_norm is None
