"""Template anatomy of the phantom: the MNI ICBM152 maps on a base grid, and grid resampling."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nibabel as nib
import nilearn
import numpy as np
import numpy.typing as npt
from scipy import ndimage

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

_TEMPLATE_NAME: Final = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_CSF_RIM_MM: Final = 1.5  # subarachnoid CSF added outside the template's brain mask
_SHARPEN_POWER: Final = 3.0  # makes the population tissue maps look like one subject
_CLOSING_MM: Final = 10.0  # closes sulci and notches when deriving the intracranial mask


@dataclass(frozen=True)
class _Grid:
    shape: tuple[int, int, int]
    affine: npt.NDArray[np.float64]

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        sizes = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


@dataclass(frozen=True)
class _BaseAnatomy:
    grid: _Grid
    gm: FloatArray
    wm: FloatArray
    sdist: FloatArray  # signed distance to the intracranial surface (mm), negative inside


def template_paths() -> dict[str, Path]:
    """Paths of the ICBM152 2009 T1, GM and WM maps inside the installed nilearn.

    Returns:
        ``{"t1": ..., "gm": ..., "wm": ...}``.
    """
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    return {key: folder / _TEMPLATE_NAME.format(key) for key in ("t1", "gm", "wm")}


@functools.lru_cache(maxsize=1)
def _template_1mm() -> tuple[FloatArray, FloatArray, FloatArray, npt.NDArray[np.float64]]:
    arrays: list[FloatArray] = []
    affine: npt.NDArray[np.float64] | None = None
    for key, path in template_paths().items():
        if not path.is_file():
            raise FileNotFoundError(
                f"MNI template {key} not found at {path}; the phantom needs nilearn>=0.11, "
                "whose wheel ships it"
            )
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image):
            raise TypeError(f"{path} is not a NIfTI-1 image")
        data = np.asarray(image.dataobj, dtype=np.float32) / np.float32(255.0)
        data.flags.writeable = False
        arrays.append(data)
        affine = np.asarray(image.affine, dtype=np.float64)
    assert affine is not None
    return arrays[0], arrays[1], arrays[2], affine


def _axis_weights(n_in: int, n_out: int, ratio: float, sigma: float) -> FloatArray:
    """Resampling matrix ``(n_out, n_in)`` along one axis.

    Output voxel ``j`` sits at input coordinate ``j * ratio + (ratio - 1) / 2`` (grids that share
    their field of view). Rows are linear-interpolation weights, or Gaussian weights of width
    ``sigma`` (input voxels) when the output voxel is much larger; every row sums to one.
    """
    centres = np.arange(n_out, dtype=np.float64) * ratio + (ratio - 1.0) / 2.0
    diff = np.arange(n_in, dtype=np.float64)[None, :] - centres[:, None]
    if sigma < 0.5:
        weights = np.maximum(0.0, 1.0 - np.abs(diff))
    else:
        weights = np.exp(-0.5 * (diff / sigma) ** 2)
        weights[np.abs(diff) > 4.0 * sigma + 1.0] = 0.0
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    return weights.astype(np.float32)


def _apply_separable(volume: FloatArray, matrices: Sequence[FloatArray | None]) -> FloatArray:
    """Apply one ``(n_out, n_in)`` matrix per axis (``None`` keeps the axis) with BLAS products."""
    mx, my, mz = matrices
    out = np.asarray(volume, dtype=np.float32)
    if mz is not None:
        out = out @ mz.T
    if my is not None:
        out = np.matmul(my, out)
    if mx is not None:
        rest = out.shape[1:]
        out = (mx @ out.reshape(out.shape[0], -1)).reshape(mx.shape[0], *rest)
    return np.ascontiguousarray(out, dtype=np.float32)


def _resampling_matrices(source: _Grid, target: _Grid) -> list[FloatArray | None]:
    """Per-axis matrices from ``source`` to ``target`` (same field of view, axis-aligned).

    Where the target voxels are larger, a Gaussian whose FWHM makes up the difference in voxel
    size (a slice profile) is folded into the interpolation.
    """
    matrices: list[FloatArray | None] = []
    for axis in range(3):
        src, dst = source.voxel_size[axis], target.voxel_size[axis]
        n_in, n_out = source.shape[axis], target.shape[axis]
        if n_in == n_out and math.isclose(src, dst, rel_tol=1e-6):
            matrices.append(None)
            continue
        sigma = math.sqrt(max(dst**2 - src**2, 0.0) / (8.0 * math.log(2.0))) / src
        matrices.append(_axis_weights(n_in, n_out, dst / src, sigma))
    return matrices


def _resample_to_grid(volume: FloatArray, source: _Grid, target: _Grid) -> FloatArray:
    """Resample a volume between two axis-aligned grids that cover the same field of view."""
    return _apply_separable(volume, _resampling_matrices(source, target))


def _grid_with_voxel(source: _Grid, voxel_mm: Sequence[float]) -> _Grid:
    """A grid over the same field of view as ``source`` with another voxel size."""
    src_vox = np.asarray(source.voxel_size)
    ratio = np.asarray(voxel_mm, dtype=np.float64) / src_vox
    shape = tuple(max(1, round(n / r)) for n, r in zip(source.shape, ratio, strict=True))
    affine = source.affine.copy()
    affine[:3, :3] = source.affine[:3, :3] @ np.diag(ratio)
    affine[:3, 3] = source.affine[:3, 3] + source.affine[:3, :3] @ ((ratio - 1.0) / 2.0)
    return _Grid((shape[0], shape[1], shape[2]), affine)


def _sharpen(gm: FloatArray, wm: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Turn population probabilities into one crisp-ish subject (1 mm partial volume).

    The template's maps average 152 brains, so deep white matter still holds ~20 % "grey
    matter". Raising the (CSF, GM, WM) probabilities to ``_SHARPEN_POWER`` and renormalising
    keeps the boundaries where they are but makes the tissue inside them nearly pure.
    """
    brain = gm + wm
    scale = np.where(brain > 1.0, 1.0 / np.maximum(brain, 1e-6), 1.0).astype(np.float32)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    powered = [np.power(p, _SHARPEN_POWER, dtype=np.float32) for p in (csf, gm, wm)]
    total = np.maximum(powered[0] + powered[1] + powered[2], np.float32(1e-12))
    return (powered[1] / total).astype(np.float32), (powered[2] / total).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _base_anatomy(voxel_size: float) -> _BaseAnatomy:
    """Template tissue maps on the base grid, with the signed distance to the skull's inside."""
    t1, gm, wm, affine = _template_1mm()
    template = _Grid((t1.shape[0], t1.shape[1], t1.shape[2]), affine)
    grid = _grid_with_voxel(template, (voxel_size,) * 3)
    gm, wm = _sharpen(gm, wm)
    t1 = _resample_to_grid(t1, template, grid)
    gm = _resample_to_grid(gm, template, grid)
    wm = _resample_to_grid(wm, template, grid)

    # Intracranial volume: the template's brain mask (ventricles included), sulci closed.
    mask = (t1 > 0.08) | (gm + wm > 0.2)
    outside_mm = ndimage.distance_transform_edt(~mask) * voxel_size
    dilated = outside_mm <= _CLOSING_MM
    inside_mm = ndimage.distance_transform_edt(dilated) * voxel_size
    closed = ndimage.binary_fill_holes(inside_mm > _CLOSING_MM) | mask
    sdist = (
        ndimage.distance_transform_edt(~closed) - ndimage.distance_transform_edt(closed)
    ) * voxel_size
    sdist = ndimage.gaussian_filter(sdist.astype(np.float32), sigma=max(0.5, 1.0 / voxel_size))
    sdist = (sdist - _CSF_RIM_MM).astype(np.float32)
    for array in (gm, wm, sdist):
        array.flags.writeable = False
    logger.debug("phantom base grid %s at %.2f mm", grid.shape, voxel_size)
    return _BaseAnatomy(grid=grid, gm=gm, wm=wm, sdist=sdist)
