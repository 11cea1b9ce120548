"""Weights on the wire: what a site sends and the coordinator receives, maybe in half precision.

Flower's ``ArrayRecord`` carries numpy arrays, and numpy has no bfloat16, so bfloat16 travels as
its raw 16-bit patterns (``uint16``) and is widened back to float32 on arrival; float16 travels as
numpy float16. Aggregation always happens in float32 (``decode`` returns float32). Integer and
boolean tensors are sent unchanged. ``wire_bytes`` counts the payload bytes of an encoded update,
the figure the coordinator logs per round and per site.

A message carries its state **packed** (:func:`pack`): every floating entry, concatenated in one
vector (``values``), and every other entry in a second one (``integers``, int64), not one array
per parameter. Flower moves each array as objects of its own, and every object costs the
SuperLink a few database transactions and a signature check per hop; a U-Net's 44 parameters
were 52 objects a message, the packed state is 5 (3 of them the 5 MB chunks of the values). The
coordinator's message also carries the layout (names, shapes, dtypes: UTF-8 JSON as ``uint8``) so
that a site can unpack it without knowing the model; a site's reply carries numbers only, in the
order of the layout it received, and the coordinator unpacks it with its own layout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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


VALUES = "values"  # every floating entry of a packed state, in the wire dtype
INTEGERS = "integers"  # every other entry, as int64
LAYOUT = "layout"  # names, shapes and dtypes of the entries (coordinator -> site only)
MAX_LAYOUT_BYTES = 4 << 20
MAX_DIMS = 8
_INTEGER_DTYPES = {"int64", "int32", "int16", "int8", "uint8", "bool"}
_FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}
_WIRE_NUMPY: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),  # bit patterns
}


@dataclass(frozen=True)
class Slot:
    """One entry of a packed state: its name, shape and torch dtype (``"float32"``, ``"int64"``)."""

    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def floating(self) -> bool:
        return self.dtype in _FLOAT_DTYPES

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def layout_of(state: Mapping[str, torch.Tensor]) -> list[Slot]:
    """The slots of a state, in its order."""
    return [
        Slot(key, tuple(int(n) for n in t.shape), str(t.dtype).removeprefix("torch."))
        for key, t in state.items()
    ]


def pack(
    state: Mapping[str, torch.Tensor], dtype: str = "float32", *, with_layout: bool = False
) -> dict[str, np.ndarray]:
    """A state as ``values`` (+ ``integers``, + ``layout`` if asked): see the module docstring."""
    wire = _check(dtype)
    encoded = encode(state, wire)
    floating = [encoded[k].reshape(-1) for k, t in state.items() if t.is_floating_point()]
    other = [
        encoded[k].reshape(-1).astype(np.int64)
        for k, t in state.items()
        if not t.is_floating_point()
    ]
    out = {VALUES: np.concatenate(floating) if floating else np.zeros(0, dtype=_WIRE_NUMPY[wire])}
    if other:
        out[INTEGERS] = np.concatenate(other)
    if with_layout:
        text = json.dumps([[s.key, list(s.shape), s.dtype] for s in layout_of(state)])
        out[LAYOUT] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
    return out


def _is_slot(entry: Any) -> bool:
    """``[name, [n, ...], dtype]`` with a known dtype and at most :data:`MAX_DIMS` sizes >= 0."""
    if not (isinstance(entry, list) and len(entry) == 3):
        return False
    key, shape, kind = entry
    return (
        isinstance(key, str)
        and isinstance(shape, list)
        and len(shape) <= MAX_DIMS
        and all(type(n) is int and n >= 0 for n in shape)
        and kind in _FLOAT_DTYPES | _INTEGER_DTYPES
    )


def read_layout(arrays: Mapping[str, np.ndarray]) -> list[Slot]:
    """The layout a packed state carries.

    Raises:
        ValueError: no layout, or one that is not a list of ``[name, shape, dtype]``.
    """
    if LAYOUT not in arrays:
        raise ValueError("the packed state carries no layout")
    raw = np.asarray(arrays[LAYOUT])
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > MAX_LAYOUT_BYTES:
        raise ValueError(f"layout: expected at most {MAX_LAYOUT_BYTES} bytes of uint8 JSON")
    try:
        entries = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"layout: not JSON ({exc})") from None
    if not isinstance(entries, list):
        raise ValueError("layout: expected a list of [name, shape, dtype]")
    slots: list[Slot] = []
    for entry in entries:
        if not _is_slot(entry):
            raise ValueError(f"layout: bad entry {str(entry)[:120]}")
        slots.append(Slot(entry[0], tuple(entry[1]), entry[2]))
    if len({s.key for s in slots}) != len(slots):
        raise ValueError("layout: a name appears twice")
    return slots


def packed_problems(
    arrays: Mapping[str, tuple[str, Sequence[int]]], dtype: str, layout: Sequence[Slot]
) -> list[str]:
    """Every way ``arrays`` (name -> (dtype name, shape), e.g. a Flower record's metadata, read
    without its data) is not a state packed in ``dtype`` with ``layout``; empty if it is."""
    wire = _check(dtype)
    problems: list[str] = []
    unexpected = set(arrays) - {VALUES, INTEGERS, LAYOUT}
    if unexpected:
        problems.append(f"arrays under unexpected keys: {', '.join(sorted(unexpected))}")
    counts = {
        VALUES: (sum(s.size for s in layout if s.floating), _WIRE_NUMPY[wire].name),
        INTEGERS: (sum(s.size for s in layout if not s.floating), "int64"),
    }
    for name, (count, kind) in counts.items():
        if name not in arrays:
            if name == VALUES or count:
                problems.append(f"no {name!r} array")
            continue
        found, shape = arrays[name]
        if found != kind or len(shape) != 1:
            problems.append(
                f"{name!r} is {found} with {len(shape)} dimension(s), expected 1-D {kind}"
            )
        elif shape[0] != count:
            problems.append(
                f"{name!r} has {shape[0]} numbers, the shapes of the shared parameters {count}"
            )
    return problems


def outline(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``name -> (dtype name, shape)``, what :func:`packed_problems` checks."""
    return {name: (np.asarray(a).dtype.name, np.shape(a)) for name, a in arrays.items()}


def unpack(
    arrays: Mapping[str, np.ndarray], dtype: str, layout: Sequence[Slot]
) -> dict[str, torch.Tensor]:
    """A packed state -> float32 tensors (other entries in their own dtype), in layout order.

    Raises:
        ValueError: ``arrays`` does not fit ``layout`` (:func:`packed_problems`).
    """
    problems = packed_problems(outline(arrays), dtype, layout)
    if problems:
        raise ValueError("; ".join(problems))
    pieces: dict[str, np.ndarray] = {}
    reference: dict[str, torch.Tensor] = {}
    offsets = {VALUES: 0, INTEGERS: 0}
    for slot in layout:
        name = VALUES if slot.floating else INTEGERS
        start = offsets[name]
        offsets[name] = start + slot.size
        pieces[slot.key] = np.asarray(arrays[name])[start : offsets[name]].reshape(slot.shape)
        reference[slot.key] = torch.empty(0, dtype=getattr(torch, slot.dtype))
    return decode(pieces, dtype, reference=reference)
