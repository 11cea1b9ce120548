"""Structural similarity (Wang et al. 2004) as scikit-image defines it, whole or inside a mask."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from fedsynth.common.metrics.checks import (
    BoolArray,
    FloatArray,
    check_data_range,
    check_mask,
    check_pair,
)

# SSIM of Wang et al. 2004 (IEEE TIP 13(4)), as scikit-image's
# structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # in units of sigma: radius int(3.5 * 1.5 + 0.5) = 5, an 11-tap window
SSIM_WIN_SIZE = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1  # 11
SSIM_BORDER = (SSIM_WIN_SIZE - 1) // 2  # 5: pixels left out of every SSIM mean at each edge
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def local_ssim(pred: FloatArray, target: FloatArray, data_range: float) -> FloatArray:
    """The local SSIM map of checked float64 images (:func:`ssim_map` without the checks)."""
    too_small = [n for n in pred.shape if n < SSIM_WIN_SIZE]
    if too_small:
        raise ValueError(
            f"ssim needs at least {SSIM_WIN_SIZE} pixels along every axis (its Gaussian window), "
            f"got shape {pred.shape}"
        )

    def smooth(x: FloatArray) -> FloatArray:
        out: FloatArray = ndimage.gaussian_filter(
            x, sigma=SSIM_SIGMA, truncate=SSIM_TRUNCATE, mode="reflect"
        )
        return out

    mu_p, mu_t = smooth(pred), smooth(target)
    # Population (weighted) moments: E[x^2] - E[x]^2, as in Wang et al.
    var_p = smooth(pred * pred) - mu_p * mu_p
    var_t = smooth(target * target) - mu_t * mu_t
    cov = smooth(pred * target) - mu_p * mu_t
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    numerator = (2 * mu_p * mu_t + c1) * (2 * cov + c2)
    denominator = (mu_p * mu_p + mu_t * mu_t + c1) * (var_p + var_t + c2)
    result: FloatArray = numerator / denominator
    return result


def _interior(shape: tuple[int, ...]) -> BoolArray:
    """True away from the SSIM_BORDER-wide strip along every edge."""
    inside = np.zeros(shape, dtype=np.bool_)
    inside[tuple(slice(SSIM_BORDER, n - SSIM_BORDER) for n in shape)] = True
    return inside


def mean_ssim(ssim_values: FloatArray, mask: BoolArray | None) -> float:
    """Mean of an SSIM map away from the border, over all pixels or those in ``mask``."""
    inside = _interior(ssim_values.shape)
    selected = inside if mask is None else inside & mask
    if not selected.any():
        return math.nan
    return float(np.mean(ssim_values[selected], dtype=np.float64))


def ssim_map(pred: npt.ArrayLike, target: npt.ArrayLike, data_range: float = 1.0) -> FloatArray:
    """Full-size local SSIM map (Wang et al. 2004), one value per pixel / voxel.

    Gaussian-weighted local means, variances and covariance (sigma 1.5, truncated to an 11-tap
    window; 2D for a slice, isotropic 3D for a volume), population (not sample) covariance,
    ``K1 = 0.01``, ``K2 = 0.03``, ``C_i = (K_i * data_range)**2``, edges filled by reflection.
    Equal to ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=data_range, full=True)[1]``. The values within
    :data:`SSIM_BORDER` (5) pixels of an edge depend on the reflected padding; :func:`ssim`
    leaves them out.
    """
    p, t = check_pair(pred, target)
    return local_ssim(p, t, check_data_range(data_range))


def ssim(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    mask: npt.ArrayLike | None = None,
    data_range: float = 1.0,
) -> float:
    """Mean structural similarity (Wang et al. 2004), the scikit-image reference definition.

    Without a mask this is exactly ``skimage.metrics.structural_similarity(pred, target,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=data_range)``: the
    mean of :func:`ssim_map` after cropping a border of ``(11 - 1) // 2 = 5`` pixels from every
    edge (where the window reaches into reflected padding).

    With a mask, the full-size SSIM map is averaged over the mask pixels that lie outside that
    same 5-pixel border. Each SSIM value still looks at its 11-pixel Gaussian neighbourhood, so
    pixels just outside the mask influence the values near its boundary.

    Args:
        pred: predicted slice (2D window) or volume (3D window), on [0, data_range].
        target: reference of the same shape; every axis at least 11 long.
        mask: optional boolean mask of the same shape.
        data_range: the intensity range, 1.0 for images on [0, 1].

    Returns:
        Mean SSIM in [-1, 1]; 1.0 for identical images.

    Raises:
        ValueError: bad inputs, an axis shorter than 11, or a mask with no pixel outside the
            border.
    """
    p, t = check_pair(pred, target)
    peak = check_data_range(data_range)
    region = None if mask is None else check_mask("mask", mask, p.shape)
    value = mean_ssim(local_ssim(p, t, peak), region)
    if math.isnan(value):
        raise ValueError(
            f"mask of shape {p.shape} selects no pixel outside the {SSIM_BORDER}-pixel border "
            "that SSIM leaves out"
        )
    return value
