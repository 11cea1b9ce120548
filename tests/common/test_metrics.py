"""Tests for fedsynth.common.metrics: every metric against an independent computation.

References: scikit-image (PSNR, SSIM; a test-only dependency), plain numpy / Python sums, and an
explicit DFT matrix with a loop over pixels for the k-space bands.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from skimage import metrics as skimage_metrics  # the reference; a test-only dependency

from fedsynth.common.metrics import (
    BAND_NAMES,
    SSIM_BORDER,
    image_metrics,
    kspace_band_errors,
    mae,
    mean_metrics,
    nmse,
    psnr,
    radial_frequency,
    region_metrics,
    ssim,
    ssim_map,
    to_unit,
)
from tests.conftest import shared_site

Array = npt.NDArray[np.float64]
TOL = 1e-4
SUBJECT = ("brain-mri", "site-a", "sub-gli001", "anat")
AXIAL = 77  # a mid-brain axial slice of the 240x240x155 volumes


# ---------------------------------------------------------------------------- test images


def random_pair(shape: tuple[int, ...], seed: int = 0) -> tuple[Array, Array]:
    rng = np.random.default_rng(seed)
    target = rng.random(shape)
    pred = np.clip(target + rng.normal(0, 0.1, shape), 0, 1)
    return pred, target


def structured(shape: tuple[int, ...], seed: int = 0) -> Array:
    """A 'head': an ellipsoid with a brighter core, a smooth gradient, a striped insert, noise."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grid) / 0.8)
    image = np.where(radius < 1, 0.4, 0.0) + np.where(radius < 0.6, 0.3, 0.0)
    image += 0.1 * (grid[0] + 1) * (radius < 1)
    stripes = (np.sin(12 * np.pi * grid[-1]) > 0) & (np.abs(grid[0] - 0.3) < 0.15) & (radius < 1)
    image += 0.15 * stripes
    image += np.random.default_rng(seed).normal(0, 0.01, shape) * (radius < 1)
    clipped: Array = np.clip(image, 0, 1)
    return clipped


def structured_pair(shape: tuple[int, ...]) -> tuple[Array, Array]:
    target = structured(shape)
    pred = np.clip(ndimage.gaussian_filter(target, 1.0) + 0.02, 0, 1)
    return pred, target


PAIRS: dict[str, Callable[[], tuple[Array, Array]]] = {
    "random-2d": lambda: random_pair((32, 40)),
    "random-2d-odd": lambda: random_pair((11, 17), seed=1),
    "random-3d": lambda: random_pair((14, 20, 24), seed=2),
    "structured-2d": lambda: structured_pair((64, 72)),
    "structured-3d": lambda: structured_pair((24, 32, 28)),
}


def skimage_ssim(pred: Array, target: Array, **kwargs: Any) -> Any:
    return skimage_metrics.structural_similarity(
        pred,
        target,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=kwargs.pop("data_range", 1.0),
        **kwargs,
    )


@pytest.fixture(scope="module")
def real() -> dict[str, Array]:
    """T1w and T2w volumes of one real subject, each divided by its maximum (so on [0, 1])."""
    folder = shared_site(*SUBJECT)
    volumes = {}
    for modality in ("T1w", "T2w"):
        image: Any = nib.load(folder / f"sub-gli001_{modality}.nii.gz")
        data = np.asarray(image.dataobj, dtype=np.float64)
        volumes[modality] = data / data.max()
    return volumes


def real_predictions(target: Array) -> dict[str, Array]:
    rng = np.random.default_rng(7)
    return {
        "noisy": np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1),
        "blurred": ndimage.gaussian_filter(target, 1.5),
    }


# ---------------------------------------------------------------------------- PSNR


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_psnr_matches_skimage(name: str) -> None:
    pred, target = PAIRS[name]()
    expected = skimage_metrics.peak_signal_noise_ratio(target, pred, data_range=1.0)
    assert psnr(pred, target) == pytest.approx(expected, abs=TOL)


def test_psnr_data_range_matches_skimage() -> None:
    pred, target = random_pair((20, 24))
    expected = skimage_metrics.peak_signal_noise_ratio(255 * target, 255 * pred, data_range=255)
    assert psnr(255 * pred, 255 * target, data_range=255) == pytest.approx(expected, abs=TOL)


@pytest.mark.realdata
def test_psnr_real_slices_match_skimage(real: dict[str, Array]) -> None:
    target = real["T2w"][:, :, AXIAL]
    predictions = real_predictions(target) | {"T1w-as-T2w": real["T1w"][:, :, AXIAL]}
    for label, pred in predictions.items():
        expected = skimage_metrics.peak_signal_noise_ratio(target, pred, data_range=1.0)
        assert psnr(pred, target) == pytest.approx(expected, abs=TOL), label


@pytest.mark.parametrize("shape", [(30, 26), (10, 12, 14)])
def test_masked_psnr_matches_numpy(shape: tuple[int, ...]) -> None:
    pred, target = random_pair(shape, seed=3)
    mask = structured(shape) > 0.5
    squared = [
        (p - t) ** 2
        for p, t, m in zip(pred.ravel(), target.ravel(), mask.ravel(), strict=True)
        if m
    ]
    expected = 10 * math.log10(1.0 / (math.fsum(squared) / len(squared)))
    assert psnr(pred, target, mask=mask) == pytest.approx(expected, abs=TOL)
    # only the masked pixels count: changing the others changes nothing
    pred_outside = np.where(mask, pred, 0.0)
    assert psnr(pred_outside, target, mask=mask) == pytest.approx(expected, abs=1e-12)


def test_psnr_of_constant_offset_is_20_db() -> None:
    target = structured((40, 40)) * 0.9
    assert psnr(target + 0.1, target) == pytest.approx(20.0, abs=1e-9)
    assert psnr(target - 0.1, target, mask=target > 0.3) == pytest.approx(20.0, abs=1e-9)
    volume = structured((12, 16, 16)) * 0.9
    assert psnr(volume + 0.1, volume) == pytest.approx(20.0, abs=1e-9)


def test_psnr_of_volume_uses_one_mse_over_all_voxels() -> None:
    pred, target = random_pair((4, 16, 16), seed=4)
    pred[0] = target[0]  # a perfect first slice: infinite slice PSNR, finite volume PSNR
    mse = float(np.mean((pred - target) ** 2))
    assert psnr(pred, target) == pytest.approx(10 * math.log10(1 / mse), abs=1e-9)


# ---------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_ssim_matches_skimage(name: str) -> None:
    pred, target = PAIRS[name]()
    assert ssim(pred, target) == pytest.approx(skimage_ssim(pred, target), abs=TOL)


@pytest.mark.parametrize("name", ["random-2d", "structured-3d"])
def test_ssim_map_matches_skimage_full_map(name: str) -> None:
    pred, target = PAIRS[name]()
    _, expected = skimage_ssim(pred, target, full=True)
    np.testing.assert_allclose(ssim_map(pred, target), expected, atol=TOL, rtol=0)


def test_ssim_data_range_matches_skimage() -> None:
    pred, target = structured_pair((40, 44))
    expected = skimage_ssim(255 * pred, 255 * target, data_range=255)
    assert ssim(255 * pred, 255 * target, data_range=255) == pytest.approx(expected, abs=TOL)


@pytest.mark.realdata
def test_ssim_real_slices_match_skimage(real: dict[str, Array]) -> None:
    target = real["T2w"][:, :, AXIAL]
    predictions = real_predictions(target) | {"T1w-as-T2w": real["T1w"][:, :, AXIAL]}
    for label, pred in predictions.items():
        assert ssim(pred, target) == pytest.approx(skimage_ssim(pred, target), abs=TOL), label


@pytest.mark.realdata
def test_ssim_real_volumes_match_skimage(real: dict[str, Array]) -> None:
    box = (slice(50, 190), slice(40, 200), slice(60, 90))  # a brain block, 3D window
    target = real["T2w"][box]
    predictions = real_predictions(target) | {"T1w-as-T2w": real["T1w"][box]}
    for label, pred in predictions.items():
        assert ssim(pred, target) == pytest.approx(skimage_ssim(pred, target), abs=TOL), label


@pytest.mark.parametrize("shape", [(40, 36), (16, 20, 18)])
def test_masked_ssim_is_skimage_map_averaged_over_mask(shape: tuple[int, ...]) -> None:
    pred, target = structured_pair(shape)
    mask = structured(shape) > 0.5
    _, full_map = skimage_ssim(pred, target, full=True)
    crop = tuple(slice(SSIM_BORDER, n - SSIM_BORDER) for n in shape)
    expected = full_map[crop][mask[crop]].mean()
    assert ssim(pred, target, mask=mask) == pytest.approx(expected, abs=TOL)
    everywhere = np.ones(shape, dtype=bool)
    assert ssim(pred, target, mask=everywhere) == pytest.approx(ssim(pred, target), abs=1e-12)


@pytest.mark.realdata
def test_masked_ssim_real_slice(real: dict[str, Array]) -> None:
    target = real["T2w"][:, :, AXIAL]
    pred = real_predictions(target)["blurred"]
    brain = target > 0.05
    _, full_map = skimage_ssim(pred, target, full=True)
    inner = full_map[SSIM_BORDER:-SSIM_BORDER, SSIM_BORDER:-SSIM_BORDER]
    expected = inner[brain[SSIM_BORDER:-SSIM_BORDER, SSIM_BORDER:-SSIM_BORDER]].mean()
    assert ssim(pred, target, mask=brain) == pytest.approx(expected, abs=TOL)


def test_ssim_refuses_images_smaller_than_its_window() -> None:
    pred, target = random_pair((10, 30))
    with pytest.raises(ValueError, match=r"at least 11 pixels.*\(10, 30\)"):
        ssim(pred, target)


def test_masked_ssim_refuses_a_mask_inside_the_border() -> None:
    pred, target = random_pair((20, 20))
    mask = np.zeros((20, 20), dtype=bool)
    mask[:SSIM_BORDER, :] = True
    with pytest.raises(ValueError, match="border"):
        ssim(pred, target, mask=mask)


unit_images = hnp.arrays(
    np.float64,
    st.tuples(st.integers(11, 18), st.integers(11, 18)),
    elements=st.floats(0, 1, allow_nan=False, width=64),
)


@settings(max_examples=40, deadline=None)
@given(unit_images, st.data())
def test_ssim_identity_and_symmetry(image: Array, data: st.DataObject) -> None:
    other = data.draw(
        hnp.arrays(np.float64, image.shape, elements=st.floats(0, 1, allow_nan=False, width=64))
    )
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    assert ssim(image, other) == pytest.approx(ssim(other, image), abs=1e-12)
    assert -1.0 <= ssim(image, other) <= 1.0 + 1e-12


# ---------------------------------------------------------------------------- MAE, NMSE


@pytest.mark.parametrize("shape", [(13, 9), (5, 6, 7)])
def test_mae_and_nmse_match_sums_by_hand(shape: tuple[int, ...]) -> None:
    pred, target = random_pair(shape, seed=5)
    mask = structured(shape) > 0.3
    pairs = list(zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True))
    inside = [pt for pt, m in zip(pairs, mask.ravel().tolist(), strict=True) if m]
    for selected, kwargs in ((pairs, {}), (inside, {"mask": mask})):
        expected_mae = math.fsum(abs(p - t) for p, t in selected) / len(selected)
        expected_nmse = math.fsum((p - t) ** 2 for p, t in selected) / math.fsum(
            t * t for _, t in selected
        )
        assert mae(pred, target, **kwargs) == pytest.approx(expected_mae, abs=TOL)
        assert nmse(pred, target, **kwargs) == pytest.approx(expected_nmse, abs=TOL)


def test_nmse_of_zero_prediction_is_one() -> None:
    target = structured((20, 20))
    assert nmse(np.zeros_like(target), target) == pytest.approx(1.0, abs=1e-12)


def test_nmse_refuses_an_all_zero_target() -> None:
    target = np.zeros((16, 16))
    with pytest.raises(ValueError, match="zero everywhere"):
        nmse(target + 0.1, target)
    image = structured((16, 16))
    with pytest.raises(ValueError, match="zero inside the mask"):
        nmse(image, image, mask=image == 0)


def test_perfect_prediction_identities() -> None:
    for shape in [(24, 28), (12, 14, 16)]:
        target = structured(shape)
        assert psnr(target, target) == math.inf
        assert ssim(target, target) == pytest.approx(1.0, abs=1e-12)
        assert mae(target, target) == 0.0
        assert nmse(target, target) == 0.0
        scores = image_metrics(2 * target - 1, 2 * target - 1, mask=target > 0.3)
        assert scores["psnr"] == math.inf and scores["psnr_masked"] == math.inf
        assert scores["ssim"] == pytest.approx(1.0, abs=1e-12)
        assert scores["mae"] == scores["nmse"] == scores["mae_masked"] == 0.0
        assert all(scores[f"kspace_{band}"] == 0.0 for band in BAND_NAMES)


# ---------------------------------------------------------------------------- k-space


def centred_dft_by_hand(image: Array) -> npt.NDArray[np.complex128]:
    """DFT matrices, with bin k of each axis holding frequency (k - n // 2) / n."""

    def matrix(n: int) -> npt.NDArray[np.complex128]:
        freq = (np.arange(n) - n // 2)[:, None]
        return np.exp(-2j * np.pi * freq * np.arange(n)[None, :] / n)

    height, width = image.shape
    return matrix(height) @ image @ matrix(width).T


def band_errors_by_hand(pred: Array, target: Array, edges: tuple[float, float]) -> dict[str, float]:
    fp, ft = centred_dft_by_hand(pred), centred_dft_by_hand(target)
    height, width = pred.shape
    sums = dict.fromkeys(BAND_NAMES, 0.0)
    counts = dict.fromkeys(BAND_NAMES, 0)
    for i in range(height):
        for j in range(width):
            fy = (i - height // 2) / (height / 2)  # Nyquist (half a cycle per pixel) -> 1
            fx = (j - width // 2) / (width / 2)
            radius = math.hypot(fy, fx)
            band = "low" if radius < edges[0] else "mid" if radius < edges[1] else "high"
            sums[band] += abs(math.log(1 + abs(fp[i, j])) - math.log(1 + abs(ft[i, j])))
            counts[band] += 1
    return {band: sums[band] / counts[band] for band in BAND_NAMES}


@pytest.mark.parametrize("shape", [(8, 8), (9, 13), (12, 10), (1, 7), (5, 3)])
def test_radial_frequency_matches_loop(shape: tuple[int, int]) -> None:
    height, width = shape
    expected = np.array(
        [
            [math.hypot(2 * (i - height // 2) / height, 2 * (j - width // 2) / width)]
            for i in range(height)
            for j in range(width)
        ]
    ).reshape(shape)
    np.testing.assert_allclose(radial_frequency(shape), expected, atol=1e-12)


def test_radial_frequency_known_values() -> None:
    radius = radial_frequency((4, 4))
    assert radius[2, 2] == 0.0  # DC at n // 2
    assert radius[0, 2] == radius[2, 0] == 1.0  # Nyquist along each axis
    assert radius[0, 0] == pytest.approx(math.sqrt(2))  # corner
    assert radius[2, 3] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("shape", "edges"),
    [((16, 16), (1 / 3, 2 / 3)), ((15, 12), (1 / 3, 2 / 3)), ((11, 14), (0.25, 0.9))],
)
def test_kspace_band_errors_match_brute_force(
    shape: tuple[int, int], edges: tuple[float, float]
) -> None:
    pred, target = structured_pair(shape)
    expected = band_errors_by_hand(pred, target, edges)
    result = kspace_band_errors(pred, target, bands=edges)
    assert result.keys() == set(BAND_NAMES)
    for band in BAND_NAMES:
        assert result[band] == pytest.approx(expected[band], abs=TOL), band


def test_kspace_band_errors_of_stack_average_slices() -> None:
    pred, target = random_pair((3, 12, 14), seed=6)
    per_slice = [band_errors_by_hand(pred[k], target[k], (1 / 3, 2 / 3)) for k in range(3)]
    result = kspace_band_errors(pred, target)
    for band in BAND_NAMES:
        expected = sum(errors[band] for errors in per_slice) / 3
        assert result[band] == pytest.approx(expected, abs=TOL)


def test_kspace_identical_images_have_zero_error_and_offset_is_low_band_only() -> None:
    target = structured((48, 40))
    assert kspace_band_errors(target, target) == dict.fromkeys(BAND_NAMES, 0.0)
    shifted = kspace_band_errors(np.roll(target, 3, axis=1), target)  # phase is ignored
    assert all(value < 1e-9 for value in shifted.values())
    offset = kspace_band_errors(target + 0.1, target)  # a constant moves only the DC bin
    assert offset["low"] > 1e-3
    assert offset["mid"] < 1e-9 and offset["high"] < 1e-9


def fourier_blur(image: Array, sigma: float) -> Array:
    """Circular Gaussian blur: multiply the spectrum by exp(-2 pi^2 sigma^2 f^2)."""
    f2 = sum(g**2 for g in np.meshgrid(*map(np.fft.fftfreq, image.shape), indexing="ij"))
    blurred: Array = np.fft.ifft2(np.fft.fft2(image) * np.exp(-2 * np.pi**2 * sigma**2 * f2)).real
    return blurred


def test_kspace_blur_errors_are_bounded_and_grow_with_blur() -> None:
    """Exact for a blur applied in the Fourier domain: in a bin with gain g < 1 the error is at
    most -log g, and it grows as g falls; at most log(1 + |F|) however strong the blur."""
    target = structured((64, 64))
    amplitude = np.log1p(np.abs(np.fft.fftshift(np.fft.fft2(target))))
    radius = radial_frequency(target.shape)
    previous = dict.fromkeys(BAND_NAMES, 0.0)
    for sigma in (0.5, 1.0, 2.0, 4.0):
        errors = kspace_band_errors(fourier_blur(target, sigma), target)
        for band, edge in (("low", 1 / 3), ("mid", 2 / 3)):
            # f = r / 2 cycles per pixel; -log g = 2 pi^2 sigma^2 f^2 at the band's outer edge
            assert errors[band] <= 2 * np.pi**2 * sigma**2 * (edge / 2) ** 2 + 1e-9
        assert errors["high"] <= amplitude[radius >= 2 / 3].mean() + 1e-9
        for band in BAND_NAMES:
            assert errors[band] >= previous[band] - 1e-9
        previous = errors
    mild = kspace_band_errors(fourier_blur(target, 0.75), target)
    assert mild["high"] > 3 * mild["low"]


@pytest.mark.realdata
def test_kspace_exposes_blur_that_noise_of_equal_psnr_does_not(real: dict[str, Array]) -> None:
    target = real["T2w"][:, :, AXIAL]
    blurred = ndimage.gaussian_filter(target, 1.0)
    rmse = math.sqrt(float(np.mean((blurred - target) ** 2)))
    noisy = target + np.random.default_rng(0).normal(0, rmse, target.shape)
    assert psnr(noisy, target) == pytest.approx(psnr(blurred, target), abs=0.1)
    blur_errors, noise_errors = (
        kspace_band_errors(blurred, target),
        kspace_band_errors(noisy, target),
    )
    assert blur_errors["high"] > 3 * blur_errors["low"]
    assert blur_errors["high"] > 1.5 * noise_errors["high"]
    assert blur_errors["mid"] > 1.5 * noise_errors["mid"]


def test_kspace_refuses_bad_bands_and_tiny_slices() -> None:
    pred, target = random_pair((16, 16))
    for bands in [(0.5, 0.2), (0.0, 0.5), (0.3, 0.3)]:
        with pytest.raises(ValueError, match="bands"):
            kspace_band_errors(pred, target, bands=bands)
    with pytest.raises(ValueError, match="'mid' band"):
        kspace_band_errors(np.ones((3, 3)), np.ones((3, 3)))


# ---------------------------------------------------------------------------- lesion regions


def test_region_metrics_equal_masked_metrics() -> None:
    pred, target = structured_pair((48, 48))
    lesion = np.zeros((48, 48), dtype=bool)
    lesion[20:28, 18:30] = True
    result = region_metrics(pred, target, lesion)
    assert result == {
        "psnr": pytest.approx(psnr(pred, target, mask=lesion), abs=1e-12),
        "ssim": pytest.approx(ssim(pred, target, mask=lesion), abs=1e-12),
        "mae": pytest.approx(mae(pred, target, mask=lesion), abs=1e-12),
    }


def test_region_metrics_of_empty_or_border_region_are_nan() -> None:
    pred, target = random_pair((24, 24))
    empty = region_metrics(pred, target, np.zeros((24, 24), dtype=bool))
    assert empty.keys() == {"psnr", "ssim", "mae"}
    assert all(math.isnan(value) for value in empty.values())
    edge = np.zeros((24, 24), dtype=bool)
    edge[0, :4] = True
    at_edge = region_metrics(pred, target, edge)
    assert math.isnan(at_edge["ssim"])
    assert math.isfinite(at_edge["psnr"]) and math.isfinite(at_edge["mae"])


# ---------------------------------------------------------------------------- aggregate


def test_to_unit_maps_and_clips() -> None:
    np.testing.assert_array_equal(
        to_unit(np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    )


@pytest.mark.parametrize("shape", [(40, 44), (12, 32, 36)])
def test_image_metrics_on_model_scale(shape: tuple[int, ...]) -> None:
    pred_unit, target_unit = structured_pair(shape)
    pred, target = 2 * pred_unit - 1, 2 * target_unit - 1
    mask = target_unit > 0.05
    lesion = np.zeros(shape, dtype=bool)
    lesion[..., 14:22, 16:24] = True
    scores = image_metrics(pred, target, mask=mask, lesion=lesion)
    expected = {
        "psnr": psnr(pred_unit, target_unit),
        "ssim": ssim(pred_unit, target_unit),
        "mae": mae(pred_unit, target_unit),
        "nmse": nmse(pred_unit, target_unit),
        "psnr_masked": psnr(pred_unit, target_unit, mask=mask),
        "ssim_masked": ssim(pred_unit, target_unit, mask=mask),
        "mae_masked": mae(pred_unit, target_unit, mask=mask),
        "nmse_masked": nmse(pred_unit, target_unit, mask=mask),
    }
    expected |= {f"kspace_{k}": v for k, v in kspace_band_errors(pred_unit, target_unit).items()}
    expected |= {
        f"lesion_{k}": v for k, v in region_metrics(pred_unit, target_unit, lesion).items()
    }
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value, abs=1e-12), key
    assert set(image_metrics(pred, target)) == {
        "psnr", "ssim", "mae", "nmse", "kspace_low", "kspace_mid", "kspace_high"
    }  # fmt: skip


def test_image_metrics_reports_undefined_values_as_nan() -> None:
    background = -np.ones((24, 24))  # all background: zero after to_unit
    pred = background + 0.2
    scores = image_metrics(
        pred, background, mask=np.zeros((24, 24), bool), lesion=np.zeros((24, 24), bool)
    )
    assert math.isnan(scores["nmse"]) and math.isnan(scores["nmse_masked"])
    for key in ("psnr_masked", "ssim_masked", "mae_masked", "lesion_psnr", "lesion_ssim"):
        assert math.isnan(scores[key]), key
    assert scores["psnr"] == pytest.approx(20.0, abs=1e-9)  # an offset of 0.1 on [0, 1]


def test_mean_metrics_skips_nan_and_counts_infinities() -> None:
    summary = mean_metrics(
        [
            {"psnr": 30.0, "lesion_mae": math.nan, "ssim": 0.8},
            {"psnr": math.inf, "lesion_mae": 0.2, "ssim": 0.9},
            {"psnr": 20.0, "lesion_mae": 0.4},
        ]
    )
    assert summary["psnr"] == 25.0 and summary["psnr_n"] == 2 and summary["psnr_n_inf"] == 1
    assert summary["lesion_mae"] == pytest.approx(0.3) and summary["lesion_mae_n"] == 2
    assert summary["ssim"] == pytest.approx(0.85) and summary["ssim_n"] == 2
    assert list(summary)[:3] == ["psnr", "psnr_n", "psnr_n_inf"]
    only_nan = mean_metrics([{"lesion_psnr": math.nan}])
    assert math.isnan(only_nan["lesion_psnr"]) and only_nan["lesion_psnr_n"] == 0
    with pytest.raises(ValueError, match="at least one"):
        mean_metrics([])
    with pytest.raises(ValueError, match="'psnr' must be a number"):
        mean_metrics([{"psnr": "high"}])


# ---------------------------------------------------------------------------- bad inputs

METRICS: dict[str, Callable[[Any, Any], Any]] = {
    "psnr": psnr,
    "ssim": ssim,
    "mae": mae,
    "nmse": nmse,
    "kspace_band_errors": kspace_band_errors,
    "region_metrics": lambda p, t: region_metrics(p, t, np.ones(np.shape(p), bool)),
    "image_metrics": image_metrics,
}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metrics_refuse_bad_inputs(name: str) -> None:
    metric = METRICS[name]
    good = structured((16, 16))
    with pytest.raises(ValueError, match=r"same shape.*pred \(16, 16\).*target \(16, 18\)"):
        metric(good, np.zeros((16, 18)))
    for shape in [(16,), (2, 16, 16, 16)]:
        with pytest.raises(ValueError, match=rf"pred must be a 2D .* {len(shape)}D array"):
            metric(np.zeros(shape), np.zeros(shape))
    with_nan = good.copy()
    with_nan[3, 4] = math.nan
    with pytest.raises(ValueError, match=r"pred of shape \(16, 16\) holds 1 NaN"):
        metric(with_nan, good)
    with pytest.raises(ValueError, match=r"target .* NaN or infinite"):
        metric(good, np.where(good > 0.5, math.inf, good))


def test_masks_and_data_range_are_checked() -> None:
    pred, target = random_pair((16, 16))
    with pytest.raises(ValueError, match=r"mask must have the shape .*\(16, 16\), got \(16, 15\)"):
        psnr(pred, target, mask=np.ones((16, 15), bool))
    with pytest.raises(ValueError, match="mask must be boolean"):
        mae(pred, target, mask=np.full((16, 16), 0.5))
    with pytest.raises(ValueError, match="region_mask"):
        region_metrics(pred, target, np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="lesion"):
        image_metrics(pred, target, lesion=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="selects no pixels"):
        psnr(pred, target, mask=np.zeros((16, 16), bool))
    with pytest.raises(ValueError, match="data_range"):
        psnr(pred, target, data_range=0)
    assert mae(pred, target, mask=(pred > 0.5).astype(np.uint8)) == mae(
        pred, target, mask=pred > 0.5
    )
