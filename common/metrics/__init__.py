"""Image-quality metrics for synthesized slices and volumes: PSNR, SSIM, MAE, NMSE, k-space bands.

Standard definitions, tested against scikit-image and brute-force computations, plus the two
neuroimage-specific views the survey asks for (Challenges 2 and 3): metrics inside a lesion
mask and the error of the log-amplitude spectrum per radial frequency band.

Conventions (every function of the package):

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

What is where: :mod:`.checks` (:func:`to_unit` and the input checks), :mod:`.pixelwise` (PSNR,
MAE, NMSE), :mod:`.ssim`, :mod:`.kspace` (the spectrum's band errors), :mod:`.lesions` (metrics in
a region) and :mod:`.aggregate` (:func:`image_metrics`, :func:`mean_metrics`). Every public name
is importable from ``fedsynth.common.metrics`` itself.
"""

from __future__ import annotations

from fedsynth.common.metrics.aggregate import image_metrics, mean_metrics
from fedsynth.common.metrics.checks import BoolArray, FloatArray, to_unit
from fedsynth.common.metrics.kspace import (
    BAND_NAMES,
    DEFAULT_BANDS,
    kspace_band_errors,
    radial_frequency,
)
from fedsynth.common.metrics.lesions import region_metrics
from fedsynth.common.metrics.pixelwise import mae, nmse, psnr
from fedsynth.common.metrics.ssim import (
    SSIM_BORDER,
    SSIM_K1,
    SSIM_K2,
    SSIM_SIGMA,
    SSIM_TRUNCATE,
    SSIM_WIN_SIZE,
    ssim,
    ssim_map,
)

__all__ = [
    "BAND_NAMES",
    "DEFAULT_BANDS",
    "SSIM_BORDER",
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_SIGMA",
    "SSIM_TRUNCATE",
    "SSIM_WIN_SIZE",
    "BoolArray",
    "FloatArray",
    "image_metrics",
    "kspace_band_errors",
    "mae",
    "mean_metrics",
    "nmse",
    "psnr",
    "radial_frequency",
    "region_metrics",
    "ssim",
    "ssim_map",
    "to_unit",
]
