"""Partitioners: sizes add up, no subject in two sites, no subject on both sides when unpaired,
the same seed gives the same split, and a materialized site is a folder the loader reads."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsynth.common.config import DataConfig
from fedsynth.common.data.site import assign_domains, load_site
from fedsynth.common.modalities import Direction
from fedsynth.simulations.partition import (
    ONLY_A,
    ONLY_B,
    PoolSubject,
    assign,
    availability,
    dirichlet_sizes,
    hold_out,
    largest_remainder,
    materialize,
    natural,
    plan_split,
    power_sizes,
    ratio_sizes,
    read_pool,
    site_sizes,
)

DIRECTION = Direction.parse("T1w->T2w")


def fake_pool(n: int, paired: float = 1.0, origins: int = 1) -> list[PoolSubject]:
    """Subjects without files: the first ``paired * n`` have both modalities, the rest T1w."""
    pool = []
    for i in range(n):
        modalities = ("T1w", "T2w") if i < round(paired * n) else ("T1w",)
        root = Path(f"/pool/origin-{i % origins}")
        pool.append(
            PoolSubject(
                label=f"p{i:03d}",
                original=f"p{i:03d}",
                origin=root.name,
                root=root,
                files={m: (root / f"sub-p{i:03d}_{m}.nii.gz",) for m in modalities},
            )
        )
    return pool


sizes_args = st.integers(1, 12).flatmap(
    lambda sites: st.tuples(
        st.just(sites),
        st.integers(sites, 200),
        st.lists(st.floats(0.01, 10.0), min_size=sites, max_size=sites),
    )
)


@given(sizes_args)
@settings(max_examples=150, deadline=None)
def test_largest_remainder_adds_up_and_is_proportional(args: tuple[int, int, list[float]]) -> None:
    sites, total, weights = args
    sizes = largest_remainder(total, weights, min_size=1)
    assert sum(sizes) == total
    assert min(sizes) >= 1
    exact = (total - sites) * np.asarray(weights) / sum(weights)
    assert np.all(np.abs(np.asarray(sizes) - 1 - exact) < 1.0)


def test_ratio_sizes_by_hand() -> None:
    # 22 subjects, 1 each first, 18 left: exact 7.2, 5.4, 3.6, 1.8 -> floors 7, 5, 3, 1 (16),
    # the two largest remainders (0.8 of site 4, 0.6 of site 3) get one more.
    assert ratio_sizes(22, [0.4, 0.3, 0.2, 0.1]) == [8, 6, 5, 3]
    assert ratio_sizes(10, [4, 3, 2, 1], min_size=0) == [4, 3, 2, 1]


@given(st.integers(1, 20), st.integers(0, 300), st.floats(0.05, 20.0), st.integers(0, 99))
@settings(max_examples=150, deadline=None)
def test_dirichlet_sizes(sites: int, extra: int, alpha: float, seed: int) -> None:
    total = sites + extra
    sizes = dirichlet_sizes(total, sites, alpha, seed=seed)
    assert sum(sizes) == total and min(sizes) >= 1 and len(sizes) == sites
    assert sizes == dirichlet_sizes(total, sites, alpha, seed=seed)


def test_dirichlet_alpha_sets_the_imbalance() -> None:
    def spread(alpha: float) -> float:
        return float(np.mean([np.std(dirichlet_sizes(400, 8, alpha, seed=s)) for s in range(30)]))

    assert spread(0.1) > 2 * spread(100.0)


@given(st.integers(1, 50), st.integers(0, 500), st.floats(0.0, 3.0))
@settings(max_examples=150, deadline=None)
def test_power_sizes_are_a_long_tail(sites: int, extra: int, exponent: float) -> None:
    sizes = power_sizes(sites + extra, sites, exponent)
    assert sum(sizes) == sites + extra and min(sizes) >= 1
    # Non-increasing up to the rounding of one subject.
    assert all(a >= b - 1 for a, b in itertools.pairwise(sizes))


def test_sizes_refuse_impossible_splits() -> None:
    with pytest.raises(ValueError, match="cannot give 5 sites at least 1"):
        ratio_sizes(4, [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_sizes(10, 2, 0.0)
    with pytest.raises(ValueError, match="unknown split scheme"):
        site_sizes("zipf", 10, 2)
    with pytest.raises(ValueError, match="needs 3 ratios"):
        site_sizes("ratios", 10, 3, ratios=[0.5, 0.5])


@given(st.integers(1, 10).flatmap(lambda k: st.lists(st.integers(0, 8), min_size=k, max_size=k)))
@settings(max_examples=150, deadline=None)
def test_assign_puts_every_subject_in_one_site(sizes: list[int]) -> None:
    pool = fake_pool(sum(sizes) + 3)
    sites = assign(pool, sizes, seed=4)
    assert [len(s) for s in sites] == sizes
    labels = [s.label for site in sites for s in site]
    assert len(labels) == len(set(labels))  # no subject in two sites
    assert set(labels) <= {s.label for s in pool}
    assert [[s.label for s in site] for site in assign(pool, sizes, seed=4)] == [
        [s.label for s in site] for site in sites
    ]


def test_natural_keeps_the_real_sites() -> None:
    pool = fake_pool(7, origins=3)
    groups = natural(pool)
    assert [len(g) for g in groups] == [3, 2, 2]
    assert all(len({s.root for s in g}) == 1 for g in groups)


@given(st.integers(1, 12), st.integers(0, 4), st.floats(0.0, 1.0), st.integers(0, 50))
@settings(max_examples=150, deadline=None)
def test_hold_out(n: int, count: int, paired: float, seed: int) -> None:
    subjects = fake_pool(n, paired=paired)
    train, test = hold_out(subjects, count, DIRECTION, seed=seed)
    assert len(train) >= 1 and len(train) + len(test) == n
    assert not {s.label for s in train} & {s.label for s in test}
    assert all(s.has(DIRECTION) for s in test)
    eligible = sum(s.has(DIRECTION) for s in subjects)
    assert len(test) == min(count, eligible, n - 1)


@given(st.integers(1, 30), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(0, 50))
@settings(max_examples=200, deadline=None)
def test_availability(n: int, paired: float, fraction: float, seed: int) -> None:
    subjects = fake_pool(n, paired=paired)
    codes = availability(subjects, DIRECTION, unpaired_fraction=fraction, seed=seed)
    both = sum(s.has(DIRECTION) for s in subjects)
    split = int(np.floor(fraction * both + 0.5))
    paired_left = sum(c == "AB" for c in codes.values())
    # Unpairing stops one subject short only where it would empty a domain (B: the T1w-only
    # subjects of fake_pool bring A, so only B can run out).
    assert paired_left in (both - split, both - split + 1)
    assert any("A" in c for c in codes.values()) and (
        both == 0 or any("B" in c for c in codes.values())
    )
    if paired_left == both - split + 1:
        assert split >= 1
    only_b = sum(c == ONLY_B for c in codes.values())
    only_a_unpaired = sum(c == ONLY_A for c in codes.values()) - (n - both)
    assert abs(only_a_unpaired - only_b) <= 1  # the unpaired ones alternate A / B
    for s in subjects:  # nobody gains a modality
        if not s.has(DIRECTION):
            assert codes[s.label] == ONLY_A
    if fraction == 1.0 and both >= 2:
        assert "AB" not in codes.values()


def test_a_one_subject_site_stays_paired() -> None:
    codes = availability(fake_pool(1), DIRECTION, unpaired_fraction=1.0)
    assert codes == {"p000": "AB"}


def test_fully_unpaired_site_has_no_subject_on_both_sides() -> None:
    subjects = fake_pool(9)
    codes = availability(subjects, DIRECTION, unpaired_fraction=1.0, seed=1)
    side_a, side_b = assign_domains(
        [k for k, c in codes.items() if ONLY_A in c],
        [k for k, c in codes.items() if ONLY_B in c],
        0,
    )
    assert not set(side_a) & set(side_b)
    assert len(side_a) + len(side_b) == 9


def test_a_site_without_domain_b_is_excluded_not_crashed() -> None:
    groups = assign(fake_pool(8), [5, 3], seed=0)
    plan = plan_split(groups, DIRECTION, scheme="counts", missing=["", "B"], holdout=1)
    first, second = plan.sites
    assert first.excluded is None
    assert second.subjects_b == 0 and second.excluded is not None and "B" in second.excluded
    assert second.summary().excluded == second.excluded


def test_per_site_options_must_match_the_site_count() -> None:
    groups = assign(fake_pool(6), [3, 3])
    with pytest.raises(ValueError, match="misalignment lists 3 sites, the split has 2"):
        plan_split(groups, DIRECTION, scheme="counts", misalignment=["none", "slight", "severe"])


def test_materialized_sites_load_and_keep_subjects_apart(make_site, tmp_path: Path) -> None:
    # Two real-looking sites whose labels collide (sub-01 in both).
    one = make_site(
        "hosp-a", {f"sub-0{i}": ["T1w", "T2w"] for i in range(1, 5)}, shape=(24, 26, 20)
    )
    two = make_site("hosp-b", {"sub-01": ["T1w", "T2w"], "sub-09": ["T1w"]}, shape=(24, 26, 20))
    pool = read_pool([one, two])
    assert len({s.label for s in pool}) == 6  # colliding labels were prefixed
    groups = assign(pool, ratio_sizes(len(pool), [0.5, 0.5]), seed=3)
    plan = plan_split(groups, DIRECTION, scheme="ratios", unpaired_fraction=1.0, seed=3)
    folders = materialize(plan, tmp_path / "split")
    again = json.loads((tmp_path / "split" / "split.json").read_text())
    data = DataConfig(spacing_mm=(4.0, 4.0, 4.0), image_size=16, min_foreground=0.05)
    seen: set[str] = set()
    for site in plan.sites:
        train_dir, test_dir = folders[site.name]
        assert test_dir is not None and len(site.test) == 1
        loaded = load_site(train_dir, data, cache_dir=tmp_path / "cache")
        subjects_a = {v.scan.subject for v in loaded.domain_a}
        subjects_b = {v.scan.subject for v in loaded.domain_b}
        assert not subjects_a & subjects_b  # unpaired: nobody on both sides
        assert not loaded.paired  # and nobody brings both scans
        test = load_site(test_dir, data, cache_dir=tmp_path / "cache")
        assert {v.scan.subject for v in test.domain_a} | {v.scan.subject for v in test.domain_b}
        names = subjects_a | subjects_b | {a.scan.subject for a, _ in test.paired}
        assert not names & seen  # no subject in two sites
        seen |= names
    assert len(seen) == 6
    # Same seed, same split (and the record on disk says so).
    plan_again = plan_split(
        assign(read_pool([one, two]), ratio_sizes(6, [0.5, 0.5]), seed=3),
        DIRECTION,
        scheme="ratios",
        unpaired_fraction=1.0,
        seed=3,
    )
    materialize(plan_again, tmp_path / "split")
    assert json.loads((tmp_path / "split" / "split.json").read_text()) == again
