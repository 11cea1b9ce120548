"""Weights on the wire: exact round trips, half-precision bounds, byte counts, Flower records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from common.config import ModelConfig
from common.models import define_generator, init_weights
from common.wire import decode, encode, wire_bytes

TINY = ModelConfig(ngf=8, n_blocks=1, ndf=8, d_layers=1)


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    generator = init_weights(define_generator(TINY, 32), seed=0)
    return {k: v.clone() for k, v in generator.state_dict().items()}


def test_float32_round_trip_is_exact(state: dict[str, torch.Tensor]) -> None:
    back = decode(encode(state, "float32"), "float32", reference=state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize(("dtype", "bits"), [("float16", 10), ("bfloat16", 7)])
def test_half_precision_error_is_within_rounding(
    state: dict[str, torch.Tensor], dtype: str, bits: int
) -> None:
    back = decode(encode(state, dtype), dtype, reference=state)
    for key, value in state.items():
        assert back[key].dtype == torch.float32
        # Round-to-nearest: relative error at most 2**-(mantissa bits + 1) for normal numbers.
        normal = value.abs() > 1e-4
        relative = ((back[key] - value).abs() / value.abs().clamp_min(1e-30))[normal]
        worst = float(relative.max()) if relative.numel() else 0.0
        assert worst <= 2.0 ** -(bits + 1) * 1.0001, key
        # Independent reference: torch's own cast.
        expected = value.to(getattr(torch, dtype)).to(torch.float32)
        assert torch.equal(back[key], expected), key


def test_bytes_halve_in_half_precision(state: dict[str, torch.Tensor]) -> None:
    full = wire_bytes(encode(state, "float32"))
    assert full == sum(v.numel() * 4 for v in state.values())
    for dtype in ("float16", "bfloat16"):
        assert wire_bytes(encode(state, dtype)) * 2 == full


def test_non_floating_entries_travel_unchanged() -> None:
    state = {"w": torch.randn(3), "count": torch.tensor([7, 8], dtype=torch.int64)}
    for dtype in ("float32", "float16", "bfloat16"):
        back = decode(encode(state, dtype), dtype, reference=state)
        assert torch.equal(back["count"], state["count"]) and back["count"].dtype == torch.int64


def test_flower_array_record_carries_every_encoding(state: dict[str, torch.Tensor]) -> None:
    for dtype in ("float32", "float16", "bfloat16"):
        encoded = encode(state, dtype)
        record = ArrayRecord(numpy_ndarrays=list(encoded.values()))
        arrays = dict(zip(encoded, record.to_numpy_ndarrays(), strict=True))
        back = decode(arrays, dtype, reference=state)
        expected = decode(encoded, dtype, reference=state)
        for key in state:
            assert torch.equal(back[key], expected[key]), (dtype, key)


def test_unknown_dtype_is_refused(state: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="unknown wire dtype 'int8'; allowed: float32"):
        encode(state, "int8")
    assert isinstance(encode(state, "bfloat16")["model.1.weight"], np.ndarray)
