"""Weak pairing: a session's contrasts on two grids come onto one grid by their scanner affines.

The phantom is a head with three small bright markers at known world positions. The target
contrast is written on another grid (other voxel size, field of view and axis order) and the
head is moved between the two acquisitions by a known rigid motion. After pairing, every marker
of the resampled target must sit where that motion puts it, within one model voxel.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from fedsynth.common.config import DataConfig
from fedsynth.common.data import training_set
from fedsynth.common.data.discovery import Scan
from fedsynth.common.data.pairing import match_sessions
from fedsynth.common.data.site import load_site
from fedsynth.common.modalities import Modality
from tests.conftest import save_nifti

CONFIG = DataConfig(spacing_mm=(3.0, 3.0, 3.0), image_size=48, min_foreground=0.05)
MARKERS_MM = np.array([[-20.0, 15.0, -6.0], [25.0, -10.0, 9.0], [0.0, 30.0, 0.0]])
HEAD_RADII_MM = np.array([60.0, 70.0, 55.0])


def _rigid(angle_deg: float, shift_mm: tuple[float, float, float]) -> np.ndarray:
    """World-space motion: a rotation about the z axis, then a shift."""
    angle = math.radians(angle_deg)
    motion = np.eye(4)
    motion[:2, :2] = [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    motion[:3, 3] = shift_mm
    return motion


def _render(affine: np.ndarray, shape: tuple[int, int, int], motion: np.ndarray) -> np.ndarray:
    """The moved head sampled on a grid: value at world x is the head's at motion^-1 x."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    inverse = np.linalg.inv(motion)
    body = world @ inverse[:3, :3].T + inverse[:3, 3]
    head = ((body / HEAD_RADII_MM) ** 2).sum(-1) < 1.0
    volume = np.where(head, 300.0, 0.0)
    for marker in MARKERS_MM:
        volume[np.linalg.norm(body - marker, axis=-1) < 6.0] = 1500.0
    return volume.astype(np.float32)


def _session(tmp_path: Path, motion: np.ndarray) -> Path:
    root = tmp_path / "site"
    anat = root / "sub-01" / "ses-1" / "anat"
    # Source: 1.5 mm isotropic, RAS axes.
    source_affine = np.diag([1.5, 1.5, 1.5, 1.0])
    source_affine[:3, 3] = [-90.0, -100.0, -75.0]
    source = _render(source_affine, (120, 134, 100), np.eye(4))
    save_nifti(anat / "sub-01_ses-1_T1w.nii.gz", source, source_affine)
    # Target: anisotropic 1.1 x 1.1 x 3.3 mm, LPS axes, another field of view, moved head.
    target_affine = np.diag([-1.1, -1.1, 3.3, 1.0])
    target_affine[:3, 3] = [95.0, 105.0, -70.0]
    target = _render(target_affine, (172, 190, 44), motion)
    save_nifti(anat / "sub-01_ses-1_T2w.nii.gz", target, target_affine)
    return root


def _marker_centres_world(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World positions of the bright blobs of a (model-scale) volume, in MARKERS_MM order."""
    labels, count = ndimage.label(volume > 0.5)
    centres = np.array(ndimage.center_of_mass(volume > 0.5, labels, range(1, count + 1)))
    world = centres @ affine[:3, :3].T + affine[:3, 3]
    return world


def _paired_volumes(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    site = load_site(root, CONFIG.model_copy(update={"percentiles": (0.0, 100.0)}))
    assert len(site.paired) == 1 and not site.unpaired_a and not site.unpaired_b
    source, target = site.paired[0]
    assert source.stack.depth == target.stack.depth
    np.testing.assert_allclose(source.stack.affine, target.stack.affine)
    shape = (*source.stack.slices.shape[1:], source.stack.depth)
    volumes = []
    for volume in (source, target):
        full = np.full(shape, -1.0, dtype=np.float32)
        full[:, :, volume.stack.z] = np.moveaxis(volume.stack.slices, 0, 2)
        volumes.append(full)
    return volumes[0], volumes[1], source.stack.affine


@pytest.mark.parametrize(
    ("angle_deg", "shift_mm"), [(0.0, (0.0, 0.0, 0.0)), (4.0, (5.0, -4.0, 3.0))]
)
def test_same_session_on_two_grids_lands_on_one_grid_within_a_voxel_of_the_motion(
    tmp_path: Path, angle_deg: float, shift_mm: tuple[float, float, float]
) -> None:
    motion = _rigid(angle_deg, shift_mm)
    source, target, affine = _paired_volumes(_session(tmp_path, motion))
    expected_source = MARKERS_MM
    expected_target = MARKERS_MM @ motion[:3, :3].T + motion[:3, 3]
    voxel = max(CONFIG.spacing_mm)
    for volume, expected in ((source, expected_source), (target, expected_target)):
        found = _marker_centres_world(volume, affine)
        assert len(found) == len(expected)
        # Match each expected marker with the nearest blob found.
        distances = np.linalg.norm(found[None] - expected[:, None], axis=-1).min(axis=1)
        assert distances.max() < voxel, distances
    if angle_deg:
        # The motion is really there: the target's markers are not at the source's positions.
        found = _marker_centres_world(target, affine)
        moved = np.linalg.norm(found[None] - MARKERS_MM[:, None], axis=-1).min(axis=1)
        assert moved.min() > voxel


def test_the_target_takes_the_sources_mask_where_it_has_data(tmp_path: Path) -> None:
    site = load_site(_session(tmp_path, _rigid(2.0, (2.0, 0.0, 0.0))), CONFIG)
    source, target = site.paired[0]
    common, ia, ib = np.intersect1d(source.stack.z, target.stack.z, return_indices=True)
    assert len(common) > 10
    inside = target.stack.masks[ib]
    assert not (inside & ~source.stack.masks[ia]).any()  # never outside the source's mask
    assert inside.sum() > 0.95 * source.stack.masks[ia].sum()  # both fields of view cover it


def _scan(subject: str, session: str | None, modality: Modality, name: str = "") -> Scan:
    path = Path(f"/site/{subject}/{session or ''}/{subject}_{modality.value}{name}.nii.gz")
    return Scan(path, subject, modality, session)


def test_match_sessions_pairs_by_subject_and_session_only() -> None:
    t1 = [
        _scan("sub-1", "ses-1", Modality.T1W),
        _scan("sub-1", "ses-2", Modality.T1W),
        _scan("sub-2", None, Modality.T1W),
        _scan("sub-2", None, Modality.T1W, "-run2"),
    ]
    t2 = [
        _scan("sub-1", "ses-2", Modality.T2W),
        _scan("sub-2", None, Modality.T2W),
        _scan("sub-3", None, Modality.T2W),
    ]
    match = match_sessions(t1, t2)
    assert [(a.subject, a.session, b.session) for a, b in match.pairs] == [
        ("sub-1", "ses-2", "ses-2"),
        ("sub-2", None, None),
    ]
    # Two T1w runs in one session: the first by path is the reference, the other unpaired.
    assert match.pairs[1][0].path.name == "sub-2_T1w-run2.nii.gz"
    assert {(s.subject, s.session) for s in match.unpaired_sources} == {
        ("sub-1", "ses-1"),
        ("sub-2", None),
    }
    assert [s.subject for s in match.unpaired_targets] == ["sub-3"]


def test_a_mixed_site_trains_paired_and_unpaired_examples(tmp_path: Path) -> None:
    root = _session(tmp_path, np.eye(4))
    other = root / "sub-02" / "anat"
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    affine[:3, 3] = [-90.0, -100.0, -75.0]
    save_nifti(other / "sub-02_T1w.nii.gz", _render(affine, (120, 134, 100), np.eye(4)), affine)
    site = load_site(root, CONFIG)
    assert len(site.paired) == 1 and len(site.unpaired_a) == 1 and not site.unpaired_b
    dataset = training_set([site], misalignment="slight", seed=3)
    source, target = site.paired[0]
    assert dataset.paired_count == len(np.intersect1d(source.stack.z, target.stack.z))
    assert dataset.unpaired_count == len(site.unpaired_a[0].stack)
    kinds = [float(dataset[i]["paired"]) for i in range(len(dataset))]
    assert kinds == [1.0] * dataset.paired_count + [0.0] * dataset.unpaired_count
    # Independent affines for the two images of a pair: a and b are moved differently.
    item = dataset[dataset.paired_count // 2]
    plain = training_set([site], misalignment="none", seed=3)[dataset.paired_count // 2]
    assert not torch.equal(item["a"], plain["a"]) and not torch.equal(item["b"], plain["b"])
    # The unpaired A slices of sub-02 meet B slices of the only target there is (sub-01's).
    unpaired = dataset[dataset.paired_count]
    assert float(unpaired["paired"]) == 0.0
    assert dataset.max_examples_per_subject() >= dataset.paired_count


def test_gamma_augmentation_changes_only_the_source_and_is_reproducible(tmp_path: Path) -> None:
    site = load_site(_session(tmp_path, np.eye(4)), CONFIG)
    plain = training_set([site], seed=5)
    augmented = training_set([site], augment_gamma=0.4, seed=5)
    index = plain.paired_count // 2
    before, after = plain[index], augmented[index]
    assert torch.equal(before["b"], after["b"])
    assert not torch.allclose(before["a"], after["a"])
    # A gamma on [0, 1] keeps the ends: background stays -1, the brightest value stays 1.
    background = before["a"] == -1.0
    assert torch.equal(after["a"][background], before["a"][background])
    gamma = np.log((after["a"][~background] + 1) / 2) / np.log((before["a"][~background] + 1) / 2)
    finite = torch.isfinite(gamma) & ((before["a"][~background] + 1) / 2 < 0.95)
    assert gamma[finite].std() < 1e-3  # one gamma per image
    assert 1 / np.exp(0.4) - 1e-4 <= float(gamma[finite].mean()) <= np.exp(0.4) + 1e-4
    assert torch.equal(training_set([site], augment_gamma=0.4, seed=5)[index]["a"], after["a"])
