"""Preprocessing: orientation, spacing, intensity scale, masks, Otsu and slice selection.

Each property is checked against a computation written here with numpy (or nibabel), not
against the pipeline's own intermediate results.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsynth.common.config import DataConfig
from fedsynth.common.data.masks import TISSUE_PERCENTILE, TISSUE_SCALE, otsu_threshold, subject_mask
from fedsynth.common.data.preprocess import IntensityMapping, preprocess_scan
from fedsynth.common.modalities import Modality
from tests.conftest import CONTRASTS, head_volume, save_nifti

SMALL = DataConfig(spacing_mm=(2.0, 2.0, 2.0), image_size=48)
SHAPE = (40, 44, 36)
# save_nifti's default affine: RAS, 2 mm, origin at voxel 0; already on SMALL's grid.
RAS_2MM = np.diag([2.0, 2.0, 2.0, 1.0])
# In-plane padding 40 -> 48 and 44 -> 48, centred.
PAD_X, PAD_Y = (48 - SHAPE[0]) // 2, (48 - SHAPE[1]) // 2


def _ellipsoid_radius(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """The normalised radius head_volume uses: < 1 inside the head, < 0.8 in the core."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, (0.8, 0.85, 0.8), strict=True)))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _padded(volume: np.ndarray, fill: float) -> np.ndarray:
    """Centre ``volume`` (40 x 44 in-plane) in a 48 x 48 field of view, as the model sees it."""
    out = np.full((48, 48, volume.shape[2]), fill, dtype=np.float64)
    out[PAD_X : PAD_X + volume.shape[0], PAD_Y : PAD_Y + volume.shape[1]] = volume
    return out


# --------------------------------------------------------------------------- (1) orientation


def _with_marker(modality: str = "T1w") -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Head phantom with a bright 4x4x4 cube in the right-anterior-superior part of the head."""
    volume = head_volume(modality)
    marker = (slice(26, 30), slice(30, 34), slice(20, 24))
    volume[marker] = 2000.0
    return volume, marker


def _lps_and_ras_files(tmp_path: Path, volume: np.ndarray) -> tuple[Path, Path, np.ndarray]:
    """The same head twice: voxels stored L->R/P->A (LPS affine), and flipped with a RAS affine."""
    nx, ny, _ = volume.shape
    lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    lps[:3, 3] = [40.0, 50.0, -30.0]
    ras = np.diag([2.0, 2.0, 2.0, 1.0])
    ras[:3, 3] = [40.0 - 2.0 * (nx - 1), 50.0 - 2.0 * (ny - 1), -30.0]
    lps_data = np.ascontiguousarray(volume[::-1, ::-1, :])
    # Guard the fixture itself: both files put each voxel value at the same world position.
    for ijk in [(0, 0, 0), (5, 7, 3), (nx - 1, ny - 1, 35)]:
        i, j, k = ijk
        world_ras = nib.affines.apply_affine(ras, ijk)
        world_lps = nib.affines.apply_affine(lps, (nx - 1 - i, ny - 1 - j, k))
        np.testing.assert_allclose(world_ras, world_lps)
        assert volume[i, j, k] == lps_data[nx - 1 - i, ny - 1 - j, k]
    assert nib.aff2axcodes(lps) == ("L", "P", "S") and nib.aff2axcodes(ras) == ("R", "A", "S")
    return (
        save_nifti(tmp_path / "lps.nii.gz", lps_data, lps),
        save_nifti(tmp_path / "ras.nii.gz", volume, ras),
        ras,
    )


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (2.5, 2.5, 3.0)])
def test_orientation_lps_and_ras_give_identical_ras_slices(
    tmp_path: Path, spacing: tuple[float, float, float]
) -> None:
    volume, marker = _with_marker()
    lps_path, ras_path, ras_affine = _lps_and_ras_files(tmp_path, volume)
    # Percentiles (0, 100): the marker (the maximum) is the only thing mapped to exactly 1.
    config = SMALL.model_copy(update={"spacing_mm": spacing, "percentiles": (0.0, 100.0)})

    from_lps = preprocess_scan(lps_path, Modality.T1W, config)
    from_ras = preprocess_scan(ras_path, Modality.T1W, config)

    np.testing.assert_array_equal(from_lps.slices, from_ras.slices)
    np.testing.assert_array_equal(from_lps.masks, from_ras.masks)
    np.testing.assert_array_equal(from_lps.z, from_ras.z)
    np.testing.assert_allclose(from_lps.affine, from_ras.affine, atol=1e-9)
    assert from_lps.depth == from_ras.depth

    affine = from_lps.affine
    assert "".join(nib.aff2axcodes(affine)) == "RAS"
    # Spacing read off the affine's columns (length of each voxel step in world mm).
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), spacing, rtol=1e-6)
    assert from_lps.depth == round(volume.shape[2] * 2.0 / spacing[2])

    # The marker sits where the input says it is in the world, through the output affine.
    expected_world = nib.affines.apply_affine(
        ras_affine, [np.mean([s.start, s.stop - 1]) for s in marker]
    )
    k, x, y = np.nonzero(from_lps.slices > 0.5)
    found_world = nib.affines.apply_affine(
        affine, np.stack([x, y, from_lps.z[k]], axis=1).astype(np.float64)
    ).mean(axis=0)
    tolerance = 1e-6 if spacing == (2.0, 2.0, 2.0) else 1.0  # mm; interpolation blurs edges
    np.testing.assert_allclose(found_world, expected_world, atol=tolerance)
    # And in the slice array itself: right = high x index, anterior = high y index.
    assert x.mean() > 24 and y.mean() > 24


# --------------------------------------------------------------------------- (2) intensity scale


@pytest.mark.parametrize("percentiles", [(0.5, 99.5), (5.0, 95.0)])
def test_mr_intensity_mapping_anchors_on_the_masks_low_and_75th_percentiles(
    tmp_path: Path, percentiles: tuple[float, float]
) -> None:
    volume = head_volume("T1w")  # RAS at 2 mm already: no resampling happens
    path = save_nifti(tmp_path / "t1.nii.gz", volume, RAS_2MM)
    config = SMALL.model_copy(update={"percentiles": percentiles})

    stack = preprocess_scan(path, Modality.T1W, config)

    mask = subject_mask(volume, Modality.T1W)
    low, anchor = np.percentile(volume[mask].astype(np.float64), [percentiles[0], 75.0])
    high = low + 3.0 * (anchor - low)  # the 75th percentile lands at -1/3
    assert (TISSUE_PERCENTILE, TISSUE_SCALE) == (75.0, 3.0)
    assert stack.mapping.kind == "percentile"
    assert stack.mapping.low == pytest.approx(low, rel=1e-6)
    assert stack.mapping.high == pytest.approx(high, rel=1e-6)

    # The model's slices are that linear map of the native volume, padded with -1.
    scaled = 2.0 * (np.clip(volume, low, high) - low) / (high - low) - 1.0
    expected = np.moveaxis(_padded(scaled, -1.0)[:, :, stack.z], 2, 0)
    np.testing.assert_allclose(stack.slices, expected, atol=1e-5)
    assert stack.slices.min() >= -1.0 and stack.slices.max() <= 1.0
    assert stack.slices.min() == -1.0
    assert np.percentile(scaled[mask], 75.0) == pytest.approx(-1.0 / 3.0, abs=1e-6)
    background = np.moveaxis(_padded(volume, 0.0)[:, :, stack.z], 2, 0) == 0.0
    assert background.any()
    assert (stack.slices[background] == -1.0).all()
    assert (stack.slices[:, [0, 0, -1, -1], [0, -1, 0, -1]] == -1.0).all()

    # to_native inverts to_model up to the clipping.
    probe = np.concatenate([volume.ravel(), [low - 500.0, high + 500.0, (low + high) / 2]])
    back = stack.mapping.to_native(stack.mapping.to_model(probe))
    np.testing.assert_allclose(back, np.clip(probe, low, high), rtol=1e-4)


@pytest.mark.parametrize("window", [(-1024.0, 2048.0), (-200.0, 300.0)])
def test_ct_uses_the_fixed_hounsfield_window(tmp_path: Path, window: tuple[float, float]) -> None:
    volume = head_volume("ct")
    path = save_nifti(tmp_path / "ct.nii.gz", volume, RAS_2MM)
    config = SMALL.model_copy(update={"ct_window_hu": window})

    stack = preprocess_scan(path, Modality.CT, config)

    assert stack.mapping == IntensityMapping(window[0], window[1], "window")
    low, high = window
    scaled = 2.0 * (np.clip(volume, low, high) - low) / (high - low) - 1.0
    expected = np.moveaxis(_padded(scaled, -1.0)[:, :, stack.z], 2, 0)
    np.testing.assert_allclose(stack.slices, expected, atol=1e-5)
    # -1000 HU air: inside the default window it is not -1; outside a narrow one it is.
    air = -1.0 + 2.0 * (-1000.0 - low) / (high - low) if low < -1000.0 else -1.0
    assert stack.slices[0, PAD_X, PAD_Y] == pytest.approx(air, abs=1e-6)


def test_to_native_is_the_inverse_on_the_model_range() -> None:
    mapping = IntensityMapping(low=120.0, high=980.0, kind="percentile")
    model = np.linspace(-1.0, 1.0, 101, dtype=np.float32)
    np.testing.assert_allclose(mapping.to_model(mapping.to_native(model)), model, atol=1e-6)
    assert mapping.to_native(np.array([-1.0, 0.0, 1.0])).tolist() == [120.0, 550.0, 980.0]


# --------------------------------------------------------------------------- (3) Otsu


def _otsu_brute_force(values: np.ndarray, bins: int) -> tuple[float, float]:
    """Try every split between histogram bins; return (best centre, its between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    best_t, best_var = 0, -1.0
    for t in range(bins - 1):  # class 0 = bins 0..t, class 1 = bins t+1..
        w0, w1 = hist[: t + 1].sum(), hist[t + 1 :].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (hist[: t + 1] * centres[: t + 1]).sum() / w0
        m1 = (hist[t + 1 :] * centres[t + 1 :]).sum() / w1
        var = float(w0) * float(w1) * (m0 - m1) ** 2
        if var > best_var:
            best_t, best_var = t, var
    return float(centres[best_t]), best_var


def _between_variance_at(values: np.ndarray, bins: int, threshold: float) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    below = centres <= threshold
    w0, w1 = hist[below].sum(), hist[~below].sum()
    m0 = (hist[below] * centres[below]).sum() / w0
    m1 = (hist[~below] * centres[~below]).sum() / w1
    return float(w0) * float(w1) * (m0 - m1) ** 2


@pytest.mark.parametrize("bins", [256, 64])
def test_otsu_matches_brute_force_on_a_bimodal_sample(bins: int) -> None:
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.normal(100, 10, 6000), rng.normal(320, 25, 3000)])

    threshold = otsu_threshold(values, bins=bins)

    expected, best = _otsu_brute_force(values, bins)
    assert threshold == pytest.approx(expected, rel=1e-12)
    assert _between_variance_at(values, bins, threshold) == pytest.approx(best, rel=1e-9)
    assert 140 < threshold < 260  # between the modes


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    gap=st.floats(2.0, 50.0),
    ratio=st.floats(0.1, 0.9),
)
def test_otsu_reaches_the_brute_force_maximum(seed: int, gap: float, ratio: float) -> None:
    rng = np.random.default_rng(seed)
    n = 2000
    values = np.concatenate(
        [rng.normal(0.0, 1.0, int(n * ratio)), rng.normal(gap, 2.0, n - int(n * ratio))]
    )
    threshold = otsu_threshold(values)
    _, best = _otsu_brute_force(values, 256)
    # Ties may pick a different bin; the criterion value must be the maximum.
    assert _between_variance_at(values, 256, threshold) == pytest.approx(best, rel=1e-9)


# --------------------------------------------------------------------------- (4) foreground mask


@pytest.mark.parametrize("modality", ["T1w", "T2w", "FLAIR", "PD", "ct"])
def test_subject_mask_is_the_head(modality: str) -> None:
    inside = _ellipsoid_radius() < 1.0
    mask = subject_mask(head_volume(modality), Modality.parse(modality))
    assert mask.dtype == bool and mask.shape == SHAPE
    assert _dice(mask, inside) > 0.97


def test_subject_mask_fills_a_dark_interior_hole() -> None:
    radius = _ellipsoid_radius()
    volume = head_volume("T1w")
    hole = radius < 0.5
    volume[hole] = 0.0  # as dark as the air outside

    mask = subject_mask(volume, Modality.T1W)

    assert mask[hole].all()
    assert _dice(mask, radius < 1.0) > 0.97


def test_subject_mask_fills_a_channel_open_to_the_outside_slice_by_slice() -> None:
    # A dark channel from the centre up through the top of the head: a 3D fill cannot close it
    # (it touches the air), each axial slice's 2D fill does.
    shape = SHAPE
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = _ellipsoid_radius()
    channel = (np.hypot(grid[0], grid[1]) < 0.15) & (grid[2] > 0.0)
    volume = head_volume("T1w")
    volume[channel] = 0.0

    mask = subject_mask(volume, Modality.T1W)

    assert mask[channel & (radius < 0.95)].all()
    assert not mask[channel & (radius > 1.05)].any()
    assert _dice(mask, radius < 1.0) > 0.97


def test_subject_mask_keeps_only_the_largest_component() -> None:
    volume = head_volume("T1w")
    volume[1:6, 1:6, 1:6] = 800.0  # a bright object in the corner, outside the head
    mask = subject_mask(volume, Modality.T1W)
    assert not mask[1:6, 1:6, 1:6].any()
    assert _dice(mask, _ellipsoid_radius() < 1.0) > 0.97


# --------------------------------------------------------------------------- (5) slice selection


@pytest.mark.parametrize("min_foreground", [0.05, 0.2, 0.3])
def test_slices_kept_are_exactly_those_reaching_min_foreground(
    tmp_path: Path, min_foreground: float
) -> None:
    path = save_nifti(tmp_path / "t1.nii.gz", head_volume("T1w"), RAS_2MM)
    every = preprocess_scan(path, Modality.T1W, SMALL.model_copy(update={"min_foreground": 0.0}))
    stack = preprocess_scan(
        path, Modality.T1W, SMALL.model_copy(update={"min_foreground": min_foreground})
    )

    assert len(every) == every.depth == stack.depth
    np.testing.assert_array_equal(every.z, np.arange(every.depth))
    fraction = every.masks.reshape(len(every), -1).mean(axis=1)
    np.testing.assert_array_equal(stack.z, np.flatnonzero(fraction >= min_foreground))
    assert 0 < len(stack) < stack.depth  # the threshold actually removes some slices
    assert (stack.masks.reshape(len(stack), -1).mean(axis=1) >= min_foreground).all()
    np.testing.assert_array_equal(stack.slices, every.slices[stack.z])
    np.testing.assert_array_equal(stack.masks, every.masks[stack.z])
    assert stack.slices.shape == (len(stack), 48, 48) and stack.slices.dtype == np.float32
    assert stack.masks.dtype == bool


# --------------------------------------------------------------------------- (6) co-registration


def test_coregistered_modalities_share_grid_and_z(tmp_path: Path) -> None:
    # Same anisotropic grid for both files: in-plane resampling, z kept at 2 mm.
    affine = np.diag([1.8, 2.2, 2.0, 1.0])
    affine[:3, 3] = [-30.0, -45.0, -40.0]
    # A 'nose' sticking out of the head in front, at input z = 13..16 only.
    nose = (slice(17, 23), slice(34, 44), slice(13, 17))
    stacks = []
    for name, seed in (("T1w", 1), ("T2w", 2)):
        volume = head_volume(name, seed=seed)
        volume[nose] = CONTRASTS[name][1]  # shell intensity of that contrast
        path = save_nifti(tmp_path / f"{name}.nii.gz", volume, affine)
        stacks.append(preprocess_scan(path, Modality.parse(name), SMALL))
    a, b = stacks

    np.testing.assert_array_equal(a.affine, b.affine)
    assert a.depth == b.depth == 36

    # A point inside the nose and outside the head, mapped through the output affine.
    world = nib.affines.apply_affine(affine, [19.5, 40.5, 14.5])
    x, y, z = nib.affines.apply_affine(np.linalg.inv(a.affine), world)
    assert z == pytest.approx(14.5)
    x, y = round(x), round(y)
    for stack in (a, b):
        nose_z = [int(k) for k, m in zip(stack.z, stack.masks, strict=True) if m[x, y]]
        assert nose_z == [13, 14, 15, 16]


# --------------------------------------------------------------------------- (7) clipped foreground


def test_foreground_clipped_when_the_field_of_view_is_too_small(tmp_path: Path) -> None:
    volume = head_volume("T1w")
    path = save_nifti(tmp_path / "t1.nii.gz", volume, RAS_2MM)

    roomy = preprocess_scan(path, Modality.T1W, SMALL)
    tight = preprocess_scan(path, Modality.T1W, SMALL.model_copy(update={"image_size": 16}))

    assert roomy.foreground_clipped == 0.0
    # Independently: a centred 16 x 16 crop of the 40 x 44 grid keeps [12:28, 14:30].
    mask = subject_mask(volume, Modality.T1W)
    expected = 1.0 - mask[12:28, 14:30].sum() / mask.sum()
    assert expected > 0.3
    assert tight.foreground_clipped == pytest.approx(expected, abs=1e-9)
    assert tight.slices.shape[1:] == (16, 16)
