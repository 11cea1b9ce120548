"""Brain and head masks, robust intensity standardisation and anti-aliasing, as pure functions.

Used by :mod:`fedsynth.common.data.preprocess`; measured on the real sites in BENCHMARKS.md (issue
16).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from fedsynth.common.modalities import Modality

# A voxel within this fraction of the intensity span (99.9th percentile - minimum) of the
# background value is background.
BACKGROUND_TOLERANCE = 1e-3
# A skull-stripped scan: background covers at least this fraction of the volume, its largest
# non-background component holds at least MIN_LARGEST_SHARE of the non-background voxels, and at
# most MAX_DARK_INTERIOR of them are dark (below DARK_LEVEL x their 99th percentile) without
# touching the background. Measured (BENCHMARKS.md, issue 16) on the native, 1 mm and 3 mm grids:
# 0.0-0.8 % dark interior voxels on the skull-stripped sites a-d, 4-39 % on the raw site-e heads
# (noisy air, dark skull), 22-59 % on fedsynth.common.phantom's heads (Rician noise in all the air).
MIN_BACKGROUND_FRACTION = 0.2
MIN_LARGEST_SHARE = 0.95
DARK_LEVEL = 0.05
MAX_DARK_INTERIOR = 0.02
# MR standardisation: the mask's 75th percentile maps to -1 + 2 / TISSUE_SCALE = -1/3.
TISSUE_PERCENTILE = 75.0
TISSUE_SCALE = 3.0


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return np.asarray(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)), dtype=bool)


def _fill(mask: np.ndarray) -> np.ndarray:
    """Fill holes in 3D, then slice by slice along the last (axial) axis.

    A 3D fill leaves open the cavities that reach the edge of the volume (sulci at the top, a
    head cut by the field of view); the axial fill closes those in every slice.
    """
    filled = np.asarray(ndimage.binary_fill_holes(mask), dtype=bool)
    for z in range(filled.shape[2]):
        filled[:, :, z] = ndimage.binary_fill_holes(filled[:, :, z])
    return filled


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximal between-class variance) of a 1D sample."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = hist.astype(np.float64)
    w0 = np.cumsum(weight)
    w1 = w0[-1] - w0
    m0 = np.cumsum(weight * centres)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def background_level(volume: np.ndarray) -> tuple[float, float]:
    """The background value of a volume and the tolerance around it.

    The background is 0 or the volume's minimum, whichever has more voxels within the
    tolerance (``BACKGROUND_TOLERANCE`` x (99.9th percentile - minimum)). Site-c's skull-stripped
    scans have an exact-zero background and small negative values from resampling near the brain:
    their background is 0, not the minimum.

    Returns:
        ``(value, tolerance)``.
    """
    lowest = float(volume.min())
    highest = float(volume.max())
    span = float(np.percentile(volume, 99.9)) - lowest
    if span <= 0:
        span = highest - lowest
    tolerance = BACKGROUND_TOLERANCE * span
    candidates = [0.0, lowest] if lowest < 0.0 <= highest else [lowest]
    counts = [int(np.count_nonzero(np.abs(volume - c) <= tolerance)) for c in candidates]
    return candidates[int(np.argmax(counts))], tolerance


def _non_background(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``|volume - background|``, the non-background voxels)."""
    value, tolerance = background_level(volume)
    deviation = np.abs(volume.astype(np.float32) - np.float32(value))
    return deviation, deviation > tolerance


def dark_interior_fraction(volume: np.ndarray) -> float:
    """Fraction of the non-background voxels that are dark and do not touch the background.

    Dark: below ``DARK_LEVEL`` x the 99th percentile of ``|volume - background|`` over the
    non-background voxels; touching: 6-connected to a background voxel (the partial-volume rim of
    a skull-stripped brain). 0.0 for a volume without non-background voxels.
    """
    deviation, tissue = _non_background(volume)
    count = int(np.count_nonzero(tissue))
    if count == 0:
        return 0.0
    scale = float(np.percentile(deviation[tissue], 99))
    interior = ndimage.binary_erosion(tissue)
    return int(np.count_nonzero(interior & (deviation < DARK_LEVEL * scale))) / count


def is_skull_stripped(volume: np.ndarray) -> bool:
    """Whether ``volume`` is a skull-stripped brain rather than a head with skull and air.

    A skull-stripped scan has an exactly constant background (see :func:`background_level`)
    covering a large part of the volume (``MIN_BACKGROUND_FRACTION``), one compact
    non-background region (``MIN_LARGEST_SHARE``), and no dark voxels inside that region apart
    from its one-voxel rim (:func:`dark_interior_fraction` at most ``MAX_DARK_INTERIOR``). A head
    with skull has noisy, non-zero air around it and dark bone inside, so many dark voxels lie
    away from the background even where the scanner zeroed the air far from the head (site-e).

    Args:
        volume: a 3D MR volume (any orientation and grid).

    Returns:
        True for a skull-stripped brain. Always False for a volume without a large constant
        background (a CT, a phantom with noisy air everywhere).
    """
    _, tissue = _non_background(volume)
    count = int(np.count_nonzero(tissue))
    if count == 0 or 1.0 - count / tissue.size < MIN_BACKGROUND_FRACTION:
        return False
    if np.count_nonzero(_largest_component(tissue)) < MIN_LARGEST_SHARE * count:
        return False
    return dark_interior_fraction(volume) <= MAX_DARK_INTERIOR


def _head_mask(volume: np.ndarray) -> np.ndarray:
    """Head mask of an MR volume with skull: everything above the air noise, holes filled.

    The threshold is Otsu's on the logarithm of the non-background intensities: air noise
    (about 1 % of the brain's brightest) and tissue (tens of %) are an order of magnitude apart,
    so the logarithm separates them where a linear Otsu splits tissue (FLAIR: brain vs scalp).
    The scalp is then one shell around a dark skull, so holes are filled before the largest
    component is taken (else the brain alone would be the largest component).
    """
    value, tolerance = background_level(volume)
    deviation = volume.astype(np.float32) - np.float32(value)
    positive = deviation[deviation > tolerance]
    if positive.size == 0:
        return np.zeros(volume.shape, dtype=bool)
    threshold = float(np.exp(otsu_threshold(np.log(positive))))
    mask = _largest_component(_fill(deviation > threshold))
    # Close gaps of up to ~4 voxels in the scalp (thin at 3 mm), then fill again.
    mask |= ndimage.binary_closing(mask, iterations=2)
    return _fill(_largest_component(mask))


def subject_mask(volume: np.ndarray, modality: Modality) -> np.ndarray:
    """The subject's region of a volume: the brain of a skull-stripped scan, else the head.

    - Skull-stripped MR (:func:`is_skull_stripped`): the non-background region, largest
      component, holes filled (3D, then every axial slice). Keeps the whole brain, dark CSF of
      T1w/FLAIR and bright CSF of T2w included (>= 99.8 % of the non-zero voxels of sites a-d
      on the 1 mm and 3 mm grids); on a grid coarser than the scan it also holds the one-voxel
      partial-volume rim the pre-filter spreads into the background (11-15 % of the brain's
      volume at 3 mm).
    - MR with skull: :func:`_head_mask`, the head down to the air noise, holes filled, so brain,
      CSF and skull are inside and the air outside.
    - CT: above -500 HU, opened once, largest component, holes filled.
    - PET: above a tenth of the 99th percentile of the non-minimum voxels, same clean-up as CT.

    Args:
        volume: (X, Y, Z) with Z the axial axis (RAS after reorientation).
        modality: the volume's contrast.

    Returns:
        A bool array of ``volume``'s shape.
    """
    if modality is Modality.CT or modality is Modality.PET:
        if modality is Modality.CT:
            mask = volume > -500.0
        else:
            positive = volume[volume > volume.min()]
            if positive.size == 0:
                return np.zeros(volume.shape, dtype=bool)
            mask = volume > 0.1 * float(np.percentile(positive, 99))
        mask = ndimage.binary_opening(mask, iterations=1)
        return _fill(_largest_component(mask))
    if is_skull_stripped(volume):
        _, tissue = _non_background(volume)
        return _fill(_largest_component(tissue))
    return _head_mask(volume)


def standardisation_range(
    volume: np.ndarray, mask: np.ndarray, modality: Modality, percentiles: tuple[float, float]
) -> tuple[float, float]:
    """The native intensities ``(low, high)`` that map to -1 and 1 on the model's scale.

    MR: ``low`` is the mask's ``percentiles[0]`` percentile (the background-ish rim of a
    skull-stripped brain, the air and bone of a head), and the scale is anchored on a robust
    tissue statistic: the mask's ``TISSUE_PERCENTILE`` (75th) percentile maps to -1/3, i.e.
    ``high = low + TISSUE_SCALE * (p75 - low)`` with ``TISSUE_SCALE = 3``. A bright lesion or
    more CSF moves the 75th percentile by the few percent of the mask it covers, where it would
    set the 99.5th percentile outright. ``percentiles[1]`` is not used for MR.

    Measured on the real sites (BENCHMARKS.md, issue 16; white matter from the subject's T1w):
    at 3 mm the white-matter median over ``p75 - low`` varies across sites a-e with a
    coefficient of variation of 0.08 (T1w), 0.06 (T2w), 0.04 (FLAIR), against 0.22, 0.19, 0.16
    with the mask's 99.5th percentile as the scale and 0.24, 0.60, 0.18 with the previous mask
    and percentiles (1 mm: 0.07, 0.10, 0.08 against 0.24, 0.29, 0.18 and 0.23, 0.60, 0.20). The
    site medians of the mapped white matter lie within 0.15 (T1w), 0.09 (T2w), 0.09 (FLAIR) of
    each other at 3 mm, against 0.89, 0.51, 0.58 before. The 99.5th percentile of a brain is at
    most 3.1 x (p75 - low) above ``low`` at 3 mm (T2w; T1w 2.1, FLAIR 2.2) and 3.7 at 1 mm, so
    ``TISSUE_SCALE = 3`` clips at most 0.6 % (3 mm) or 1.5 % (1 mm, the brightest CSF of a T2w)
    of a mask at 1.

    PET keeps the mask's ``percentiles`` (its uptake has no tissue class to anchor on).

    Args:
        volume: the volume, native intensities.
        mask: bool, same shape: the region measured (:func:`subject_mask`).
        modality: the volume's contrast.
        percentiles: ``(low, high)`` percentiles (``DataConfig.percentiles``).

    Returns:
        ``(low, high)`` with ``high > low``.

    Raises:
        ValueError: for CT (the caller keeps the fixed Hounsfield window), an empty mask or one
            of another shape, or a low percentile not below ``TISSUE_PERCENTILE``.
    """
    if modality is Modality.CT:
        raise ValueError(
            "CT keeps its fixed Hounsfield window (data.ct_window_hu): no standardisation range"
        )
    if mask.shape != volume.shape:
        raise ValueError(f"mask of shape {mask.shape} for a volume of shape {volume.shape}")
    values = np.asarray(volume[mask], dtype=np.float64)
    if values.size == 0:
        raise ValueError("empty mask: nothing to standardise on")
    low_q, high_q = (float(p) for p in percentiles)
    if modality is Modality.PET:
        low, high = (float(v) for v in np.percentile(values, (low_q, high_q)))
    else:
        if not 0.0 <= low_q < TISSUE_PERCENTILE:
            raise ValueError(
                f"the low percentile must be in [0, {TISSUE_PERCENTILE:g}), found {low_q:g}"
            )
        low, anchor = (float(v) for v in np.percentile(values, (low_q, TISSUE_PERCENTILE)))
        high = low + TISSUE_SCALE * (anchor - low)
    if not high > low:  # a (nearly) constant mask: fall back to its full range, then to 1 unit
        high = float(values.max()) if float(values.max()) > low else low + 1.0
    return low, high


def antialias_sigma(spacing_in: Sequence[float], spacing_out: Sequence[float]) -> tuple[float, ...]:
    """Per-axis Gaussian sigma (input voxels): ``(s - 1) / 2`` for a downsampling factor ``s``.

    The convention of ``skimage.transform.resize(anti_aliasing=True)`` (and MONAI's ``Resize``);
    0 along axes that are not made coarser.
    """
    if len(spacing_in) != len(spacing_out):
        raise ValueError(
            f"spacing_in has {len(spacing_in)} axes and spacing_out {len(spacing_out)}"
        )
    sigma = []
    for size_in, size_out in zip(spacing_in, spacing_out, strict=True):
        if not size_in > 0 or not size_out > 0:
            raise ValueError(
                f"voxel sizes must be positive, found {tuple(spacing_in)} -> {tuple(spacing_out)}"
            )
        sigma.append(max(0.0, (float(size_out) / float(size_in) - 1.0) / 2.0))
    return tuple(sigma)


def antialias(
    volume: np.ndarray, spacing_in: Sequence[float], spacing_out: Sequence[float]
) -> np.ndarray:
    """Gaussian pre-filter of a volume before it is resampled to a coarser grid.

    Sigma per axis is :func:`antialias_sigma` (``(s - 1) / 2`` input voxels for a downsampling
    factor ``s = spacing_out / spacing_in``, the convention of ``skimage.transform.resize`` with
    ``anti_aliasing=True``), only along axes where ``spacing_out > spacing_in``; the filter is
    ``scipy.ndimage.gaussian_filter`` (``mode="nearest"``: the edge of the field of view is not
    mirrored into the volume).

    Args:
        volume: (X, Y, Z) in the scan's own voxel axes.
        spacing_in: the voxel size of ``volume`` along its axes (mm), after any reorientation.
        spacing_out: the target voxel size along the same axes (mm).

    Returns:
        float32 array of ``volume``'s shape; a float32 copy when no axis is downsampled.
    """
    sigma = antialias_sigma(spacing_in, spacing_out)
    data = np.asarray(volume, dtype=np.float32)
    if len(sigma) != data.ndim:
        raise ValueError(f"{len(sigma)} voxel sizes for a {data.ndim}D volume")
    if not any(s > 0 for s in sigma):
        return data.copy()
    return np.asarray(ndimage.gaussian_filter(data, sigma, mode="nearest"), dtype=np.float32)
