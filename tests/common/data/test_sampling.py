"""Who feeds which domain, and how the datasets draw slices (unpaired and paired)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsynth.common.config import DataConfig
from fedsynth.common.data import PairedSlices, UnpairedSlices, Volume, assign_domains, load_site
from fedsynth.common.data.discovery import Scan
from fedsynth.common.data.preprocess import IntensityMapping, SliceStack
from fedsynth.common.modalities import Modality
from tests.conftest import CONTRASTS, SiteMaker, head_volume, save_nifti

SMALL = DataConfig(spacing_mm=(2.0, 2.0, 2.0), image_size=48)

# --------------------------------------------------------------------------- assign_domains

_names = st.sampled_from([f"sub-{i:02d}" for i in range(12)])


def _split(draw_a: list[str], draw_b: list[str], seed: int) -> tuple[set[str], set[str]]:
    side_a, side_b = assign_domains(draw_a, draw_b, seed)
    assert side_a == sorted(side_a) and side_b == sorted(side_b)
    assert len(set(side_a)) == len(side_a) and len(set(side_b)) == len(side_b)
    return set(side_a), set(side_b)


@settings(max_examples=300, deadline=None)
@given(a=st.lists(_names, max_size=15), b=st.lists(_names, max_size=15), seed=st.integers(0, 2**31))
def test_assign_domains_properties(a: list[str], b: list[str], seed: int) -> None:
    side_a, side_b = _split(a, b, seed)
    set_a, set_b = set(a), set(b)
    everyone = set_a | set_b

    # Exactly the input subjects, each on a side where it has a scan.
    assert side_a | side_b == everyone
    assert side_a <= set_a and side_b <= set_b
    # Subjects with one modality go to that side.
    assert set_a - set_b <= side_a and set_b - set_a <= side_b
    # Disjoint once two subjects exist (a lone subject feeds both sides it has).
    if len(everyone) >= 2:
        assert not side_a & side_b
    else:
        assert (side_a, side_b) == (set_a, set_b)
    # Each side non-empty whenever the site has that modality.
    assert bool(side_a) == bool(set_a) and bool(side_b) == bool(set_b)
    # Greedy balance: the shared subjects close the gap left by the single-modality ones.
    if len(everyone) >= 2:
        only_a, only_b, both = len(set_a - set_b), len(set_b - set_a), len(set_a & set_b)
        gap = abs(only_a - only_b)
        expected = gap - both if both < gap else (both - gap) % 2
        assert abs(len(side_a) - len(side_b)) == expected
    # Deterministic per seed, whatever the order of the inputs.
    assert _split(list(reversed(a)), list(reversed(b)), seed) == (side_a, side_b)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 2**31))
def test_all_subjects_paired_splits_in_balanced_halves(n: int, seed: int) -> None:
    subjects = [f"p{i}" for i in range(n)]
    side_a, side_b = _split(subjects, subjects, seed)
    assert side_a and side_b
    assert abs(len(side_a) - len(side_b)) <= 1
    assert side_a | side_b == set(subjects) and not side_a & side_b


def test_assign_domains_uses_the_seed() -> None:
    subjects = [f"p{i}" for i in range(10)]
    splits = {tuple(assign_domains(subjects, subjects, seed)[0]) for seed in range(20)}
    assert len(splits) > 1


# --------------------------------------------------------------------------- load_site


def _subjects(volumes: Sequence[Volume]) -> list[str]:
    return [v.scan.subject for v in volumes]


def test_load_site_unpaired_never_shares_a_subject(make_site: SiteMaker, tmp_path: Path) -> None:
    root = make_site(subjects={f"sub-0{i}": ["T1w", "T2w"] for i in range(1, 5)})
    unpaired = SMALL.model_copy(update={"pairing": "unpaired"})

    for seed in range(3):
        site = load_site(root, unpaired, seed=seed, cache_dir=tmp_path / "cache")
        a, b = _subjects(site.domain_a), _subjects(site.domain_b)
        assert not set(a) & set(b)
        assert len(a) == len(b) == 2  # 4 subjects with both modalities: 2 + 2
        assert {v.scan.modality for v in site.domain_a} == {Modality.T1W}
        assert {v.scan.modality for v in site.domain_b} == {Modality.T2W}
        # Paired evaluation still sees every subject.
        assert sorted(x.scan.subject for x, _ in site.paired) == [f"sub-0{i}" for i in range(1, 5)]
        assert site.slices_a == sum(len(v.stack) for v in site.domain_a) > 0
        # Nothing trains as a pair, and the unpaired examples are exactly the two sides.
        assert site.training_pairs == []
        assert site.training_unpaired == (site.domain_a, site.domain_b)


def test_load_site_weak_pairs_every_session_with_both(make_site: SiteMaker) -> None:
    root = make_site(
        subjects={**{f"sub-0{i}": ["T1w", "T2w"] for i in range(1, 4)}, "sub-09": ["T2w"]}
    )

    site = load_site(root, SMALL)

    assert site.pairing == "weak"
    assert [(a.scan.subject, b.scan.subject) for a, b in site.training_pairs] == [
        (f"sub-0{i}", f"sub-0{i}") for i in range(1, 4)
    ]
    for a, b in site.paired:
        assert (a.scan.modality, b.scan.modality) == (Modality.T1W, Modality.T2W)
        np.testing.assert_allclose(a.stack.affine, b.stack.affine)
    assert site.unpaired_a == []
    assert _subjects(site.unpaired_b) == ["sub-09"]
    assert _subjects(site.domain_b) == ["sub-01", "sub-02", "sub-03", "sub-09"]


# --------------------------------------------------------------------------- synthetic stacks


def _disk(size: int, radius: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    return np.hypot(x, y) < radius


def _volume(
    values: Sequence[float],
    *,
    z: Sequence[int] | None = None,
    depth: int | None = None,
    size: int = 32,
    radius: float = 9.0,
    affine: np.ndarray | None = None,
    name: str = "v",
) -> Volume:
    """A stack whose slice k is a disk of value ``values[k]`` on a -1 background."""
    mask = _disk(size, radius)
    slices = np.full((len(values), size, size), -1.0, dtype=np.float32)
    slices[:, mask] = np.asarray(values, dtype=np.float32)[:, None]
    z_arr = np.arange(len(values)) if z is None else np.asarray(z)
    stack = SliceStack(
        slices=slices,
        masks=np.repeat(mask[None], len(values), axis=0),
        z=z_arr.astype(np.int64),
        mapping=IntensityMapping(0.0, 1.0, "percentile"),
        affine=np.eye(4) if affine is None else affine,
        depth=int(z_arr.max()) + 1 if depth is None else depth,
        foreground_clipped=0.0,
    )
    return Volume(Scan(Path(f"{name}.nii.gz"), name, Modality.T1W), stack)


def _ids(n: int, offset: float) -> list[float]:
    return [round(offset + 0.01 * k, 4) for k in range(n)]


def _label(item: torch.Tensor, size: int = 32) -> float:
    """The disk value identifying a slice (read at the centre)."""
    return round(float(item[0, size // 2, size // 2]), 4)


def _epoch(dataset: UnpairedSlices) -> list[dict[str, torch.Tensor]]:
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize(
    ("a_sizes", "b_sizes", "expected"), [([5], [3], 5), ([3], [3, 4], 7), ([2, 2], [2], 4)]
)
def test_unpaired_length_is_the_larger_domain(
    a_sizes: list[int], b_sizes: list[int], expected: int
) -> None:
    a = [_volume(_ids(n, 0.1 * i), name=f"a{i}") for i, n in enumerate(a_sizes)]
    b = [_volume(_ids(n, -0.5 + 0.1 * i), name=f"b{i}") for i, n in enumerate(b_sizes)]
    assert len(UnpairedSlices(a, b)) == expected


@pytest.mark.parametrize("misalignment", ["none", "severe"])
def test_unpaired_same_seed_and_epoch_give_identical_items(misalignment: str) -> None:
    a, b = [_volume(_ids(6, 0.1))], [_volume(_ids(9, -0.5))]
    first = UnpairedSlices(a, b, misalignment=misalignment, seed=3)
    second = UnpairedSlices(a, b, misalignment=misalignment, seed=3)
    first.set_epoch(2)
    second.set_epoch(5)
    second.set_epoch(2)  # revisiting an epoch reproduces it (a resumed run)
    for x, y in zip(_epoch(first), _epoch(second), strict=True):
        assert x.keys() == y.keys() == {"a", "b", "a_mask", "b_mask"}
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_unpaired_new_epoch_repairs_b_but_keeps_a() -> None:
    a, b = [_volume(_ids(5, 0.1))], [_volume(_ids(12, -0.5))]
    dataset = UnpairedSlices(a, b, seed=0)
    epoch0 = _epoch(dataset)
    dataset.set_epoch(1)
    epoch1 = _epoch(dataset)

    for x, y in zip(epoch0, epoch1, strict=True):
        assert torch.equal(x["a"], y["a"]) and torch.equal(x["a_mask"], y["a_mask"])
    assert [_label(x["b"]) for x in epoch0] != [_label(y["b"]) for y in epoch1]
    # Another seed pairs differently too.
    other = UnpairedSlices(a, b, seed=1)
    assert [_label(x["b"]) for x in _epoch(other)] != [_label(x["b"]) for x in epoch0]


@pytest.mark.parametrize(("n_a", "n_b"), [(4, 10), (10, 10), (11, 3), (7, 2)])
def test_every_slice_appears_every_epoch(n_a: int, n_b: int) -> None:
    a, b = [_volume(_ids(n_a, 0.1))], [_volume(_ids(n_b, -0.5))]
    dataset = UnpairedSlices(a, b, seed=11)
    n = len(dataset)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        items = _epoch(dataset)
        b_counts = Counter(_label(x["b"]) for x in items)
        a_counts = Counter(_label(x["a"]) for x in items)
        assert set(b_counts) == set(_ids(n_b, -0.5))
        assert set(b_counts.values()) <= {n // n_b, -(-n // n_b)}
        assert set(a_counts) == set(_ids(n_a, 0.1))
        assert set(a_counts.values()) <= {n // n_a, -(-n // n_a)}


def test_no_misalignment_returns_b_slices_bit_identical() -> None:
    b_volume = _volume(_ids(7, -0.5))
    dataset = UnpairedSlices([_volume(_ids(7, 0.1))], [b_volume], misalignment="none", seed=2)
    stack = b_volume.stack
    by_label = {round(float(s[16, 16]), 4): k for k, s in enumerate(stack.slices)}
    for item in _epoch(dataset):
        k = by_label[_label(item["b"])]
        assert item["b"].dtype == torch.float32 and item["b"].shape == (1, 32, 32)
        np.testing.assert_array_equal(item["b"][0].numpy(), stack.slices[k])
        np.testing.assert_array_equal(item["b_mask"][0].numpy(), stack.masks[k].astype(np.float32))


def test_severe_misalignment_warps_b_within_range() -> None:
    values = _ids(8, 0.2)
    b_volume = _volume(values)
    dataset = UnpairedSlices([_volume(_ids(4, 0.1))], [b_volume], misalignment="severe", seed=4)
    changed = 0
    for item in _epoch(dataset):
        b, b_mask = item["b"][0].numpy(), item["b_mask"][0].numpy()
        assert b.min() >= -1.0 - 1e-6 and b.max() <= 1.0
        assert b.max() <= max(values) + 1e-6  # bilinear: no overshoot above the disk value
        assert (b[[0, 0, -1, -1], [0, -1, 0, -1]] == -1.0).all()
        assert (b_mask[[0, 0, -1, -1], [0, -1, 0, -1]] == 0.0).all()
        assert set(np.unique(b_mask)) <= {0.0, 1.0}
        changed += not any(np.array_equal(b, s) for s in b_volume.stack.slices)
        # The mask moved with the image: for a disk of value v on -1, (b + 1) / (v + 1) is the
        # interpolation weight of the disk, which the warped mask thresholds at 0.5.
        v = float(b[16, 16])  # the disk still covers the centre after a severe draw
        assert v == pytest.approx(min(values, key=lambda x: abs(x - v)), abs=1e-5)
        weight = (b + 1.0) / (v + 1.0)
        agree = ((weight > 0.5) == (b_mask > 0.5)) | (np.abs(weight - 0.5) < 0.05)
        assert agree.all()
    assert changed == len(dataset)


# --------------------------------------------------------------------------- paired slices


def test_paired_slices_match_z_positions_and_use_the_target_mask() -> None:
    # Each slice's value encodes its z: 0.1 + 0.01 z in A, -0.5 + 0.01 z in B.
    pairs = []
    for index in range(2):
        z_a, z_b = np.arange(2 + index, 10), np.arange(4, 12 - index)
        a = _volume(0.1 + 0.01 * z_a, z=z_a, depth=14, name=f"a{index}")
        b = _volume(-0.5 + 0.01 * z_b, z=z_b, depth=14, radius=6.0, name=f"b{index}")
        pairs.append((a, b))

    dataset = PairedSlices(pairs)

    expected_positions = [(0, z) for z in range(4, 10)] + [(1, z) for z in range(4, 10)]
    assert dataset.positions == expected_positions
    assert len(dataset) == len(expected_positions)
    target_mask = _disk(32, 6.0).astype(np.float32)
    for i, (_, z) in enumerate(expected_positions):
        item = dataset[i]
        z_from_a = round((_label(item["a"]) - 0.1) / 0.01)
        z_from_b = round((_label(item["b"]) + 0.5) / 0.01)
        assert z_from_a == z_from_b == z
        np.testing.assert_array_equal(item["mask"][0].numpy(), target_mask)


def test_paired_slices_refuse_mismatching_grids() -> None:
    a = _volume(_ids(4, 0.1), depth=10, name="a")
    deeper = _volume(_ids(4, -0.5), depth=12, name="deeper")
    shifted = _volume(_ids(4, -0.5), depth=10, affine=np.diag([2.0, 2.0, 2.0, 1.0]), name="moved")
    with pytest.raises(
        ValueError, match=r"a\.nii\.gz and deeper\.nii\.gz are not on the same grid"
    ):
        PairedSlices([(a, deeper)])
    with pytest.raises(ValueError, match="not on the same grid"):
        PairedSlices([(a, shifted)])
    disjoint = _volume(_ids(4, -0.5), z=[6, 7, 8, 9], depth=10, name="disjoint")
    with pytest.raises(ValueError, match="no slice position is usable"):
        PairedSlices([(a, disjoint)])


def test_paired_site_slices_correspond_end_to_end(tmp_path: Path) -> None:
    """Through discovery and preprocessing: a 'nose' at input z 13..16 of each subject shows in
    exactly the same paired items of A and B."""
    root = tmp_path / "site"
    nose = (slice(17, 23), slice(34, 44), slice(13, 17))
    for index, subject in enumerate(["sub-01", "sub-02"]):
        for modality in ("T1w", "T2w"):
            volume = head_volume(modality, seed=index)
            volume[nose] = CONTRASTS[modality][1]
            save_nifti(root / subject / "anat" / f"{subject}_{modality}.nii.gz", volume)

    site = load_site(root, SMALL.model_copy(update={"paired": True}))
    dataset = PairedSlices(site.paired)

    # The nose lies outside the head: input (19, 40) is (19 + 4, 40 + 2) after centred padding.
    marked_a = [bool(dataset[i]["a"][0, 23, 42] > -1.0) for i in range(len(dataset))]
    marked_b = [bool(dataset[i]["b"][0, 23, 42] > -1.0) for i in range(len(dataset))]
    assert marked_a == marked_b
    marked_z = sorted({z for (_, z), m in zip(dataset.positions, marked_a, strict=True) if m})
    assert marked_z == [13, 14, 15, 16]
