"""Scan intake under attack (issue 17): every damaged kind, random corruption, a whole bad folder.

Each refusal names the file and says why, within a time bound and a memory bound measured with
``tracemalloc`` (which sees numpy's and Python's allocations, not torch's): the limits, not the
file's claims, decide what reading costs. Random corruption (hypothesis) may only end in a
SliceStack or the file's ScanError. A folder mixing every bad kind with one good subject is
inspected, trained on with ``skip_bad`` and served by the CLI; an unforeseen library failure is one
file's verdict; the limits are settings; valid variants still read exactly as nibabel reads them.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import logging
import re
import signal
import time
import tracemalloc
import types
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.transforms import Spacingd
from typer.testing import CliRunner

from fedsynth.cli.main import app
from fedsynth.common.config import DataConfig
from fedsynth.common.data import loading, transforms
from fedsynth.common.data.errors import BadScansError, ScanError
from fedsynth.common.data.inspect import inspect_site
from fedsynth.common.data.loading import NIFTI2_HEADER, ScanLimits, read_scan
from fedsynth.common.data.preprocess import GridReference, SliceCache, SliceStack, preprocess_scan
from fedsynth.common.data.site import load_site
from fedsynth.common.modalities import Direction, Modality
from tests.conftest import head_volume, save_nifti
from tests.intake import BAD_KINDS, GOOD_SUBJECT, write_bad_site, write_bomb

SMALL_SETTINGS: dict[str, Any] = {
    "spacing_mm": (2.0, 2.0, 2.0),
    "image_size": 48,
    "min_foreground": 0.05,
}
SMALL = DataConfig(**SMALL_SETTINGS)
FUZZ_SHAPE = (24, 28, 20)  # a small head of 2 mm voxels: each example preprocesses quickly
# Corruption may make the fuzzed scan claim anything up to these limits, which bound the
# resampled grid at 2M voxels (about 31 MiB traced at worst, measured), so the memory bound below
# follows from the limits (for scale: voxels of 20 mm instead of 2 would make a 13M-voxel grid,
# 194 MiB traced; test_a_large_resampled_grid_is_refused_before_it_is_allocated).
FUZZ = DataConfig(**SMALL_SETTINGS, max_axis_voxels=256, max_voxels=1 << 21)
HEADER = 352  # NIfTI-1 header and extension flag: where the voxel data of the fuzzed scan starts

CASE_SECONDS = 10.0  # generous: a refusal takes milliseconds, reading a claimed bomb would not
EXAMPLE_SECONDS = 5.0
MEMORY_BOUND = 64 << 20
MIB = 1 << 20
CLI_SMALL = ["--set", "data.spacing_mm=[2, 2, 2]", "--set", "data.image_size=48"]

runner = CliRunner()


def config(**changes: Any) -> DataConfig:
    """SMALL with ``changes``, validated."""
    return DataConfig(**{**SMALL_SETTINGS, **changes})


# --------------------------------------------------------------------------- bounds


class _Hung(BaseException):
    """Raised by the watchdog; a BaseException so that no ``except Exception`` swallows it."""


@dataclass
class Usage:
    """Wall time and tracemalloc peak (above the level at the start) of a measured block."""

    seconds: float = 0.0
    peak_bytes: int = 0

    def check(self, what: str, seconds: float, peak_bytes: int = MEMORY_BOUND) -> None:
        assert self.seconds < seconds, f"{what}: {self.seconds:.2f} s, over {seconds:g} s"
        assert self.peak_bytes < peak_bytes, (
            f"{what}: traced peak {self.peak_bytes / MIB:.1f} MiB, over {peak_bytes / MIB:g} MiB"
        )


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[Usage]:
    """Measure the block; a block still running at three times ``seconds`` is interrupted
    (a hang in a decompression loop becomes a failure, not a stuck test run)."""

    def _interrupt(signum: int, frame: Any) -> None:
        raise _Hung(f"still running after {3 * seconds:g} s")

    usage = Usage()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    previous = signal.signal(signal.SIGALRM, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, 3 * seconds)
    begin = time.perf_counter()
    try:
        yield usage
    finally:
        usage.seconds = time.perf_counter() - begin
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        usage.peak_bytes = tracemalloc.get_traced_memory()[1] - base
        if started:
            tracemalloc.stop()


def test_the_memory_bound_sees_numpy_and_bytes() -> None:
    with bounded(CASE_SECONDS) as used:
        array = np.ones(24 * MIB, dtype=np.uint8)
        del array
        block = bytes(16 * MIB)
        del block
    assert used.peak_bytes >= 24 * MIB
    with pytest.raises(AssertionError, match="traced peak"):
        used.check("a 24 MiB array", CASE_SECONDS, peak_bytes=16 * MIB)


def _assert_refusal(error: ScanError, path: Path, fragment: str) -> None:
    assert error.path == path
    assert str(path) in str(error)
    assert fragment in str(error), f"{fragment!r} not in {error}"


# --------------------------------------------------------------------------- every bad kind


@pytest.mark.parametrize("step", ["read_scan", "preprocess_scan"])
@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_every_bad_kind_is_refused_within_bounds(tmp_path: Path, kind: str, step: str) -> None:
    bad = BAD_KINDS[kind]
    path = tmp_path / f"sub-{kind}_T1w{bad.suffix}"
    bad.write(path)
    calls: dict[str, Callable[[], object]] = {
        "read_scan": lambda: read_scan(path, spacing_mm=(3.0, 3.0, 3.0)),
        "preprocess_scan": lambda: preprocess_scan(path, Modality.T1W, SMALL),
    }
    with bounded(CASE_SECONDS) as used, pytest.raises(ScanError) as info:
        calls[step]()
    _assert_refusal(info.value, path, bad.reason)
    used.check(f"{step} of {kind}", CASE_SECONDS)


class _CountingInflater:
    """A zlib decompressor that records how many bytes each call inflates."""

    def __init__(self, inner: Any, counts: list[int]):
        self._inner = inner
        self._counts = counts

    def decompress(self, data: bytes, max_length: int = 0) -> bytes:
        piece = self._inner.decompress(data, max_length)
        self._counts.append(len(piece))
        return bytes(piece)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _spy_on_inflation(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the loader's zlib count what it inflates; returns the per-call counts."""
    counts: list[int] = []
    spy = types.SimpleNamespace(
        decompressobj=lambda *args, **kwargs: _CountingInflater(
            zlib.decompressobj(*args, **kwargs), counts
        ),
        MAX_WBITS=zlib.MAX_WBITS,
        error=zlib.error,
    )
    monkeypatch.setattr(loading, "zlib", spy)
    return counts


def _inflated_size(path: Path) -> int:
    """What a gzip file decompresses to, streamed (never held in memory)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    total = 0
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            data = block
            while data:
                total += len(inflater.decompress(data, MIB))
                data = inflater.unconsumed_tail
    return total


def test_a_bomb_is_refused_after_inflating_its_header_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = 64 * MIB
    bomb = tmp_path / "sub-bomb_T1w.nii.gz"
    write_bomb(bomb, payload, level=1)
    assert _inflated_size(bomb) > payload  # real zeros behind the header, not just a claim
    counts = _spy_on_inflation(monkeypatch)

    # The spy sees inflation: a good scan is inflated whole, exactly once.
    good = save_nifti(tmp_path / "good.nii.gz", head_volume())
    read_scan(good)
    assert sum(counts) == len(gzip.decompress(good.read_bytes()))

    for step in (read_scan, lambda path: preprocess_scan(path, Modality.T1W, SMALL)):
        counts.clear()
        with bounded(CASE_SECONDS) as used, pytest.raises(ScanError) as info:
            step(bomb)
        # The header only: without the header check the loader would inflate the 64 MiB of
        # zeros (and hold them) before finding them short of the claim.
        assert sum(counts) <= NIFTI2_HEADER
        used.check("the bomb", CASE_SECONDS, peak_bytes=8 * MIB)
        _assert_refusal(info.value, bomb, "decompression bomb")


def test_a_large_resampled_grid_is_refused_before_it_is_allocated(tmp_path: Path) -> None:
    # 20 mm voxels are within voxel_mm, but at the model's 2 mm they make a 240x280x200 grid
    # (13M voxels, 194 MiB traced when preprocessed): over FUZZ's limits, refused from the header.
    path = save_nifti(
        tmp_path / "coarse.nii", head_volume(shape=FUZZ_SHAPE), np.diag([20.0] * 3 + [1])
    )
    with bounded(CASE_SECONDS) as used, pytest.raises(ScanError) as info:
        preprocess_scan(path, Modality.T1W, FUZZ)
    _assert_refusal(info.value, path, "would be a 240x280x200 grid")
    used.check("the coarse scan", CASE_SECONDS, peak_bytes=8 * MIB)


# --------------------------------------------------------------------------- random corruption


@dataclass(frozen=True)
class ValidScans:
    folder: Path
    nii: bytes  # an uncompressed single-file NIfTI-1 scan
    gz: bytes  # the same, gzip-compressed


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> ValidScans:
    folder = tmp_path_factory.mktemp("fuzz")
    nii = save_nifti(folder / "valid.nii", head_volume(shape=FUZZ_SHAPE)).read_bytes()
    gz = save_nifti(folder / "valid.nii.gz", head_volume(shape=FUZZ_SHAPE)).read_bytes()
    return ValidScans(folder, nii, gz)


# (offset, new byte value); offsets are reduced into the targeted region in the test.
CHANGES = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=8)
FUZZ_SETTINGS = settings(
    deadline=None,  # the per-example bound is asserted below, with what happened
    database=None,  # no example database: every run draws fresh examples
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


# Corrupt voxels and scale factors overflow float32 on the way (numpy warns; the result is
# judged below).
CORRUPT_NUMBERS = "ignore::RuntimeWarning"


def _corrupt(raw: bytes, changes: list[tuple[int, int]], start: int, stop: int) -> bytes:
    out = bytearray(raw)
    for offset, value in changes:
        out[start + offset % (stop - start)] = value
    return bytes(out)


def _outcome_is_a_stack_or_a_verdict(path: Path) -> None:
    """Reading and preprocessing ``path`` ends in a usable SliceStack or ``path``'s ScanError,
    within the bounds; never any other exception."""
    limits = ScanLimits.of(FUZZ)
    with bounded(EXAMPLE_SECONDS) as used:
        try:
            read_scan(path, limits, FUZZ.spacing_mm)
        except ScanError as error:
            refused: ScanError | None = error
        else:
            refused = None
        try:
            result: SliceStack | ScanError = preprocess_scan(path, Modality.T1W, FUZZ)
        except ScanError as error:
            result = error
    used.check(f"preprocessing {path.name}", EXAMPLE_SECONDS)
    if isinstance(result, ScanError):
        assert result.path == path and str(path) in str(result)
    else:
        assert isinstance(result, SliceStack)
        assert result.slices.shape[1:] == (FUZZ.image_size, FUZZ.image_size)
        assert np.isfinite(result.slices).all()
        assert np.abs(result.slices).max(initial=0.0) <= 1.0 + 1e-5
    if refused is not None:
        # The loader's verdict is the pipeline's: preprocessing reads through it.
        assert refused.path == path
        assert isinstance(result, ScanError) and result.reason == refused.reason


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.filterwarnings(CORRUPT_NUMBERS)
@settings(FUZZ_SETTINGS, max_examples=150)
@given(changes=CHANGES)
def test_header_corruption_ends_in_a_stack_or_a_verdict(
    valid: ValidScans, suffix: str, changes: list[tuple[int, int]]
) -> None:
    damaged = _corrupt(valid.nii, changes, 0, HEADER)
    path = valid.folder / f"header{suffix}"
    path.write_bytes(gzip.compress(damaged, compresslevel=1) if suffix == ".nii.gz" else damaged)
    _outcome_is_a_stack_or_a_verdict(path)


@pytest.mark.parametrize(
    "region", ["nii-voxels", "gz-first-bytes", "gz-rest"], ids=lambda region: region
)
@pytest.mark.filterwarnings(CORRUPT_NUMBERS)
@settings(FUZZ_SETTINGS, max_examples=40)
@given(changes=CHANGES)
def test_other_corruption_ends_in_a_stack_or_a_verdict(
    valid: ValidScans, region: str, changes: list[tuple[int, int]]
) -> None:
    if region == "nii-voxels":
        path = valid.folder / "voxels.nii"
        path.write_bytes(_corrupt(valid.nii, changes, HEADER, len(valid.nii)))
    else:  # the compressed bytes themselves: gzip header and deflate stream, then the rest
        start, stop = (0, HEADER) if region == "gz-first-bytes" else (HEADER, len(valid.gz))
        path = valid.folder / f"{region}.nii.gz"
        path.write_bytes(_corrupt(valid.gz, changes, start, stop))
    _outcome_is_a_stack_or_a_verdict(path)


# --------------------------------------------------------------------------- a whole bad folder


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Path, str]]:
    root = tmp_path_factory.mktemp("intake") / "site"
    return root, write_bad_site(root)


def _good_scans(root: Path) -> tuple[Path, Path]:
    anat = root / GOOD_SUBJECT / "anat"
    return anat / f"{GOOD_SUBJECT}_T1w.nii.gz", anat / f"{GOOD_SUBJECT}_T2w.nii.gz"


def test_inspect_site_gives_every_bad_file_its_reason(
    bad_site: tuple[Path, dict[Path, str]],
) -> None:
    root, expected = bad_site
    report = inspect_site(root, SMALL)
    verdicts = {r.scan.path: r for r in report.scans}
    assert set(verdicts) == set(expected) | set(_good_scans(root))
    assert {r.scan.path for r in report.bad} == set(expected)
    for path, fragment in expected.items():
        error = verdicts[path].error
        assert error is not None and fragment in error, f"{path.name}: {error}"
    for path in _good_scans(root):
        assert verdicts[path].ok, verdicts[path].error
    t1_to_t2 = Direction(Modality.T1W, Modality.T2W)
    assert t1_to_t2 in report.directions and t1_to_t2 in report.paired_directions


def test_load_site_lists_every_bad_file(bad_site: tuple[Path, dict[Path, str]]) -> None:
    root, expected = bad_site
    with pytest.raises(BadScansError) as info:
        load_site(root, SMALL)
    listed = {error.path: error for error in info.value.errors}
    assert set(listed) == set(expected)
    for path, fragment in expected.items():
        assert fragment in str(listed[path])
        assert str(path) in str(info.value)


def test_load_site_skipping_bad_files_trains_and_caches_only_the_good_pair(
    tmp_path: Path, bad_site: tuple[Path, dict[Path, str]]
) -> None:
    root, expected = bad_site
    cache_dir = tmp_path / "cache"
    site = load_site(root, config(skip_bad=True), cache_dir=cache_dir)

    assert {error.path for error in site.skipped} == set(expected)
    t1, t2 = _good_scans(root)
    assert len(site.paired) == 1
    source, target = site.paired[0]
    assert (source.scan.path, target.scan.path) == (t1, t2)
    assert not site.unpaired_a and not site.unpaired_b

    # The cache holds the source on its own grid and the target on the source's, nothing else
    # (no temporary files, no entry for a bad file).
    cache = SliceCache(cache_dir)
    skip = config(skip_bad=True)
    source_key = cache.key(t1, Modality.T1W, skip)
    reference = GridReference.of(source.stack, source_key)
    target_key = cache.key(t2, Modality.T2W, skip, reference)
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted(
        [f"{source_key}.npz", f"{target_key}.npz"]
    )


def _one_line(output: str) -> str:
    """The CLI's output with rich's wrapping undone (paths may be folded at the width)."""
    return output.replace("\n", "")


def test_cli_inspect_names_every_bad_file(
    bad_site: tuple[Path, dict[Path, str]], restore_logging: None
) -> None:
    root, expected = bad_site
    result = runner.invoke(app, ["inspect", str(root), *CLI_SMALL])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert f"{len(expected)} unusable file(s)" in result.output
    for path in expected:
        assert str(path) in _one_line(result.output), path
    skipped = runner.invoke(app, ["inspect", str(root), "--skip-bad", *CLI_SMALL])
    assert skipped.exit_code == 0, skipped.output
    assert "T1w -> T2w" in skipped.output


# --------------------------------------------------------------------------- unforeseen failures

VICTIM_SHAPE = (40, 44, 38)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what the CLI's callback does to logging (root handlers, fedsynth's levels)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in ("fedsynth",)}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, package_level in levels.items():
        logging.getLogger(name).setLevel(package_level)


def _site_with_a_victim(root: Path) -> Path:
    """sub-01 with a T1w and a T2w; sub-02 with a T1w and a T2w of ``VICTIM_SHAPE``, the one
    shape the injected failure strikes. Returns the victim."""
    for modality in ("T1w", "T2w"):
        save_nifti(root / "sub-01" / "anat" / f"sub-01_{modality}.nii.gz", head_volume(modality))
    save_nifti(root / "sub-02" / "anat" / "sub-02_T1w.nii.gz", head_volume("T1w", seed=1))
    victim = root / "sub-02" / "anat" / "sub-02_T2w.nii.gz"
    return save_nifti(victim, head_volume("T2w", VICTIM_SHAPE, seed=1))


def _inject(monkeypatch: pytest.MonkeyPatch, where: str, error: Callable[[], Exception]) -> None:
    """Make one step of the pipeline raise ``error()`` on the victim's volume only."""
    if where == "antialias":
        original = transforms.antialias

        def _failing_antialias(volume: np.ndarray, *args: Any) -> np.ndarray:
            if volume.shape == VICTIM_SHAPE:
                raise error()
            return original(volume, *args)

        monkeypatch.setattr(transforms, "antialias", _failing_antialias)
    else:
        original_call = Spacingd.__call__

        def _failing_spacing(self: Spacingd, data: Any, *args: Any, **kwargs: Any) -> Any:
            if tuple(data["image"].shape[1:]) == VICTIM_SHAPE:
                raise error()
            return original_call(self, data, *args, **kwargs)

        monkeypatch.setattr(Spacingd, "__call__", _failing_spacing)


@dataclass(frozen=True)
class Failure:
    where: str  # the step that fails: "antialias" (ours) or "spacing" (MONAI's Spacingd)
    error: Callable[[], Exception]
    reason: tuple[str, ...]  # fragments of the victim's verdict
    hint: str  # a fragment of its hint


def _injected() -> Exception:
    return RuntimeError("injected library failure")


FAILURES = {
    "antialias-runtime": Failure(
        "antialias", _injected, ("RuntimeError", "injected library failure"), "-v"
    ),
    "spacing-memory": Failure("spacing", MemoryError, ("ran out of memory",), "data.max_voxels"),
    "spacing-runtime": Failure(
        "spacing", _injected, ("RuntimeError", "injected library failure"), "-v"
    ),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_an_unforeseen_failure_is_one_files_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    injected = FAILURES[failure]
    root = tmp_path / "site"
    victim = _site_with_a_victim(root)
    _inject(monkeypatch, injected.where, injected.error)

    report = inspect_site(root, SMALL)
    verdicts = {r.scan.path: r for r in report.scans}
    assert len(verdicts) == 4
    error, hint = verdicts[victim].error, verdicts[victim].hint
    assert error is not None and hint is not None
    for fragment in injected.reason:
        assert fragment in error
    assert injected.hint in hint
    for path, r in verdicts.items():
        assert r.ok or path == victim, (path, r.error)
    assert Direction(Modality.T1W, Modality.T2W) in report.directions

    with pytest.raises(BadScansError) as info:
        load_site(root, SMALL)
    assert [e.path for e in info.value.errors] == [victim]
    site = load_site(root, config(skip_bad=True))
    assert [e.path for e in site.skipped] == [victim]
    assert [(a.scan.subject, b.scan.subject) for a, b in site.paired] == [("sub-01", "sub-01")]
    assert [v.scan.subject for v in site.unpaired_a] == ["sub-02"]


def test_cli_shows_the_traceback_of_an_unforeseen_failure_only_with_v(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    root = tmp_path / "site"
    victim = _site_with_a_victim(root)
    _inject(monkeypatch, "antialias", _injected)

    def squeezed(output: str) -> str:  # rich's traceback boxes wrap and frame the text
        return re.sub(r"[\s│]", "", output)

    plain = runner.invoke(app, ["inspect", str(root), *CLI_SMALL])
    assert plain.exit_code == 1, plain.output
    assert str(victim) in _one_line(plain.output)
    assert "injected library failure" in plain.output  # the verdict names the failure
    assert "Traceback" not in plain.output
    assert "_failing_antialias" not in squeezed(plain.output)

    verbose = runner.invoke(app, ["-v", "inspect", str(root), *CLI_SMALL])
    assert verbose.exit_code == 1, verbose.output
    assert "Traceback" in verbose.output
    assert "_failing_antialias" in squeezed(verbose.output)  # the frame that raised it


# --------------------------------------------------------------------------- limits are settings


def test_a_refused_voxel_size_is_accepted_when_the_limit_is_raised(
    tmp_path: Path, restore_logging: None
) -> None:
    volume = head_volume(shape=(10, 12, 8))
    site = tmp_path / "site"
    path = save_nifti(
        site / "sub-01" / "anat" / "sub-01_T1w.nii.gz", volume, np.diag([30.0] * 3 + [1])
    )
    with pytest.raises(ScanError) as info:
        preprocess_scan(path, Modality.T1W, SMALL)
    _assert_refusal(info.value, path, "outside 0.1-20 mm")
    assert info.value.hint is not None and "data.voxel_mm" in info.value.hint

    raised = config(voxel_mm=(0.1, 40.0))
    loaded = read_scan(path, ScanLimits.of(raised), raised.spacing_mm)
    np.testing.assert_array_equal(loaded.data, volume)
    assert len(preprocess_scan(path, Modality.T1W, raised)) > 0

    assert runner.invoke(app, ["inspect", str(site), *CLI_SMALL]).exit_code == 1
    accepted = runner.invoke(
        app, ["inspect", str(site), *CLI_SMALL, "--set", "data.voxel_mm=[0.1, 40]"]
    )
    assert accepted.exit_code == 0, accepted.output


def test_a_refused_long_axis_is_accepted_when_the_limit_is_raised(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).normal(100.0, 10.0, (1100, 3, 3)).astype(np.float32)
    path = save_nifti(tmp_path / "long.nii.gz", volume, np.eye(4))
    with pytest.raises(ScanError) as info:
        read_scan(path, ScanLimits.of(SMALL), SMALL.spacing_mm)
    _assert_refusal(info.value, path, "voxels on an axis")
    raised = config(max_axis_voxels=2048)
    loaded = read_scan(path, ScanLimits.of(raised), raised.spacing_mm)
    np.testing.assert_array_equal(loaded.data, volume)


@pytest.mark.parametrize(
    ("lowered", "fragment"),
    [
        ({"max_axis_voxels": 32}, "voxels on an axis"),
        ({"max_voxels": 10_000}, "over 10,000"),
        ({"max_decompressed_gib": 1e-4}, "GiB of voxel data"),
        ({"voxel_mm": (0.1, 1.5)}, "outside 0.1-1.5 mm"),
    ],
    ids=lambda value: next(iter(value)) if isinstance(value, dict) else None,
)
def test_a_cached_scan_is_refused_once_the_limits_are_lowered(
    tmp_path: Path, lowered: dict[str, Any], fragment: str
) -> None:
    scan = save_nifti(tmp_path / "sub-01_T1w.nii.gz", head_volume())  # 40x44x36 of 2 mm
    folder = tmp_path / "cache"
    cache = SliceCache(folder)
    cache.load(scan, Modality.T1W, SMALL)
    entries = sorted(folder.iterdir())
    assert len(entries) == 1

    # The same preprocessing settings (the entry's key), stricter limits: refused, not served.
    with pytest.raises(ScanError) as info:
        cache.load(scan, Modality.T1W, config(**lowered))
    _assert_refusal(info.value, scan, fragment)
    assert (cache.hits, cache.misses) == (0, 1)
    assert sorted(folder.iterdir()) == entries
    cache.load(scan, Modality.T1W, SMALL)
    assert cache.hits == 1


# --------------------------------------------------------------------------- valid variants


def _nibabel(path: Path) -> np.ndarray:
    image: Any = nib.load(path)
    return np.asarray(image.get_fdata(dtype=np.float32))


def _patch(path: Path, offset: int, value: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("variant", ["float32", "scaled-int16"])
def test_an_uncompressed_scan_reads_as_nibabel_reads_it(tmp_path: Path, variant: str) -> None:
    volume = head_volume()
    if variant == "float32":
        path = save_nifti(tmp_path / "scan.nii", volume)
    else:  # integer voxels with a slope and intercept in the header (scl_slope, scl_inter)
        path = save_nifti(tmp_path / "scan.nii", np.round(volume).astype(np.int16))
        _patch(path, 112, np.array([0.5, 10.0], dtype="<f4").tobytes())
    loaded = read_scan(path)
    np.testing.assert_array_equal(loaded.data, _nibabel(path))
    image: Any = nib.load(path)
    np.testing.assert_array_equal(loaded.affine, image.affine)
    if variant == "scaled-int16":
        assert loaded.data.min() >= 10.0  # the scaling was applied, not ignored


def test_concatenated_gzip_members_read_as_nibabel_reads_them(tmp_path: Path) -> None:
    # Noise does not compress: the file spans two of the loader's 1 MiB reads.
    volume = np.random.default_rng(0).normal(500.0, 100.0, (72, 72, 72)).astype(np.float32)
    raw = save_nifti(tmp_path / "plain.nii", volume).read_bytes()
    expected = _nibabel(tmp_path / "plain.nii")
    for cuts in [(100,), (348,), (HEADER,), (NIFTI2_HEADER,), (MIB,), (7, 5000, len(raw) - 3)]:
        bounds = [0, *cuts, len(raw)]
        path = tmp_path / f"members-{'-'.join(map(str, cuts))}.nii.gz"
        path.write_bytes(b"".join(gzip.compress(raw[a:b]) for a, b in itertools.pairwise(bounds)))
        assert path.stat().st_size > MIB
        loaded = read_scan(path)
        np.testing.assert_array_equal(loaded.data, expected)
        np.testing.assert_array_equal(loaded.data, _nibabel(path))
        assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti2_scan_reads_as_nibabel_reads_it(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"scan{suffix}"
    nib.save(nib.Nifti2Image(head_volume(), np.diag([2.0, 2.0, 2.0, 1.0])), path)
    loaded = read_scan(path)
    np.testing.assert_array_equal(loaded.data, _nibabel(path))
    assert isinstance(loaded.header, nib.Nifti2Header)
    assert len(preprocess_scan(path, Modality.T1W, SMALL)) > 0


def test_a_damaged_unit_code_does_not_hide_the_voxel_size_verdict(tmp_path: Path) -> None:
    """Found by the header fuzzer: a 50 mm voxel with xyzt_units = 4 (no such unit) made
    nibabel's get_xyzt_units raise KeyError while the verdict was being worded."""
    path = tmp_path / "units.nii"
    save_nifti(path, head_volume(), np.diag([50.0, 50.0, 50.0, 1.0]))
    raw = bytearray(path.read_bytes())
    raw[123] = 4  # xyzt_units (NIfTI-1 header offset 123)
    path.write_bytes(bytes(raw))
    with pytest.raises(ScanError, match=r"outside 0\.1-20 mm .*the invalid code 4"):
        read_scan(path)
