"""The metrics' shared conventions: the [-1, 1] -> [0, 1] scale and the checks of their inputs."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def to_unit(x: npt.ArrayLike) -> FloatArray:
    """Map model-scale intensities in [-1, 1] to [0, 1]: ``(x + 1) / 2``, clipped to [0, 1].

    Args:
        x: array on the model's scale (a generator's ``tanh`` output, a normalised target).

    Returns:
        A float64 array of the same shape. NaN stays NaN (the metrics reject it).
    """
    unit: FloatArray = np.clip((np.asarray(x, dtype=np.float64) + 1.0) / 2.0, 0.0, 1.0)
    return unit


def _as_image(name: str, x: npt.ArrayLike) -> FloatArray:
    array = np.asarray(x)
    if array.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be a 2D slice (H, W) or a 3D volume, "
            f"got a {array.ndim}D array of shape {array.shape}"
        )
    if np.iscomplexobj(array) or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise ValueError(f"{name} must hold numbers, got dtype {array.dtype}")
    values = array.astype(np.float64, copy=False)
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - np.count_nonzero(finite))
        raise ValueError(
            f"{name} of shape {array.shape} holds {bad} NaN or infinite value(s); "
            "metrics need finite intensities"
        )
    return values


def check_pair(pred: npt.ArrayLike, target: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Both images as float64 arrays, or a ``ValueError`` naming the mismatch or bad values."""
    pred_shape, target_shape = np.shape(pred), np.shape(target)
    if pred_shape != target_shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {pred_shape} "
            f"and target {target_shape}"
        )
    return _as_image("pred", pred), _as_image("target", target)


def check_mask(name: str, mask: npt.ArrayLike, shape: tuple[int, ...]) -> BoolArray:
    """``mask`` as a boolean array of ``shape``, or a ``ValueError`` naming it (``name``)."""
    array = np.asarray(mask)
    if array.shape != shape:
        raise ValueError(
            f"{name} must have the shape of pred and target {shape}, got {array.shape}"
        )
    if array.dtype != np.bool_:
        if not np.issubdtype(array.dtype, np.number) or not np.isin(array, (0, 1)).all():
            raise ValueError(
                f"{name} must be boolean (or hold only 0 and 1), got dtype {array.dtype}"
            )
        array = array != 0
    return array


def check_data_range(data_range: float) -> float:
    """``data_range`` as a float, or a ``ValueError`` unless it is positive and finite."""
    value = float(data_range)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    return value


def check_selected(name: str, mask: BoolArray) -> BoolArray:
    """``mask`` itself, or a ``ValueError`` when it selects no pixel (a metric of nothing)."""
    if not mask.any():
        raise ValueError(f"{name} selects no pixels: the metric is undefined on an empty region")
    return mask
