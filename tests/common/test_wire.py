"""Weights on the wire: exact round trips, half-precision bounds, byte counts, Flower records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from fedsynth.common.config import ModelConfig
from fedsynth.common.models import define_generator, init_weights
from fedsynth.common.wire import (
    INTEGERS,
    LAYOUT,
    VALUES,
    decode,
    encode,
    layout_of,
    pack,
    read_layout,
    unpack,
    wire_bytes,
)

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


def test_a_packed_state_unpacks_to_the_same_tensors_in_the_same_order() -> None:
    state = {
        "g.conv.weight": torch.randn(4, 2, 3, 3),
        "g.norm.count": torch.tensor(5, dtype=torch.int64),
        "g.conv.bias": torch.randn(4),
        "g.flag": torch.tensor([True, False]),
    }
    for dtype in ("float32", "float16", "bfloat16"):
        packed = pack(state, dtype, with_layout=True)
        assert set(packed) == {VALUES, INTEGERS, LAYOUT}
        assert packed[VALUES].size == 4 * 2 * 3 * 3 + 4 and packed[INTEGERS].tolist() == [5, 1, 0]
        layout = read_layout(packed)
        assert layout == layout_of(state)
        back = unpack(packed, dtype, layout)
        assert list(back) == list(state)
        expected = decode(encode(state, dtype), dtype, reference=state)  # per-tensor path
        for key in state:
            assert torch.equal(back[key], expected[key]), (dtype, key)
            assert back[key].dtype == (
                torch.float32 if state[key].is_floating_point() else state[key].dtype
            )


def test_packing_makes_a_message_a_handful_of_flower_objects(
    state: dict[str, torch.Tensor],
) -> None:
    from flwr.app import Array, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    def objects(arrays: dict[str, np.ndarray]) -> int:
        record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return len(get_all_nested_objects(RecordDict({"arrays": record})))

    assert len(state) > 10
    per_parameter = objects(encode(state))
    packed = objects(pack(state, with_layout=True))
    assert packed <= 6 < per_parameter


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"not json", "not JSON"),
        (b'{"a": 1}', "expected a list"),
        (b'[["w", [2, -1], "float32"]]', "bad entry"),
        (b'[["w", [2], "complex64"]]', "bad entry"),
        (b'[["w", [1, 1, 1, 1, 1, 1, 1, 1, 1], "float32"]]', "bad entry"),
        (b'[["w", [2], "float32"], ["w", [3], "float32"]]', "a name appears twice"),
    ],
)
def test_a_bad_layout_is_refused_with_what_is_wrong(text: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_layout({VALUES: np.zeros(2, np.float32), LAYOUT: np.frombuffer(text, np.uint8)})
    with pytest.raises(ValueError, match="carries no layout"):
        read_layout({VALUES: np.zeros(2, np.float32)})


def test_unpack_refuses_arrays_that_do_not_fit_the_layout() -> None:
    state = {"w": torch.randn(3, 2), "n": torch.tensor(1)}
    layout = layout_of(state)
    packed = pack(state)
    with pytest.raises(
        ValueError, match="'values' has 5 numbers, the shapes of the shared parameters 6"
    ):
        unpack({**packed, VALUES: packed[VALUES][:5]}, "float32", layout)
    with pytest.raises(ValueError, match="no 'integers' array"):
        unpack({VALUES: packed[VALUES]}, "float32", layout)
    with pytest.raises(ValueError, match="expected 1-D float16"):
        unpack(packed, "float16", layout)
