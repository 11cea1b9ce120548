"""Site scanners of the phantom: what each hospital's machines do to its images, and the seeding."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np

from fedsynth.common.modalities import Modality
from fedsynth.common.phantom.physics import (
    FIELD_STRENGTHS_T,
    SequenceParams,
    null_inversion_time,
    tissue_table,
)

_SLICE_FACTORS: Final[tuple[float, ...]] = (1.0, 2.0, 1.5, 3.0)  # x voxel_size, capped at 5 mm


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
