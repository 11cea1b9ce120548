"""Weights on the wire: what a site sends and the coordinator receives, maybe in half precision.

Flower's ``ArrayRecord`` carries numpy arrays, and numpy has no bfloat16, so bfloat16 travels as
its raw 16-bit patterns (``uint16``) and is widened back to float32 on arrival; float16 travels as
numpy float16. Aggregation always happens in float32 (``decode`` returns float32). Integer and
boolean tensors are sent unchanged. ``wire_bytes`` counts the payload bytes of an encoded update,
the figure the coordinator logs per round and per site.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

WireDtype = Literal["float32", "float16", "bfloat16"]
WIRE_DTYPES: tuple[WireDtype, ...] = ("float32", "float16", "bfloat16")


def _check(dtype: str) -> WireDtype:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}; allowed: {', '.join(WIRE_DTYPES)}")
    return dtype


def encode(state: Mapping[str, torch.Tensor], dtype: str = "float32") -> dict[str, np.ndarray]:
    """Floating tensors -> numpy arrays in ``dtype`` (bfloat16 as uint16 bit patterns)."""
    wire = _check(dtype)
    out: dict[str, np.ndarray] = {}
    for key, tensor in state.items():
        value = tensor.detach().cpu()
        if not value.is_floating_point():
            out[key] = value.numpy().copy()
        elif wire == "bfloat16":
            out[key] = (
                value.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
            )
        else:
            out[key] = value.to(getattr(torch, wire)).numpy().copy()
    return out


def decode(
    arrays: Mapping[str, np.ndarray],
    dtype: str = "float32",
    *,
    reference: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Wire arrays -> float32 tensors (non-floating ones keep the ``reference`` dtype).

    ``reference`` (the global model's state dict) says which entries are floating point, since a
    bfloat16 payload looks like an integer array on the wire.
    """
    wire = _check(dtype)
    out: dict[str, torch.Tensor] = {}
    for key, array in arrays.items():
        expected = reference.get(key)
        if expected is not None and not expected.is_floating_point():
            out[key] = torch.from_numpy(np.asarray(array).copy()).to(expected.dtype)
        elif wire == "bfloat16":
            bits = torch.from_numpy(np.ascontiguousarray(array, dtype=np.uint16).view(np.int16))
            out[key] = bits.view(torch.bfloat16).to(torch.float32)
        else:
            out[key] = torch.from_numpy(np.asarray(array, dtype=np.float32).copy())
    return out


def wire_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Payload bytes of an encoded update (array data only, no framing)."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))
