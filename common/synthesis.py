"""Apply a trained generator to a whole NIfTI volume and write a NIfTI a clinic can use.

The input goes through the same preprocessing as training (RAS, model spacing, foreground mask,
intensity scale, in-plane pad/crop); every axial slice with any foreground is translated in
batches; the result is resampled back onto the input's own voxel grid (trilinear), so the output
has the input's shape, affine and orientation and overlays it exactly.

Output intensities (documented scale): the generator's [-1, 1] is mapped back with the
checkpoint's ``output_scale``: for CT targets the Hounsfield window used in training (so the
output is in HU); for MR targets the mean foreground percentile range (e.g. 0.5th..99.5th) of the
target-domain training volumes, i.e. a typical intensity range of that contrast at the training
sites. MR intensities have no absolute unit, so only relative contrast is meaningful. Voxels
outside the head mask (and outside the model's field of view) are set to the scale's low end.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from fedsynth.common.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    OutputScale,
    load_checkpoint,
    load_into,
)
from fedsynth.common.data.discovery import bids_modality, nifti_stem
from fedsynth.common.data.loading import ScanLimits, read_scan
from fedsynth.common.data.preprocess import IntensityMapping, preprocess_volume
from fedsynth.common.device import resolve_device
from fedsynth.common.io import atomic_save
from fedsynth.common.modalities import Modality
from fedsynth.common.models import define_generator

logger = logging.getLogger(__name__)


def guess_modality(path: Path) -> Modality | None:
    """The modality a file name declares (BIDS suffix, ``ce-`` entity), or None."""
    parts = nifti_stem(Path(path)).split("_")
    if len(parts) < 2:
        return None
    return bids_modality(parts[-1], (p.partition("-")[0] for p in parts[:-1]))


@dataclass(frozen=True)
class SynthesisResult:
    output: Path
    slices: int
    seconds: float
    scale: OutputScale


class Synthesizer:
    """A checkpoint's G_AB, ready to translate volumes.

    Args:
        checkpoint: checkpoint folder (or one of its files).
        device: ``auto``, ``cpu``, ``cuda:1``...
        batch_size: slices per forward pass.
        bf16: bfloat16 autocast (CUDA, or CPU where supported); see BENCHMARKS.md for its error.
    """

    def __init__(
        self,
        checkpoint: Path,
        *,
        device: str = "auto",
        batch_size: int = 16,
        bf16: bool = False,
    ):
        self.metadata: CheckpointMetadata
        self.metadata, networks = load_checkpoint(checkpoint)
        if "g_ab" not in networks:
            raise CheckpointError(f"{checkpoint}: no G_AB weights (found {sorted(networks)})")
        self.device = resolve_device(device)
        self.generator = define_generator(self.metadata.model, self.metadata.data.image_size)
        load_into(self.generator, networks["g_ab"], where=str(checkpoint))
        self.generator.to(self.device).eval()
        self.batch_size = batch_size
        self.bf16 = bf16
        self.direction = self.metadata.parsed_direction

    @property
    def output_scale(self) -> OutputScale:
        scale = self.metadata.output_scale
        if scale is not None:
            return scale
        if self.direction.target is Modality.CT:
            low, high = self.metadata.data.ct_window_hu
            return OutputScale(low=low, high=high, kind="window")
        return OutputScale(low=0.0, high=1000.0, kind="percentile")

    @torch.no_grad()
    def translate_slices(self, slices: np.ndarray) -> np.ndarray:
        """(n, H, W) model-scale slices -> (n, H, W) synthesized, model scale."""
        out = np.empty_like(slices, dtype=np.float32)
        autocast = torch.autocast(
            device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16
        )
        for start in range(0, len(slices), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(slices[start : start + self.batch_size]))
            with autocast:
                result = self.generator(batch[:, None].to(self.device))
            out[start : start + len(batch)] = result[:, 0].float().cpu().numpy()
        return out

    def synthesize(
        self, input_path: Path, output_path: Path, *, modality: Modality | None = None
    ) -> SynthesisResult:
        """Translate one volume and write it (atomically) with the input's grid.

        Args:
            input_path: a NIfTI of the checkpoint's source modality.
            output_path: where to write the synthesized NIfTI.
            modality: the input's modality when its name does not say (BIDS suffix).

        Raises:
            ValueError: the input's modality is known and is not the checkpoint's source.
            ScanError: the input is unusable.
        """
        start = time.perf_counter()
        declared = modality or guess_modality(input_path)
        source = self.direction.source
        if declared is not None and declared is not source:
            raise ValueError(
                f"{input_path} is {declared.value} but the checkpoint translates "
                f"{self.direction} (its input must be {source.value})"
            )
        data = self.metadata.data
        scan = read_scan(input_path, ScanLimits.of(data), data.spacing_mm)
        pre = preprocess_volume(scan, source, data)
        depth = pre.volume.shape[2]
        active = np.flatnonzero(pre.mask.reshape(-1, depth).any(axis=0))
        synthesized = np.full(pre.volume.shape, -1.0, dtype=np.float32)
        if active.size:
            slices = np.moveaxis(pre.volume[:, :, active], 2, 0)
            synthesized[:, :, active] = np.moveaxis(self.translate_slices(slices), 0, 2)
        synthesized[~pre.mask] = -1.0

        # Back onto the input grid: input voxel -> world -> model-grid voxel.
        voxel_map = np.linalg.inv(pre.affine) @ scan.affine
        on_input = ndimage.affine_transform(
            synthesized,
            voxel_map[:3, :3],
            offset=voxel_map[:3, 3],
            output_shape=scan.data.shape,
            order=1,
            mode="constant",
            cval=-1.0,
        )
        scale = self.output_scale
        native = IntensityMapping(scale.low, scale.high, scale.kind).to_native(on_input)

        codes = (1, 1)
        if scan.header is not None:
            codes = (int(scan.header["qform_code"]) or 1, int(scan.header["sform_code"]) or 1)
        image = nib.Nifti1Image(native.astype(np.float32), scan.affine)
        image.header["descrip"] = f"fedsynth {self.direction}".encode()[:80]
        image.set_qform(scan.affine, code=codes[0])
        image.set_sform(scan.affine, code=codes[1])
        if scan.header is not None:
            image.header.set_xyzt_units(*scan.header.get_xyzt_units())
        output_path = Path(output_path)
        atomic_save(output_path, lambda tmp: nib.save(image, tmp))
        seconds = time.perf_counter() - start
        logger.info("wrote %s (%d slices, %.1f s)", output_path, int(active.size), seconds)
        return SynthesisResult(output_path, int(active.size), seconds, scale)
