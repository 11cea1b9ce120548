"""Brain and head masks, intensity standardisation and anti-aliasing (fedsynth.common.data.masks).

Phantoms are built here: a skull-stripped T2w-like brain (bright CSF rim and ventricles, darker
tissue, exact-zero background) and T1w- and FLAIR-like heads with scalp, dark skull and Rician
noise in the air. Statistics are checked against computations written here, not against the
module's own intermediate results.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fedsynth.common.data.masks import (
    TISSUE_PERCENTILE,
    TISSUE_SCALE,
    antialias,
    antialias_sigma,
    background_level,
    is_skull_stripped,
    standardisation_range,
    subject_mask,
)
from fedsynth.common.modalities import Modality
from tests.conftest import shared_site

PERCENTILES = (0.5, 99.5)


def _radius(
    shape: tuple[int, int, int], centre: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """Normalised ellipsoidal radius on a [-1, 1]^3 grid: < 1 inside the reference ellipsoid."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    semi_axes = (0.8, 0.85, 0.8)
    return np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, semi_axes, strict=True)))


STRIPPED_SHAPE = (48, 52, 40)


def stripped_t2w(
    *, lesion: bool = False, ventricle_scale: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A skull-stripped T2w-like brain and its labels (tissue, csf, lesion)."""
    r = _radius(STRIPPED_SHAPE)
    volume = np.zeros(STRIPPED_SHAPE, dtype=np.float32)
    brain = r < 1.0
    volume[brain] = 330.0  # white matter
    volume[(r >= 0.6) & brain] = 430.0  # grey matter
    csf = (r >= 0.94) & brain  # bright subarachnoid CSF rim
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in STRIPPED_SHAPE], indexing="ij")
    scale = ventricle_scale
    for side in (-0.18, 0.18):  # two lateral ventricles
        inside = (
            ((grid[0] - side) / (0.08 * scale)) ** 2
            + (grid[1] / (0.3 * scale)) ** 2
            + (grid[2] / (0.15 * scale)) ** 2
        ) < 1.0
        csf |= inside & brain
    volume[csf] = 1150.0
    lesion_mask = np.zeros(STRIPPED_SHAPE, dtype=bool)
    if lesion:
        lesion_mask = (_radius(STRIPPED_SHAPE, centre=(0.35, -0.3, 0.1)) < 0.26) & brain & ~csf
        volume[lesion_mask] = 2000.0
    rng = np.random.default_rng(seed)
    volume[brain] += rng.normal(0.0, 12.0, size=int(brain.sum())).astype(np.float32)
    tissue = brain & ~csf & ~lesion_mask
    return volume, {"brain": brain, "tissue": tissue, "csf": csf, "lesion": lesion_mask}


HEAD_SHAPE = (56, 60, 44)


# Signal of (scalp, skull, CSF, grey matter, white matter) per contrast. FLAIR: suppressed CSF
# and a scalp darker than the brain, so a linear Otsu threshold would cut the scalp away and with
# it the dark CSF and skull between scalp and brain.
HEAD_SIGNAL = {
    "T1w": (820.0, 25.0, 130.0, 460.0, 620.0),
    "FLAIR": (260.0, 25.0, 45.0, 640.0, 560.0),
}


def head_phantom(
    contrast: str = "T1w", *, zero_far_air: bool, seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A head: brain, CSF, dark skull and scalp, with Rician noise in the air.

    With ``zero_far_air`` the air beyond a margin around the head is exactly 0, as the site-e
    scanner writes it, so the head sits in a ring of noise inside a constant background.
    """
    scalp, skull, csf, grey, white = HEAD_SIGNAL[contrast]
    r = _radius(HEAD_SHAPE)
    signal = np.zeros(HEAD_SHAPE, dtype=np.float64)
    signal[r < 0.95] = scalp
    signal[r < 0.86] = skull
    signal[r < 0.76] = csf
    signal[r < 0.70] = grey
    signal[r < 0.50] = white
    rng = np.random.default_rng(seed)
    sigma = 14.0
    real = signal + rng.normal(0.0, sigma, size=HEAD_SHAPE)
    imaginary = rng.normal(0.0, sigma, size=HEAD_SHAPE)
    volume = np.sqrt(real**2 + imaginary**2).astype(np.float32)  # Rician magnitude
    if zero_far_air:
        volume[r > 1.12] = 0.0
    return volume, {"brain": r < 0.76, "head": r < 0.95, "air": r >= 1.0}


# --------------------------------------------------------------------------- masks


def test_skull_stripped_t2w_mask_keeps_bright_csf_and_dark_tissue() -> None:
    volume, labels = stripped_t2w()
    nonzero = volume != 0
    assert is_skull_stripped(volume)
    mask = subject_mask(volume, Modality.T2W)
    assert mask.dtype == np.bool_ and mask.shape == volume.shape
    assert mask[nonzero].mean() >= 0.99
    assert mask[labels["tissue"]].all() and mask[labels["csf"]].all()
    # and not the background: nothing is enclosed, so the mask is the non-zero region
    assert (mask & ~nonzero).sum() <= 0.01 * nonzero.sum()


def test_skull_stripped_with_negative_resampling_values_like_site_c() -> None:
    volume, labels = stripped_t2w(seed=1)
    # Site-c: exact-zero background, small negative values (ringing) in a rim around the brain.
    rim = ndimage.binary_dilation(labels["brain"], iterations=1) & ~labels["brain"]
    rng = np.random.default_rng(2)
    ringing = rim & (rng.random(volume.shape) < 0.3)
    volume[ringing] = -0.05 * float(volume.max())
    assert volume.min() < 0
    value, tolerance = background_level(volume)
    assert value == 0.0  # the exact-zero background, not the minimum
    assert 0 < tolerance < 0.01 * float(volume.max())
    assert is_skull_stripped(volume)
    mask = subject_mask(volume, Modality.T2W)
    assert mask[labels["brain"]].mean() >= 0.99


@pytest.mark.parametrize("contrast", ["T1w", "FLAIR"])
@pytest.mark.parametrize("zero_far_air", [False, True])
def test_head_with_skull_mask_covers_the_head_not_the_air(
    contrast: str, zero_far_air: bool
) -> None:
    volume, labels = head_phantom(contrast, zero_far_air=zero_far_air)
    assert not is_skull_stripped(volume)
    mask = subject_mask(volume, Modality.parse(contrast))
    assert mask[labels["brain"]].all()  # the whole brain and CSF, inside the dark skull
    assert mask[labels["head"]].mean() >= 0.98  # scalp and skull too
    assert mask[labels["air"]].mean() < 0.05  # most of the air stays out


def test_ct_mask_keeps_the_hounsfield_head_logic() -> None:
    r = _radius((40, 44, 36))
    volume = np.full(r.shape, -1000.0, dtype=np.float32)
    volume[r < 0.95] = 40.0  # soft tissue
    volume[(r >= 0.8) & (r < 0.9)] = 1200.0  # skull
    volume[(r < 0.3)] = -800.0  # an air-filled cavity inside: filled
    mask = subject_mask(volume, Modality.CT)
    assert mask[r < 0.9].all()
    assert not mask[r > 1.05].any()


# --------------------------------------------------------------------------- standardisation


def _percentile(values: np.ndarray, q: float) -> float:
    """Linear-interpolation percentile from the sorted sample (numpy's default definition)."""
    ordered = np.sort(values.ravel().astype(np.float64))
    rank = q / 100.0 * (ordered.size - 1)
    below = math.floor(rank)
    above = min(below + 1, ordered.size - 1)
    return float(ordered[below] + (rank - below) * (ordered[above] - ordered[below]))


def _to_model(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return (np.clip(values, low, high) - low) / (high - low) * 2.0 - 1.0


def test_standardisation_range_matches_an_independent_computation() -> None:
    volume, _ = stripped_t2w(lesion=True)
    mask = subject_mask(volume, Modality.T2W)
    low, high = standardisation_range(volume, mask, Modality.T2W, PERCENTILES)
    values = volume[mask]
    expected_low = _percentile(values, PERCENTILES[0])
    anchor = _percentile(values, TISSUE_PERCENTILE)
    assert low == pytest.approx(expected_low, rel=1e-9, abs=1e-6)
    assert high == pytest.approx(expected_low + 3.0 * (anchor - expected_low), rel=1e-9)
    # the anchor lands at -1/3 on the model's scale
    assert _to_model(np.array([anchor]), low, high)[0] == pytest.approx(-1.0 / 3.0, abs=1e-9)
    assert TISSUE_SCALE == 3.0


def test_standardised_tissue_is_robust_to_a_bright_lesion() -> None:
    clean, clean_labels = stripped_t2w()
    sick, sick_labels = stripped_t2w(lesion=True)
    lesion_share = sick_labels["lesion"].sum() / sick_labels["brain"].sum()
    assert 0.01 < lesion_share < 0.05  # a small lesion: 1-5 % of the brain
    tissue = clean_labels["tissue"] & sick_labels["tissue"]  # the same tissue voxels in both

    def tissue_median(volume: np.ndarray, low: float, high: float) -> float:
        return float(np.median(_to_model(volume[tissue], low, high)))

    ranges = {}
    for name, volume in (("clean", clean), ("sick", sick)):
        mask = subject_mask(volume, Modality.T2W)
        ranges[name] = standardisation_range(volume, mask, Modality.T2W, PERCENTILES)
    moved = abs(tissue_median(sick, *ranges["sick"]) - tissue_median(clean, *ranges["clean"]))
    assert moved < 0.02
    # The mask's 0.5 / 99.5 percentiles (the previous recipe) let the lesion set the scale:
    # the same tissue moves by more than 0.1 on the model's scale.
    previous = {
        name: tuple(np.percentile(volume[subject_mask(volume, Modality.T2W)], PERCENTILES))
        for name, volume in (("clean", clean), ("sick", sick))
    }
    moved_before = abs(
        tissue_median(sick, *previous["sick"]) - tissue_median(clean, *previous["clean"])
    )
    assert moved_before > 0.1


def test_standardised_tissue_is_robust_to_larger_ventricles() -> None:
    small, small_labels = stripped_t2w(ventricle_scale=1.0)
    large, large_labels = stripped_t2w(ventricle_scale=1.4)
    share = [labels["csf"].sum() / labels["brain"].sum() for labels in (small_labels, large_labels)]
    assert share[1] > share[0] + 0.02  # at least 2 % more of the brain is CSF
    tissue = small_labels["tissue"] & large_labels["tissue"]
    medians = []
    for volume in (small, large):
        low, high = standardisation_range(
            volume, subject_mask(volume, Modality.T2W), Modality.T2W, PERCENTILES
        )
        medians.append(float(np.median(_to_model(volume[tissue], low, high))))
    assert abs(medians[1] - medians[0]) < 0.03


def test_standardisation_range_pet_keeps_percentiles_and_ct_refuses() -> None:
    rng = np.random.default_rng(3)
    volume = rng.gamma(2.0, 1.5, size=(20, 22, 18)).astype(np.float32)
    mask = volume > 0.5
    low, high = standardisation_range(volume, mask, Modality.PET, (1.0, 99.0))
    assert low == pytest.approx(_percentile(volume[mask], 1.0), rel=1e-6)
    assert high == pytest.approx(_percentile(volume[mask], 99.0), rel=1e-6)
    with pytest.raises(ValueError, match="Hounsfield"):
        standardisation_range(volume, mask, Modality.CT, PERCENTILES)
    with pytest.raises(ValueError, match="shape"):
        standardisation_range(volume, mask[:-1], Modality.T1W, PERCENTILES)
    with pytest.raises(ValueError, match="empty"):
        standardisation_range(volume, np.zeros_like(mask), Modality.T1W, PERCENTILES)


def test_standardisation_range_of_a_constant_mask_is_not_degenerate() -> None:
    volume = np.full((8, 8, 8), 5.0, dtype=np.float32)
    low, high = standardisation_range(volume, volume > 0, Modality.T1W, PERCENTILES)
    assert high > low


# --------------------------------------------------------------------------- anti-aliasing


def test_antialias_sigma_follows_the_skimage_convention() -> None:
    assert antialias_sigma((1.0, 1.0, 1.0), (3.0, 2.0, 0.5)) == pytest.approx((1.0, 0.5, 0.0))
    assert antialias_sigma((0.5, 1.0, 4.0), (3.0, 3.0, 3.0)) == pytest.approx((2.5, 1.0, 0.0))
    with pytest.raises(ValueError, match="positive"):
        antialias_sigma((0.0, 1.0, 1.0), (3.0, 3.0, 3.0))


def test_antialias_suppresses_an_alternating_pattern_before_3x_decimation() -> None:
    x = np.arange(60)
    pattern = np.broadcast_to(((-1.0) ** x)[:, None, None], (60, 12, 10)).astype(np.float32)
    volume = pattern + 5.0
    filtered = antialias(volume, (1.0, 1.0, 1.0), (3.0, 1.0, 1.0))
    assert filtered.dtype == np.float32
    # Decimate 3x along x (the worst case for aliasing: (-1)^(3k) keeps its full amplitude).
    raw_energy = float(np.mean((volume[::3] - 5.0) ** 2))
    filtered_energy = float(np.mean((filtered[3:-3:3] - 5.0) ** 2))
    assert raw_energy == pytest.approx(1.0)
    assert filtered_energy < 1e-3 * raw_energy
    assert float(filtered.mean()) == pytest.approx(5.0, abs=1e-3)  # low frequencies kept


def test_antialias_gain_matches_the_gaussian_transfer_function() -> None:
    # A cosine of period 6 voxels, sigma 1 voxel (3x): gain exp(-sigma^2 omega^2 / 2).
    x = np.arange(96)
    omega = 2.0 * math.pi / 6.0
    wave = np.broadcast_to(np.cos(omega * x)[:, None, None], (96, 4, 4)).astype(np.float32)
    filtered = antialias(wave, (1.0, 1.0, 1.0), (3.0, 1.0, 1.0))
    interior = slice(12, -12)
    gain = float(np.dot(filtered[interior, 0, 0], wave[interior, 0, 0]))
    gain /= float(np.dot(wave[interior, 0, 0], wave[interior, 0, 0]))
    assert gain == pytest.approx(math.exp(-(omega**2) / 2.0), abs=0.01)


def test_antialias_filters_only_the_axes_made_coarser() -> None:
    z = np.arange(24)
    volume = np.broadcast_to(((-1.0) ** z)[None, None, :], (10, 10, 24)).astype(np.float32)
    # Thick slices (3 mm) onto a 3 mm grid: z is not downsampled, so the z pattern stays.
    filtered = antialias(volume, (1.0, 1.0, 3.0), (3.0, 3.0, 3.0))
    np.testing.assert_allclose(filtered, volume, atol=1e-6)


def test_antialias_without_downsampling_returns_an_unchanged_copy() -> None:
    rng = np.random.default_rng(4)
    volume = rng.normal(size=(9, 10, 11)).astype(np.float32)
    out = antialias(volume, (1.0, 1.0, 1.0), (1.0, 0.5, 1.0))
    np.testing.assert_array_equal(out, volume)
    assert out.dtype == np.float32 and not np.shares_memory(out, volume)
    as_float64 = antialias(volume.astype(np.float64), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0))
    assert as_float64.dtype == np.float32
    np.testing.assert_array_equal(as_float64, volume)


# --------------------------------------------------------------------------- real scans


def _read(path: Path) -> np.ndarray:
    image = nib.as_closest_canonical(nib.load(path))
    return np.asarray(image.dataobj, dtype=np.float32)


@pytest.mark.realdata
def test_real_scans_masks_and_skull_stripping() -> None:
    brain_mri = shared_site("brain-mri")
    clinical = shared_site("brain-mri-clinical", "site-e")
    for site, subject in (
        ("site-a", "sub-gli001"),
        ("site-b", "sub-met110"),
        ("site-d", "sub-stroke01"),
    ):
        volume = _read(brain_mri / site / subject / "anat" / f"{subject}_T2w.nii.gz")
        nonzero = volume != 0
        mask = subject_mask(volume, Modality.T2W)
        assert mask[nonzero].mean() >= 0.99, site
    raw_t1w = _read(clinical / "sub-ms01" / "ses-1" / "anat" / "sub-ms01_ses-1_T1w.nii.gz")
    assert not is_skull_stripped(raw_t1w)
    site_a_t1w = _read(brain_mri / "site-a" / "sub-gli001" / "anat" / "sub-gli001_T1w.nii.gz")
    assert is_skull_stripped(site_a_t1w)
