"""Phantom contrasts: MR, CT and PET images rendered from tissue fractions and a site's scanner."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from fedsynth.common.modalities import Modality
from fedsynth.common.phantom.anatomy import FloatArray, _Grid
from fedsynth.common.phantom.physics import _AIR_HU, TissueParams, tissue_signal
from fedsynth.common.phantom.scanner import SiteScanner, _bias_monomials


def _bias_field(scanner: SiteScanner, grid: _Grid) -> FloatArray:
    """The site's multiplicative receive bias on a grid (axis-aligned affine)."""
    axes = []
    for k in range(3):
        world = grid.affine[k, k] * np.arange(grid.shape[k]) + grid.affine[k, 3]
        axes.append(
            ((world - scanner.bias_centre_mm[k]) / scanner.bias_radius_mm).astype(np.float32)
        )
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    log_field = np.zeros(grid.shape, dtype=np.float32)
    for coefficient, monomial in zip(
        scanner.bias_coefficients, _bias_monomials(x, y, z), strict=True
    ):
        log_field += np.float32(coefficient) * monomial
    out: FloatArray = np.exp(log_field)
    return out


def _weighted_sum(
    fractions: dict[str, FloatArray], values: dict[str, float], shape: tuple[int, ...]
) -> FloatArray:
    out = np.zeros(shape, dtype=np.float32)
    for name, value in values.items():
        if value != 0.0:
            out += fractions[name] * np.float32(value)
    return out


def _render_mr(
    modality: Modality,
    fractions: dict[str, FloatArray],
    tissues: dict[str, TissueParams],
    scanner: SiteScanner,
    bias: FloatArray,
    rng: np.random.Generator,
) -> npt.NDArray[np.int16]:
    sequence = scanner.sequences[modality.value]
    field = scanner.field_strength_t
    signals = {name: tissue_signal(params, sequence, field) for name, params in tissues.items()}
    clean = _weighted_sum(fractions, signals, bias.shape) * bias
    reference = max(signals[name] for name in ("csf", "gm", "wm"))
    sigma = np.float32(scanner.mr_noise * reference)
    real = clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    magnitude = np.hypot(real, imag)
    scaled = magnitude * np.float32(scanner.mr_scale[modality.value]) + np.float32(
        scanner.mr_offset[modality.value]
    )
    return np.clip(np.rint(scaled), 0, np.iinfo(np.int16).max).astype(np.int16)


def _render_ct(
    fractions: dict[str, FloatArray],
    tissues: dict[str, TissueParams],
    bone_hu: FloatArray,
    scanner: SiteScanner,
    rng: np.random.Generator,
) -> npt.NDArray[np.int16]:
    values = {name: params.ct_hu for name, params in tissues.items() if name != "bone"}
    values["air"] = _AIR_HU
    hu = _weighted_sum(fractions, values, bone_hu.shape) + bone_hu
    hu += np.float32(scanner.ct_offset_hu)
    hu += np.float32(scanner.ct_noise_hu) * rng.standard_normal(hu.shape, dtype=np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _render_pet(
    fractions: dict[str, FloatArray],
    tissues: dict[str, TissueParams],
    scanner: SiteScanner,
    grid: _Grid,
    subject_scale: float,
    rng: np.random.Generator,
) -> FloatArray:
    values = {name: params.pet_uptake for name, params in tissues.items()}
    scale = np.float32(subject_scale * scanner.pet_calibration)
    uptake = _weighted_sum(fractions, values, grid.shape) * scale
    sigmas = [
        scanner.pet_fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / v for v in grid.voxel_size
    ]
    # Noise is drawn white and then shares the PET blur: scale it so that, after blurring, its
    # standard deviation is pet_noise x sqrt(uptake x grey-matter uptake) (Poisson-like).
    delta = np.zeros((33, 33, 33), dtype=np.float64)
    delta[16, 16, 16] = 1.0
    gain = 1.0 / math.sqrt(float((ndimage.gaussian_filter(delta, sigmas) ** 2).sum()))
    level = np.float32(scanner.pet_noise * gain)
    reference = np.float32(tissues["gm"].pet_uptake) * scale
    noisy = uptake + level * np.sqrt(uptake * reference) * rng.standard_normal(
        uptake.shape, dtype=np.float32
    )
    blurred: FloatArray = ndimage.gaussian_filter(noisy, sigmas, mode="constant", cval=0.0)
    return np.maximum(blurred, np.float32(0.0)).astype(np.float32)
