"""PyTorch datasets over a site's slices: unpaired (training) and paired (evaluation).

One training example is the pair drawn at one index: slice ``i`` of domain A and a slice of
domain B chosen by a per-epoch permutation. This is the unit of privacy under DP-SGD later on.
Everything random (B's permutation, misalignment) is a function of (seed, epoch, index), so a
run is reproducible and a resumed epoch sees the same examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from common.data.misalign import apply_affine, draw_affine
from common.data.site import Volume


def _stack(volumes: Sequence[Volume]) -> tuple[np.ndarray, np.ndarray]:
    if not volumes:
        raise ValueError("a domain needs at least one volume")
    slices = np.concatenate([v.stack.slices for v in volumes], axis=0)
    masks = np.concatenate([v.stack.masks for v in volumes], axis=0)
    return slices, masks


class UnpairedSlices(Dataset[dict[str, torch.Tensor]]):
    """Domain A and domain B slices drawn independently.

    Args:
        domain_a: volumes feeding the source domain.
        domain_b: volumes feeding the target domain.
        misalignment: severity name applied to B (see :mod:`common.data.misalign`), or one
            name per B volume (pooled sites that are misaligned differently).
        seed: base seed for B's pairing and misalignment draws.

    Items are ``{"a", "b", "a_mask", "b_mask"}``, each (1, H, W) float32.
    """

    def __init__(
        self,
        domain_a: Sequence[Volume],
        domain_b: Sequence[Volume],
        *,
        misalignment: str | Sequence[str] = "none",
        seed: int = 0,
    ):
        self.a, self.a_masks = _stack(domain_a)
        self.b, self.b_masks = _stack(domain_b)
        if isinstance(misalignment, str):
            self._severity = [misalignment] * len(self.b)
        else:
            if len(misalignment) != len(domain_b):
                raise ValueError(
                    f"{len(misalignment)} misalignment levels for {len(domain_b)} B volumes"
                )
            self._severity = [
                m for m, v in zip(misalignment, domain_b, strict=True) for _ in v.stack.slices
            ]
        self.seed = seed
        self.set_epoch(0)

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def set_epoch(self, epoch: int) -> None:
        """Re-draw which B slice meets which A slice (call once per epoch)."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch, 0])
        repeats = -(-len(self) // len(self.b))
        self._b_index = np.concatenate([rng.permutation(len(self.b)) for _ in range(repeats)])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        a_index = index % len(self.a)
        b_index = int(self._b_index[index])
        b, b_mask = self.b[b_index], self.b_masks[b_index]
        severity = self._severity[b_index]
        if severity != "none":
            rng = np.random.default_rng([self.seed, self.epoch, 1, index])
            draw = draw_affine(severity, b.shape[-1], rng)
            b = apply_affine(b, draw)
            b_mask = apply_affine(b_mask.astype(np.float32), draw, background=0.0) > 0.5
        return {
            "a": torch.from_numpy(np.ascontiguousarray(self.a[a_index]))[None],
            "b": torch.from_numpy(np.ascontiguousarray(b))[None],
            "a_mask": torch.from_numpy(self.a_masks[a_index].astype(np.float32))[None],
            "b_mask": torch.from_numpy(np.asarray(b_mask, dtype=np.float32))[None],
        }


class PairedSlices(Dataset[dict[str, torch.Tensor]]):
    """Co-registered (source, target) slices of the same subject and slice position.

    Only slices usable in both volumes are kept. The mask is the target's foreground.

    Args:
        pairs: (source, target) volumes of the same subjects.
        lesions: per pair, a lesion mask on the model grid, (H, W, D) bool (see
            :func:`common.data.preprocess.preprocess_label`), or None; ``self.lesions`` is then
            (n, H, W), all False for pairs without one, or None when no pair has one.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Volume, Volume]],
        lesions: Sequence[np.ndarray | None] | None = None,
    ):
        sources: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        lesion_slices: list[np.ndarray] = []
        positions: list[tuple[int, int]] = []
        lesions = list(lesions) if lesions is not None else [None] * len(pairs)
        if len(lesions) != len(pairs):
            raise ValueError(f"{len(lesions)} lesion masks for {len(pairs)} pairs")
        for index, ((a, b), lesion) in enumerate(zip(pairs, lesions, strict=True)):
            if a.stack.depth != b.stack.depth or not np.allclose(a.stack.affine, b.stack.affine):
                raise ValueError(
                    f"{a.scan.path} and {b.scan.path} are not on the same grid after "
                    "preprocessing; paired evaluation needs co-registered volumes"
                )
            common_z, ia, ib = np.intersect1d(a.stack.z, b.stack.z, return_indices=True)
            sources.append(a.stack.slices[ia])
            targets.append(b.stack.slices[ib])
            masks.append(b.stack.masks[ib])
            if lesion is not None and lesion.shape != (*b.stack.slices.shape[1:], b.stack.depth):
                raise ValueError(
                    f"lesion mask of shape {lesion.shape} does not match {b.scan.path} on the "
                    f"model grid {(*b.stack.slices.shape[1:], b.stack.depth)}"
                )
            lesion_slices.append(
                np.moveaxis(lesion[:, :, common_z], 2, 0)
                if lesion is not None
                else np.zeros((len(common_z), *b.stack.slices.shape[1:]), dtype=bool)
            )
            positions.extend((index, int(z)) for z in common_z)
        if not positions:
            raise ValueError("no slice position is usable in both volumes of any pair")
        self.a = np.concatenate(sources)
        self.b = np.concatenate(targets)
        self.masks = np.concatenate(masks)
        self.lesions = (
            np.concatenate(lesion_slices) if any(m is not None for m in lesions) else None
        )
        self.positions = positions

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "a": torch.from_numpy(np.ascontiguousarray(self.a[index]))[None],
            "b": torch.from_numpy(np.ascontiguousarray(self.b[index]))[None],
            "mask": torch.from_numpy(self.masks[index].astype(np.float32))[None],
        }
