"""Read one NIfTI scan and refuse it, with the file's name and the reason, if it is unusable.

Reading is bounded: the header is read first (a few kilobytes, decompressed on the fly) and the
scan is refused before any voxel is read when its claims exceed :class:`ScanLimits`: voxels per
axis, voxels in all, decompressed bytes, voxel size, and, when the model's spacing is known, the
grid it would be resampled to. The voxel data is then inflated in chunks up to the header's claim
and no further, so a gzip bomb or a mislabelled export costs a bounded amount of reading and
memory. The file's bytes give the content hash (the preprocessing cache key) as they stream.

Checks, in order: readable, not too large on disk, an intact gzip stream, a NIfTI-1/2 header,
3D (a 4D file with one volume is accepted), the limits, an orientation (qform or sform) and an
invertible affine, the voxel size, a data block as long as the header says, finite voxels, not
empty or constant.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from fedsynth.common.data.errors import ScanError

if TYPE_CHECKING:
    from fedsynth.common.config import DataConfig

logger = logging.getLogger(__name__)

CHUNK = 1 << 20  # bytes read (and inflated) at a time
NIFTI2_HEADER = 540  # the longer of the two headers; NIfTI-1's is 348
MAX_EXTENSIONS = 64 << 20  # header extensions (vox_offset) beyond this are not a real scan
GIB = 1 << 30


@dataclass(frozen=True)
class ScanLimits:
    """What a scan may claim before fedsynth reads its voxels (``data.*`` settings).

    The defaults fit any real head scan with room to spare: a 0.5 mm whole-head acquisition is
    about 512 x 512 x 400 voxels.
    """

    max_axis_voxels: int = 1024
    max_voxels: int = 1 << 28
    max_decompressed_gib: float = 2.0
    voxel_mm: tuple[float, float] = (0.1, 20.0)

    @classmethod
    def of(cls, config: DataConfig) -> ScanLimits:
        return cls(
            max_axis_voxels=config.max_axis_voxels,
            max_voxels=config.max_voxels,
            max_decompressed_gib=config.max_decompressed_gib,
            voxel_mm=config.voxel_mm,
        )

    @property
    def max_bytes(self) -> int:
        return int(self.max_decompressed_gib * GIB)


DEFAULT_LIMITS = ScanLimits()


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
        spacing = voxel_sizes(self.affine)
        return (float(spacing[0]), float(spacing[1]), float(spacing[2]))

    @property
    def axcodes(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """The voxel size along each voxel axis (mm): the norms of the affine's columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


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
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- bounded streams


class _Stream:
    """The decompressed content of a (possibly gzipped) file, read in bounded pieces.

    Every raw byte read goes into ``digest``; :meth:`finish` hashes what is left unread.
    """

    def __init__(self, path: Path, handle: IO[bytes], digest: Any):
        self.path = path
        self.handle = handle
        self.digest = digest
        first = handle.read(CHUNK)
        digest.update(first)
        self.gzip = first[:2] == b"\x1f\x8b"
        if not self.gzip and path.name.endswith(".gz"):
            raise ScanError(path, "named .gz but is not gzip-compressed (no gzip magic bytes)")
        self._raw = first  # raw bytes not yet inflated
        self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if self.gzip else None
        self._ended = False

    def _more_raw(self) -> bytes:
        block = self.handle.read(CHUNK)
        self.digest.update(block)
        return block

    def read(self, wanted: int, into: io.BytesIO) -> int:
        """Append up to ``wanted`` content bytes to ``into``; fewer only at the content's end."""
        got = 0
        while got < wanted and not self._ended:
            if self._inflater is None:
                piece = self._raw[: wanted - got]
                self._raw = self._raw[len(piece) :]
                if not self._raw:
                    self._raw = self._more_raw()
                    self._ended = not self._raw and not piece
            else:
                piece = self._inflate(wanted - got)
            into.write(piece)
            got += len(piece)
        return got

    def _inflate(self, wanted: int) -> bytes:
        assert self._inflater is not None
        if not self._raw and not self._inflater.unconsumed_tail:
            self._raw = self._more_raw()
            if not self._raw:
                if not self._inflater.eof:
                    raise ScanError(
                        self.path,
                        "truncated gzip stream: the file ends early (interrupted copy or "
                        "download?)",
                    )
                self._ended = True
                return b""
        data = self._inflater.unconsumed_tail or self._raw
        if not self._inflater.unconsumed_tail:
            self._raw = b""
        try:
            piece = self._inflater.decompress(data, wanted)
        except zlib.error as exc:
            raise ScanError(self.path, f"corrupt gzip stream ({exc})") from None
        if self._inflater.eof:
            rest = self._inflater.unused_data
            if rest[:2] == b"\x1f\x8b":  # concatenated gzip members are one valid stream
                self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                self._raw = rest
            else:
                self._ended = True
        return piece

    def finish(self) -> str:
        """Hash the rest of the file without inflating it; the file's SHA-256."""
        while self._more_raw():
            pass
        return str(self.digest.hexdigest())


# --------------------------------------------------------------------------- the header


@dataclass(frozen=True)
class HeaderFacts:
    """What a NIfTI header claims, checked against :class:`ScanLimits` before reading voxels."""

    header: nib.Nifti1Header | nib.Nifti2Header
    image_class: type[nib.Nifti1Image] | type[nib.Nifti2Image]
    shape: tuple[int, int, int]
    affine: np.ndarray
    content_bytes: int  # header, extensions and voxel data: what the file must decompress to


def _parse_header(path: Path, head: bytes) -> tuple[Any, Any]:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        header_class: Any = nib.Nifti1Header
        image_class: Any = nib.Nifti1Image
        size = 348
    elif len(head) >= NIFTI2_HEADER and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        header_class, image_class, size = nib.Nifti2Header, nib.Nifti2Image, NIFTI2_HEADER
    elif len(head) < 348:
        raise ScanError(path, f"not a NIfTI file: only {len(head)} bytes, a header needs 348")
    else:
        raise ScanError(path, "not a NIfTI file: no NIfTI-1 or NIfTI-2 header magic")
    if head[344:347] == b"ni1" or head[4:7] == b"ni2":
        raise ScanError(path, "a NIfTI header with separate .img data: convert it to a .nii file")
    try:
        header = header_class.from_fileobj(io.BytesIO(head[:size]), check=True)
    except Exception as exc:  # nibabel raises many types for malformed headers
        raise ScanError(path, f"malformed NIfTI header ({exc})") from None
    return header, image_class


def _limit_hint(setting: str) -> str:
    return f"if the scan is genuine, raise data.{setting} (--set data.{setting}=...)"


def check_header(
    path: Path,
    head: bytes,
    limits: ScanLimits = DEFAULT_LIMITS,
    spacing_mm: tuple[float, float, float] | None = None,
) -> HeaderFacts:
    """Parse the header bytes of ``path`` and refuse what no real head scan claims.

    Args:
        head: the file's first (decompressed) bytes, at least the header's.
        spacing_mm: the model's spacing; when given, the grid the scan would be resampled to is
            bounded too (before MONAI allocates it).

    Raises:
        ScanError: naming ``path``, the claim and the limit.
    """
    header, image_class = _parse_header(path, head)
    try:
        full_shape = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        vox_offset = int(header["vox_offset"])
    except Exception as exc:
        raise ScanError(path, f"malformed NIfTI header ({exc})") from None
    shape = full_shape[:3] if len(full_shape) == 4 and full_shape[3] == 1 else full_shape
    if len(shape) != 3:
        hint = " (a series: split it into 3D volumes first)" if len(shape) == 4 else ""
        raise ScanError(
            path, f"{len(shape)}D image of shape {full_shape}, expected a 3D volume{hint}"
        )
    if min(shape) < 2:
        raise ScanError(path, f"degenerate 3D shape {shape}: every axis needs at least 2 voxels")
    content = _check_claimed_size(path, header, shape, dtype, vox_offset, limits)
    affine = _claimed_affine(path, header, limits)
    if spacing_mm is not None:
        check_resampled_grid(path, shape, affine, spacing_mm, limits)
    return HeaderFacts(header, image_class, shape, affine, content)


def _check_claimed_size(
    path: Path,
    header: Any,
    shape: tuple[int, ...],
    dtype: np.dtype,
    vox_offset: int,
    limits: ScanLimits,
) -> int:
    """Refuse a grid, voxel type or data size over the limits, before any voxel is read.

    Returns:
        The bytes the file must decompress to: header, extensions and voxel data.
    """
    if max(shape) > limits.max_axis_voxels:
        raise ScanError(
            path,
            f"the header claims a {'x'.join(map(str, shape))} grid, over "
            f"{limits.max_axis_voxels} voxels on an axis (a mislabelled export or a "
            "decompression bomb?)",
            hint=_limit_hint("max_axis_voxels"),
        )
    voxels = math.prod(shape)
    if voxels > limits.max_voxels:
        raise ScanError(
            path,
            f"the header claims {voxels:,} voxels ({'x'.join(map(str, shape))}), over "
            f"{limits.max_voxels:,}",
            hint=_limit_hint("max_voxels"),
        )
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise ScanError(
            path, f"voxel type {dtype} (from the header's datatype): expected integers or floats"
        )
    if not 0 <= vox_offset <= MAX_EXTENSIONS:
        raise ScanError(path, f"malformed NIfTI header (vox_offset {vox_offset})")
    content = max(vox_offset, len(header.binaryblock)) + voxels * dtype.itemsize
    if content > limits.max_bytes:
        raise ScanError(
            path,
            f"the header claims {content / GIB:.1f} GiB of voxel data "
            f"({'x'.join(map(str, shape))} {dtype}), over "
            f"{limits.max_decompressed_gib:g} GiB (a mislabelled export or a decompression "
            "bomb?)",
            hint=_limit_hint("max_decompressed_gib"),
        )
    return content


def _claimed_affine(path: Path, header: Any, limits: ScanLimits) -> np.ndarray:
    """The header's voxel-to-world affine; refuses a scan without orientation, with a singular
    (or non-finite) affine, or with voxel sizes outside ``limits.voxel_mm`` (a units error)."""
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        raise ScanError(
            path,
            "no orientation in the header (qform_code and sform_code are both 0): the "
            "voxel-to-world affine is unknown; re-export the scan from DICOM with orientation",
        )
    try:
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception as exc:
        raise ScanError(path, f"malformed NIfTI header ({exc})") from None
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ScanError(
            path, "the affine (qform/sform) is missing or singular: voxel positions unknown"
        )
    sizes = voxel_sizes(affine)
    low, high = limits.voxel_mm
    if sizes.min() < low or sizes.max() > high:
        units = _spatial_unit(header)
        said = f"; the header's unit is {units}" if units not in ("mm", "unknown") else ""
        raise ScanError(
            path,
            f"voxel size {' x '.join(f'{s:.3g}' for s in sizes)} mm, outside {low:g}-{high:g} "
            f"mm (a units error in the export?{said})",
            hint=_limit_hint("voxel_mm"),
        )
    return affine


def _spatial_unit(header: Any) -> str:
    """The header's spatial unit (``mm``, ``micron``, ...), or what its code is when nibabel
    knows no such code (``get_xyzt_units`` raises KeyError on a damaged field)."""
    try:
        return str(header.get_xyzt_units()[0])
    except (KeyError, AttributeError):
        code = int(np.asarray(header["xyzt_units"]).item()) % 8
        return f"the invalid code {code}"


def check_resampled_grid(
    path: Path,
    shape: tuple[int, ...],
    affine: np.ndarray,
    spacing_mm: tuple[float, float, float],
    limits: ScanLimits = DEFAULT_LIMITS,
) -> tuple[int, int, int]:
    """Bound the grid a scan becomes at ``spacing_mm``: its field of view's world extent
    (an upper bound of what MONAI's resampling allocates, oblique grids included).

    Returns:
        The bound, voxels per world axis.

    Raises:
        ScanError: the bound is over the limits.
    """
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])]
    )
    world = (np.asarray(affine, dtype=np.float64) @ corners.T)[:3]
    extent = world.max(axis=1) - world.min(axis=1)
    grid = tuple(math.ceil(e / s - 1e-6) for e, s in zip(extent, spacing_mm, strict=True))
    if max(grid) > limits.max_axis_voxels or math.prod(grid) > limits.max_voxels:
        raise ScanError(
            path,
            f"its field of view ({' x '.join(f'{e:.0f}' for e in extent)} mm) would be a "
            f"{'x'.join(map(str, grid))} grid at the model's "
            f"{'x'.join(f'{s:g}' for s in spacing_mm)} mm, over the limits "
            f"({limits.max_axis_voxels} per axis, {limits.max_voxels:,} in all): not a head "
            "scan, or voxel sizes in the wrong unit",
            hint=_limit_hint("max_axis_voxels"),
        )
    return (grid[0], grid[1], grid[2])


def read_header(
    path: Path,
    limits: ScanLimits = DEFAULT_LIMITS,
    spacing_mm: tuple[float, float, float] | None = None,
) -> HeaderFacts:
    """Check a scan's header only (a few kilobytes read), as :func:`read_scan` does first."""
    path = Path(path)
    with _readable(path), path.open("rb") as handle:
        return _header_first(path, handle, limits, spacing_mm)[2]


def _header_first(
    path: Path,
    handle: IO[bytes],
    limits: ScanLimits,
    spacing_mm: tuple[float, float, float] | None,
) -> tuple[_Stream, io.BytesIO, HeaderFacts]:
    """The file's size, then its header, checked: the stream, what it gave so far, the facts."""
    _check_size(path, handle, limits)
    stream = _Stream(path, handle, hashlib.sha256())
    content = io.BytesIO()
    stream.read(NIFTI2_HEADER, content)
    return stream, content, check_header(path, content.getvalue(), limits, spacing_mm)


def _check_size(path: Path, handle: IO[bytes], limits: ScanLimits) -> None:
    size = os.fstat(handle.fileno()).st_size
    if size == 0:
        raise ScanError(path, "empty file (0 bytes)")
    if size > limits.max_bytes + MAX_EXTENSIONS:
        raise ScanError(
            path,
            f"{size / GIB:.1f} GiB on disk, over {limits.max_decompressed_gib:g} GiB",
            hint=_limit_hint("max_decompressed_gib"),
        )


def read_scan(
    path: Path,
    limits: ScanLimits = DEFAULT_LIMITS,
    spacing_mm: tuple[float, float, float] | None = None,
) -> LoadedScan:
    """Read and validate one scan, header first (see the module docstring).

    Args:
        limits: what the header may claim.
        spacing_mm: the model's spacing, to bound the resampled grid too.

    Raises:
        ScanError: naming ``path`` and what is wrong with it.
    """
    path = Path(path)
    with _readable(path), path.open("rb") as handle:
        stream, content, facts = _header_first(path, handle, limits, spacing_mm)
        wanted = facts.content_bytes - content.tell()
        got = stream.read(wanted, content) if wanted > 0 else 0
        if got < wanted:
            raise ScanError(
                path,
                f"voxel data does not match the header (truncated file?): the header needs "
                f"{facts.content_bytes:,} bytes, the file holds {content.tell():,}",
            )
        sha = stream.finish()
    data = _voxels(path, facts, content)
    del content

    finite = np.isfinite(data)
    if not finite.all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(data.size - finite.sum() - n_nan)
        raise ScanError(
            path,
            f"{n_nan} NaN and {n_inf} infinite voxel(s) out of {data.size}: expected finite values",
        )
    del finite
    lo, hi = float(data.min()), float(data.max())
    if lo == hi == 0.0:
        raise ScanError(path, "all voxels are zero: an empty volume")
    if lo == hi:
        raise ScanError(path, f"constant volume (every voxel is {lo:g}): no image content")
    return LoadedScan(path=path, data=data, affine=facts.affine, sha256=sha, header=facts.header)


def _voxels(path: Path, facts: HeaderFacts, content: io.BytesIO) -> np.ndarray:
    content.seek(0)
    try:
        file_map = facts.image_class.make_file_map({"image": content, "header": content})
        image = facts.image_class.from_file_map(file_map)
        data = np.asarray(image.dataobj, dtype=np.float32).reshape(facts.shape)
    except Exception as exc:
        raise ScanError(
            path, f"voxel data does not match the header (truncated file?): {exc}"
        ) from None
    return data
