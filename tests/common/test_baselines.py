"""The naive baselines and their mergeable statistics, against plain numpy / loop computations:
the lookup table is the per-bin mean, merged sites equal the concatenated data, the constant is
the mean target inside the mask, histogram matching from a histogram is within one bin of the
sample-quantile version; statistics survive JSON and checkpoint metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedsynth.common.baselines import (
    BASELINE_NAMES,
    CONSTANT,
    DEFAULT_BINS,
    HISTOGRAM,
    LOOKUP_TABLE,
    ConstantBaseline,
    HistogramMatcher,
    IntensityStats,
    LookupTableBaseline,
    baseline_statistics,
    bin_centres,
    fit_baselines,
    site_intensity_stats,
    site_statistics,
)
from fedsynth.common.config import DataConfig
from tests.conftest import SiteMaker

DATA = DataConfig(
    direction="T1w->T2w", spacing_mm=(4.0, 4.0, 4.0), image_size=16, min_foreground=0.05
)


Pair = tuple[np.ndarray, np.ndarray, np.ndarray]


def fake_site(
    seed: int, subjects: int = 2, shape: tuple[int, int, int] = (5, 12, 12)
) -> list[Pair]:
    """Paired (source, target, mask) volumes: target = 0.6 - 1.2 source^2 plus noise."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(subjects):
        source = np.clip(rng.normal(0.0, 0.45, shape), -1, 1)
        target = np.clip(0.6 - 1.2 * source**2 + rng.normal(0, 0.05, shape), -1, 1)
        mask = rng.random(shape) > 0.3
        pairs.append((source, target, mask))
    return pairs


def loop_table(pairs: list[Pair], bins: int) -> tuple[dict[int, float], dict[int, int]]:
    """Per source bin, the sum and count of target values, one voxel at a time."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    width = 2.0 / bins
    for source, target, mask in pairs:
        for s, t, m in zip(source.ravel(), target.ravel(), mask.ravel(), strict=True):
            if not m:
                continue
            k = min(int((s + 1.0) // width), bins - 1)
            sums[k] = sums.get(k, 0.0) + float(t)
            counts[k] = counts.get(k, 0) + 1
    return sums, counts


def test_lookup_table_is_the_per_bin_mean_and_fills_empty_bins_from_neighbours() -> None:
    bins = 32
    # Sources within [-0.9, 0.9] with a gap around 0.2: empty bins at both ends and inside.
    pairs = [
        (np.clip(np.where(np.abs(s - 0.2) < 0.1, s + 0.2, s), -0.9, 0.9), t, m)
        for s, t, m in fake_site(0)
    ]
    stats = site_intensity_stats(pairs, bins=bins)
    sums, counts = loop_table(pairs, bins)
    assert {k: int(c) for k, c in enumerate(stats.pair_counts) if c} == counts
    table = LookupTableBaseline.from_stats(stats).table
    centres = [-1.0 + (k + 0.5) * 2.0 / bins for k in range(bins)]
    filled = sorted(counts)
    assert filled[0] > 0 and filled[-1] < bins - 1
    assert len(filled) < filled[-1] - filled[0] + 1  # a gap inside, filled by interpolation
    for k in range(bins):
        if k in counts:
            expected = sums[k] / counts[k]
        else:  # nearest filled neighbours, linear in the bin centres; the end value beyond
            left = [j for j in filled if j < k]
            right = [j for j in filled if j > k]
            if not left:
                expected = sums[right[0]] / counts[right[0]]
            elif not right:
                expected = sums[left[-1]] / counts[left[-1]]
            else:
                a, b = left[-1], right[0]
                w = (centres[k] - centres[a]) / (centres[b] - centres[a])
                expected = (1 - w) * sums[a] / counts[a] + w * sums[b] / counts[b]
        assert table[k] == pytest.approx(expected, abs=1e-12), k
    # Applied: the table's value at a bin centre, linear in between, background outside.
    lut = LookupTableBaseline.from_stats(stats)
    probe = np.array([[[centres[10], (centres[10] + centres[11]) / 2, 0.3]]])
    mask = np.array([[[True, True, False]]])
    out = lut(probe, mask)
    assert out.shape == probe.shape and out.dtype == np.float32
    assert out[0, 0, 0] == pytest.approx(table[10], abs=1e-6)
    assert out[0, 0, 1] == pytest.approx((table[10] + table[11]) / 2, abs=1e-6)
    assert out[0, 0, 2] == -1.0
    # Below the first centre: the first value, not an extrapolation.
    assert lut(np.array([[[-1.0]]]), np.array([[[True]]]))[0, 0, 0] == pytest.approx(table[0])


def test_lookup_table_learns_the_relation_it_is_given() -> None:
    """On a noiseless relation the table reproduces it between bin centres (to the curvature
    error of linear interpolation on 256 bins)."""
    rng = np.random.default_rng(3)
    source = rng.uniform(-1, 1, (16, 64, 64))
    target = np.sin(2.0 * source)  # not monotone: histogram matching could not follow it
    mask = np.ones(source.shape, bool)
    lut = LookupTableBaseline.from_stats(site_intensity_stats([(source, target, mask)]))
    probe = rng.uniform(-0.99, 0.99, (1, 8, 8))
    np.testing.assert_allclose(lut(probe, np.ones(probe.shape, bool)), np.sin(2 * probe), atol=3e-3)


def test_merging_two_sites_equals_the_statistics_of_their_data_together() -> None:
    site_1, site_2 = fake_site(1), fake_site(2, subjects=3)
    targets_1 = [(t, m) for _, t, m in site_1]
    targets_2 = [(t, m) for _, t, m in site_2] + [(np.full((2, 12, 12), 0.5), np.ones((2, 12, 12)))]
    stats_1 = site_intensity_stats(site_1, targets_1)
    stats_2 = site_intensity_stats(site_2, targets_2)
    merged = stats_1 + stats_2
    together = site_intensity_stats(site_1 + site_2, targets_1 + targets_2)
    np.testing.assert_array_equal(merged.pair_counts, together.pair_counts)
    np.testing.assert_array_equal(merged.target_counts, together.target_counts)
    np.testing.assert_allclose(merged.pair_sums, together.pair_sums, rtol=1e-12, atol=1e-12)
    assert merged.target_sum == pytest.approx(together.target_sum, rel=1e-12)
    assert (merged.sites, merged.pairs, merged.volumes) == (2, 5, 6)
    # Commutative, and the empty statistics are neutral.
    other = stats_2.merge(stats_1)
    np.testing.assert_allclose(other.pair_sums, merged.pair_sums, rtol=1e-12)
    alone = IntensityStats.merge_all([stats_1])
    np.testing.assert_array_equal(alone.pair_counts, stats_1.pair_counts)
    assert alone.sites == 1
    with pytest.raises(ValueError, match="256 and 32 bins"):
        stats_1.merge(site_intensity_stats(site_2, bins=32))


def test_constant_is_the_mean_target_inside_the_mask() -> None:
    pairs = fake_site(4)
    diagonal = np.broadcast_to(np.eye(12, dtype=bool), (2, 12, 12)).copy()
    extra = (np.linspace(-1, 1, 2 * 12 * 12).reshape(2, 12, 12), diagonal)
    targets = [(t, m) for _, t, m in pairs] + [extra]
    stats = site_intensity_stats(pairs, targets)
    expected = np.mean(np.concatenate([t[np.asarray(m, bool)] for t, m in targets]))
    constant = ConstantBaseline.from_stats(stats)
    assert constant.value == pytest.approx(expected, abs=1e-12)
    source, _, mask = pairs[0]
    out = constant(source, mask)
    assert np.all(out[mask] == np.float32(expected)) and np.all(out[~mask] == -1.0)


def test_histogram_matching_from_a_histogram_is_within_a_bin_of_the_sample_version() -> None:
    """Quantiles from a histogram assume the mass uniform within each bin, so each reference
    quantile, and so each matched value, is within one bin width (2 / bins) of the sample's."""
    rng = np.random.default_rng(5)
    reference = np.clip(rng.gamma(2.0, 0.2, size=50_000) - 1.0, -1, 1)
    reference[:2000] = 0.35  # a spike: a whole quantile range inside one bin
    mask = np.ones(reference.shape, bool)
    stats = site_intensity_stats([], [(reference, mask)])
    width = 2.0 / DEFAULT_BINS
    from_samples = HistogramMatcher(reference)
    from_histogram = HistogramMatcher.from_stats(stats)
    np.testing.assert_allclose(from_histogram.reference, from_samples.reference, atol=width)
    source = rng.normal(0.0, 0.3, size=(3, 40, 40))
    inside = np.zeros(source.shape, bool)
    inside[:, 5:35, 5:35] = True
    matched, expected = from_histogram(source, inside), from_samples(source, inside)
    np.testing.assert_allclose(matched[inside], expected[inside], atol=width + 1e-6)
    assert np.all(matched[~inside] == -1.0)
    # The end quantiles are the first and last filled bins' outer edges.
    edges = np.linspace(-1, 1, DEFAULT_BINS + 1)
    filled = np.flatnonzero(stats.target_counts)
    assert from_histogram.reference[0] == pytest.approx(edges[filled[0]])
    assert from_histogram.reference[-1] == pytest.approx(edges[filled[-1] + 1])


def test_statistics_round_trip_through_json_and_refuse_bad_records() -> None:
    stats = site_intensity_stats(fake_site(6))
    record = json.loads(json.dumps(stats.to_dict()))
    back = IntensityStats.from_dict(record)
    np.testing.assert_array_equal(back.pair_counts, stats.pair_counts)
    np.testing.assert_array_equal(back.pair_sums, stats.pair_sums)  # repr of floats is exact
    np.testing.assert_array_equal(back.target_counts, stats.target_counts)
    assert back.target_sum == stats.target_sum and back.pairs == 2
    with pytest.raises(ValueError, match="not intensity statistics"):
        IntensityStats.from_dict({"kind": "other"})
    with pytest.raises(ValueError, match="pair_sums has shape"):
        IntensityStats.from_dict({**record, "pair_sums": record["pair_sums"][:-1]})
    with pytest.raises(ValueError, match="negative counts"):
        IntensityStats.from_dict({**record, "target_counts": [-1] * DEFAULT_BINS})
    with pytest.raises(ValueError, match="record says 128"):
        IntensityStats.from_dict({**record, "bins": 128})
    with pytest.raises(ValueError, match="without 'target_sum'"):
        IntensityStats.from_dict({k: v for k, v in record.items() if k != "target_sum"})


def test_no_pair_no_lookup_table_but_the_others_fit() -> None:
    rng = np.random.default_rng(7)
    target = rng.uniform(-1, 1, (2, 8, 8))
    stats = site_intensity_stats([], [(target, np.ones(target.shape, bool))])
    fitted, skipped = fit_baselines(stats)
    assert list(fitted) == [CONSTANT, HISTOGRAM] and list(skipped) == [LOOKUP_TABLE]
    assert "no paired voxel" in skipped[LOOKUP_TABLE]
    fitted, skipped = fit_baselines(site_intensity_stats(fake_site(8)))
    assert list(fitted) == list(BASELINE_NAMES) and not skipped
    _, empty = fit_baselines(IntensityStats.empty())
    assert set(empty) == set(BASELINE_NAMES)


def test_a_sites_statistics_come_from_its_paired_slices_and_target_volumes(
    make_site: SiteMaker, tmp_path: Path
) -> None:
    from fedsynth.common.data.datasets import PairedSlices
    from fedsynth.common.data.site import load_site

    root = make_site(
        "s", {"sub-01": ["T1w", "T2w"], "sub-02": ["T1w", "T2w"], "sub-03": ["T2w"]}, (24, 26, 20)
    )
    site = load_site(root, DATA, cache_dir=tmp_path / "cache")
    stats = site_statistics(site)
    assert stats.pairs == 2 and stats.volumes == 3
    paired = [PairedSlices([pair]) for pair in site.paired]
    assert stats.paired_voxels == sum(int(p.masks.sum()) for p in paired)
    targets = {str(b.scan.path): b for _, b in site.paired} | {
        str(v.scan.path): v for v in site.domain_b
    }
    assert len(targets) == 3  # the T2w-only subject counts in the target histogram
    assert stats.target_voxels == sum(int(v.stack.masks.sum()) for v in targets.values())
    expected = np.concatenate([v.stack.slices[v.stack.masks] for v in targets.values()])
    assert ConstantBaseline.from_stats(stats).value == pytest.approx(
        expected.astype(np.float64).mean(), abs=1e-12
    )
    record = baseline_statistics([site, site])
    assert record["sites"] == 2 and sum(record["pair_counts"]) == 2 * stats.paired_voxels
    # On the synthetic head (T1w shell dark, T2w shell bright) the table inverts the contrast,
    # which histogram matching cannot (see test_evaluation).
    (a, b) = site.paired[0]
    pair = PairedSlices([(a, b)])
    lut = LookupTableBaseline.from_stats(stats)(pair.a, pair.masks)
    error_lut = np.abs(lut - pair.b)[pair.masks].mean()
    matched = HistogramMatcher.from_stats(stats)(pair.a, pair.masks)
    error_matched = np.abs(matched - pair.b)[pair.masks].mean()
    assert error_lut < 0.5 * error_matched


def test_checkpoint_metadata_carries_statistics_and_old_checkpoints_still_load(
    tmp_path: Path,
) -> None:
    from fedsynth.common.checkpoint import (
        METADATA_NAME,
        CheckpointError,
        CheckpointMetadata,
        read_metadata,
    )
    from fedsynth.common.config import ModelConfig

    record = site_intensity_stats(fake_site(9)).to_dict()
    meta = CheckpointMetadata(
        kind="local", direction="T1w->T2w", model=ModelConfig(), data=DATA, baselines=record
    )
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / METADATA_NAME).write_text(meta.model_dump_json())
    back = read_metadata(folder)
    assert back.baselines is not None
    np.testing.assert_array_equal(
        IntensityStats.from_dict(back.baselines).pair_counts, record["pair_counts"]
    )
    old = json.loads(meta.model_dump_json())
    del old["baselines"]  # a checkpoint written before the field existed
    (folder / METADATA_NAME).write_text(json.dumps(old))
    assert read_metadata(folder).baselines is None
    (folder / METADATA_NAME).write_text(json.dumps({**old, "baselines": {"kind": "x"}}))
    with pytest.raises(CheckpointError, match=r"baselines.*not intensity statistics"):
        read_metadata(folder)


def test_bin_centres_cover_the_model_scale() -> None:
    centres = bin_centres(4)
    np.testing.assert_allclose(centres, [-0.75, -0.25, 0.25, 0.75])
