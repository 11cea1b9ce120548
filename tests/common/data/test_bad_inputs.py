"""Every kind of bad input gets an error naming the file (or folder) and what is wrong."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedsynth.common.config import DataConfig
from fedsynth.common.data import (
    BadScansError,
    EmptySiteError,
    MissingModalityError,
    ScanError,
    discover_site,
    load_site,
    read_scan,
)
from tests.conftest import SiteMaker, head_volume, save_nifti

SMALL = DataConfig(spacing_mm=(2.0, 2.0, 2.0), image_size=48, min_foreground=0.05)


def _good_bytes(tmp_path: Path) -> bytes:
    path = save_nifti(tmp_path / "good.nii.gz", head_volume())
    return path.read_bytes()


def _expect(path: Path, *fragments: str) -> ScanError:
    with pytest.raises(ScanError) as info:
        read_scan(path)
    assert info.value.path == path
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return info.value


def test_truncated_gzip(tmp_path: Path) -> None:
    raw = _good_bytes(tmp_path)
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(raw[: len(raw) // 2])
    _expect(path, "truncated gzip stream")


def test_corrupt_gzip(tmp_path: Path) -> None:
    raw = bytearray(_good_bytes(tmp_path))
    raw[40:60] = b"\x00" * 20  # damage the deflate stream, keep the magic bytes
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(raw))
    error = _expect(path)
    assert "gzip" in error.reason or "NIfTI" in error.reason


def test_gz_name_without_gzip_content(tmp_path: Path) -> None:
    path = tmp_path / "plain.nii.gz"
    path.write_bytes(b"this is a text file, not an image\n" * 20)
    _expect(path, "not gzip-compressed")


def test_not_a_nifti(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii"
    path.write_bytes(b"patient notes" * 100)
    _expect(path, "not a NIfTI file", "header magic")
    gz = tmp_path / "report.nii.gz"
    gz.write_bytes(gzip.compress(b"x" * 1000))
    _expect(gz, "not a NIfTI file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    _expect(path, "empty file")


def test_2d_image(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "slice.nii.gz", np.ones((32, 32), np.float32))
    _expect(path, "2D image of shape (32, 32)", "expected a 3D volume")


def test_4d_series(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "fmri.nii.gz", np.ones((8, 8, 8, 5), np.float32))
    _expect(path, "4D image of shape (8, 8, 8, 5)", "split it into 3D volumes")


def test_4d_with_one_volume_is_accepted(tmp_path: Path) -> None:
    volume = head_volume()
    path = save_nifti(tmp_path / "one.nii.gz", volume[..., None])
    loaded = read_scan(path)
    assert loaded.data.shape == volume.shape
    np.testing.assert_array_equal(loaded.data, volume)


@pytest.mark.parametrize(
    ("value", "label"), [(np.nan, "1 NaN and 0 infinite"), (np.inf, "0 NaN and 1 infinite")]
)
def test_non_finite_voxels(tmp_path: Path, value: float, label: str) -> None:
    volume = head_volume()
    volume[3, 4, 5] = value
    path = save_nifti(tmp_path / "nan.nii.gz", volume)
    _expect(path, label, "expected finite values")


def test_all_zero_volume(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "zero.nii.gz", np.zeros((10, 10, 10), np.float32))
    _expect(path, "all voxels are zero")


def test_constant_volume(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "flat.nii.gz", np.full((10, 10, 10), 7.0, np.float32))
    _expect(path, "constant volume (every voxel is 7)")


def test_no_orientation(tmp_path: Path) -> None:
    # Patch a valid file's header: qform_code = sform_code = 0 leaves orientation unknown.
    path = save_nifti(tmp_path / "no-orientation.nii", head_volume())
    raw = bytearray(path.read_bytes())
    raw[252:256] = np.zeros(2, np.int16).tobytes()
    path.write_bytes(bytes(raw))
    _expect(path, "no orientation in the header", "qform_code and sform_code are both 0")


def test_singular_affine(tmp_path: Path) -> None:
    # nibabel refuses to write a singular affine, so patch the sform rows of a valid file.
    path = save_nifti(tmp_path / "flat-affine.nii", head_volume())
    raw = bytearray(path.read_bytes())
    raw[252:256] = np.array([0, 1], np.int16).tobytes()  # use the sform only
    raw[280:328] = np.zeros(12, np.float32).tobytes()  # srow_x, srow_y, srow_z
    path.write_bytes(bytes(raw))
    _expect(path, "affine", "singular")


def test_missing_file(tmp_path: Path) -> None:
    _expect(tmp_path / "nowhere.nii.gz", "file not found")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    with pytest.raises(EmptySiteError, match=r"no NIfTI scans found in .*site: expected BIDS"):
        discover_site(tmp_path / "site")
    with pytest.raises(EmptySiteError, match="does not exist"):
        discover_site(tmp_path / "absent")


def test_missing_modality_for_direction(make_site: SiteMaker) -> None:
    root = make_site(subjects={"sub-01": ["T1w", "FLAIR"]})
    config = SMALL.model_copy(update={"direction": "T1w->T2w"})
    with pytest.raises(MissingModalityError) as info:
        load_site(root, config)
    message = str(info.value)
    assert str(root) in message and "needs T2w" in message and "found: T1w, FLAIR" in message


def _break(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])


def test_bad_scans_refuse_start_and_list_every_file(make_site: SiteMaker) -> None:
    root = make_site(subjects={f"sub-0{i}": ["T1w", "T2w"] for i in range(1, 4)})
    bad = [root / "sub-01/anat/sub-01_T2w.nii.gz", root / "sub-03/anat/sub-03_T1w.nii.gz"]
    for path in bad:
        _break(path)
    with pytest.raises(BadScansError) as info:
        load_site(root, SMALL)
    assert [e.path for e in info.value.errors] == sorted(bad)
    assert "--skip-bad" in str(info.value)
    # Nothing is lost: the files are left exactly as they were.
    assert all(path.exists() for path in bad)


def test_skip_bad_continues_with_a_warning_per_file(
    make_site: SiteMaker, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_site(subjects={f"sub-0{i}": ["T1w", "T2w"] for i in range(1, 4)})
    bad = root / "sub-02/anat/sub-02_T2w.nii.gz"
    _break(bad)
    config = SMALL.model_copy(update={"skip_bad": True})
    with caplog.at_level(logging.WARNING):
        site = load_site(root, config)
    assert [e.path for e in site.skipped] == [bad]
    assert any(str(bad) in record.getMessage() for record in caplog.records)
    used = {v.scan.path for v in site.domain_a + site.domain_b}
    assert bad not in used and len(used) >= 3


def test_all_scans_of_a_modality_bad_is_missing_modality(make_site: SiteMaker) -> None:
    root = make_site(subjects={"sub-01": ["T1w", "T2w"], "sub-02": ["T1w", "T2w"]})
    for path in root.glob("sub-*/anat/*_T2w.nii.gz"):
        _break(path)
    config = SMALL.model_copy(update={"skip_bad": True})
    with pytest.raises(MissingModalityError, match="every T2w scan was unusable"):
        load_site(root, config)


def test_nibabel_reads_what_we_validate(tmp_path: Path) -> None:
    """Independent check: our reader agrees with nibabel's own loader on a good file."""
    path = save_nifti(tmp_path / "ok.nii.gz", head_volume())
    ours = read_scan(path)
    theirs = nib.load(path)
    np.testing.assert_array_equal(ours.data, np.asarray(theirs.dataobj, dtype=np.float32))
    np.testing.assert_array_equal(ours.affine, theirs.affine)
