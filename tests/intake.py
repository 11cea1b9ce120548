"""Damaged scans for the intake tests and benchmark: every kind a hospital's export can produce.

:data:`BAD_KINDS` maps a kind to a writer ``(path) -> None`` and to a fragment of the reason
fedsynth must give. :func:`write_bad_site` lays them out as a BIDS site, one subject per kind,
beside one good subject with a T1w and a T2w, so a folder can be inspected, trained on with
``skip_bad`` and served by a hospital daemon.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.conftest import head_volume, save_nifti

GOOD_SUBJECT = "sub-good"


def _header_bytes(shape: tuple[int, ...], dtype: type, zooms: tuple[float, ...]) -> bytes:
    """A valid NIfTI-1 single-file header (and its 4-byte extension flag) for ``shape``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_zooms(zooms)
    header.set_qform(np.diag([*zooms[:3], 1.0]), code=1)
    header.set_sform(np.diag([*zooms[:3], 1.0]), code=1)
    header["vox_offset"] = 352
    return bytes(header.binaryblock) + b"\x00" * 4


def write_bomb(path: Path, payload_bytes: int = 1 << 20, level: int = 9) -> None:
    """A .nii.gz whose header claims 1536^3 int16 (7.2 GB) over ``payload_bytes`` of zeros.

    With the default payload the file is a few kilobytes (for tests); the benchmark writes a
    payload of the claimed size, as a real bomb or a mislabelled export would be.
    """
    compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\x00" * (1 << 24)
    with path.open("wb") as handle:
        handle.write(compressor.compress(_header_bytes((1536, 1536, 1536), np.int16, (1,) * 3)))
        left = payload_bytes
        while left > 0:
            handle.write(compressor.compress(zeros[: min(left, len(zeros))]))
            left -= len(zeros)
        handle.write(compressor.flush())


def _valid(path: Path, zooms: tuple[float, float, float] = (2.0, 2.0, 2.0)) -> Path:
    return save_nifti(path, head_volume(), np.diag([*zooms, 1.0]))


def _patched(path: Path, offset: int, value: bytes) -> None:
    """A valid uncompressed scan with ``value`` written over its bytes at ``offset``."""
    _valid(path)
    _overwrite(path, offset, value)


def _overwrite(path: Path, offset: int, value: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(value)] = value
    path.write_bytes(bytes(raw))


def _singular(path: Path) -> None:
    """The sform alone, with every row zero (nibabel will not write such an affine)."""
    _patched(path, 252, np.array([0, 1], np.int16).tobytes())
    _overwrite(path, 280, np.zeros(12, np.float32).tobytes())


def _short_data(path: Path) -> None:
    """A valid header over 2,000 bytes: the voxel data ends early."""
    _valid(path)
    path.write_bytes(path.read_bytes()[:2000])


def _gz_of(path: Path, change: Callable[[bytes], bytes]) -> None:
    plain = path.with_name("_plain.nii")
    _valid(plain)
    path.write_bytes(change(gzip.compress(plain.read_bytes())))
    plain.unlink()


def _claims_only(path: Path, shape: tuple[int, ...], zooms: tuple[float, ...]) -> None:
    """A header claiming ``shape`` over a few bytes of data (refused before they matter)."""
    path.write_bytes(gzip.compress(_header_bytes(shape, np.uint8, zooms) + b"\x00" * 4096))


@dataclass(frozen=True)
class BadKind:
    write: Callable[[Path], None]
    reason: str  # a fragment of the reason fedsynth must give
    suffix: str = ".nii.gz"


BAD_KINDS: dict[str, BadKind] = {
    "bomb": BadKind(write_bomb, "decompression bomb"),
    "gigavoxel": BadKind(
        lambda p: _claims_only(p, (1024, 1024, 512), (0.5, 0.5, 0.5)), "voxels (1024x1024x512)"
    ),
    "units50mm": BadKind(lambda p: _valid(p, (50.0, 50.0, 50.0)), "outside 0.1-20 mm"),
    "microns": BadKind(lambda p: _valid(p, (0.01, 0.01, 0.01)), "outside 0.1-20 mm"),
    "hugefov": BadKind(
        lambda p: _claims_only(p, (300, 300, 300), (19.0, 19.0, 19.0)), "field of view"
    ),
    "longaxis": BadKind(
        lambda p: _claims_only(p, (4000, 8, 8), (1.0, 1.0, 1.0)), "voxels on an axis"
    ),
    "truncated": BadKind(lambda p: _gz_of(p, lambda raw: raw[: len(raw) // 2]), "truncated"),
    "corrupt": BadKind(
        lambda p: _gz_of(p, lambda raw: raw[:40] + b"\xff" * 64 + raw[104:]), "gzip"
    ),
    "plaintext": BadKind(
        lambda p: p.write_bytes(b"exported by a PACS\n" * 40), "not gzip-compressed"
    ),
    "notnifti": BadKind(lambda p: p.write_bytes(gzip.compress(b"DICM" * 400)), "not a NIfTI"),
    "empty": BadKind(lambda p: p.write_bytes(b""), "empty file"),
    "twod": BadKind(lambda p: save_nifti(p, np.ones((32, 32), np.float32)), "2D image"),
    "series": BadKind(
        lambda p: save_nifti(p, np.ones((8, 8, 8, 3), np.float32)), "split it into 3D volumes"
    ),
    "nan": BadKind(
        lambda p: save_nifti(p, np.where(head_volume() > 50, np.nan, 1.0).astype(np.float32)),
        "NaN",
    ),
    "zeros": BadKind(lambda p: save_nifti(p, np.zeros((10, 10, 10), np.float32)), "all voxels"),
    "constant": BadKind(
        lambda p: save_nifti(p, np.full((10, 10, 10), 3.0, np.float32)), "constant volume"
    ),
    "noorientation": BadKind(
        lambda p: _patched(p, 252, b"\x00\x00\x00\x00"), "no orientation", suffix=".nii"
    ),
    "singular": BadKind(_singular, "singular", suffix=".nii"),
    "imgpair": BadKind(lambda p: _patched(p, 344, b"ni1\x00"), "separate .img", suffix=".nii"),
    "shortdata": BadKind(_short_data, "voxel data does not match the header", suffix=".nii"),
    "complex": BadKind(
        lambda p: save_nifti(p, (head_volume() + 1j).astype(np.complex64)), "voxel type"
    ),
}


def write_bad_site(
    root: Path,
    *,
    bomb_payload: int | None = None,
    kinds: list[str] | None = None,
    good_shape: tuple[int, int, int] = (80, 96, 80),
) -> dict[Path, str]:
    """A BIDS site: one good subject (T1w + T2w) and one subject per bad kind.

    The good subject is a head of ``good_shape`` voxels of 2 mm (160 x 192 x 160 mm by default:
    every preset finds slices in it). Bad scans alternate between T1w and T2w so that both
    modalities hold some. Returns each bad file with the fragment its reason must hold.
    """
    for modality in ("T1w", "T2w"):
        save_nifti(
            root / GOOD_SUBJECT / "anat" / f"{GOOD_SUBJECT}_{modality}.nii.gz",
            head_volume(modality, good_shape),
        )
    expected: dict[Path, str] = {}
    for index, name in enumerate(kinds or list(BAD_KINDS)):
        kind = BAD_KINDS[name]
        subject = f"sub-{name}"
        modality = "T1w" if index % 2 == 0 else "T2w"
        path = root / subject / "anat" / f"{subject}_{modality}{kind.suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "bomb" and bomb_payload is not None:
            write_bomb(path, bomb_payload, level=1)
        else:
            kind.write(path)
        expected[path] = kind.reason
    return expected
