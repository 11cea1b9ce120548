"""Split a pool of subjects into simulated hospitals, and give each its own heterogeneity.

A *pool* is a list of subjects read from BIDS site folders (phantom or real). A *partitioner*
decides how many subjects each simulated site gets (fixed ratios, Dirichlet(alpha), a power law,
explicit counts) or keeps the real sites as they are (``natural``); :func:`assign` then deals the
subjects out, each to exactly one site. Per site, :func:`hold_out` keeps a few subjects with both
modalities aside as its test set, and :func:`availability` decides which modalities each training
subject brings (``unpaired_fraction`` of them keep only one; a site may lack a domain entirely).
:func:`materialize` writes every simulated site as a BIDS folder of links to the pool's files, so
the ordinary site loader reads it and no image is copied.

Everything random is a function of the seed: the same pool, scheme and seed give the same split.

The rule for a site that lacks a domain: it cannot train a CycleGAN (one side would be empty),
so the split marks it ``excluded``; in a federated run it answers every round with "missing
modality" and the coordinator leaves it out, exactly as a real hospital without T2w would be; it
gets no local-only baseline, and the pooled baseline leaves it out too (the site loader needs
both domains at every site it reads).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsynth.common.data.discovery import discover_site
from fedsynth.common.modalities import Direction
from fedsynth.simulations.results import SiteSplit, SplitSummary

logger = logging.getLogger(__name__)

SCHEMES = ("counts", "ratios", "dirichlet", "power", "natural")
BOTH, ONLY_A, ONLY_B = "AB", "A", "B"
SPLIT_NAME = "split.json"


@dataclass(frozen=True)
class PoolSubject:
    """One subject of the pool: where it lives and which scans it has (modality -> files)."""

    label: str  # BIDS label without "sub-", unique in the pool after :func:`read_pool`
    original: str  # its label in the folder it came from
    origin: str  # the site folder it came from
    root: Path  # that folder
    files: Mapping[str, tuple[Path, ...]]  # modality value -> NIfTI files (sidecars follow)

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(self.files)

    def has(self, direction: Direction) -> bool:
        return {direction.source.value, direction.target.value} <= self.modalities


def read_pool(folders: Sequence[Path]) -> list[PoolSubject]:
    """Every subject of the given site folders; labels that repeat across folders get the
    folder's index as a prefix (``o2s001``) so that no two pool subjects share one."""
    found: list[tuple[int, str, Path, dict[str, list[Path]]]] = []
    for index, folder in enumerate(folders, start=1):
        inventory = discover_site(Path(folder))
        for subject, scans in inventory.by_subject().items():
            files = {m.value: [s.path for s in found_scans] for m, found_scans in scans.items()}
            found.append((index, subject.removeprefix("sub-"), Path(folder), files))
    counts: dict[str, int] = {}
    for _, label, _, _ in found:
        counts[label] = counts.get(label, 0) + 1
    return [
        PoolSubject(
            label=label if counts[label] == 1 else f"o{index}{label}",
            original=label,
            origin=root.name,
            root=root,
            files={m: tuple(paths) for m, paths in files.items()},
        )
        for index, label, root, files in found
    ]


# ----------------------------------------------------------------------------- site sizes


def _check_total(total: int, sites: int, min_size: int) -> None:
    if sites < 1:
        raise ValueError(f"a split needs at least one site, found {sites}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, found {min_size}")
    if total < sites * min_size:
        raise ValueError(
            f"{total} subject(s) cannot give {sites} sites at least {min_size} each "
            f"(need {sites * min_size})"
        )


def largest_remainder(total: int, weights: Sequence[float], min_size: int = 0) -> list[int]:
    """Integer sizes summing to ``total``, each ``>= min_size``, proportional to ``weights``
    (Hamilton's method on what is left after the minimum; ties go to the earlier site)."""
    _check_total(total, len(weights), min_size)
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, found {weights}")
    spare = total - len(w) * min_size
    exact = spare * w / w.sum()
    sizes = np.floor(exact).astype(int)
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order[: spare - int(sizes.sum())]:
        sizes[i] += 1
    return [int(s) + min_size for s in sizes]


def ratio_sizes(total: int, ratios: Sequence[float], min_size: int = 1) -> list[int]:
    """Fixed ratios, e.g. ``[0.4, 0.3, 0.2, 0.1]`` (normalised if they do not sum to 1)."""
    return largest_remainder(total, ratios, min_size)


def dirichlet_sizes(
    total: int, sites: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[int]:
    """Site shares drawn from a symmetric Dirichlet(``alpha``): small alpha, very unequal sites."""
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, found {alpha}")
    _check_total(total, sites, min_size)
    shares = np.random.default_rng([seed, 11]).dirichlet([alpha] * sites)
    return largest_remainder(total, list(shares), min_size)


def power_sizes(total: int, sites: int, exponent: float = 1.0, min_size: int = 1) -> list[int]:
    """A long tail: site ``k`` (1-based) gets a share proportional to ``k ** -exponent``."""
    if exponent < 0:
        raise ValueError(f"exponent must be >= 0, found {exponent}")
    return largest_remainder(total, [k**-exponent for k in range(1, sites + 1)], min_size)


def assign(
    pool: Sequence[PoolSubject], sizes: Sequence[int], seed: int = 0
) -> list[list[PoolSubject]]:
    """Deal a seeded shuffle of the pool out to sites of the given sizes (each subject once)."""
    if any(s < 0 for s in sizes):
        raise ValueError(f"site sizes must be >= 0, found {list(sizes)}")
    if sum(sizes) > len(pool):
        raise ValueError(
            f"sizes {list(sizes)} need {sum(sizes)} subjects, the pool has {len(pool)}"
        )
    order = np.random.default_rng([seed, 12]).permutation(len(pool))
    sites, start = [], 0
    for size in sizes:
        sites.append([pool[int(i)] for i in order[start : start + size]])
        start += size
    return sites


def natural(pool: Sequence[PoolSubject]) -> list[list[PoolSubject]]:
    """Each real site as it is, in the order the folders were given."""
    sites: dict[str, list[PoolSubject]] = {}
    for subject in pool:
        sites.setdefault(str(subject.root), []).append(subject)
    return list(sites.values())


# ----------------------------------------------------------------------------- per-site data


def hold_out(
    subjects: Sequence[PoolSubject], count: int, direction: Direction, seed: int = 0
) -> tuple[list[PoolSubject], list[PoolSubject]]:
    """(training, test): up to ``count`` subjects with both modalities go to the test set, but
    at least one subject always stays for training (a one-subject site has no test set)."""
    eligible = [i for i, s in enumerate(subjects) if s.has(direction)]
    take = max(0, min(count, len(eligible), len(subjects) - 1))
    chosen = set(
        np.random.default_rng([seed, 13]).choice(eligible, size=take, replace=False).tolist()
        if take
        else []
    )
    train = [s for i, s in enumerate(subjects) if i not in chosen]
    test = [s for i, s in enumerate(subjects) if i in chosen]
    return train, test


def availability(
    subjects: Sequence[PoolSubject],
    direction: Direction,
    *,
    unpaired_fraction: float = 0.0,
    missing: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, str]:
    """Which domains each training subject brings: ``"AB"``, ``"A"`` or ``"B"`` (label -> code).

    ``round(unpaired_fraction * n)`` of the subjects that have both modalities keep only one,
    alternately A and B from a seeded start (so the two sides stay balanced); with fraction 1 no
    subject brings both. ``missing`` (``"A"`` and/or ``"B"``) removes a domain from every
    subject of the site. A subject that has only one modality keeps just that one. Unpairing
    never empties a domain: a site whose only subject has both modalities keeps it paired (the
    loader then draws both sides from it, see :func:`fedsynth.common.data.site.assign_domains`).
    """
    if not 0.0 <= unpaired_fraction <= 1.0:
        raise ValueError(f"unpaired_fraction must be in [0, 1], found {unpaired_fraction}")
    bad = [m for m in missing if m not in (ONLY_A, ONLY_B)]
    if bad:
        raise ValueError(f"missing domains must be 'A' or 'B', found {bad}")
    source, target = direction.source.value, direction.target.value
    codes: dict[str, str] = {}
    for s in subjects:
        has = (ONLY_A if source in s.modalities else "") + (
            ONLY_B if target in s.modalities else ""
        )
        codes[s.label] = has
    both = [s.label for s in subjects if codes[s.label] == BOTH]
    rng = np.random.default_rng([seed, 14])
    order = [both[int(i)] for i in rng.permutation(len(both))]
    first = int(rng.integers(2))
    split = math.floor(unpaired_fraction * len(both) + 0.5)
    while True:
        unpaired = dict(codes)
        for k, label in enumerate(sorted(order[:split])):
            unpaired[label] = (ONLY_A, ONLY_B)[(k + first) % 2]
        kept = all(
            any(d in c for c in unpaired.values()) or not any(d in c for c in codes.values())
            for d in (ONLY_A, ONLY_B)
        )
        if kept or split == 0:  # unpairing never takes a domain away from the site
            break
        split -= 1
    codes = unpaired
    for domain in missing:
        codes = {label: code.replace(domain, "") for label, code in codes.items()}
    return codes


# ----------------------------------------------------------------------------- the plan


@dataclass
class SitePlan:
    """One simulated hospital: its training subjects (with what each brings) and test subjects."""

    name: str
    train: list[PoolSubject]
    test: list[PoolSubject]
    domains: dict[str, str]  # training subject label -> "AB" / "A" / "B" / ""
    unpaired_fraction: float = 0.0
    misalignment: str = "none"
    missing: tuple[str, ...] = ()
    scanner: dict[str, Any] = field(default_factory=dict)

    @property
    def subjects_a(self) -> int:
        return sum(ONLY_A in self.domains[s.label] for s in self.train)

    @property
    def subjects_b(self) -> int:
        return sum(ONLY_B in self.domains[s.label] for s in self.train)

    @property
    def excluded(self) -> str | None:
        lacking = [d for d, n in ((ONLY_A, self.subjects_a), (ONLY_B, self.subjects_b)) if n == 0]
        if lacking:
            return f"no domain-{' or '.join(lacking)} scans: cannot train a CycleGAN"
        return None

    def summary(self, slices: Mapping[str, int] | None = None) -> SiteSplit:
        slices = slices or {}
        return SiteSplit(
            site=self.name,
            train_subjects=len(self.train),
            subjects_a=self.subjects_a,
            subjects_b=self.subjects_b,
            slices_a=int(slices.get("a", 0)),
            slices_b=int(slices.get("b", 0)),
            test_subjects=len(self.test),
            test_slices=int(slices.get("test", 0)),
            unpaired_fraction=self.unpaired_fraction,
            misalignment=self.misalignment,
            missing=list(self.missing),
            scanner=dict(self.scanner),
            source=sorted({s.origin for s in [*self.train, *self.test]}),
            excluded=self.excluded,
        )


@dataclass
class SplitPlan:
    scheme: str
    parameters: dict[str, Any]
    seed: int
    pool: str
    direction: Direction
    sites: list[SitePlan]

    def summary(self, slices: Mapping[str, Mapping[str, int]] | None = None) -> SplitSummary:
        slices = slices or {}
        return SplitSummary(
            scheme=self.scheme,
            parameters=self.parameters,
            seed=self.seed,
            pool=self.pool,
            sites=[s.summary(slices.get(s.name)) for s in self.sites],
        )


def _per_site(value: Any, sites: int, name: str, default: Any) -> list[Any]:
    if value is None:
        return [default] * sites
    if isinstance(value, (list, tuple)):
        if len(value) != sites:
            raise ValueError(f"{name} lists {len(value)} sites, the split has {sites}")
        return list(value)
    return [value] * sites


def site_sizes(
    scheme: str,
    total: int,
    sites: int,
    *,
    counts: Sequence[int] | None = None,
    ratios: Sequence[float] | None = None,
    alpha: float = 0.5,
    exponent: float = 1.0,
    min_size: int = 1,
    seed: int = 0,
) -> list[int]:
    """How many subjects each site gets under ``scheme`` (not for ``natural``)."""
    if scheme == "counts":
        if counts is None or len(counts) != sites:
            raise ValueError(f"scheme 'counts' needs {sites} counts, found {counts}")
        if any(c < min_size for c in counts):
            raise ValueError(f"every count must be >= {min_size}, found {list(counts)}")
        return [int(c) for c in counts]
    if scheme == "ratios":
        if ratios is None or len(ratios) != sites:
            raise ValueError(f"scheme 'ratios' needs {sites} ratios, found {ratios}")
        return ratio_sizes(total, ratios, min_size)
    if scheme == "dirichlet":
        return dirichlet_sizes(total, sites, alpha, seed, min_size)
    if scheme == "power":
        return power_sizes(total, sites, exponent, min_size)
    raise ValueError(f"unknown split scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


def plan_split(
    groups: Sequence[Sequence[PoolSubject]],
    direction: Direction,
    *,
    scheme: str,
    parameters: Mapping[str, Any] | None = None,
    seed: int = 0,
    pool: str = "phantom",
    holdout: int = 1,
    unpaired_fraction: float | Sequence[float] = 0.0,
    misalignment: str | Sequence[str] = "none",
    missing: Sequence[str] | None = None,
    scanners: Sequence[Mapping[str, Any]] | None = None,
) -> SplitPlan:
    """Turn per-site subject groups (from :func:`assign` or :func:`natural`) into a plan.

    ``missing``: per site, ``""``, ``"A"``, ``"B"`` or ``"AB"``: domains that site lacks.
    """
    n = len(groups)
    fractions = _per_site(unpaired_fraction, n, "unpaired_fraction", 0.0)
    severities = _per_site(misalignment, n, "misalignment", "none")
    lacks = _per_site(list(missing) if missing is not None else None, n, "missing_domain", "")
    scanner_list = list(scanners) if scanners is not None else [{}] * n
    sites = []
    for k, group in enumerate(groups):
        name = f"site-{k + 1}"
        train, test = hold_out(group, holdout, direction, seed=seed + k)
        gone = tuple(d for d in (ONLY_A, ONLY_B) if d in str(lacks[k]).upper())
        domains = availability(
            train, direction, unpaired_fraction=float(fractions[k]), missing=gone, seed=seed + k
        )
        sites.append(
            SitePlan(
                name=name,
                train=list(train),
                test=test,
                domains=domains,
                unpaired_fraction=float(fractions[k]),
                misalignment=str(severities[k]),
                missing=gone,
                scanner=dict(scanner_list[k]),
            )
        )
    return SplitPlan(
        scheme=scheme,
        parameters=dict(parameters or {}),
        seed=seed,
        pool=pool,
        direction=direction,
        sites=sites,
    )


# ----------------------------------------------------------------------------- on disk


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(source.resolve())
    except OSError:  # file systems without links: copy (the pool stays the reference)
        shutil.copy2(source, target)


def _sidecars(path: Path) -> list[Path]:
    stem = path.name.removesuffix(".gz").removesuffix(".nii")
    return [p for p in path.parent.glob(f"{stem}.*") if p != path and p.suffix == ".json"]


def _renamed(relative: Path, old: str, new: str) -> Path:
    return Path(*(part.replace(f"sub-{old}", f"sub-{new}") for part in relative.parts))


def _write_subject(subject: PoolSubject, modalities: Sequence[str], out: Path) -> None:
    old, new = subject.original, subject.label
    for modality in modalities:
        for path in subject.files.get(modality, ()):
            for file in (path, *_sidecars(path)):
                _link(file, out / _renamed(file.relative_to(subject.root), old, new))
    # The phantom's lesion masks (derivatives/<pipeline>/sub-*/anat/...) serve evaluation.
    for mask in subject.root.glob(f"derivatives/*/sub-{old}/**/*_label-lesion_mask.nii*"):
        _link(mask, out / _renamed(mask.relative_to(subject.root), old, new))


def _write_site(
    folder: Path, name: str, subjects: Sequence[tuple[PoolSubject, Sequence[str]]]
) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    description = {
        "Name": f"fedsynth simulated {name}",
        "BIDSVersion": "1.9.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "fedsynth.simulations.partition"}],
    }
    (folder / "dataset_description.json").write_text(json.dumps(description, indent=2) + "\n")
    rows = ["participant_id\torigin"]
    for subject, modalities in subjects:
        _write_subject(subject, modalities, folder)
        rows.append(f"sub-{subject.label}\t{subject.origin}")
    (folder / "participants.tsv").write_text("\n".join(rows) + "\n")


def materialize(plan: SplitPlan, out_dir: Path) -> dict[str, tuple[Path, Path | None]]:
    """Write ``out_dir/train/site-k`` and ``out_dir/test/site-k`` (links to the pool's files)
    and ``out_dir/split.json``; return site name -> (training folder, test folder or None)."""
    out_dir = Path(out_dir)
    source, target = plan.direction.source.value, plan.direction.target.value
    folders: dict[str, tuple[Path, Path | None]] = {}
    for site in plan.sites:
        train_dir = out_dir / "train" / site.name
        wanted = [
            (
                s,
                [
                    m
                    for m, code in ((source, ONLY_A), (target, ONLY_B))
                    if code in site.domains[s.label]
                ],
            )
            for s in site.train
        ]
        _write_site(train_dir, site.name, wanted)
        test_dir: Path | None = None
        if site.test:
            test_dir = out_dir / "test" / site.name
            _write_site(test_dir, site.name, [(s, [source, target]) for s in site.test])
        elif (out_dir / "test" / site.name).exists():
            shutil.rmtree(out_dir / "test" / site.name)
        folders[site.name] = (train_dir, test_dir)
    record = {
        "scheme": plan.scheme,
        "parameters": plan.parameters,
        "seed": plan.seed,
        "pool": plan.pool,
        "direction": str(plan.direction),
        "sites": [
            {
                "site": s.name,
                "train": {t.label: s.domains[t.label] for t in s.train},
                "test": [t.label for t in s.test],
                "unpaired_fraction": s.unpaired_fraction,
                "misalignment": s.misalignment,
                "missing": list(s.missing),
                "excluded": s.excluded,
            }
            for s in plan.sites
        ],
    }
    (out_dir / SPLIT_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return folders
