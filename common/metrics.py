"""Image-quality metrics for synthesized slices and volumes: PSNR, SSIM, MAE, NMSE, k-space bands.

Standard definitions, tested against scikit-image and brute-force computations, plus the two
neuroimage-specific views the survey asks for (Challenges 2 and 3): metrics inside a lesion
mask and the error of the log-amplitude spectrum per radial frequency band.

Conventions (every function below):

* Intensities are on [0, 1] and ``data_range`` (default 1.0) is explicit; the networks work in
  [-1, 1], so map their outputs (and the targets) with :func:`to_unit` first, or call
  :func:`image_metrics`, which does it.
* Inputs are a 2D slice ``(H, W)`` or a 3D volume. Volume metrics are computed over the whole
  volume (one MSE over all voxels, a 3D Gaussian SSIM window), not averaged over slices; only the
  k-space bands are per slice, with the slices stacked on axis 0, ``(n, H, W)``.
* ``pred`` and ``target`` must have the same shape and finite values; a ``mask`` must have that
  shape too and hold only 0/1 (boolean) values. Anything else raises a ``ValueError`` that names
  the argument and the shapes.
* Arithmetic is float64 whatever the input dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# SSIM of Wang et al. 2004 (IEEE TIP 13(4)), as scikit-image's
# structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False).
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # in units of sigma: radius int(3.5 * 1.5 + 0.5) = 5, an 11-tap window
SSIM_WIN_SIZE = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1  # 11
SSIM_BORDER = (SSIM_WIN_SIZE - 1) // 2  # 5: pixels left out of every SSIM mean at each edge
SSIM_K1 = 0.01
SSIM_K2 = 0.03

BAND_NAMES = ("low", "mid", "high")
DEFAULT_BANDS = (1 / 3, 2 / 3)

_NO_REGION = float("nan")


# ---------------------------------------------------------------------------- scale and checks


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


def _check_pair(pred: npt.ArrayLike, target: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    pred_shape, target_shape = np.shape(pred), np.shape(target)
    if pred_shape != target_shape:
        raise ValueError(
            f"pred and target must have the same shape, got pred {pred_shape} "
            f"and target {target_shape}"
        )
    return _as_image("pred", pred), _as_image("target", target)


def _check_mask(name: str, mask: npt.ArrayLike, shape: tuple[int, ...]) -> BoolArray:
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


def _check_data_range(data_range: float) -> float:
    value = float(data_range)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"data_range must be a positive finite number, got {data_range!r}")
    return value


def _selected(name: str, mask: BoolArray) -> BoolArray:
    if not mask.any():
        raise ValueError(f"{name} selects no pixels: the metric is undefined on an empty region")
    return mask


# ---------------------------------------------------------------------------- pixel-wise metrics


def _mse(pred: FloatArray, target: FloatArray, mask: BoolArray | None) -> float:
    diff = pred - target if mask is None else pred[mask] - target[mask]
    return float(np.mean(diff * diff))


def _psnr_from_mse(mse: float, data_range: float) -> float:
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
    p, t = _check_pair(pred, target)
    peak = _check_data_range(data_range)
    region = None if mask is None else _selected("mask", _check_mask("mask", mask, p.shape))
    return _psnr_from_mse(_mse(p, t, region), peak)


def mae(pred: npt.ArrayLike, target: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> float:
    """Mean absolute error over all pixels / voxels, or over those inside ``mask``."""
    p, t = _check_pair(pred, target)
    if mask is None:
        return float(np.mean(np.abs(p - t)))
    region = _selected("mask", _check_mask("mask", mask, p.shape))
    return float(np.mean(np.abs(p[region] - t[region])))


def nmse(pred: npt.ArrayLike, target: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> float:
    """Normalised mean squared error ``sum((pred - target)**2) / sum(target**2)``.

    Sums run over all pixels / voxels, or over those inside ``mask``. The normalisation is by the
    target's energy (not its variance or range), so NMSE does not depend on ``data_range``; it is
    0 for a perfect prediction and 1 for an all-zero prediction.

    Raises:
        ValueError: bad inputs, an empty mask, or a target that is zero everywhere (in the mask).
    """
    p, t = _check_pair(pred, target)
    if mask is not None:
        region = _selected("mask", _check_mask("mask", mask, p.shape))
        p, t = p[region], t[region]
    energy = float(np.sum(t * t))
    if energy == 0.0:
        where = "inside the mask" if mask is not None else "everywhere"
        raise ValueError(f"nmse is undefined: target of shape {np.shape(target)} is zero {where}")
    diff = p - t
    return float(np.sum(diff * diff)) / energy


# ---------------------------------------------------------------------------- SSIM


def _ssim_map(pred: FloatArray, target: FloatArray, data_range: float) -> FloatArray:
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


def _mean_ssim(ssim_values: FloatArray, mask: BoolArray | None) -> float:
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
    p, t = _check_pair(pred, target)
    return _ssim_map(p, t, _check_data_range(data_range))


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
    p, t = _check_pair(pred, target)
    peak = _check_data_range(data_range)
    region = None if mask is None else _check_mask("mask", mask, p.shape)
    value = _mean_ssim(_ssim_map(p, t, peak), region)
    if math.isnan(value):
        raise ValueError(
            f"mask of shape {p.shape} selects no pixel outside the {SSIM_BORDER}-pixel border "
            "that SSIM leaves out"
        )
    return value


# ---------------------------------------------------------------------------- k-space bands


def radial_frequency(shape: tuple[int, ...]) -> FloatArray:
    """Radial spatial frequency of every bin of a centred (``fftshift``-ed) DFT.

    Along each axis the frequency of bin ``k`` is ``2 (k - n // 2) / n``: 0 at the centre (the DC
    term, at index ``n // 2``) and -1 at index 0, the Nyquist frequency (half a cycle per pixel);
    positive frequencies stop at ``1 - 2/n`` (even n) or ``1 - 1/n`` (odd n). The radius is the
    Euclidean norm over the axes, so it reaches ``sqrt(2)`` in the corners of a 2D spectrum.

    Args:
        shape: the image shape, e.g. ``(H, W)``.

    Returns:
        A float64 array of that shape.
    """
    if len(shape) == 0 or any(int(n) < 1 for n in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive sizes, got {shape}")
    axes = [2.0 * np.fft.fftshift(np.fft.fftfreq(int(n))) for n in shape]
    grids = np.meshgrid(*axes, indexing="ij")
    radius: FloatArray = np.sqrt(np.sum([g * g for g in grids], axis=0))
    return radius


def _band_masks(shape: tuple[int, int], bands: tuple[float, float]) -> dict[str, BoolArray]:
    low_edge, high_edge = bands
    radius = radial_frequency(shape)
    masks = {
        "low": radius < low_edge,
        "mid": (radius >= low_edge) & (radius < high_edge),
        "high": radius >= high_edge,
    }
    for name, band in masks.items():
        if not band.any():
            raise ValueError(
                f"the {name!r} band {bands} holds no frequency of a {shape} slice: "
                "the slice is too small for these bands"
            )
    return masks


def _log_amplitude(slices: FloatArray) -> FloatArray:
    spectrum = np.fft.fftshift(np.fft.fft2(slices, axes=(-2, -1)), axes=(-2, -1))
    amplitude: FloatArray = np.log1p(np.abs(spectrum))
    return amplitude


def _check_bands(bands: tuple[float, float]) -> tuple[float, float]:
    edges = tuple(float(b) for b in bands)
    if len(edges) != 2 or not (0.0 < edges[0] < edges[1]) or not all(map(math.isfinite, edges)):
        raise ValueError(
            f"bands must be two increasing positive radii (low/mid, mid/high edges), got {bands}"
        )
    return edges[0], edges[1]


def kspace_band_errors(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    bands: tuple[float, float] = DEFAULT_BANDS,
) -> dict[str, float]:
    """Mean absolute log-amplitude error of the 2D spectrum, per radial frequency band.

    A blurred synthesis can score a good PSNR while it lacks the high spatial frequencies of
    the target (the survey's Challenge 3); this shows where in k-space the error lies.

    Per 2D slice: the centred 2D DFT (numpy's unnormalised forward FFT, ``norm="backward"``, so
    amplitudes grow with the pixel count: compare band errors between images of one size),
    log-amplitude ``log(1 + |F|)``, radial frequency from :func:`radial_frequency` (Nyquist
    along each axis is 1). Bands with ``bands = (b1, b2)``: ``low`` is ``r < b1``, ``mid`` is
    ``b1 <= r < b2``, ``high`` is ``r >= b2``, including the corners beyond ``r = 1``. Each
    band's error is the mean of ``|log(1 + |F_pred|) - log(1 + |F_target|)|`` over its bins.
    Phase is ignored: a shifted image has zero error. A 3D input ``(n, H, W)`` is ``n`` slices
    stacked on axis 0; its band errors are the means of the per-slice errors.

    Args:
        pred: predicted slice ``(H, W)`` or stack of slices ``(n, H, W)``, on [0, 1].
        target: reference of the same shape.
        bands: the two band edges in normalised radial frequency (default ``(1/3, 2/3)``).

    Returns:
        ``{"low": ..., "mid": ..., "high": ...}``, all 0 for identical images.
    """
    p, t = _check_pair(pred, target)
    edges = _check_bands(bands)
    if p.ndim == 2:
        p, t = p[np.newaxis], t[np.newaxis]
    height, width = p.shape[-2:]
    masks = _band_masks((height, width), edges)
    error = np.abs(_log_amplitude(p) - _log_amplitude(t))  # (n, H, W)
    # mean over each band per slice, then over slices (equal bins per slice: one global mean)
    return {name: float(np.mean(error[:, band])) for name, band in masks.items()}


# ---------------------------------------------------------------------------- lesions


def _region_values(
    pred: FloatArray,
    target: FloatArray,
    region: BoolArray,
    data_range: float,
    ssim_values: FloatArray | None,
) -> dict[str, float]:
    if not region.any():
        return {"psnr": _NO_REGION, "ssim": _NO_REGION, "mae": _NO_REGION}
    if ssim_values is None:
        ssim_values = _ssim_map(pred, target, data_range)
    return {
        "psnr": _psnr_from_mse(_mse(pred, target, region), data_range),
        "ssim": _mean_ssim(ssim_values, region),
        "mae": float(np.mean(np.abs(pred[region] - target[region]))),
    }


def region_metrics(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    region_mask: npt.ArrayLike,
    data_range: float = 1.0,
) -> dict[str, float]:
    """PSNR, SSIM and MAE inside a region such as a lesion mask (the survey's Challenge 2).

    Same definitions as :func:`psnr`, :func:`ssim` (masked: the SSIM map averaged over the
    region's pixels outside the 5-pixel border) and :func:`mae`, restricted to the region.

    Never raises for an empty region: a slice without lesion is normal, so every value is NaN
    when the region is empty (there is nothing to measure), and ``"ssim"`` is NaN when all region
    pixels lie in the SSIM border. :func:`mean_metrics` skips NaN. ``"psnr"`` is ``inf`` when the
    region is reproduced exactly. Invalid inputs (shapes, NaN) still raise ``ValueError``.

    Returns:
        ``{"psnr": ..., "ssim": ..., "mae": ...}``.
    """
    p, t = _check_pair(pred, target)
    region = _check_mask("region_mask", region_mask, p.shape)
    return _region_values(p, t, region, _check_data_range(data_range), None)


# ---------------------------------------------------------------------------- aggregate


def image_metrics(
    pred: npt.ArrayLike,
    target: npt.ArrayLike,
    mask: npt.ArrayLike | None = None,
    lesion: npt.ArrayLike | None = None,
) -> dict[str, float]:
    """All metrics of one model-scale prediction, a 2D slice or a 3D volume.

    ``pred`` and ``target`` are on the model's [-1, 1] scale; both go through :func:`to_unit`
    and every metric is computed on [0, 1] with ``data_range = 1``.

    Keys, always: ``psnr``, ``ssim``, ``mae``, ``nmse`` (whole image), ``kspace_low``,
    ``kspace_mid``, ``kspace_high`` (per slice along axis 0 for a volume ``(n, H, W)``, averaged).
    With ``mask`` (e.g. the head foreground): ``psnr_masked``, ``ssim_masked``, ``mae_masked``,
    ``nmse_masked``. With ``lesion``: ``lesion_psnr``, ``lesion_ssim``, ``lesion_mae``.

    Undefined values are NaN rather than errors, so one bad slice does not stop an evaluation
    (:func:`mean_metrics` skips them): ``nmse`` when the target is all background (zero after
    :func:`to_unit`), every masked / lesion value when the mask / lesion is empty, the SSIM ones
    when it lies entirely in the SSIM border. ``psnr*`` are ``inf`` for an exact reproduction.

    Raises:
        ValueError: mismatched shapes, not 2D/3D, NaN/inf values, a mask of another shape, or an
            axis shorter than 11 pixels (SSIM's window).
    """
    p_raw, t_raw = _check_pair(pred, target)
    p, t = to_unit(p_raw), to_unit(t_raw)
    ssim_values = _ssim_map(p, t, 1.0)
    energy = float(np.sum(t * t))
    results: dict[str, float] = {
        "psnr": _psnr_from_mse(_mse(p, t, None), 1.0),
        "ssim": _mean_ssim(ssim_values, None),
        "mae": float(np.mean(np.abs(p - t))),
        "nmse": float(np.sum((p - t) ** 2)) / energy if energy > 0 else math.nan,
    }
    if mask is not None:
        region = _check_mask("mask", mask, p.shape)
        values = _region_values(p, t, region, 1.0, ssim_values)
        masked_energy = float(np.sum(t[region] ** 2))
        if not region.any():
            logger.debug("image_metrics: empty mask, masked metrics are NaN")
        results |= {f"{key}_masked": value for key, value in values.items()}
        results["nmse_masked"] = (
            float(np.sum((p[region] - t[region]) ** 2)) / masked_energy
            if masked_energy > 0
            else math.nan
        )
    spectrum = kspace_band_errors(p, t)
    results |= {f"kspace_{band}": spectrum[band] for band in BAND_NAMES}
    if lesion is not None:
        region = _check_mask("lesion", lesion, p.shape)
        values = _region_values(p, t, region, 1.0, ssim_values)
        results |= {f"lesion_{key}": value for key, value in values.items()}
    return results


def mean_metrics(results: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Average metric dictionaries (one per slice, volume or subject), key by key.

    For every key found in any dictionary (in first-seen order) the result holds three entries:

    * ``key``: the mean of its finite values; NaN values (undefined, e.g. a lesion metric of a
      slice without lesion) and missing keys are skipped; NaN if no finite value is left.
    * ``key + "_n"``: how many finite values went into that mean.
    * ``key + "_n_inf"``: how many infinite values were left out of it (a PSNR of ``inf`` is an
      exact reproduction; averaging it would make the mean ``inf``), reported so they are not
      silently lost.

    The key set depends only on the input keys, so every site reports the same keys.

    Raises:
        ValueError: no dictionaries, or a value that is not a real number.
    """
    rows = list(results)
    if not rows:
        raise ValueError("mean_metrics needs at least one metrics dictionary, got none")
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    summary: dict[str, float] = {}
    for key in keys:
        finite: list[float] = []
        n_inf = 0
        for row in rows:
            if key not in row:
                continue
            try:
                value = float(row[key])
            except (TypeError, ValueError) as error:
                raise ValueError(f"metric {key!r} must be a number, got {row[key]!r}") from error
            if math.isinf(value):
                n_inf += 1
            elif not math.isnan(value):
                finite.append(value)
        summary[key] = math.fsum(finite) / len(finite) if finite else math.nan
        summary[f"{key}_n"] = float(len(finite))
        summary[f"{key}_n_inf"] = float(n_inf)
    return summary
