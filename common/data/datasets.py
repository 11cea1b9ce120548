"""PyTorch datasets over a site's slices: training (weakly paired and unpaired) and evaluation.

:class:`TrainingSlices` is what sites train on: a session's two contrasts at one slice position
(weakly paired), or, for sessions missing a modality, slice ``i`` of domain A with a slice of
domain B chosen by a per-epoch permutation (unpaired; :class:`UnpairedSlices` alone is plain
CycleGAN's sampling). One example is the unit of privacy under slice-level DP-SGD
(``privacy.level = "example"``); :class:`PatientSlices` makes the patient the unit.
Everything random (B's permutation, misalignment) is a function of (seed, epoch, index), so a
run is reproducible and a resumed epoch sees the same examples.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from fedsynth.common.data.misalign import apply_affine, draw_affine
from fedsynth.common.data.site import SiteData, Volume


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
        misalignment: severity name applied to B (see :mod:`fedsynth.common.data.misalign`), or one
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

    Only slices usable in both volumes are kept. The mask is the target's, which is the source
    scan's mask where the target has data (a session's target takes its source's mask,
    :mod:`fedsynth.common.data.pairing`): the region that exists at inference, the same for every
    model.

    Args:
        pairs: (source, target) volumes of the same subjects.
        lesions: per pair, a lesion mask on the model grid, (H, W, D) bool (see
            :func:`fedsynth.common.data.preprocess.preprocess_label`), or None; ``self.lesions`` is
            then (n, H, W), all False for pairs without one, or None when no pair has one.
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


class TrainingSlices(Dataset[dict[str, torch.Tensor]]):
    """A site's training examples: weakly paired slices first, then unpaired ones.

    A weakly paired example is one slice position of one session: the source slice and the target
    slice (on the source's grid, :mod:`fedsynth.common.data.pairing`) where both are usable. With a
    misalignment severity, each image of the pair gets its own random affine, so the pair differs by
    the composition of two draws (as RegGAN trains). An unpaired example takes an A slice of a
    session without a target and a B slice chosen by a per-epoch permutation, as
    :class:`UnpairedSlices`; when only one side has unpaired volumes, its partner is drawn from
    all of the other domain's slices (a subject missing T2w still meets T2w slices, of others).

    Args:
        pairs: (source, target) volumes of the same session, on one grid.
        unpaired_a: source volumes without a target in their session.
        unpaired_b: target volumes without a source in their session.
        misalignment: severity for every example, or one per volume of ``pairs`` followed by
            ``unpaired_a`` and then ``unpaired_b`` (pooled sites misaligned differently).
        augment_gamma: ``g`` of a random gamma ``exp(U(-g, g))`` applied to every source (A)
            image on the [0, 1] scale, drawn per (epoch, example); 0 = off.
        seed: base seed of the B permutation and the affine and gamma draws.

    Items are ``{"a", "b", "a_mask", "b_mask"}`` (each (1, H, W) float32) and ``"paired"``
    (a 0-d float32, 1 for a weakly paired example).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Volume, Volume]],
        unpaired_a: Sequence[Volume] = (),
        unpaired_b: Sequence[Volume] = (),
        *,
        misalignment: str | Sequence[str] = "none",
        augment_gamma: float = 0.0,
        seed: int = 0,
    ):
        volumes = len(pairs) + len(unpaired_a) + len(unpaired_b)
        if volumes == 0:
            raise ValueError("a training set needs at least one volume")
        levels = [misalignment] * volumes if isinstance(misalignment, str) else list(misalignment)
        if len(levels) != volumes:
            raise ValueError(f"{len(levels)} misalignment levels for {volumes} volumes")
        pair_levels = levels[: len(pairs)]
        level_b = levels[len(pairs) + len(unpaired_a) :]

        # Weakly paired: the slice positions usable in both images of a session.
        parts: dict[str, list[np.ndarray]] = {"a": [], "b": [], "a_mask": [], "b_mask": []}
        self.pair_severity: list[str] = []
        self.pair_subjects: list[str] = []
        for (a, b), level in zip(pairs, pair_levels, strict=True):
            if a.stack.depth != b.stack.depth or not np.allclose(a.stack.affine, b.stack.affine):
                raise ValueError(
                    f"{a.scan.path} and {b.scan.path} are not on one grid: a weakly paired "
                    "target must be preprocessed onto its source's grid "
                    "(fedsynth.common.data.pairing)"
                )
            _, ia, ib = np.intersect1d(a.stack.z, b.stack.z, return_indices=True)
            parts["a"].append(a.stack.slices[ia])
            parts["b"].append(b.stack.slices[ib])
            parts["a_mask"].append(a.stack.masks[ia])
            parts["b_mask"].append(b.stack.masks[ib])
            self.pair_severity += [level] * len(ia)
            self.pair_subjects += [a.scan.subject] * len(ia)
        self.paired = {
            key: np.concatenate(value) if value else np.zeros((0, 1, 1), np.float32)
            for key, value in parts.items()
        }

        # Unpaired: the driving side's slices, each with a partner from the other pool.
        all_a = [a for a, _ in pairs] + list(unpaired_a)
        all_b = [b for _, b in pairs] + list(unpaired_b)
        self.unpaired_count = max(_slices(unpaired_a), _slices(unpaired_b))
        self.unpaired_a_subjects = [v.scan.subject for v in unpaired_a]
        self.unpaired_b_subjects = [v.scan.subject for v in unpaired_b]
        pool_a = list(unpaired_a) if unpaired_a else all_a
        pool_b, levels_pool_b = (list(unpaired_b), level_b) if unpaired_b else (all_b, pair_levels)
        self.pool_a_subjects = [v.scan.subject for v in pool_a for _ in v.stack.slices]
        self.pool_b_subjects = [v.scan.subject for v in pool_b for _ in v.stack.slices]
        if self.unpaired_count:
            self.a, self.a_masks = _stack(pool_a)
            self.b, self.b_masks = _stack(pool_b)
            self.b_severity = [
                m for m, v in zip(levels_pool_b, pool_b, strict=True) for _ in v.stack.slices
            ]
        self.augment_gamma = augment_gamma
        self.seed = seed
        self.set_epoch(0)

    @property
    def paired_count(self) -> int:
        return len(self.pair_severity)

    def __len__(self) -> int:
        return self.paired_count + self.unpaired_count

    def set_epoch(self, epoch: int) -> None:
        """Re-draw which B slice meets which unpaired A slice (call once per epoch)."""
        self.epoch = epoch
        if not self.unpaired_count:
            self._b_index = np.zeros(0, dtype=np.int64)
            return
        rng = np.random.default_rng([self.seed, epoch, 0])
        repeats = -(-self.unpaired_count // len(self.b))
        self._b_index = np.concatenate([rng.permutation(len(self.b)) for _ in range(repeats)])

    def max_examples_per_subject(self) -> int:
        """Most examples of one epoch that can hold one subject's slices (group privacy)."""
        counts: dict[str, int] = {}
        for subject in self.pair_subjects:
            counts[subject] = counts.get(subject, 0) + 1
        if self.unpaired_count:
            for pool in (self.pool_a_subjects, self.pool_b_subjects):
                reuse = -(-self.unpaired_count // len(pool))
                for subject in pool:
                    counts[subject] = counts.get(subject, 0) + reuse
        return max(counts.values())

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.item(index)

    def item(self, index: int, key: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Example ``index``; its random draws (affines, gamma) are seeded by ``key`` instead of
        the index when given, so that they do not depend on where the example sits."""
        key = [index] if key is None else list(key)
        if index < self.paired_count:
            item = self._paired_item(index, key)
        else:
            item = self._unpaired_item(index - self.paired_count)
        if self.augment_gamma > 0:
            rng = np.random.default_rng([self.seed, self.epoch, 3, *key])
            gamma = float(np.exp(rng.uniform(-self.augment_gamma, self.augment_gamma)))
            item["a"] = ((item["a"] + 1.0) * 0.5).clamp(0.0, 1.0) ** gamma * 2.0 - 1.0
        return item

    def _paired_item(self, index: int, key: Sequence[int]) -> dict[str, torch.Tensor]:
        images = {name: self.paired[name][index] for name in ("a", "b", "a_mask", "b_mask")}
        severity = self.pair_severity[index]
        if severity != "none":
            rng = np.random.default_rng([self.seed, self.epoch, 2, *key])
            for side in ("a", "b"):  # independent draws: the pair is misaligned both ways
                draw = draw_affine(severity, images[side].shape[-1], rng)
                images[side] = apply_affine(images[side], draw)
                mask = images[f"{side}_mask"].astype(np.float32)
                images[f"{side}_mask"] = apply_affine(mask, draw, background=0.0) > 0.5
        return _item(images, paired=True)

    def _unpaired_item(self, index: int) -> dict[str, torch.Tensor]:
        a_index = index % len(self.a)
        b_index = int(self._b_index[index])
        images = {
            "a": self.a[a_index],
            "b": self.b[b_index],
            "a_mask": self.a_masks[a_index],
            "b_mask": self.b_masks[b_index],
        }
        severity = self.b_severity[b_index]
        if severity != "none":
            rng = np.random.default_rng([self.seed, self.epoch, 1, index])
            draw = draw_affine(severity, images["b"].shape[-1], rng)
            images["b"] = apply_affine(images["b"], draw)
            mask = images["b_mask"].astype(np.float32)
            images["b_mask"] = apply_affine(mask, draw, background=0.0) > 0.5
        return _item(images, paired=False)


class PatientSlices:
    """A site's patients, each with the weakly paired examples only that patient's data makes.

    The unit of patient-level DP-SGD (:mod:`fedsynth.common.privacy`): a Poisson batch draws
    patients, and each drawn patient gives one of its own examples, chosen by :meth:`example`. Every
    session of a subject is the same patient (sessions share ``scan.subject``). Subjects with one
    modality only are left out: their examples pair one patient's slice with another's, so a row
    would carry two people (``left_out`` names them).

    Args:
        examples: the site's training examples; only the weakly paired ones are used.
    """

    def __init__(self, examples: TrainingSlices):
        groups: dict[str, list[int]] = {}
        for index, subject in enumerate(examples.pair_subjects):
            groups.setdefault(subject, []).append(index)
        self.examples = examples
        self.patients = sorted(groups)
        self.rows = [np.asarray(groups[p], dtype=np.int64) for p in self.patients]
        single = {*examples.unpaired_a_subjects, *examples.unpaired_b_subjects}
        self.left_out = sorted(single - set(groups))
        # A patient's draws depend on its own name only: adding or removing another patient
        # leaves them unchanged (what the sensitivity argument and its test rely on).
        self._keys = [zlib.crc32(p.encode("utf-8")) for p in self.patients]

    def __len__(self) -> int:
        return len(self.patients)

    def set_epoch(self, epoch: int) -> None:
        self.examples.set_epoch(epoch)

    def example(self, patient: int, draw: Sequence[int]) -> dict[str, torch.Tensor]:
        """Patient ``patient``'s example for draw ``draw`` (e.g. ``(epoch, step)``): one of its
        own weakly paired slices, uniformly, misaligned and augmented by draws that are a
        function of (seed, draw, patient name, slice) only."""
        key = [self._keys[patient], *draw]
        rng = np.random.default_rng([self.examples.seed, 4, *key])
        rows = self.rows[patient]
        choice = int(rng.integers(len(rows)))
        return self.examples.item(int(rows[choice]), [*key, choice])


def _slices(volumes: Sequence[Volume]) -> int:
    return sum(len(v.stack) for v in volumes)


def _item(images: dict[str, np.ndarray], *, paired: bool) -> dict[str, torch.Tensor]:
    item = {
        key: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))[None]
        for key, value in images.items()
    }
    item["paired"] = torch.tensor(1.0 if paired else 0.0)
    return item


def training_set(
    sites: Sequence[SiteData],
    *,
    misalignment: str | Sequence[str] = "none",
    augment_gamma: float = 0.0,
    seed: int = 0,
) -> TrainingSlices:
    """The training examples of one site, or of several pooled (one misalignment per site)."""
    levels = [misalignment] * len(sites) if isinstance(misalignment, str) else list(misalignment)
    if len(levels) != len(sites):
        raise ValueError(f"{len(levels)} misalignment levels for {len(sites)} sites")
    pairs: list[tuple[Volume, Volume]] = []
    unpaired_a: list[Volume] = []
    unpaired_b: list[Volume] = []
    level_pairs: list[str] = []
    level_a: list[str] = []
    level_b: list[str] = []
    for site, level in zip(sites, levels, strict=True):
        site_a, site_b = site.training_unpaired
        pairs += site.training_pairs
        unpaired_a += site_a
        unpaired_b += site_b
        level_pairs += [level] * len(site.training_pairs)
        level_a += [level] * len(site_a)
        level_b += [level] * len(site_b)
    return TrainingSlices(
        pairs,
        unpaired_a,
        unpaired_b,
        misalignment=[*level_pairs, *level_a, *level_b],
        augment_gamma=augment_gamma,
        seed=seed,
    )
