"""The MONAI side of preprocessing: the dictionary transforms fedsynth writes and the recipes.

Imported by :mod:`fedsynth.common.data.preprocess` only when a scan is really preprocessed (a cache
miss): MONAI's package import costs about 1.5-2 s of CPU (it loads most of its submodules,
matplotlib among them), which a ClientApp whose slices are all cached should not pay every round.
See
:mod:`fedsynth.common.data.preprocess` for the recipe.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    Orientationd,
    ResampleToMatchd,
    ResizeWithPadOrCropd,
    Spacingd,
)

from fedsynth.common.config import DataConfig
from fedsynth.common.data.loading import LoadedScan, read_scan
from fedsynth.common.data.masks import antialias, subject_mask
from fedsynth.common.data.preprocess import (
    GridReference,
    PreprocessedVolume,
    intensity_mapping,
)
from fedsynth.common.modalities import Modality


class LoadScand(MapTransform):
    """Read and validate a scan (see :func:`read_scan`) into a channel-first MetaTensor."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            source = out[key]
            scan = source if isinstance(source, LoadedScan) else read_scan(Path(source))
            out[key] = MetaTensor(
                torch.from_numpy(scan.data)[None], affine=torch.from_numpy(scan.affine)
            )
            out[f"{key}_sha256"] = scan.sha256
        return out


class AntiAliasd(MapTransform):
    """Gaussian pre-filter along the axes that :class:`Spacingd` will make coarser.

    Reads the (reoriented) voxel size from the MetaTensor's affine; see
    :func:`fedsynth.common.data.masks.antialias` for the filter's width.
    """

    def __init__(self, keys: str, pixdim: tuple[float, float, float]):
        super().__init__(keys)
        self.pixdim = pixdim

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            affine = np.asarray(image.affine, dtype=np.float64)
            spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
            filtered = antialias(image[0].numpy(), tuple(spacing), self.pixdim)
            out[key] = MetaTensor(torch.from_numpy(filtered)[None], affine=image.affine)
        return out


class HeadMaskd(MapTransform):
    """Add ``mask`` (same shape, 0/1) computed by
    :func:`fedsynth.common.data.masks.subject_mask`."""

    def __init__(self, keys: str, modality: Modality, mask_key: str = "mask"):
        super().__init__(keys)
        self.modality = modality
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            volume = image[0].numpy()
            mask = subject_mask(volume, self.modality)
            out[self.mask_key] = MetaTensor(
                torch.from_numpy(mask.astype(np.float32))[None], affine=image.affine
            )
            out[f"{self.mask_key}_voxels"] = int(mask.sum())
        return out


class RobustNormalized(MapTransform):
    """Map ``keys`` to [-1, 1] (see module docstring); the mapping goes to ``<key>_mapping``."""

    def __init__(self, keys: str, modality: Modality, config: DataConfig, mask_key: str = "mask"):
        super().__init__(keys)
        self.modality = modality
        self.config = config
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        mask = out[self.mask_key][0].numpy() > 0.5
        for key in self.key_iterator(out):
            image = out[key]
            volume = image[0].numpy()
            mapping = intensity_mapping(volume, mask, self.modality, self.config)
            scaled = mapping.to_model(volume)
            out[key] = MetaTensor(torch.from_numpy(scaled)[None], affine=image.affine)
            out[f"{key}_mapping"] = mapping
        return out


def _reading(config: DataConfig) -> list[MapTransform]:
    """What every recipe starts with: read, reorient to RAS, anti-alias to the model spacing."""
    return [
        LoadScand(keys="image"),
        Orientationd(keys="image", axcodes="RAS", labels=None),
        AntiAliasd(keys="image", pixdim=config.spacing_mm),
    ]


def _spacing(config: DataConfig) -> Spacingd:
    return Spacingd(keys="image", pixdim=config.spacing_mm, mode="bilinear", padding_mode="border")


def build_pipeline(modality: Modality, config: DataConfig) -> Compose:
    """The preprocessing recipe for one modality (see the module docstring)."""
    size = (config.image_size, config.image_size, -1)
    return Compose(
        [
            *_reading(config),
            _spacing(config),
            HeadMaskd(keys="image", modality=modality),
            RobustNormalized(keys="image", modality=modality, config=config),
            ResizeWithPadOrCropd(keys="image", spatial_size=size, mode="constant", value=-1.0),
            ResizeWithPadOrCropd(keys="mask", spatial_size=size, mode="constant", value=0.0),
        ]
    )


def build_reference_pipeline() -> Compose:
    """The end of the recipe for a scan brought onto a :class:`GridReference`.

    After :func:`_reading`: resample through both scanner affines onto the reference grid (under
    ``"reference"``; world coordinates, trilinear; no registration: the head motion between the
    two acquisitions stays, for the model to learn). Also resamples a volume of ones to find
    where this scan has data (``valid``).
    """
    return Compose(
        [
            _Onesd(source="image", key="valid"),
            ResampleToMatchd(
                keys=["image", "valid"],
                key_dst="reference",
                mode="bilinear",
                padding_mode="zeros",
                dtype=np.float32,
            ),
        ]
    )


class _Onesd(MapTransform):
    """Add ``key``: a volume of ones on ``source``'s grid (where that scan has data)."""

    def __init__(self, source: str, key: str):
        super().__init__(source)
        self.source = source
        self.key = key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        image = out[self.source]
        out[self.key] = MetaTensor(torch.ones_like(image.as_tensor()), affine=image.affine)
        return out


def own_grid(scan: LoadedScan, modality: Modality, config: DataConfig) -> PreprocessedVolume:
    """The recipe on a scan's own grid (see :mod:`fedsynth.common.data.preprocess`)."""
    result = build_pipeline(modality, config)({"image": scan})
    image: MetaTensor = result["image"]
    mask = result["mask"][0].numpy() > 0.5
    # Foreground lost to the in-plane crop: compare with the mask before cropping.
    before = result["mask_voxels"]
    clipped = 1.0 - float(mask.sum()) / before if before else 0.0
    return PreprocessedVolume(
        volume=np.asarray(image[0].numpy(), dtype=np.float32),
        mask=mask,
        mapping=result["image_mapping"],
        affine=np.asarray(image.affine, dtype=np.float64),
        foreground_clipped=max(clipped, 0.0),
    )


def onto_reference(
    scan: LoadedScan, modality: Modality, config: DataConfig, reference: GridReference
) -> PreprocessedVolume:
    # A co-registered scan (the source's own grid) takes the source's path exactly: the same
    # resampling and crop, so its voxels match the source's bit for bit in position.
    size = (config.image_size, config.image_size, -1)
    read = Compose(_reading(config))({"image": scan})  # once, for either path below
    own = Compose(
        [
            _spacing(config),
            # NaN marks the padding: no data there (the source pads -1 on the model scale).
            ResizeWithPadOrCropd(
                keys="image", spatial_size=size, mode="constant", value=float("nan")
            ),
        ]
    )(dict(read))["image"]
    if tuple(own.shape[1:]) == reference.shape and np.allclose(
        np.asarray(own.affine, dtype=np.float64), reference.affine, atol=1e-4
    ):
        volume = np.asarray(own[0].numpy(), dtype=np.float32)
        valid = np.isfinite(volume)
        volume = np.where(valid, volume, 0.0).astype(np.float32)
    else:
        grid = MetaTensor(
            torch.zeros((1, *reference.shape)), affine=torch.from_numpy(reference.affine)
        )
        result = build_reference_pipeline()({**read, "reference": grid})
        volume = np.asarray(result["image"][0].numpy(), dtype=np.float32)
        valid = result["valid"][0].numpy() > 0.999
    mask = reference.mask & valid
    mapping = intensity_mapping(volume, mask, modality, config)
    scaled = mapping.to_model(volume)
    scaled[~valid] = -1.0  # no data there: the model scale's background
    covered = float(mask.sum()) / float(reference.mask.sum()) if reference.mask.any() else 1.0
    return PreprocessedVolume(
        volume=scaled,
        mask=mask,
        mapping=mapping,
        affine=np.asarray(reference.affine, dtype=np.float64),
        foreground_clipped=max(1.0 - covered, 0.0),
    )


def label_on_model_grid(label: np.ndarray, affine: np.ndarray, config: DataConfig) -> np.ndarray:
    """A binary (x, y, z) label onto the model grid, nearest neighbour: (H, W, D) bool."""
    size = (config.image_size, config.image_size, -1)
    recipe = Compose(
        [
            Orientationd(keys="label", axcodes="RAS", labels=None),
            Spacingd(keys="label", pixdim=config.spacing_mm, mode="nearest"),
            ResizeWithPadOrCropd(keys="label", spatial_size=size, mode="constant", value=0.0),
        ]
    )
    tensor = MetaTensor(
        torch.from_numpy(np.asarray(label, dtype=np.float32))[None],
        affine=torch.from_numpy(np.asarray(affine, dtype=np.float64)),
    )
    return np.asarray(recipe({"label": tensor})["label"][0].numpy() > 0.5)
