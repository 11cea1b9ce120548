"""Holding out a site's own validation data: never overlapping training, unit, determinism."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from fedsynth.common.data.datasets import training_set
from fedsynth.common.data.discovery import Scan
from fedsynth.common.data.preprocess import IntensityMapping, SliceStack
from fedsynth.common.data.site import SiteData, Volume
from fedsynth.common.data.validation import (
    BLOCK_SLICES,
    MIN_SUBJECTS,
    hold_out,
    split_unit,
    validation_pairs,
    validation_slices,
)
from fedsynth.common.modalities import Direction, Modality

SIZE = 8


def _volume(subject: str, modality: Modality, z: Sequence[int], session: str = "") -> Volume:
    """A stack whose slice at position z is filled with a value naming (subject, z)."""
    code = int(subject.removeprefix("sub-"))
    slices = np.stack([np.full((SIZE, SIZE), code * 1000 + k, np.float32) for k in z])
    stack = SliceStack(
        slices=slices,
        masks=np.ones((len(z), SIZE, SIZE), dtype=bool),
        z=np.asarray(z, dtype=np.int64),
        mapping=IntensityMapping(0.0, 1.0, "percentile"),
        affine=np.eye(4),
        depth=64,
        foreground_clipped=0.0,
    )
    name = f"{subject}{'_' + session if session else ''}_{modality.value}.nii.gz"
    return Volume(Scan(Path(name), subject, modality, session or None), stack)


def _pair(subject: str, z_a: Sequence[int], z_b: Sequence[int] | None = None, session: str = ""):
    return (
        _volume(subject, Modality.T1W, z_a, session),
        _volume(subject, Modality.T2W, z_a if z_b is None else z_b, session),
    )


def _site(subjects: int, **extra: list[Volume]) -> SiteData:
    pairs = [_pair(f"sub-{i:02d}", range(3 + i, 33 + i)) for i in range(1, subjects + 1)]
    return SiteData("site-x", Direction.parse("T1w->T2w"), pairs, **extra)


def _positions(pairs: Sequence[tuple[Volume, Volume]]) -> set[tuple[str, str, int]]:
    """Every (subject, modality, z) the volumes hold, read from the pixels themselves."""
    out = set()
    for pair in pairs:
        for volume in pair:
            for value in volume.stack.slices[:, 0, 0]:
                out.add(
                    (f"sub-{int(value) // 1000:02d}", volume.scan.modality.value, int(value) % 1000)
                )
    return out


def test_slice_level_split_never_shares_a_slice_and_loses_none() -> None:
    site = _site(2)
    # A source with extra slices where its target has none, and a target missing a slice.
    site.paired.append(_pair("sub-09", range(0, 40), [z for z in range(5, 36) if z != 17]))
    assert split_unit(site) == "slices"
    held = hold_out(site, 0.15, seed=3)

    train, val = _positions(held.paired), _positions(held.validation)
    assert val, "a slice-level split holds something out"
    assert not train & val
    assert train | val == _positions(site.paired)
    # The sub-stacks keep their slice indices (the pixels say which slice they are).
    for a, b in held.paired + held.validation:
        for volume in (a, b):
            assert [int(v) % 1000 for v in volume.stack.slices[:, 0, 0]] == list(volume.stack.z)
    # Held out in contiguous blocks of BLOCK_SLICES positions counted from the first common one.
    for (a, b), (va, vb) in zip(site.paired, held.validation, strict=True):
        start = int(np.intersect1d(a.stack.z, b.stack.z).min())
        blocks = {
            (int(z) - start) // BLOCK_SLICES for z in np.concatenate([va.stack.z, vb.stack.z])
        }
        expected = {
            int(z)
            for z in np.concatenate([a.stack.z, b.stack.z])
            if z >= start and (z - start) // BLOCK_SLICES in blocks
        }
        assert set(va.stack.z) | set(vb.stack.z) == expected
        assert len(blocks) >= 1
    # About the asked share: k = round(1 / 0.15) = 7, one block in seven.
    total = sum(len(np.intersect1d(a.stack.z, b.stack.z)) for a, b in site.paired)
    assert 0.05 < validation_slices(held) / total < 0.3
    # Training draws only from the training part, evaluation only from the validation part.
    dataset = training_set([held])
    assert dataset.paired_count == total - validation_slices(held)
    trained = {float(v) for v in dataset.paired["a"][:, 0, 0]}
    scored = {float(v) for _, p in validation_pairs(held) for v in p.a[:, 0, 0]}
    assert scored and not trained & scored
    assert sum(len(p) for _, p in validation_pairs(held)) == validation_slices(held)


def test_whole_subjects_are_held_out_when_the_site_has_enough() -> None:
    site = _site(
        6,
        unpaired_a=[
            _volume(f"sub-{i:02d}", Modality.T1W, range(5, 20), "ses-2") for i in (1, 2, 3)
        ],
    )
    assert MIN_SUBJECTS == 4 and split_unit(site) == "subjects"
    held = hold_out(site, 0.15, seed=0)
    val_subjects = {a.scan.subject for a, _ in held.validation}
    train_subjects = {a.scan.subject for a, _ in held.paired} | {
        v.scan.subject for v in held.unpaired_a + held.unpaired_b
    }
    assert len(val_subjects) == max(1, round(0.15 * 6))
    assert not val_subjects & train_subjects
    assert val_subjects | {a.scan.subject for a, _ in held.paired} == {
        a.scan.subject for a, _ in site.paired
    }
    # Whole volumes, untouched.
    assert all(len(a.stack) == 30 for a, _ in held.validation)
    assert len(hold_out(site, 0.5, seed=0).validation) == 3


def test_split_is_deterministic_and_follows_the_seed() -> None:
    def chosen(site: SiteData, seed: int) -> tuple:
        held = hold_out(site, 0.2, seed)
        return tuple(sorted(_positions(held.validation)))

    for site in (_site(2), _site(7)):
        assert chosen(site, 5) == chosen(site, 5)
        assert len({chosen(site, seed) for seed in range(12)}) > 1
    # A session splits the same way whatever else the site holds.
    small, large = _site(1), _site(3)
    first = lambda s: _positions(hold_out(s, 0.2, 4).validation[:1])  # noqa: E731
    assert first(small) == first(large)


def test_nothing_is_held_out_without_pairs_or_fraction() -> None:
    site = _site(2)
    assert hold_out(site, 0.0, seed=0).validation == []
    assert hold_out(site, 0.0, seed=0).paired == site.paired
    unpaired = SiteData(
        "site-u",
        Direction.parse("T1w->T2w"),
        [],
        [_volume("sub-01", Modality.T1W, range(10))],
        [_volume("sub-02", Modality.T2W, range(10))],
    )
    assert split_unit(unpaired) is None
    assert hold_out(unpaired, 0.15, seed=0).validation == []
    assert validation_pairs(hold_out(unpaired, 0.15, seed=0)) == []
    # A session of fewer than two blocks trains whole.
    tiny = SiteData("site-t", Direction.parse("T1w->T2w"), [_pair("sub-01", range(3))])
    assert hold_out(tiny, 0.15, seed=0).validation == []
    # Splitting twice changes nothing; a fraction out of range is refused.
    once = hold_out(site, 0.15, seed=0)
    assert hold_out(once, 0.15, seed=1) is once
    with pytest.raises(ValueError, match="fraction"):
        hold_out(site, 1.0, seed=0)


def test_unpaired_mode_trains_on_neither_image_of_a_validation_slice() -> None:
    site = _site(2)
    site.pairing = "unpaired"
    held = hold_out(site, 0.15, seed=1)
    val = {(s, z) for s, _, z in _positions(held.validation)}
    for volume in held.domain_a + held.domain_b:
        subject = volume.scan.subject
        assert not {(subject, int(z)) for z in volume.stack.z} & val
