"""Read one NIfTI scan and refuse it, with the file's name and the reason, if it is unusable.

The file is read once: its bytes give the content hash (the preprocessing cache key) and, after
decompression, the image. Checks, in order: readable, intact gzip stream, a NIfTI-1/2 header, a
consistent data block, 3D (a 4D file with one volume is accepted), finite voxels, not empty or
constant, an orientation (qform or sform) and an invertible affine.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from common.data.errors import ScanError


@dataclass(frozen=True)
class LoadedScan:
    """A validated volume: voxels as float32 (x, y, z), its affine and content hash."""

    path: Path
    data: np.ndarray
    affine: np.ndarray
    sha256: str
    header: nib.Nifti1Header | nib.Nifti2Header | None = None

    @property
    def zooms(self) -> tuple[float, float, float]:
        spacing = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return (float(spacing[0]), float(spacing[1]), float(spacing[2]))

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turn the operating system's reasons for not reading ``path`` into a :class:`ScanError`."""
    try:
        yield
    except FileNotFoundError:
        raise ScanError(path, "file not found") from None
    except IsADirectoryError:
        raise ScanError(path, "is a folder, expected a NIfTI file") from None
    except PermissionError:
        raise ScanError(path, "permission denied: the daemon's user cannot read it") from None
    except OSError as exc:
        raise ScanError(path, f"cannot be read ({exc.strerror or exc})") from None


def file_sha256(path: Path) -> str:
    """Content hash of a file (streamed). Raises ScanError when it cannot be read."""
    digest = hashlib.sha256()
    with _readable(path), path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_bytes(path: Path) -> bytes:
    with _readable(path):
        return path.read_bytes()
    raise AssertionError("unreachable")  # pragma: no cover (keeps mypy's return check happy)


def _decompress(path: Path, raw: bytes) -> bytes:
    if raw[:2] != b"\x1f\x8b":
        if path.name.endswith(".gz"):
            raise ScanError(path, "named .gz but is not gzip-compressed (no gzip magic bytes)")
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise ScanError(
            path, "truncated gzip stream: the file ends early (interrupted copy or download?)"
        ) from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise ScanError(path, f"corrupt gzip stream ({exc})") from None


def _nifti_from_bytes(path: Path, content: bytes) -> nib.Nifti1Image | nib.Nifti2Image:
    if len(content) >= 348 and content[344:348] in (b"n+1\x00", b"ni1\x00"):
        image_class: type[nib.Nifti1Image] | type[nib.Nifti2Image] = nib.Nifti1Image
    elif len(content) >= 540 and content[4:8] in (b"n+2\x00", b"ni2\x00"):
        image_class = nib.Nifti2Image
    elif len(content) < 348:
        raise ScanError(path, f"not a NIfTI file: only {len(content)} bytes, a header needs 348")
    else:
        raise ScanError(path, "not a NIfTI file: no NIfTI-1 or NIfTI-2 header magic")
    if content[344:347] == b"ni1" or content[4:7] == b"ni2":
        raise ScanError(path, "a NIfTI header with separate .img data: convert it to a .nii file")
    try:
        image = image_class.from_bytes(content)
    except Exception as exc:  # nibabel raises many types for malformed headers
        raise ScanError(path, f"malformed NIfTI header ({exc})") from None
    return image


def _voxels(path: Path, image: nib.Nifti1Image | nib.Nifti2Image) -> np.ndarray:
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        kind = f"{len(shape)}D"
        hint = " (a series: split it into 3D volumes first)" if len(shape) == 4 else ""
        raise ScanError(
            path, f"{kind} image of shape {tuple(image.shape)}, expected a 3D volume{hint}"
        )
    if min(shape) < 2:
        raise ScanError(path, f"degenerate 3D shape {shape}: every axis needs at least 2 voxels")
    try:
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise ScanError(
            path, f"voxel data does not match the header (truncated file?): {exc}"
        ) from None
    return data


def read_scan(path: Path) -> LoadedScan:
    """Read and validate one scan.

    Raises:
        ScanError: naming ``path`` and what is wrong with it.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if not raw:
        raise ScanError(path, "empty file (0 bytes)")
    sha = hashlib.sha256(raw).hexdigest()
    image = _nifti_from_bytes(path, _decompress(path, raw))
    data = _voxels(path, image)

    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(data.size - finite.sum() - n_nan)
        raise ScanError(
            path,
            f"{n_nan} NaN and {n_inf} infinite voxel(s) out of {data.size}: expected finite values",
        )
    lo, hi = float(data.min()), float(data.max())
    if lo == hi == 0.0:
        raise ScanError(path, "all voxels are zero: an empty volume")
    if lo == hi:
        raise ScanError(path, f"constant volume (every voxel is {lo:g}): no image content")

    header = image.header
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise ScanError(
            path,
            "no orientation in the header (qform_code and sform_code are both 0): the "
            "voxel-to-world affine is unknown; re-export the scan from DICOM with orientation",
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(
            path, "the affine (qform/sform) is missing or singular: voxel positions unknown"
        )
    return LoadedScan(path=path, data=data, affine=affine, sha256=sha, header=header)
