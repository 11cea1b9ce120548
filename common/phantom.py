"""Built-in brain phantom: BIDS hospital sites with known anatomy, physics and scanner effects.

Lets every test, demo and benchmark run offline, with the ground truth written beside the images.

Anatomy comes from the MNI ICBM152 2009 template and its grey- and white-matter probability maps
that ship inside the nilearn wheel. That template is skull-stripped, so the intracranial volume is
derived from its brain mask and the skull and scalp are built as shells of drawn thickness around
it. Every subject is the template under its own small affine transform and smooth random warp,
with optional ellipsoidal lesions. Contrasts come from physics: spin-echo and inversion-recovery
signal equations on per-tissue T1, T2 and PD tables (1.5 T and 3 T), CT numbers, PET uptake,
mixed by partial-volume fractions. Every site draws its own scanner: field strength, sequence
timings, bias field, Rician noise, intensity scale and offset, voxel size / slice thickness, CT
noise and PET resolution.

Layout written for ``site-k`` (subject labels such as ``s1p001`` are unique in the consortium)::

    site-k/dataset_description.json, README, participants.tsv, participants.json
    site-k/sub-X/anat/sub-X_{T1w,ce-gd_T1w,T2w,FLAIR,PD,ct}.nii.gz (+ .json sidecars)
    site-k/sub-X/pet/sub-X_pet.nii.gz (+ .json)
    site-k/derivatives/phantom/dataset_description.json, dseg.tsv, ground_truth.json
    site-k/derivatives/phantom/sub-X/anat/sub-X_dseg.nii.gz              uint8 labels
    site-k/derivatives/phantom/sub-X/anat/sub-X_probseg.nii.gz           4D fractions by label
    site-k/derivatives/phantom/sub-X/anat/sub-X_label-lesion_mask.nii.gz uint8 0/1

All images of a subject share one grid (the site's voxel size, RAS affine). MR images are int16
scanner units (non-negative), CT is int16 HU, PET float32 SUV-like uptake.

Tissue label table (``dseg`` is the argmax of the fractions; also ``derivatives/phantom/dseg.tsv``):

====  ==============
 0    background (air)
 1    csf
 2    gm
 3    wm
 4    soft_tissue (scalp)
 5    bone (skull)
 6    lesion
====  ==============

Example:
    >>> from fedsynth.common.phantom import generate_consortium
    >>> sites = generate_consortium(Path("data"), sites=3, subjects=[8, 4, 2], seed=0)
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import nibabel as nib
import nilearn
import numpy as np
import numpy.typing as npt
from scipy import ndimage

from fedsynth.common import __version__
from fedsynth.common.modalities import Modality

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

GENERATOR_NAME: Final = "fedsynth phantom"
BIDS_VERSION: Final = "1.9.0"

DEFAULT_MODALITIES: Final[tuple[Modality, ...]] = (
    Modality.T1W,
    Modality.T2W,
    Modality.FLAIR,
    Modality.PD,
    Modality.CT,
    Modality.PET,
)

LABELS: Final[dict[int, str]] = {
    0: "background",
    1: "csf",
    2: "gm",
    3: "wm",
    4: "soft_tissue",
    5: "bone",
    6: "lesion",
}
TISSUES: Final[tuple[str, ...]] = ("csf", "gm", "wm", "soft_tissue", "bone")
FIELD_STRENGTHS_T: Final[tuple[float, ...]] = (1.5, 3.0)
_SLICE_FACTORS: Final[tuple[float, ...]] = (1.0, 2.0, 1.5, 3.0)  # x voxel_size, capped at 5 mm

_TEMPLATE_NAME: Final = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_MM_PER_WARP_NODE: Final = 16.0  # spacing of the coarse grid the random warp is drawn on
_CSF_RIM_MM: Final = 1.5  # subarachnoid CSF added outside the template's brain mask
_SHARPEN_POWER: Final = 3.0  # makes the population tissue maps look like one subject
_CLOSING_MM: Final = 10.0  # closes sulci and notches when deriving the intracranial mask


# ----------------------------------------------------------------------------- tissue physics


@dataclass(frozen=True)
class TissueParams:
    """Physical parameters of one tissue at one field strength.

    Attributes:
        t1_ms: Longitudinal relaxation time (ms).
        t2_ms: Transverse relaxation time (ms).
        pd: Proton density relative to pure water (0..1).
        ct_hu: CT number (Hounsfield units).
        pet_uptake: FDG-PET-like uptake (SUV-like units, g/mL).
        gd_mmol: Gadolinium concentration after contrast injection (mmol/L); shortens T1 in
            ``T1w-ce`` images only.
    """

    t1_ms: float
    t2_ms: float
    pd: float
    ct_hu: float
    pet_uptake: float
    gd_mmol: float = 0.0


# (T1 ms, T2 ms, PD) per tissue. Brain values lie in the ranges reported by Stanisz et al.,
# "T1, T2 relaxation and magnetization transfer in tissue at 3T", MRM 54:507 (2005) and the
# 1.5 T literature it reviews; scalp is a fat/muscle mix (short T1); cortical bone has almost no
# MR-visible water and a sub-millisecond T2.
_MR_TABLE: Final[dict[float, dict[str, tuple[float, float, float]]]] = {
    1.5: {
        "csf": (4000.0, 2000.0, 1.00),
        "gm": (1180.0, 95.0, 0.80),
        "wm": (760.0, 80.0, 0.70),
        "soft_tissue": (400.0, 65.0, 0.85),
        "bone": (300.0, 1.0, 0.05),
    },
    3.0: {
        "csf": (4300.0, 1800.0, 1.00),
        "gm": (1820.0, 99.0, 0.80),
        "wm": (1080.0, 70.0, 0.70),
        "soft_tissue": (500.0, 60.0, 0.85),
        "bone": (350.0, 0.8, 0.05),
    },
}
_CT_HU: Final[dict[str, float]] = {
    "csf": 15.0,
    "gm": 40.0,
    "wm": 27.0,
    "soft_tissue": 35.0,
    "bone": 1100.0,  # nominal; each subject draws its own mean and the shell has a profile
}
_AIR_HU: Final = -1000.0
_PET_UPTAKE: Final[dict[str, float]] = {
    "csf": 0.3,
    "gm": 8.0,
    "wm": 2.7,
    "soft_tissue": 1.0,
    "bone": 0.6,
}
# Gadolinium reaching each tissue after injection: the blood-brain barrier keeps it in the
# vessels of normal brain; scalp and muscle take it up.
_GD_MMOL: Final[dict[str, float]] = {
    "csf": 0.0,
    "gm": 0.02,
    "wm": 0.01,
    "soft_tissue": 0.15,
    "bone": 0.0,
}
# T1 relaxivity of a gadolinium chelate (L/mmol/s) by field strength.
_GD_R1: Final[dict[float, float]] = {1.5: 4.5, 3.0: 4.2}


def tissue_table(field_strength_t: float) -> dict[str, TissueParams]:
    """Return the parameters of every tissue at a field strength.

    Args:
        field_strength_t: 1.5 or 3.0 (tesla).

    Returns:
        Tissue name (see ``TISSUES``) -> parameters.

    Raises:
        ValueError: For a field strength without a table.
    """
    if field_strength_t not in _MR_TABLE:
        allowed = ", ".join(str(b) for b in _MR_TABLE)
        raise ValueError(f"no tissue table for {field_strength_t} T; allowed: {allowed}")
    return {
        name: TissueParams(
            t1_ms=t1,
            t2_ms=t2,
            pd=pd,
            ct_hu=_CT_HU[name],
            pet_uptake=_PET_UPTAKE[name],
            gd_mmol=_GD_MMOL[name],
        )
        for name, (t1, t2, pd) in _MR_TABLE[field_strength_t].items()
    }


@dataclass(frozen=True)
class SequenceParams:
    """Timing of one MR sequence.

    Attributes:
        kind: ``"spin_echo"`` or ``"inversion_recovery"``.
        tr_ms: Repetition time (ms).
        te_ms: Echo time (ms).
        ti_ms: Inversion time (ms), inversion recovery only.
        contrast_agent: Whether the image is acquired after gadolinium injection.
    """

    kind: str
    tr_ms: float
    te_ms: float
    ti_ms: float | None = None
    contrast_agent: bool = False


def spin_echo_signal(pd: float, t1_ms: float, t2_ms: float, *, tr_ms: float, te_ms: float) -> float:
    """Spin-echo magnitude ``PD (1 - exp(-TR/T1)) exp(-TE/T2)``.

    Args:
        pd: Proton density.
        t1_ms: T1 (ms).
        t2_ms: T2 (ms).
        tr_ms: Repetition time (ms).
        te_ms: Echo time (ms).

    Returns:
        The signal, in units of the fully relaxed magnetisation of water.
    """
    return pd * (1.0 - math.exp(-tr_ms / t1_ms)) * math.exp(-te_ms / t2_ms)


def inversion_recovery_signal(
    pd: float, t1_ms: float, t2_ms: float, *, tr_ms: float, te_ms: float, ti_ms: float
) -> float:
    """Magnitude inversion-recovery signal ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``.

    Args:
        pd: Proton density.
        t1_ms: T1 (ms).
        t2_ms: T2 (ms).
        tr_ms: Repetition time (ms).
        te_ms: Echo time (ms).
        ti_ms: Inversion time (ms).

    Returns:
        The signal, in units of the fully relaxed magnetisation of water.
    """
    mz = 1.0 - 2.0 * math.exp(-ti_ms / t1_ms) + math.exp(-tr_ms / t1_ms)
    return pd * abs(mz) * math.exp(-te_ms / t2_ms)


def null_inversion_time(t1_ms: float, tr_ms: float) -> float:
    """Inversion time that nulls a tissue: ``T1 ln(2 / (1 + exp(-TR/T1)))``.

    Args:
        t1_ms: T1 of the tissue to null (ms), e.g. CSF for FLAIR.
        tr_ms: Repetition time (ms).

    Returns:
        TI (ms) at which ``1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0``.
    """
    return t1_ms * math.log(2.0 / (1.0 + math.exp(-tr_ms / t1_ms)))


def tissue_signal(tissue: TissueParams, sequence: SequenceParams, field_strength_t: float) -> float:
    """Noise-free MR signal of a pure tissue for a sequence.

    After contrast, T1 is shortened by the gadolinium present: ``1/T1' = 1/T1 + r1 [Gd]``.

    Args:
        tissue: The tissue's parameters.
        sequence: The sequence timing.
        field_strength_t: Field strength (sets the gadolinium relaxivity).

    Returns:
        The signal, in units of the fully relaxed magnetisation of water.
    """
    t1 = tissue.t1_ms
    if sequence.contrast_agent and tissue.gd_mmol > 0.0:
        r1_per_ms = _GD_R1[field_strength_t] / 1000.0
        t1 = 1.0 / (1.0 / t1 + r1_per_ms * tissue.gd_mmol)
    if sequence.kind == "spin_echo":
        return spin_echo_signal(
            tissue.pd, t1, tissue.t2_ms, tr_ms=sequence.tr_ms, te_ms=sequence.te_ms
        )
    if sequence.kind == "inversion_recovery" and sequence.ti_ms is not None:
        return inversion_recovery_signal(
            tissue.pd,
            t1,
            tissue.t2_ms,
            tr_ms=sequence.tr_ms,
            te_ms=sequence.te_ms,
            ti_ms=sequence.ti_ms,
        )
    raise ValueError(f"unknown sequence kind {sequence.kind!r} (or inversion time missing)")


# ----------------------------------------------------------------------------- site scanners


@dataclass(frozen=True)
class SiteScanner:
    """What one hospital's scanners do to every image they write.

    Attributes:
        site: Site number (1-based).
        field_strength_t: MR field strength (T); picks the tissue table.
        voxel_size_mm: Voxel size the site writes (x, y, z); z is the slice thickness.
        sequences: MR modality value -> sequence timing.
        mr_scale: MR modality value -> scanner intensity scale.
        mr_offset: MR modality value -> scanner intensity offset.
        mr_noise: Rician noise sigma as a fraction of the brightest brain tissue's signal.
        bias_coefficients: Coefficients of the log bias field on the monomials
            ``x, y, z, x², y², z², xy, xz, yz`` of ``(world_mm - bias_centre_mm) / bias_radius_mm``.
        bias_centre_mm: Centre of the bias field (world mm).
        bias_radius_mm: Length that normalises the bias field's coordinates (mm).
        ct_noise_hu: Standard deviation of the CT noise (HU).
        ct_offset_hu: Calibration offset of the CT scanner (HU).
        pet_fwhm_mm: PET resolution (full width at half maximum, mm).
        pet_noise: PET noise as a fraction of the local uptake (after blurring).
        pet_calibration: Multiplicative calibration of the PET scanner.
    """

    site: int
    field_strength_t: float
    voxel_size_mm: tuple[float, float, float]
    sequences: dict[str, SequenceParams]
    mr_scale: dict[str, float]
    mr_offset: dict[str, float]
    mr_noise: float
    bias_coefficients: tuple[float, ...]
    bias_centre_mm: tuple[float, float, float]
    bias_radius_mm: float
    ct_noise_hu: float
    ct_offset_hu: float
    pet_fwhm_mm: float
    pet_noise: float
    pet_calibration: float


def _site_rng(seed: int, site: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, site)))


def _subject_rng(seed: int, site: int, subject: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, site, subject)))


def _noise_rng(seed: int, site: int, subject: int, modality: Modality) -> np.random.Generator:
    index = list(Modality).index(modality)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, site, subject, index)))


def _bias_monomials(x: Any, y: Any, z: Any) -> tuple[Any, ...]:
    return (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)


def draw_site_scanner(seed: int, site: int, voxel_size: float) -> SiteScanner:
    """Draw one site's scanner from ``(seed, site)`` alone.

    Every parameter is drawn whatever modalities are asked for, so a site's data never depends
    on the modality list or on other sites.

    Args:
        seed: Consortium seed.
        site: Site number (1-based).
        voxel_size: Base voxel size of the phantom (mm).

    Returns:
        The site's scanner.
    """
    rng = _site_rng(seed, site)
    # Field strength and slice thickness cycle over the sites from a seed-drawn start, so that
    # neighbouring sites always differ in both.
    start = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,))).integers(0, 4, 2)
    field = FIELD_STRENGTHS_T[(site + int(start[0])) % len(FIELD_STRENGTHS_T)]
    slice_factor = _SLICE_FACTORS[(site + int(start[1])) % len(_SLICE_FACTORS)]
    in_plane = voxel_size * float(rng.choice([1.0, 1.0, 1.2]))
    thickness = min(voxel_size * slice_factor, max(voxel_size, 5.0))
    tissues = tissue_table(field)

    t1_tr, t1_te = 10.0 * round(rng.uniform(45, 65)), float(round(rng.uniform(10, 20)))
    t2_tr, t2_te = 10.0 * round(rng.uniform(350, 600)), float(round(rng.uniform(85, 115)))
    fl_tr, fl_te = 10.0 * round(rng.uniform(800, 1100)), float(round(rng.uniform(100, 140)))
    pd_tr, pd_te = 10.0 * round(rng.uniform(250, 450)), float(round(rng.uniform(10, 20)))
    t1w = SequenceParams("spin_echo", t1_tr, t1_te)
    sequences = {
        Modality.T1W.value: t1w,
        Modality.T1W_CE.value: replace(t1w, contrast_agent=True),
        Modality.T2W.value: SequenceParams("spin_echo", t2_tr, t2_te),
        Modality.FLAIR.value: SequenceParams(
            "inversion_recovery", fl_tr, fl_te, null_inversion_time(tissues["csf"].t1_ms, fl_tr)
        ),
        Modality.PD.value: SequenceParams("spin_echo", pd_tr, pd_te),
    }
    base_scale = float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0))))
    mr_scale, mr_offset = {}, {}
    for modality in Modality:
        if modality.is_mr:
            mr_scale[modality.value] = base_scale * float(rng.uniform(0.8, 1.25))
            mr_offset[modality.value] = float(rng.uniform(0.0, 0.02)) * base_scale
    mr_noise = float(rng.uniform(0.01, 0.04))

    # Smooth bias: a random quadratic in log space, scaled so that its standard deviation over
    # a head-sized box is the drawn strength.
    centre = tuple(float(c) for c in rng.uniform(-30.0, 30.0, size=3))
    radius = 100.0
    raw = rng.standard_normal(9)
    axis = np.linspace(-0.8, 0.8, 9)
    gx, gy, gz = np.meshgrid(axis, axis, axis, indexing="ij")
    field_log = sum(c * m for c, m in zip(raw, _bias_monomials(gx, gy, gz), strict=True))
    strength = float(rng.uniform(0.04, 0.12))
    coefficients = raw * strength / max(float(np.std(field_log)), 1e-9)

    return SiteScanner(
        site=site,
        field_strength_t=field,
        voxel_size_mm=(in_plane, in_plane, thickness),
        sequences=sequences,
        mr_scale=mr_scale,
        mr_offset=mr_offset,
        mr_noise=mr_noise,
        bias_coefficients=tuple(float(c) for c in coefficients),
        bias_centre_mm=(centre[0], centre[1], centre[2]),
        bias_radius_mm=radius,
        ct_noise_hu=float(rng.uniform(3.0, 8.0)),
        ct_offset_hu=float(rng.uniform(-3.0, 3.0)),
        pet_fwhm_mm=float(rng.uniform(4.5, 6.5)),
        pet_noise=float(rng.uniform(0.03, 0.08)),
        pet_calibration=float(rng.uniform(0.95, 1.05)),
    )


# ----------------------------------------------------------------------------- template anatomy


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


# ----------------------------------------------------------------------------- subjects


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


def _make_subject(
    base: _BaseAnatomy,
    label: str,
    rng: np.random.Generator,
    *,
    field_strength_t: float,
    lesions: bool,
) -> _Subject:
    """Warp the template into one subject and add skull, scalp and lesions (base grid)."""
    grid = base.grid
    voxel = grid.voxel_size[0]
    scales = rng.uniform(0.97, 1.03, size=3)
    angles = rng.uniform(-2.0, 2.0, size=3)
    translation = rng.uniform(-2.0, 2.0, size=3)
    warp_mm = float(rng.uniform(2.0, 4.0))
    skull_mm = float(rng.uniform(5.0, 7.0))
    scalp_mm = float(rng.uniform(4.0, 6.0))
    bone_hu = float(rng.uniform(900.0, 1300.0))
    pet_scale = float(rng.uniform(0.85, 1.15))
    linear = _rotation(angles) @ np.diag(scales)
    coords = _warp_coordinates(grid, linear, translation, warp_mm, rng)

    gm, wm, sdist = (
        np.asarray(
            ndimage.map_coordinates(volume, coords, order=1, mode="nearest", output=np.float32),
            dtype=np.float32,
        )
        for volume in (base.gm, base.wm, base.sdist)
    )
    del coords
    brain = gm + wm
    inner = np.maximum(_partial(sdist, 0.0, voxel), brain)
    skull_outer = np.maximum(_partial(sdist, skull_mm, voxel), inner)
    head = np.maximum(_partial(sdist, skull_mm + scalp_mm, voxel), skull_outer)
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
    bone_weighted = (bone * np.float32(bone_hu) * density).astype(np.float32)

    specs: list[LesionSpec] = []
    count = int(rng.integers(1, 4)) if lesions else 0
    for index in range(count):
        spec = _draw_lesion_params(rng, field_strength_t)
        candidates = np.flatnonzero(fractions["wm"] >= 0.8)
        if candidates.size == 0:
            candidates = np.array([int(np.argmax(fractions["wm"]))])
        centre_idx = np.array(np.unravel_index(int(rng.choice(candidates)), grid.shape))
        radii_vox = np.asarray(spec.radii_mm) / voxel
        lo = np.maximum(centre_idx - np.ceil(radii_vox).astype(int) - 1, 0)
        hi = np.minimum(centre_idx + np.ceil(radii_vox).astype(int) + 2, grid.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        ii, jj, kk = (
            np.arange(int(a), int(b), dtype=np.float32) for a, b in zip(lo, hi, strict=True)
        )
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
        specs.append(
            replace(spec, centre_mm=(float(centre_mm[0]), float(centre_mm[1]), float(centre_mm[2])))
        )

    record: dict[str, Any] = {
        "id": label,
        "sampling_transform": {
            "description": "subject world mm -> template world mm: x_t = R S x + t + u(x), "
            "R = Rz Ry Rx about the world origin (the anterior commissure)",
            "scales": scales.tolist(),
            "rotation_deg_xyz": angles.tolist(),
            "translation_mm": translation.tolist(),
            "warp_max_displacement_mm": warp_mm,
            "warp_node_spacing_mm": _MM_PER_WARP_NODE,
        },
        "skull_thickness_mm": skull_mm,
        "scalp_thickness_mm": scalp_mm,
        "bone_mean_hu": bone_hu,
        "pet_scale": pet_scale,
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
    return _Subject(label, fractions, bone_weighted, specs, record)


# ----------------------------------------------------------------------------- contrasts


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


# ----------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to a temporary name in the same folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_bytes(payload: Any) -> bytes:
    return (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode()


def _write_nifti(
    path: Path,
    data: npt.NDArray[Any],
    affine: npt.NDArray[np.float64],
    on_disk: type[np.generic] | None = None,
) -> None:
    """Write a NIfTI-1 file byte-stably (gzip mtime 0, no file name in the gzip header).

    ``on_disk`` stores floats as a scaled integer type (nibabel picks the slope).
    """
    image = nib.Nifti1Image(data, affine)
    if on_disk is not None:
        image.set_data_dtype(on_disk)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header["descrip"] = GENERATOR_NAME.encode()
    _atomic_write(path, gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


class _Writer:
    """Compresses and writes files on two threads while the next image is computed."""

    def __init__(self, workers: int = 2, max_pending: int = 8) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phantom-io")
        self._pending: list[Future[None]] = []
        self._max_pending = max_pending

    def nifti(
        self,
        path: Path,
        data: npt.NDArray[Any],
        affine: npt.NDArray[np.float64],
        on_disk: type[np.generic] | None = None,
    ) -> None:
        self._submit(self._pool.submit(_write_nifti, path, data, affine, on_disk))

    def raw(self, path: Path, data: bytes) -> None:
        self._submit(self._pool.submit(_atomic_write, path, data))

    def _submit(self, future: Future[None]) -> None:
        self._pending.append(future)
        while len(self._pending) > self._max_pending:
            self._pending.pop(0).result()

    def drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=exc_type is not None)


def _round(value: Any) -> Any:
    """Round floats (recursively) so the JSON ground truth stays readable."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_round(v) for v in value]
    return value


def _sidecar(modality: Modality, scanner: SiteScanner) -> dict[str, Any]:
    common = {
        "Manufacturer": "fedsynth",
        "ManufacturersModelName": GENERATOR_NAME,
        "SliceThickness": scanner.voxel_size_mm[2],
    }
    if modality is Modality.CT:
        return {**common, "Modality": "CT", "Units": "HU"}
    if modality is Modality.PET:
        return {
            **common,
            "Modality": "PT",
            "TracerName": "FDG",
            "Units": "g/mL",
            "ReconFilterSize": scanner.pet_fwhm_mm,
        }
    sequence = scanner.sequences[modality.value]
    sidecar: dict[str, Any] = {
        **common,
        "Modality": "MR",
        "MagneticFieldStrength": scanner.field_strength_t,
        "ScanningSequence": "IR" if sequence.kind == "inversion_recovery" else "SE",
        "RepetitionTime": sequence.tr_ms / 1000.0,
        "EchoTime": sequence.te_ms / 1000.0,
    }
    if sequence.ti_ms is not None:
        sidecar["InversionTime"] = sequence.ti_ms / 1000.0
    if sequence.contrast_agent:
        sidecar["ContrastBolusIngredient"] = "GADOLINIUM"
    return sidecar


def _image_path(site_dir: Path, label: str, modality: Modality) -> Path:
    folder = site_dir / f"sub-{label}" / modality.bids_datatype
    return folder / f"sub-{label}_{modality.bids_stem}.nii.gz"


def subject_label(site: int, index: int) -> str:
    """BIDS subject label of the ``index``-th (1-based) subject of ``site``, e.g. ``s1p001``."""
    return f"s{site}p{index:03d}"


def _prepare_site_dir(site_dir: Path, overwrite: bool) -> None:
    if site_dir.exists() and any(site_dir.iterdir()):
        description = site_dir / "dataset_description.json"
        made_here = False
        if description.is_file():
            try:
                generated = json.loads(description.read_text()).get("GeneratedBy", [])
                made_here = any(entry.get("Name") == GENERATOR_NAME for entry in generated)
            except (json.JSONDecodeError, AttributeError):
                made_here = False
        if not overwrite:
            raise FileExistsError(
                f"{site_dir} already exists and is not empty; pass overwrite=True to replace a "
                "phantom site, or choose another out_dir"
            )
        if not made_here:
            raise FileExistsError(
                f"{site_dir} is not a phantom site (no {description.name} generated by "
                f"{GENERATOR_NAME!r}); refusing to delete it"
            )
        shutil.rmtree(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)


def _validate(
    sites: int,
    subjects: Sequence[int],
    seed: int,
    voxel_size: float,
    modalities: Sequence[Modality | str],
) -> tuple[Modality, ...]:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(sites, bool) or not isinstance(sites, int | np.integer) or sites < 1:
        raise ValueError(f"sites must be a positive integer, got {sites!r}")
    if len(subjects) != sites:
        raise ValueError(
            f"subjects has {len(subjects)} entries but sites={sites}; give one subject count "
            "per site"
        )
    for site, count in enumerate(subjects, start=1):
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
            raise ValueError(
                f"subjects[{site - 1}] (site-{site}) must be an integer >= 1, got {count!r}"
            )
    if not (math.isfinite(voxel_size) and 0.5 <= voxel_size <= 8.0):
        raise ValueError(f"voxel_size must be between 0.5 and 8.0 mm, got {voxel_size!r}")
    chosen: list[Modality] = []
    for entry in modalities:
        modality = Modality.parse(str(entry))
        if modality not in chosen:
            chosen.append(modality)
    if not chosen:
        raise ValueError("modalities is empty; name at least one, e.g. (Modality.T1W,)")
    return tuple(chosen)


# ----------------------------------------------------------------------------- public entry point


def generate_consortium(
    out_dir: Path,
    *,
    sites: int,
    subjects: Sequence[int],
    seed: int = 0,
    modalities: Sequence[Modality | str] = DEFAULT_MODALITIES,
    voxel_size: float = 1.0,
    lesions: bool = True,
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
    shared_scanner: bool = False,
) -> list[Path]:
    """Write one BIDS folder per simulated hospital and return their paths.

    Each site ``out_dir/site-k`` holds ``subjects[k-1]`` subjects with every requested modality,
    co-registered on the site's grid, plus the ground truth under ``derivatives/phantom``. The
    output is a pure function of the arguments: site ``k``'s scanner depends only on
    ``(seed, k)``, subject ``i``'s anatomy and noise only on ``(seed, k, i)`` (never on other
    sites or subject counts), and the same arguments write the same bytes.

    Args:
        out_dir: Folder to create the sites in.
        sites: Number of hospitals.
        subjects: Number of subjects at each site (one entry per site).
        seed: Consortium seed.
        modalities: Contrasts to write, as ``Modality`` or any spelling ``Modality.parse``
            accepts (``Modality.T1W_CE`` is available but not in the default).
        voxel_size: Base isotropic voxel size (mm) the anatomy is built on; sites may write
            larger voxels or thicker slices.
        lesions: Whether subjects get 1-3 ellipsoidal lesions.
        progress: Called with a short message after every subject.
        overwrite: Replace existing phantom sites in ``out_dir`` (anything else is never deleted).
        shared_scanner: Scan every site with site 1's scanner: no scanner effects between sites
            (the subjects still differ), the control for a heterogeneity experiment.

    Returns:
        ``[out_dir/site-1, ..., out_dir/site-N]``.

    Raises:
        ValueError: For mismatched ``sites``/``subjects`` or other invalid arguments.
        FileExistsError: When a site folder exists and may not be replaced.
    """
    chosen = _validate(sites, subjects, seed, voxel_size, modalities)
    out_dir = Path(out_dir)
    base = _base_anatomy(float(voxel_size))
    total, done = sum(int(c) for c in subjects), 0
    site_dirs: list[Path] = []
    for site in range(1, sites + 1):
        site_dir = out_dir / f"site-{site}"
        _prepare_site_dir(site_dir, overwrite)
        scanner = draw_site_scanner(seed, 1 if shared_scanner else site, float(voxel_size))
        tissues = tissue_table(scanner.field_strength_t)
        site_grid = _grid_with_voxel(base.grid, scanner.voxel_size_mm)
        bias = _bias_field(scanner, site_grid) if any(m.is_mr for m in chosen) else None
        derivatives = site_dir / "derivatives" / "phantom"
        logger.info(
            "phantom site-%d: %d subjects, %.1f T, voxels %s mm, grid %s",
            site,
            subjects[site - 1],
            scanner.field_strength_t,
            "x".join(f"{v:.2f}" for v in scanner.voxel_size_mm),
            site_grid.shape,
        )
        records: list[dict[str, Any]] = []
        with _Writer() as writer:
            _write_site_metadata(writer, site_dir, site, seed)
            for index in range(1, int(subjects[site - 1]) + 1):
                label = subject_label(site, index)
                subject = _make_subject(
                    base,
                    label,
                    _subject_rng(seed, site, index),
                    field_strength_t=scanner.field_strength_t,
                    lesions=lesions,
                )
                records.append(subject.record)
                _write_subject(
                    writer,
                    site_dir,
                    derivatives,
                    subject,
                    chosen,
                    base.grid,
                    site_grid,
                    scanner,
                    tissues,
                    bias,
                    seed=seed,
                    site=site,
                    index=index,
                )
                done += 1
                if progress is not None:
                    progress(f"site-{site} sub-{label} ({done}/{total})")
            participants = "participant_id\tn_lesions\n" + "".join(
                f"sub-{r['id']}\t{len(r['lesions'])}\n" for r in records
            )
            writer.raw(site_dir / "participants.tsv", participants.encode())
            truth = _ground_truth(seed, site, voxel_size, lesions, chosen, scanner, tissues)
            truth["grid"] = {"shape": list(site_grid.shape), "affine": site_grid.affine.tolist()}
            truth["subjects"] = records
            writer.raw(derivatives / "ground_truth.json", _json_bytes(_round(truth)))
        site_dirs.append(site_dir)
    return site_dirs


def _write_site_metadata(writer: _Writer, site_dir: Path, site: int, seed: int) -> None:
    generated_by = [
        {
            "Name": GENERATOR_NAME,
            "Version": __version__,
            "Description": f"synthetic brain phantom, seed {seed}, site {site}",
        }
    ]
    derivatives = site_dir / "derivatives" / "phantom"
    derivatives.mkdir(parents=True, exist_ok=True)
    # Written first (synchronously): it marks the folder as a phantom site for overwrite=True.
    _atomic_write(
        site_dir / "dataset_description.json",
        _json_bytes(
            {
                "Name": f"fedsynth phantom site-{site}",
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "raw",
                "GeneratedBy": generated_by,
            }
        ),
    )
    writer.raw(
        site_dir / "participants.json",
        _json_bytes(
            {
                "participant_id": {"Description": "subject label, unique in the consortium"},
                "n_lesions": {"Description": "number of simulated lesions"},
            }
        ),
    )
    writer.raw(
        site_dir / "README",
        (
            f"Synthetic brain phantom site {site} written by {GENERATOR_NAME} {__version__} "
            f"(seed {seed}).\nGround truth: derivatives/phantom/ground_truth.json.\n"
        ).encode(),
    )
    writer.raw(
        derivatives / "dataset_description.json",
        _json_bytes(
            {
                "Name": f"fedsynth phantom site-{site} ground truth",
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": generated_by,
            }
        ),
    )
    writer.raw(
        derivatives / "dseg.tsv",
        ("index\tname\n" + "".join(f"{k}\t{v}\n" for k, v in LABELS.items())).encode(),
    )


def _write_subject(
    writer: _Writer,
    site_dir: Path,
    derivatives: Path,
    subject: _Subject,
    modalities: Sequence[Modality],
    base_grid: _Grid,
    site_grid: _Grid,
    scanner: SiteScanner,
    tissues: dict[str, TissueParams],
    bias: FloatArray | None,
    *,
    seed: int,
    site: int,
    index: int,
) -> None:
    """Resample one subject's tissue maps to the site grid, render and write every file."""
    label = subject.label
    fractions = {
        name: _resample_to_grid(volume, base_grid, site_grid)
        for name, volume in subject.fractions.items()
    }
    bone_hu = _resample_to_grid(subject.bone_hu, base_grid, site_grid)
    lesion_names = [f"lesion-{k + 1}" for k in range(len(subject.lesions))]
    lesion_total = np.zeros(site_grid.shape, dtype=np.float32)
    for name in lesion_names:
        lesion_total += fractions[name]
    matter = lesion_total.copy()
    for name in TISSUES:
        matter += fractions[name]
    fractions["air"] = np.clip(1.0 - matter, 0.0, 1.0).astype(np.float32)
    del matter

    all_tissues = dict(tissues)
    for name, spec in zip(lesion_names, subject.lesions, strict=True):
        all_tissues[name] = spec.params
    mr_tissues = {name: all_tissues[name] for name in (*TISSUES, *lesion_names)}

    for modality in modalities:
        rng = _noise_rng(seed, site, index, modality)
        path = _image_path(site_dir, label, modality)
        path.parent.mkdir(parents=True, exist_ok=True)
        image: npt.NDArray[Any]
        if modality.is_mr:
            assert bias is not None
            image = _render_mr(modality, fractions, mr_tissues, scanner, bias, rng)
        elif modality is Modality.CT:
            image = _render_ct(fractions, mr_tissues, bone_hu, scanner, rng)
        else:
            pet_scale = float(subject.record["pet_scale"])
            image = _render_pet(fractions, mr_tissues, scanner, site_grid, pet_scale, rng)
        writer.nifti(path, image, site_grid.affine)
        sidecar = path.with_name(path.name.removesuffix(".nii.gz") + ".json")
        writer.raw(sidecar, _json_bytes(_round(_sidecar(modality, scanner))))

    probseg = np.stack(
        [fractions["air"], *(fractions[name] for name in TISSUES), lesion_total], axis=-1
    )
    dseg = np.argmax(probseg, axis=-1).astype(np.uint8)
    anat = derivatives / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    writer.nifti(anat / f"sub-{label}_dseg.nii.gz", dseg, site_grid.affine)
    writer.nifti(anat / f"sub-{label}_probseg.nii.gz", probseg, site_grid.affine, np.uint8)
    mask = (lesion_total >= 0.5).astype(np.uint8)
    writer.nifti(anat / f"sub-{label}_label-lesion_mask.nii.gz", mask, site_grid.affine)


def _ground_truth(
    seed: int,
    site: int,
    voxel_size: float,
    lesions: bool,
    modalities: Sequence[Modality],
    scanner: SiteScanner,
    tissues: dict[str, TissueParams],
) -> dict[str, Any]:
    scanner_record = asdict(scanner)
    sequences = scanner_record.pop("sequences")
    return {
        "generator": {"name": GENERATOR_NAME, "version": __version__},
        "seed": seed,
        "site": site,
        "base_voxel_size_mm": voxel_size,
        "lesions_enabled": lesions,
        "modalities": [m.value for m in modalities],
        "template": "MNI ICBM152 2009a nonlinear symmetric (nilearn), GM/WM probability maps",
        "scanner": scanner_record,
        "sequences": {
            name: seq for name, seq in sequences.items() if Modality.parse(name) in modalities
        },
        "signal_equations": {
            "spin_echo": "PD (1 - exp(-TR/T1)) exp(-TE/T2)",
            "inversion_recovery": "PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)",
            "contrast_agent": "1/T1' = 1/T1 + r1 [Gd], r1 = "
            f"{_GD_R1[scanner.field_strength_t]} L/mmol/s",
            "mr_noise": "magnitude = |S bias + sigma (n1 + i n2)|, "
            "sigma = mr_noise x max(S_csf, S_gm, S_wm); image = scale x magnitude + offset",
            "voxel_signal": "sum over tissues of (fraction x tissue signal)",
            "ct": "HU = sum over tissues of (fraction x HU), air -1000, bone fraction x "
            "bone_mean_hu x (0.7 + 0.6 (2 depth - 1)^2) with depth 0..1 across the skull; "
            "+ ct_offset_hu + N(0, ct_noise_hu)",
            "pet": "uptake = pet_scale x pet_calibration x sum(fraction x pet_uptake), plus noise "
            "of pet_noise x sqrt(uptake x grey-matter uptake) after a Gaussian blur of "
            "pet_fwhm_mm",
        },
        "tissues": {name: asdict(params) for name, params in tissues.items()},
        "air_hu": _AIR_HU,
        "labels": {str(k): v for k, v in LABELS.items()},
    }
