"""Pixel-wise metrics: PSNR, MAE and NMSE over a whole slice or volume or inside a mask."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fedsynth.common.metrics.checks import (
    BoolArray,
    FloatArray,
    check_data_range,
    check_mask,
    check_pair,
    check_selected,
)


def mean_squared_error(pred: FloatArray, target: FloatArray, mask: BoolArray | None) -> float:
    """MSE of checked float64 images, over every pixel or those in ``mask``."""
    diff = pred - target if mask is None else pred[mask] - target[mask]
    return float(np.mean(diff * diff))


def mean_absolute_error(pred: FloatArray, target: FloatArray, mask: BoolArray | None) -> float:
    """MAE of checked float64 images, over every pixel or those in ``mask``."""
    if mask is None:
        return float(np.mean(np.abs(pred - target)))
    return float(np.mean(np.abs(pred[mask] - target[mask])))


def psnr_from_mse(mse: float, data_range: float) -> float:
    """PSNR in dB of an MSE; ``inf`` for an MSE of exactly 0."""
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range * data_range / mse)


def psnr(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    mask: npt.ArrayLike | None = None,
    data_range: float = 1.0,
) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range**2 / MSE)``.

    The MSE is the mean over all pixels of a slice or all voxels of a volume (not a mean of
    per-slice PSNRs), or over the pixels inside ``mask`` only.

    Args:
        pred: predicted slice or volume, intensities on [0, data_range].
        target: reference of the same shape.
        mask: optional boolean mask of the same shape; pixels where it is True count.
        data_range: the intensity range (the "peak"), 1.0 for images on [0, 1].

    Returns:
        PSNR in dB; ``float('inf')`` for a perfect prediction (MSE exactly 0).

    Raises:
        ValueError: bad shapes or values, or a mask that selects no pixel.
    """
    p, t = check_pair(pred, target)
    peak = check_data_range(data_range)
    region = None if mask is None else check_selected("mask", check_mask("mask", mask, p.shape))
    return psnr_from_mse(mean_squared_error(p, t, region), peak)


def mae(pred: npt.ArrayLike, target: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> float:
    """Mean absolute error over all pixels / voxels, or over those inside ``mask``."""
    p, t = check_pair(pred, target)
    region = None if mask is None else check_selected("mask", check_mask("mask", mask, p.shape))
    return mean_absolute_error(p, t, region)


def nmse(pred: npt.ArrayLike, target: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> float:
    """Normalised mean squared error ``sum((pred - target)**2) / sum(target**2)``.

    Sums run over all pixels / voxels, or over those inside ``mask``. The normalisation is by the
    target's energy (not its variance or range), so NMSE does not depend on ``data_range``; it is
    0 for a perfect prediction and 1 for an all-zero prediction.

    Raises:
        ValueError: bad inputs, an empty mask, or a target that is zero everywhere (in the mask).
    """
    p, t = check_pair(pred, target)
    if mask is not None:
        region = check_selected("mask", check_mask("mask", mask, p.shape))
        p, t = p[region], t[region]
    energy = float(np.sum(t * t))
    if energy == 0.0:
        where = "inside the mask" if mask is not None else "everywhere"
        raise ValueError(f"nmse is undefined: target of shape {np.shape(target)} is zero {where}")
    diff = p - t
    return float(np.sum(diff * diff)) / energy
