"""Misalignment augmentation: drawn ranges per severity and what the warp does to a slice."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedsynth.common.data.misalign import SEVERITIES, AffineDraw, apply_affine, draw_affine

# The table in fedsynth.common.data.misalign's docstring, written out again: (degrees, fraction,
# fraction).
DOCUMENTED = {
    "none": (0.0, 0.0, 0.0),
    "slight": (2.0, 0.02, 0.02),
    "moderate": (5.0, 0.05, 0.05),
    "severe": (10.0, 0.10, 0.10),
}


def test_severity_table_matches_the_documentation() -> None:
    assert {
        name: (s.rotation_deg, s.translation_frac, s.scale_frac) for name, s in SEVERITIES.items()
    } == DOCUMENTED


@pytest.mark.parametrize("severity", ["slight", "moderate", "severe"])
@pytest.mark.parametrize("size", [48, 256])
def test_draws_stay_within_and_reach_the_documented_bounds(severity: str, size: int) -> None:
    degrees, shift_frac, scale_frac = DOCUMENTED[severity]
    rng = np.random.default_rng(123)
    draws = [draw_affine(severity, size, rng) for _ in range(2000)]
    rotation = np.degrees([d.rotation for d in draws])
    shift = np.array([d.translation for d in draws])  # pixels
    scale = np.array([d.scale for d in draws])

    assert np.abs(rotation).max() <= degrees
    assert np.abs(shift).max() <= shift_frac * size
    assert np.abs(scale - 1.0).max() <= scale_frac + 1e-12
    # Near both ends of every range (2000 uniform draws miss the last 1 % with p ~ 2e-9).
    ranges = [
        (rotation, degrees),
        (shift[:, 0], shift_frac * size),
        (shift[:, 1], shift_frac * size),
        (scale[:, 0] - 1.0, scale_frac),
        (scale[:, 1] - 1.0, scale_frac),
    ]
    for values, bound in ranges:
        assert values.max() > 0.99 * bound and values.min() < -0.99 * bound
    # The two axes are drawn independently, not one value copied.
    assert not np.allclose(shift[:, 0], shift[:, 1])
    assert not np.allclose(scale[:, 0], scale[:, 1])


def test_draws_are_a_function_of_the_generator_state() -> None:
    one = [draw_affine("moderate", 64, np.random.default_rng(5)) for _ in range(2)]
    assert one[0] == one[1]
    assert draw_affine("moderate", 64, np.random.default_rng(6)) != one[0]


def test_none_is_the_identity() -> None:
    rng = np.random.default_rng(0)
    image = np.random.default_rng(1).uniform(-1, 1, (32, 32)).astype(np.float32)
    for _ in range(20):
        draw = draw_affine("none", 32, rng)
        assert draw == AffineDraw(0.0, (0.0, 0.0), (1.0, 1.0))
        np.testing.assert_array_equal(apply_affine(image, draw), image)


def _square(size: int = 32) -> np.ndarray:
    image = np.full((size, size), -1.0, dtype=np.float32)
    image[10:16, 12:20] = 0.5
    return image


def _box(image: np.ndarray, level: float) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(image > level)
    return int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())


@pytest.mark.parametrize("shift", [(3.0, -2.0), (-4.0, 0.0), (0.0, 5.0), (2.0, 2.0)])
def test_translation_moves_a_square_by_whole_pixels(shift: tuple[float, float]) -> None:
    image = _square()
    out = apply_affine(image, AffineDraw(0.0, shift, (1.0, 1.0)))

    # MONAI's Affine samples the input at (output position + translation): the content moves by
    # -translation. The draws are symmetric, so only |shift| and the axis order matter here;
    # the sign must be the same on both axes.
    r0, r1, c0, c1 = _box(image, 0.0)
    o0, o1, p0, p1 = _box(out, 0.0)
    moved = (o0 - r0, p0 - c0)
    assert (o1 - o0, p1 - p0) == (r1 - r0, c1 - c0)  # same size: a pure shift
    assert tuple(abs(m) for m in moved) == tuple(abs(s) for s in shift)
    signs = {np.sign(m) * np.sign(s) for m, s in zip(moved, shift, strict=True) if s}
    assert len(signs) == 1
    # Whole-pixel shifts are exact: the square is the same values, moved.
    np.testing.assert_array_equal(out[o0 : o1 + 1, p0 : p1 + 1], image[r0 : r1 + 1, c0 : c1 + 1])


def test_pixels_from_outside_get_the_background_value() -> None:
    image = np.full((24, 24), 0.25, dtype=np.float32)
    draw = AffineDraw(0.0, (5.0, 0.0), (1.0, 1.0))

    out = apply_affine(image, draw)  # default background -1 (the model's air)
    uncovered = np.abs(out - 0.25) > 1e-6
    rows = np.flatnonzero(uncovered.all(axis=1))
    assert len(rows) == 5 and uncovered.sum() == 5 * 24
    assert rows.tolist() in (list(range(5)), list(range(19, 24)))
    np.testing.assert_allclose(out[uncovered], -1.0, atol=1e-6)

    mask = apply_affine(np.ones((24, 24), np.float32), draw, background=0.0)
    np.testing.assert_allclose(mask[rows], 0.0, atol=1e-6)
    np.testing.assert_allclose(mask[~uncovered], 1.0, atol=1e-6)


def test_rotation_keeps_a_centred_disk_and_the_range() -> None:
    y, x = np.mgrid[:33, :33] - 16.0
    disk = np.where(np.hypot(x, y) < 10, 0.8, -1.0).astype(np.float32)
    out = apply_affine(disk, AffineDraw(math.radians(10.0), (0.0, 0.0), (1.0, 1.0)))
    assert out.min() >= -1.0 - 1e-6 and out.max() <= 0.8 + 1e-6
    # Rotated about the slice centre: the disk keeps its centroid and its area.
    weight = out + 1.0
    rows, cols = np.mgrid[:33, :33]
    assert (weight * rows).sum() / weight.sum() == pytest.approx(16.0, abs=0.05)
    assert (weight * cols).sum() / weight.sum() == pytest.approx(16.0, abs=0.05)
    assert weight.sum() == pytest.approx((disk + 1.0).sum(), rel=0.01)
    assert out[16, 16] == pytest.approx(0.8)
    assert (out[[0, 0, -1, -1], [0, -1, 0, -1]] == -1.0).all()
    # ... while a shape that is not round does turn.
    square = _square()
    turned = apply_affine(square, AffineDraw(math.radians(10.0), (0.0, 0.0), (1.0, 1.0)))
    assert np.abs(turned - square).max() > 0.5


def test_scale_changes_the_size_about_the_centre() -> None:
    y, x = np.mgrid[:41, :41] - 20.0
    disk = np.where(np.hypot(x, y) < 10, 1.0, -1.0).astype(np.float32)
    bigger = apply_affine(disk, AffineDraw(0.0, (0.0, 0.0), (0.8, 0.8)))
    smaller = apply_affine(disk, AffineDraw(0.0, (0.0, 0.0), (1.25, 1.25)))
    area = (disk > 0).sum()
    # One of the two grows the disk and the other shrinks it (MONAI scales the sampling grid).
    assert sorted([(bigger > 0).sum(), (smaller > 0).sum()]) == [
        pytest.approx(area * 0.64, rel=0.1),
        pytest.approx(area / 0.64, rel=0.1),
    ]
    for out in (bigger, smaller):
        rows, cols = np.nonzero(out > 0)
        assert rows.mean() == pytest.approx(20.0, abs=0.5)
        assert cols.mean() == pytest.approx(20.0, abs=0.5)


def test_apply_affine_does_not_modify_its_input() -> None:
    image = _square()
    before = image.copy()
    apply_affine(image, AffineDraw(0.1, (1.5, -0.5), (1.05, 0.95)))
    np.testing.assert_array_equal(image, before)


@pytest.mark.parametrize("name", ["extreme", "Severe", ""])
def test_unknown_severity_names_the_allowed_ones(name: str) -> None:
    with pytest.raises(ValueError) as info:
        draw_affine(name, 32, np.random.default_rng(0))
    message = str(info.value)
    assert repr(name) in message
    assert "none, slight, moderate, severe" in message
