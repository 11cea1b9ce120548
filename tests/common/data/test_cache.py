"""The preprocessed-slice cache: content-keyed, invalidated by settings, robust, atomic."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedsynth.common.config import DataConfig
from fedsynth.common.data import ScanError, load_site
from fedsynth.common.data.preprocess import SliceCache, SliceStack
from fedsynth.common.io import atomic_path, atomic_write_bytes
from fedsynth.common.modalities import Modality
from tests.conftest import SiteMaker, head_volume, save_nifti

SMALL = DataConfig(spacing_mm=(2.0, 2.0, 2.0), image_size=48)
ENTRY = re.compile(r"[0-9a-f]{32}\.npz")


def _assert_same_stack(got: SliceStack, want: SliceStack) -> None:
    for name in ("slices", "masks", "z", "affine"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(g, w, err_msg=name)
    assert got.mapping == want.mapping
    assert got.depth == want.depth
    assert got.foreground_clipped == want.foreground_clipped


def _entries(folder: Path) -> list[str]:
    """Every name in the cache folder (hidden ones included)."""
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def scan(tmp_path: Path) -> Path:
    return save_nifti(tmp_path / "scans" / "sub-01_T1w.nii.gz", head_volume("T1w"))


def test_no_folder_always_misses(scan: Path) -> None:
    cache = SliceCache(None)
    first = cache.load(scan, Modality.T1W, SMALL)
    second = cache.load(scan, Modality.T1W, SMALL)
    assert (cache.hits, cache.misses) == (0, 2)
    _assert_same_stack(second, first)


def test_second_load_hits_and_returns_the_same_arrays(tmp_path: Path, scan: Path) -> None:
    folder = tmp_path / "cache"
    cache = SliceCache(folder)

    first = cache.load(scan, Modality.T1W, SMALL)
    assert (cache.hits, cache.misses) == (0, 1)
    assert len(_entries(folder)) == 1

    second = cache.load(scan, Modality.T1W, SMALL)
    assert (cache.hits, cache.misses) == (1, 1)
    _assert_same_stack(second, first)
    assert len(first) > 0

    # A fresh cache object over the same folder (a restarted client) hits too.
    again = SliceCache(folder)
    _assert_same_stack(again.load(scan, Modality.T1W, SMALL), first)
    assert (again.hits, again.misses) == (1, 0)


def test_ct_entry_keeps_its_window_mapping(tmp_path: Path) -> None:
    path = save_nifti(tmp_path / "ct.nii.gz", head_volume("ct"))
    cache = SliceCache(tmp_path / "cache")
    first = cache.load(path, Modality.CT, SMALL)
    second = cache.load(path, Modality.CT, SMALL)
    assert cache.hits == 1
    assert second.mapping.kind == "window"
    _assert_same_stack(second, first)


def test_renamed_or_copied_file_still_hits(tmp_path: Path, scan: Path) -> None:
    cache = SliceCache(tmp_path / "cache")
    first = cache.load(scan, Modality.T1W, SMALL)

    copy = tmp_path / "elsewhere" / "anonymised-0042.nii.gz"
    copy.parent.mkdir()
    shutil.copyfile(scan, copy)
    _assert_same_stack(cache.load(copy, Modality.T1W, SMALL), first)

    moved = scan.rename(scan.with_name("renamed.nii.gz"))
    _assert_same_stack(cache.load(moved, Modality.T1W, SMALL), first)

    assert (cache.hits, cache.misses) == (2, 1)
    assert len(_entries(tmp_path / "cache")) == 1


def test_new_content_under_the_same_name_misses(tmp_path: Path, scan: Path) -> None:
    cache = SliceCache(tmp_path / "cache")
    first = cache.load(scan, Modality.T1W, SMALL)

    save_nifti(scan, head_volume("T1w", seed=1))  # same name, other noise
    second = cache.load(scan, Modality.T1W, SMALL)

    assert (cache.hits, cache.misses) == (0, 2)
    assert not np.array_equal(second.slices, first.slices)


def test_one_changed_byte_misses(tmp_path: Path) -> None:
    # Uncompressed, so one voxel byte can change and the file stays valid.
    path = save_nifti(tmp_path / "t1.nii", head_volume("T1w"))
    cache = SliceCache(tmp_path / "cache")
    first = cache.load(path, Modality.T1W, SMALL)

    raw = bytearray(path.read_bytes())
    assert len(raw) == 352 + 4 * 40 * 44 * 36  # header, then float32 voxels
    raw[len(raw) // 2] ^= 0x01  # one byte of one voxel
    path.write_bytes(bytes(raw))
    second = cache.load(path, Modality.T1W, SMALL)

    assert (cache.hits, cache.misses) == (0, 2)
    assert len(_entries(tmp_path / "cache")) == 2
    assert second.depth == first.depth


@pytest.mark.parametrize(
    "update",
    [
        {"image_size": 64},
        {"spacing_mm": (2.0, 2.0, 2.5)},
        {"percentiles": (1.0, 99.0)},
        {"min_foreground": 0.2},
        {"ct_window_hu": (-1000.0, 1000.0)},
    ],
    ids=lambda u: next(iter(u)),
)
def test_changing_a_preprocessing_setting_misses(
    tmp_path: Path, scan: Path, update: dict[str, object]
) -> None:
    cache = SliceCache(tmp_path / "cache")
    cache.load(scan, Modality.T1W, SMALL)

    cache.load(scan, Modality.T1W, SMALL.model_copy(update=update))

    assert (cache.hits, cache.misses) == (0, 2)
    assert len(_entries(tmp_path / "cache")) == 2


def test_another_modality_misses(tmp_path: Path, scan: Path) -> None:
    cache = SliceCache(tmp_path / "cache")
    cache.load(scan, Modality.T1W, SMALL)
    cache.load(scan, Modality.FLAIR, SMALL)
    assert (cache.hits, cache.misses) == (0, 2)


@pytest.mark.parametrize(
    "update",
    [{"misalignment": "severe"}, {"paired": True}, {"skip_bad": True}, {"direction": "T1w->ct"}],
    ids=lambda u: next(iter(u)),
)
def test_settings_outside_preprocessing_still_hit(
    tmp_path: Path, scan: Path, update: dict[str, object]
) -> None:
    cache = SliceCache(tmp_path / "cache")
    cache.load(scan, Modality.T1W, SMALL)
    cache.load(scan, Modality.T1W, SMALL.model_copy(update=update))
    assert (cache.hits, cache.misses) == (1, 1)


def _garbage(raw: bytes) -> bytes:
    return b"not an npz archive at all\n" * 40


def _empty(raw: bytes) -> bytes:
    return b""


def _truncated(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def _missing_key(raw: bytes) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, slices=np.zeros((1, 2, 2), np.float32))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "damage",
    [
        _garbage,
        _missing_key,
        _empty,
        _truncated,
    ],
    ids=["garbage", "missing-key", "empty", "truncated"],
)
def test_corrupt_entry_is_rebuilt_with_a_warning(
    tmp_path: Path, scan: Path, damage: Callable[[bytes], bytes], caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    cache = SliceCache(folder)
    first = cache.load(scan, Modality.T1W, SMALL)
    (entry,) = folder.iterdir()
    entry.write_bytes(damage(entry.read_bytes()))

    with caplog.at_level(logging.WARNING, logger="fedsynth.common.data.preprocess"):
        rebuilt = cache.load(scan, Modality.T1W, SMALL)

    _assert_same_stack(rebuilt, first)
    assert (cache.hits, cache.misses) == (0, 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(entry) in w and "rebuilding" in w for w in warnings)
    # The entry was rewritten: the next load hits.
    _assert_same_stack(cache.load(scan, Modality.T1W, SMALL), first)
    assert cache.hits == 1


def test_writes_leave_only_entries_behind(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    cache = SliceCache(folder)
    paths = [
        save_nifti(tmp_path / f"s{i}.nii.gz", head_volume(m, seed=i))
        for i, m in enumerate(["T1w", "T2w", "FLAIR"])
    ]
    for config in (SMALL, SMALL.model_copy(update={"image_size": 32})):
        for path in paths:
            cache.load(path, Modality.T1W, config)

    names = _entries(folder)
    assert len(names) == 6
    assert all(ENTRY.fullmatch(name) for name in names), names


def test_a_failed_write_leaves_nothing(
    tmp_path: Path, scan: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedsynth.common.data.preprocess as preprocess

    def half_then_crash(target: Path, stack: SliceStack) -> None:
        target.write_bytes(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(preprocess, "_write_entry", half_then_crash)
    folder = tmp_path / "cache"
    with pytest.raises(OSError, match="No space left"):
        SliceCache(folder).load(scan, Modality.T1W, SMALL)
    assert _entries(folder) == []


def test_an_unusable_scan_writes_no_entry(tmp_path: Path, scan: Path) -> None:
    raw = scan.read_bytes()
    scan.write_bytes(raw[: len(raw) // 2])
    folder = tmp_path / "cache"
    with pytest.raises(ScanError, match="truncated gzip"):
        SliceCache(folder).load(scan, Modality.T1W, SMALL)
    assert not folder.exists() or _entries(folder) == []


@pytest.mark.parametrize("kind", ["missing", "folder"])
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "cache"])
def test_unreadable_file_is_a_scan_error_with_or_without_a_cache(
    tmp_path: Path, kind: str, cached: bool
) -> None:
    path = tmp_path / "sub-01_T1w.nii.gz"
    if kind == "folder":
        path.mkdir()
    cache = SliceCache(tmp_path / "cache" if cached else None)
    with pytest.raises(ScanError) as info:
        cache.load(path, Modality.T1W, SMALL)
    assert info.value.path == path
    assert info.value.reason == (
        "file not found" if kind == "missing" else "is a folder, expected a NIfTI file"
    )


def test_skip_bad_with_a_cache_skips_a_folder_named_like_a_scan(
    make_site: SiteMaker, tmp_path: Path
) -> None:
    root = make_site(subjects={f"sub-0{i}": ["T1w", "T2w"] for i in range(1, 4)})
    bad = root / "sub-03" / "anat" / "sub-03_FLAIR.nii.gz"
    bad.mkdir()  # discovery lists it by name; loading must refuse it as a bad scan
    config = SMALL.model_copy(update={"skip_bad": True, "direction": "T1w->FLAIR"})
    good = root / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz"
    save_nifti(good, head_volume("FLAIR"))

    site = load_site(root, config, cache_dir=tmp_path / "cache")

    assert [e.path for e in site.skipped] == [bad]
    assert [v.scan.path for v in site.domain_b] == [good]


# --------------------------------------------------------------------------- fedsynth.common.io


def test_atomic_path_keeps_the_old_file_when_the_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "state" / "model.npz"
    atomic_write_bytes(target, b"old content")

    with pytest.raises(RuntimeError, match="mid-way"), atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new con")
        raise RuntimeError("writer died mid-way")

    assert target.read_bytes() == b"old content"
    assert _entries(target.parent) == ["model.npz"]


def test_atomic_path_leaves_no_file_when_the_first_write_fails(tmp_path: Path) -> None:
    target = tmp_path / "fresh.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError
    assert _entries(tmp_path) == []


def test_atomic_write_bytes_replaces_the_content(tmp_path: Path) -> None:
    target = tmp_path / "a.nii.gz"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two, longer")
    assert target.read_bytes() == b"two, longer"
    assert _entries(tmp_path) == ["a.nii.gz"]


def test_atomic_files_are_private_unless_a_mode_is_asked_for(tmp_path: Path) -> None:
    import os
    import stat

    from fedsynth.common.io import READABLE

    atomic_write_bytes(tmp_path / "state.pt", b"weights")
    assert stat.S_IMODE((tmp_path / "state.pt").stat().st_mode) == 0o600
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "report.md", b"# report", READABLE)
        assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644
        os.umask(0o077)  # a stricter umask still wins
        atomic_write_bytes(tmp_path / "figure.png", b"png", READABLE)
        assert stat.S_IMODE((tmp_path / "figure.png").stat().st_mode) == 0o600
    finally:
        os.umask(old)
