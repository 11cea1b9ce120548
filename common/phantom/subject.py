"""Phantom subjects: the template warped into one head, with skull, scalp and lesions."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from fedsynth.common.phantom.anatomy import (
    FloatArray,
    _apply_separable,
    _axis_weights,
    _BaseAnatomy,
    _Grid,
)
from fedsynth.common.phantom.physics import _PET_UPTAKE, TissueParams, tissue_table

_MM_PER_WARP_NODE: Final = 16.0  # spacing of the coarse grid the random warp is drawn on


@dataclass(frozen=True)
class LesionSpec:
    """One ellipsoidal lesion (axis-aligned in the subject's space).

    Attributes:
        centre_mm: Centre in world coordinates (mm).
        radii_mm: Semi-axes along x, y, z (mm).
        params: The lesion's tissue parameters at the site's field strength.
        pet: ``"hypo"`` or ``"hyper"`` metabolic.
    """

    centre_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    params: TissueParams
    pet: str


@dataclass
class _Subject:
    label: str
    fractions: dict[str, FloatArray]  # TISSUES plus "lesion-1", ... on the base grid
    bone_hu: FloatArray  # bone fraction x local bone CT number, on the base grid
    lesions: list[LesionSpec]
    record: dict[str, Any]


def _rotation(degrees: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    a, b, c = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _warp_coordinates(
    grid: _Grid,
    linear: npt.NDArray[np.float64],
    translation_mm: npt.NDArray[np.float64],
    warp_amplitude_mm: float,
    rng: np.random.Generator,
) -> FloatArray:
    """Template voxel coordinates sampled by every subject voxel: affine plus a smooth warp.

    The warp is standard-normal noise on a coarse lattice (one node per 16 mm) spread by Gaussian
    kernels one node wide (separable matrix products, cheap at any resolution), scaled so that
    its largest displacement is ``warp_amplitude_mm``.
    """
    shape = grid.shape
    voxel = grid.voxel_size[0]
    a3, a0 = grid.affine[:3, :3], grid.affine[:3, 3]
    inv3 = np.linalg.inv(a3)
    kernel = inv3 @ linear @ a3  # subject voxel -> template voxel
    shift = inv3 @ (linear @ a0 + translation_mm - a0)

    coarse = [max(3, math.ceil(n * voxel / _MM_PER_WARP_NODE) + 1) for n in shape]
    noise = rng.standard_normal((3, *coarse)).astype(np.float32)
    matrices: list[FloatArray | None] = []
    for n, c in zip(shape, coarse, strict=True):
        spacing = max(n - 1, 1) / (c - 1)  # output voxels between nodes
        matrices.append(_axis_weights(c, n, 1.0 / spacing, 1.0) if n > 1 else None)
    fields = [_apply_separable(noise[k], matrices) for k in range(3)]
    peak = max(float(np.abs(f).max()) for f in fields)
    gain = np.float32(warp_amplitude_mm / max(peak, 1e-9) / voxel)

    axes = [np.arange(n, dtype=np.float32) for n in shape]
    coords = np.empty((3, *shape), dtype=np.float32)
    for k in range(3):
        np.multiply(fields[k], gain, out=coords[k])
        coords[k] += np.float32(kernel[k, 0]) * axes[0][:, None, None]
        coords[k] += np.float32(kernel[k, 1]) * axes[1][None, :, None]
        coords[k] += np.float32(kernel[k, 2]) * axes[2][None, None, :]
        coords[k] += np.float32(shift[k])
    return coords


def _partial(distance_mm: FloatArray, radius_mm: float, voxel: float) -> FloatArray:
    """Fraction of a voxel inside the surface ``sdist = radius`` (linear ramp one voxel wide)."""
    out: FloatArray = np.clip(0.5 + (radius_mm - distance_mm) / voxel, 0.0, 1.0)
    return out.astype(np.float32, copy=False)


def _draw_lesion_params(rng: np.random.Generator, field_strength_t: float) -> LesionSpec:
    """Lesion tissue: longer T1 and T2 than white matter, PD ~0.9, ~30 HU, hypo/hyper PET."""
    tissues_15, tissues = tissue_table(1.5), tissue_table(field_strength_t)
    t1_factor = tissues["wm"].t1_ms / tissues_15["wm"].t1_ms
    t2_factor = tissues["wm"].t2_ms / tissues_15["wm"].t2_ms
    radii = tuple(float(r) for r in rng.uniform(3.0, 8.0, size=3))
    t1 = float(rng.uniform(1100.0, 1600.0)) * t1_factor
    t2 = float(rng.uniform(120.0, 250.0)) * t2_factor
    pd = float(rng.uniform(0.85, 0.95))
    hu = float(rng.uniform(22.0, 34.0))
    hyper = bool(rng.random() < 0.5)
    uptake = (
        _PET_UPTAKE["gm"] * float(rng.uniform(1.0, 1.6))
        if hyper
        else _PET_UPTAKE["wm"] * float(rng.uniform(0.3, 0.6))
    )
    enhancing = bool(rng.random() < 0.5)
    gd = float(rng.uniform(0.2, 0.5)) if enhancing else 0.0
    params = TissueParams(t1_ms=t1, t2_ms=t2, pd=pd, ct_hu=hu, pet_uptake=uptake, gd_mmol=gd)
    return LesionSpec(
        centre_mm=(0.0, 0.0, 0.0),
        radii_mm=(radii[0], radii[1], radii[2]),
        params=params,
        pet="hyper" if hyper else "hypo",
    )


@dataclass(frozen=True)
class _HeadDraws:
    """One subject's drawn pose, warp, skull and scalp, bone density and PET scale."""

    scales: npt.NDArray[np.float64]
    angles: npt.NDArray[np.float64]
    translation: npt.NDArray[np.float64]
    warp_mm: float
    skull_mm: float
    scalp_mm: float
    bone_hu: float
    pet_scale: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _HeadDraws:
        """Draw the parameters in their fixed order (the warp and lesions draw after them)."""
        scales = rng.uniform(0.97, 1.03, size=3)
        angles = rng.uniform(-2.0, 2.0, size=3)
        translation = rng.uniform(-2.0, 2.0, size=3)
        warp_mm = float(rng.uniform(2.0, 4.0))
        skull_mm = float(rng.uniform(5.0, 7.0))
        scalp_mm = float(rng.uniform(4.0, 6.0))
        bone_hu = float(rng.uniform(900.0, 1300.0))
        pet_scale = float(rng.uniform(0.85, 1.15))
        return cls(scales, angles, translation, warp_mm, skull_mm, scalp_mm, bone_hu, pet_scale)


def _make_subject(
    base: _BaseAnatomy,
    label: str,
    rng: np.random.Generator,
    *,
    field_strength_t: float,
    lesions: bool,
) -> _Subject:
    """Warp the template into one subject and add skull, scalp and lesions (base grid)."""
    draws = _HeadDraws.draw(rng)
    fractions, bone_weighted = _head_tissues(base, draws, rng)
    specs: list[LesionSpec] = []
    count = int(rng.integers(1, 4)) if lesions else 0
    for index in range(count):
        specs.append(_add_lesion(fractions, base.grid, index, rng, field_strength_t))
    return _Subject(label, fractions, bone_weighted, specs, _subject_record(label, draws, specs))


def _head_tissues(
    base: _BaseAnatomy, draws: _HeadDraws, rng: np.random.Generator
) -> tuple[dict[str, FloatArray], FloatArray]:
    """Sample the template through the subject's warp and build CSF, skull and scalp around it.

    Returns:
        The fractions of every tissue in ``TISSUES``, and bone fraction x local CT number.
    """
    grid = base.grid
    voxel = grid.voxel_size[0]
    linear = _rotation(draws.angles) @ np.diag(draws.scales)
    coords = _warp_coordinates(grid, linear, draws.translation, draws.warp_mm, rng)

    gm, wm, sdist = (
        np.asarray(
            ndimage.map_coordinates(volume, coords, order=1, mode="nearest", output=np.float32),
            dtype=np.float32,
        )
        for volume in (base.gm, base.wm, base.sdist)
    )
    del coords
    skull_mm = draws.skull_mm
    brain = gm + wm
    inner = np.maximum(_partial(sdist, 0.0, voxel), brain)
    skull_outer = np.maximum(_partial(sdist, skull_mm, voxel), inner)
    head = np.maximum(_partial(sdist, skull_mm + draws.scalp_mm, voxel), skull_outer)
    bone = skull_outer - inner
    # Denser outer and inner tables, lighter diploë between them.
    depth = np.clip(sdist / skull_mm, 0.0, 1.0)
    density = 0.7 + 0.6 * (2.0 * depth - 1.0) ** 2
    fractions: dict[str, FloatArray] = {
        "csf": inner - brain,
        "gm": gm,
        "wm": wm,
        "soft_tissue": head - skull_outer,
        "bone": bone,
    }
    bone_weighted = (bone * np.float32(draws.bone_hu) * density).astype(np.float32)
    return fractions, bone_weighted


def _add_lesion(
    fractions: dict[str, FloatArray],
    grid: _Grid,
    index: int,
    rng: np.random.Generator,
    field_strength_t: float,
) -> LesionSpec:
    """Draw lesion ``index`` (0-based), centre it in white matter and carve it out of the brain.

    Adds ``fractions["lesion-<index + 1>"]`` and takes its share from grey and white matter.
    """
    voxel = grid.voxel_size[0]
    spec = _draw_lesion_params(rng, field_strength_t)
    candidates = np.flatnonzero(fractions["wm"] >= 0.8)
    if candidates.size == 0:
        candidates = np.array([int(np.argmax(fractions["wm"]))])
    centre_idx = np.array(np.unravel_index(int(rng.choice(candidates)), grid.shape))
    radii_vox = np.asarray(spec.radii_mm) / voxel
    lo = np.maximum(centre_idx - np.ceil(radii_vox).astype(int) - 1, 0)
    hi = np.minimum(centre_idx + np.ceil(radii_vox).astype(int) + 2, grid.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    ii, jj, kk = (np.arange(int(a), int(b), dtype=np.float32) for a, b in zip(lo, hi, strict=True))
    q = np.sqrt(
        ((ii[:, None, None] - centre_idx[0]) / radii_vox[0]) ** 2
        + ((jj[None, :, None] - centre_idx[1]) / radii_vox[1]) ** 2
        + ((kk[None, None, :] - centre_idx[2]) / radii_vox[2]) ** 2
    )
    shape_frac = np.clip(0.5 + (1.0 - q) * float(radii_vox.min()), 0.0, 1.0).astype(np.float32)
    lesion = np.zeros(grid.shape, dtype=np.float32)
    lesion[box] = shape_frac * (fractions["gm"][box] + fractions["wm"][box])
    fractions["gm"][box] *= 1.0 - shape_frac
    fractions["wm"][box] *= 1.0 - shape_frac
    fractions[f"lesion-{index + 1}"] = lesion
    centre_mm = grid.affine[:3, :3] @ centre_idx + grid.affine[:3, 3]
    return replace(spec, centre_mm=(float(centre_mm[0]), float(centre_mm[1]), float(centre_mm[2])))


def _subject_record(label: str, draws: _HeadDraws, specs: list[LesionSpec]) -> dict[str, Any]:
    """The subject's entry in ``ground_truth.json``: its transform, head and lesions."""
    return {
        "id": label,
        "sampling_transform": {
            "description": "subject world mm -> template world mm: x_t = R S x + t + u(x), "
            "R = Rz Ry Rx about the world origin (the anterior commissure)",
            "scales": draws.scales.tolist(),
            "rotation_deg_xyz": draws.angles.tolist(),
            "translation_mm": draws.translation.tolist(),
            "warp_max_displacement_mm": draws.warp_mm,
            "warp_node_spacing_mm": _MM_PER_WARP_NODE,
        },
        "skull_thickness_mm": draws.skull_mm,
        "scalp_thickness_mm": draws.scalp_mm,
        "bone_mean_hu": draws.bone_hu,
        "pet_scale": draws.pet_scale,
        "lesions": [
            {
                "index": index + 1,
                "centre_mm": list(spec.centre_mm),
                "radii_mm": list(spec.radii_mm),
                "pet": spec.pet,
                "enhancing": spec.params.gd_mmol > 0.0,
                "params": asdict(spec.params),
            }
            for index, spec in enumerate(specs)
        ],
    }
