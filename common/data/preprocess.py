"""Turn one scan into normalised axial slices for the model, with a disk cache.

The recipe (MONAI dictionary transforms, some written in :mod:`fedsynth.common.data.transforms`,
which is imported only on a cache miss: MONAI's import is heavy):

    read + validate (fedsynth.common.data.loading) -> Orientationd("RAS") -> AntiAliasd (Gaussian
    pre-filter where the grid gets coarser) -> Spacingd(config spacing)
    -> HeadMaskd (brain or head mask, :mod:`fedsynth.common.data.masks`) -> RobustNormalized
    (to [-1, 1], mapping kept)
    -> ResizeWithPadOrCropd (image_size x image_size in-plane, centred on the field of view)
    -> axial slices whose foreground fraction reaches ``min_foreground``

A scan can also be brought onto another scan's model grid (:class:`GridReference`): the second
contrast of a session is resampled onto the first one's grid through their scanner affines
(world coordinates; no registration), takes its mask, and is standardised inside it. That is how
a session's contrasts on different grids become one weakly paired example
(:mod:`fedsynth.common.data.pairing`).

Intensity scale (documented, and inverted by :meth:`IntensityMapping.to_native`): MR
volumes map their foreground's ``percentiles`` (default 0.5 and 99.5) linearly to -1 and 1 and
clip outside; CT maps the fixed Hounsfield window ``ct_window_hu`` (default -1024..2048 HU) to
-1..1, so HU stay comparable across sites. Co-registered modalities of one subject share the grid
after preprocessing, so their slice ``z`` indices correspond (paired evaluation relies on it).
The cache key is the file's content hash plus every preprocessing setting: renaming a file reuses
the cache, editing it or changing a setting does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.common.config import DataConfig
from fedsynth.common.data.errors import ScanError, scan_failures
from fedsynth.common.data.loading import (
    LoadedScan,
    ScanLimits,
    check_resampled_grid,
    file_sha256,
    read_header,
    read_scan,
)
from fedsynth.common.data.masks import standardisation_range
from fedsynth.common.io import atomic_save
from fedsynth.common.modalities import Modality

logger = logging.getLogger(__name__)

PIPELINE_VERSION = 2  # bump when the recipe changes: invalidates every cache entry


@dataclass(frozen=True)
class IntensityMapping:
    """Linear map between native intensities and the model's [-1, 1] scale.

    ``native`` values ``low`` and ``high`` map to -1 and 1; values outside are clipped.
    """

    low: float
    high: float
    kind: str  # "percentile" (MR) or "window" (CT, Hounsfield units)

    def to_model(self, native: np.ndarray) -> np.ndarray:
        scaled = (np.clip(native, self.low, self.high) - self.low) / (self.high - self.low)
        return (scaled * 2.0 - 1.0).astype(np.float32)

    def to_native(self, model: np.ndarray) -> np.ndarray:
        return (self.low + (np.clip(model, -1.0, 1.0) + 1.0) * 0.5 * (self.high - self.low)).astype(
            np.float32
        )


@dataclass(frozen=True)
class SliceStack:
    """The usable axial slices of one preprocessed volume.

    Attributes:
        slices: (n, H, W) float32 in [-1, 1]; H = W = ``image_size``; axes (R, A) after RAS.
        masks: (n, H, W) bool foreground.
        z: (n,) index of each slice in the preprocessed volume (comparable across a subject's
            co-registered modalities).
        mapping: how to go back to native intensities.
        affine: the preprocessed volume's voxel-to-world affine (RAS, config spacing).
        depth: number of axial slices of the preprocessed volume.
        foreground_clipped: fraction of the foreground that fell outside the model's field of view.
        volume_mask: (H, W, depth) bool, the mask of every slice (usable or not): what a
            session's second contrast is standardised in (:class:`GridReference`).
    """

    slices: np.ndarray
    masks: np.ndarray
    z: np.ndarray
    mapping: IntensityMapping
    affine: np.ndarray
    depth: int
    foreground_clipped: float
    volume_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.slices.shape[0])


# --------------------------------------------------------------------------- masks and scaling


def intensity_mapping(
    volume: np.ndarray, mask: np.ndarray, modality: Modality, config: DataConfig
) -> IntensityMapping:
    """The native-to-model map of one volume: CT's fixed HU window, else the mask's robust range
    (:func:`fedsynth.common.data.masks.standardisation_range`)."""
    if modality is Modality.CT:
        low, high = config.ct_window_hu
        return IntensityMapping(float(low), float(high), "window")
    region = mask if mask.any() else np.ones(volume.shape, dtype=bool)
    low, high = standardisation_range(volume, region, modality, config.percentiles)
    if high <= low:
        high = low + 1.0
    return IntensityMapping(float(low), float(high), "percentile")


@dataclass(frozen=True)
class GridReference:
    """Another scan's model grid, onto which a scan of the same session is resampled.

    Attributes:
        affine: the reference's preprocessed voxel-to-world affine (RAS, model grid).
        shape: the reference's preprocessed (H, W, D).
        mask: (H, W, D) bool, the session's mask (the reference scan's own).
        key: the reference's cache key (its content and settings), part of the resampled
            scan's cache key.
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    mask: np.ndarray
    key: str

    @classmethod
    def of(cls, stack: SliceStack, key: str) -> GridReference:
        """The grid and whole mask of a preprocessed stack (without a stored whole mask, as in
        stacks built by hand: its usable slices' masks, the other slices empty)."""
        height, width = stack.slices.shape[1:]
        if stack.volume_mask is not None:
            mask = np.asarray(stack.volume_mask, dtype=bool)
        else:
            mask = np.zeros((height, width, stack.depth), dtype=bool)
            mask[:, :, stack.z] = np.moveaxis(stack.masks, 0, 2)
        return cls(np.asarray(stack.affine), (height, width, stack.depth), mask, key)


def cache_key(
    sha256: str, modality: Modality, config: DataConfig, reference: str | None = None
) -> str:
    settings = {
        "version": PIPELINE_VERSION,
        "sha256": sha256,
        "modality": modality.value,
        "spacing_mm": list(config.spacing_mm),
        "image_size": config.image_size,
        "percentiles": list(config.percentiles),
        "min_foreground": config.min_foreground,
        "ct_window_hu": list(config.ct_window_hu),
        "reference": reference,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class PreprocessedVolume:
    """A whole volume on the model grid: (H, W, D) in [-1, 1], its mask, mapping and affine."""

    volume: np.ndarray
    mask: np.ndarray
    mapping: IntensityMapping
    affine: np.ndarray
    foreground_clipped: float


def preprocess_volume(
    source: Path | LoadedScan,
    modality: Modality,
    config: DataConfig,
    reference: GridReference | None = None,
) -> PreprocessedVolume:
    """Run the recipe on one file, or on a scan already read, keeping every axial slice.

    With ``reference``, the scan is brought onto that grid (:func:`_onto_reference`);
    its mask is the reference's mask where this scan has data, and it is standardised there.

    Any failure on the way is this file's :class:`ScanError` (:func:`scan_failures`): a
    library's error on a file nobody foresaw never escapes as something else.

    Raises:
        ScanError: the file is unusable (see :func:`read_scan`).
    """
    path = source.path if isinstance(source, LoadedScan) else Path(source)
    with scan_failures(path):
        return _preprocess_volume(source, modality, config, reference)
    raise AssertionError("unreachable")  # pragma: no cover (keeps mypy's return check happy)


def _preprocess_volume(
    source: Path | LoadedScan,
    modality: Modality,
    config: DataConfig,
    reference: GridReference | None,
) -> PreprocessedVolume:
    # Read (and validate) outside the Compose, which would wrap ScanError in a RuntimeError.
    limits = ScanLimits.of(config)
    if isinstance(source, LoadedScan):
        scan = source
        check_resampled_grid(scan.path, scan.data.shape, scan.affine, config.spacing_mm, limits)
    else:
        scan = read_scan(Path(source), limits, config.spacing_mm)
    from fedsynth.common.data import transforms  # MONAI: only when a scan is really preprocessed

    if reference is not None:
        return transforms.onto_reference(scan, modality, config, reference)
    return transforms.own_grid(scan, modality, config)


def preprocess_label(path: Path, config: DataConfig) -> np.ndarray:
    """A binary label volume (a lesion mask) on the model grid: (H, W, D) bool.

    Same geometry as :func:`preprocess_volume` (RAS, config spacing, centred pad/crop) with
    nearest-neighbour resampling, so it overlays the preprocessed images of its subject.
    An all-zero mask is valid here (a subject without lesion).

    Raises:
        ScanError: the file cannot be read as a 3D NIfTI.
    """
    import nibabel as nib

    read_header(path, ScanLimits.of(config), config.spacing_mm)  # bounded before reading voxels
    try:
        image: Any = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise ScanError(path, f"unreadable label mask ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ScanError(path, f"label mask of shape {data.shape}, expected a 3D volume")
    from fedsynth.common.data import transforms  # MONAI: only when a label is really resampled

    with scan_failures(path, "resampling the label mask"):
        return transforms.label_on_model_grid(data > 0.5, np.asarray(image.affine), config)
    raise AssertionError("unreachable")  # pragma: no cover (keeps mypy's return check happy)


def usable_slices(mask: np.ndarray, min_foreground: float) -> np.ndarray:
    """Indices of the axial slices of an (H, W, D) mask with enough foreground."""
    fraction = mask.reshape(-1, mask.shape[2]).mean(axis=0)
    return np.flatnonzero(fraction >= min_foreground).astype(np.int64)


def preprocess_scan(
    source: Path | LoadedScan,
    modality: Modality,
    config: DataConfig,
    reference: GridReference | None = None,
) -> SliceStack:
    """Run the recipe on one file, or on a scan already read (no cache); keep usable slices.

    With ``reference`` the scan is brought onto that grid first (see :func:`preprocess_volume`).

    Raises:
        ScanError: the file is unusable (see :func:`read_scan`).
    """
    pre = preprocess_volume(source, modality, config, reference)
    usable = usable_slices(pre.mask, config.min_foreground)
    slices = np.ascontiguousarray(np.moveaxis(pre.volume[:, :, usable], 2, 0), dtype=np.float32)
    masks = np.ascontiguousarray(np.moveaxis(pre.mask[:, :, usable], 2, 0))
    return SliceStack(
        slices=slices,
        masks=masks,
        z=usable,
        mapping=pre.mapping,
        affine=pre.affine,
        depth=int(pre.volume.shape[2]),
        foreground_clipped=pre.foreground_clipped,
        volume_mask=np.asarray(pre.mask, dtype=bool),
    )


# --------------------------------------------------------------------------- cache


class SliceCache:
    """Preprocessed slices on disk, one ``.npz`` per (file content, settings); writes are atomic.

    Args:
        folder: where entries live; ``None`` disables caching (every call preprocesses).
    """

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.hits = 0
        self.misses = 0

    def key(
        self,
        path: Path,
        modality: Modality,
        config: DataConfig,
        reference: GridReference | None = None,
    ) -> str:
        """The entry name of ``path`` preprocessed with these settings (and onto ``reference``)."""
        return cache_key(
            file_sha256(path), modality, config, reference.key if reference is not None else None
        )

    def load(
        self,
        path: Path,
        modality: Modality,
        config: DataConfig,
        reference: GridReference | None = None,
    ) -> SliceStack:
        """The slices of ``path``, from the cache when an entry for its content exists.

        With ``reference``, ``path`` is brought onto that grid (a session's second contrast).
        """
        if self.folder is None:
            self.misses += 1
            return preprocess_scan(path, modality, config, reference)
        # Today's limits hold for an entry made under looser ones (a header read: kilobytes).
        read_header(path, ScanLimits.of(config), config.spacing_mm)
        entry = self.folder / f"{self.key(path, modality, config, reference)}.npz"
        if entry.exists():
            try:
                stack = _read_entry(entry)
            except Exception as exc:  # any damage (empty, truncated, garbage): rebuilding is safe
                logger.warning("ignoring unreadable cache entry %s (%s); rebuilding", entry, exc)
            else:
                self.hits += 1
                return stack
        self.misses += 1
        stack = preprocess_scan(path, modality, config, reference)
        atomic_save(entry, lambda tmp: _write_entry(tmp, stack))
        return stack


def _write_entry(target: Path, stack: SliceStack) -> None:
    with target.open("wb") as handle:
        np.savez(
            handle,
            slices=stack.slices,
            masks=stack.masks,
            z=stack.z,
            mapping=np.array([stack.mapping.low, stack.mapping.high]),
            mapping_kind=np.array(stack.mapping.kind),
            affine=stack.affine,
            depth=np.array(stack.depth),
            foreground_clipped=np.array(stack.foreground_clipped),
            volume_mask_bits=np.packbits(stack.volume_mask)
            if stack.volume_mask is not None
            else np.zeros(0, np.uint8),
            volume_mask_shape=np.array(
                stack.volume_mask.shape if stack.volume_mask is not None else (0, 0, 0)
            ),
        )


def _read_entry(entry: Path) -> SliceStack:
    with np.load(entry, allow_pickle=False) as archive:
        low, high = (float(v) for v in archive["mapping"])
        shape = tuple(int(n) for n in archive["volume_mask_shape"])
        volume_mask = (
            np.unpackbits(archive["volume_mask_bits"], count=int(np.prod(shape)))
            .reshape(shape)
            .astype(bool)
            if all(shape)
            else None
        )
        return SliceStack(
            slices=archive["slices"],
            masks=archive["masks"],
            z=archive["z"],
            mapping=IntensityMapping(low, high, str(archive["mapping_kind"])),
            affine=archive["affine"],
            depth=int(archive["depth"]),
            foreground_clipped=float(archive["foreground_clipped"]),
            volume_mask=volume_mask,
        )
