"""Making an experiment's split: the pool (the phantom consortium or real sites), the split plan
dealt from it (:mod:`fedsynth.simulations.partition`), and each site's training slices."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsynth.common.config import RunConfig
from fedsynth.common.data.errors import BadScansError, ScanError
from fedsynth.common.data.site import load_site
from fedsynth.common.modalities import Direction
from fedsynth.common.phantom import draw_site_scanner, generate_consortium
from fedsynth.simulations.errors import ExperimentError
from fedsynth.simulations.partition import (
    PoolSubject,
    SitePlan,
    SplitPlan,
    assign,
    natural,
    plan_split,
    read_pool,
    site_sizes,
)

logger = logging.getLogger(__name__)

SEVERITY_ORDER = ("none", "slight", "moderate", "severe")


def most_severe(levels: Sequence[str]) -> str:
    """The most severe of some misalignment levels."""
    return max(levels, key=SEVERITY_ORDER.index)


@dataclass
class Split:
    """A made split: its plan, each site's folders and training slices, the sites that cannot
    train.

    Attributes:
        plan: the split plan.
        folders: site name -> (its training folder, its test folder or None).
        slices: site name -> model-scale training slices per domain (``a``, ``b``).
        unusable: site name -> why it cannot train (unusable files).
    """

    plan: SplitPlan
    folders: dict[str, tuple[Path, Path | None]]
    slices: dict[str, dict[str, int]]
    unusable: dict[str, str]

    @property
    def trainable(self) -> list[SitePlan]:
        """The sites that can train: both domains, and no unusable files."""
        return [s for s in self.plan.sites if s.excluded is None and s.name not in self.unusable]

    @property
    def misalignment(self) -> list[str]:
        """Every site's misalignment level, in the plan's order."""
        return [s.misalignment for s in self.plan.sites]

    def train_dir(self, name: str) -> Path:
        """The training folder of site ``name``."""
        return self.folders[name][0]

    def examples(self, name: str) -> int:
        """Site ``name``'s training examples: the larger domain's slices."""
        return max(self.slices[name]["a"], self.slices[name]["b"])


def site_folders(plan: SplitPlan, split_dir: Path) -> dict[str, tuple[Path, Path | None]]:
    """Each site's training folder and test folder (None: no test subjects) under ``split_dir``."""
    return {
        s.name: (
            split_dir / "train" / s.name,
            split_dir / "test" / s.name if s.test else None,
        )
        for s in plan.sites
    }


@dataclass
class _Pool:
    """The subjects grouped into sites, ready to plan: how, from what, and the scanners."""

    groups: list[list[PoolSubject]]
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    scanners: list[dict[str, Any]] | None = None


def _sizes(config: RunConfig, scheme: str, total: int) -> list[int]:
    sim = config.simulation
    return site_sizes(
        scheme,
        total,
        sim.num_sites,
        counts=sim.subjects,
        ratios=sim.ratios,
        alpha=sim.alpha,
        exponent=sim.power_exponent,
        min_size=sim.min_subjects,
        seed=sim.seed,
    )


def _real_pool(config: RunConfig, scheme: str, pool_sites: Sequence[Path]) -> _Pool:
    """The real sites' subjects: kept as they are (``natural``) or dealt anew."""
    sim = config.simulation
    pool = read_pool(pool_sites)
    parameters: dict[str, Any] = {}
    if scheme == "natural":
        groups = natural(pool)
    else:
        sizes = _sizes(config, scheme, min(sim.total_subjects or len(pool), len(pool)))
        groups = assign(pool, sizes, seed=sim.seed)
        parameters["sizes"] = sizes
    return _Pool(groups, ", ".join(Path(p).name for p in pool_sites), parameters)


def _phantom_pool(
    config: RunConfig,
    scheme: str,
    direction: Direction,
    pool_root: Path,
    echo: Callable[[str], None],
) -> _Pool:
    """The phantom consortium, one scanner per site (generated unless ``pool_root`` holds it)."""
    sim = config.simulation
    if scheme == "natural":
        raise ExperimentError(
            "simulation.partition = 'natural' needs real sites (--site); the phantom has "
            "no natural split: use 'counts', 'ratios', 'dirichlet' or 'power'"
        )
    sizes = _sizes(config, scheme, sim.total_subjects or sum(sim.subjects))
    # Each site's test subjects are extra phantom subjects of the same scanner.
    counts = [n + sim.holdout_subjects for n in sizes]
    _generate_phantom(config, direction, counts, pool_root, echo)
    pool = read_pool([pool_root / f"site-{k}" for k in range(1, len(counts) + 1)])
    return _Pool(natural(pool), "phantom", {"sizes": sizes}, _scanners(config, len(counts)))


def _generate_phantom(
    config: RunConfig,
    direction: Direction,
    counts: list[int],
    pool_root: Path,
    echo: Callable[[str], None],
) -> None:
    """Generate the phantom consortium in ``pool_root`` unless its ``pool.json`` matches."""
    sim = config.simulation
    record = pool_root / "pool.json"
    modalities = [direction.source.value, direction.target.value]
    wanted = {
        "sizes": counts,
        "seed": sim.seed,
        "voxel_mm": sim.phantom_voxel_mm,
        "modalities": modalities,
        "scanners": sim.scanners,
    }
    if not record.exists() or json.loads(record.read_text(encoding="utf-8")) != wanted:
        echo(f"  phantom: {len(counts)} sites, {sum(counts)} subjects -> {pool_root}")
        generate_consortium(
            pool_root,
            sites=len(counts),
            subjects=counts,
            seed=sim.seed,
            modalities=modalities,
            voxel_size=sim.phantom_voxel_mm,
            overwrite=True,
            shared_scanner=sim.scanners == "shared",
        )
        record.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")


def _scanners(config: RunConfig, sites: int) -> list[dict[str, Any]]:
    """Each phantom site's scanner, as the split records it."""
    sim = config.simulation
    scanners = []
    for k in range(1, sites + 1):
        scanner = draw_site_scanner(
            sim.seed, 1 if sim.scanners == "shared" else k, sim.phantom_voxel_mm
        )
        scanners.append(
            {
                "field_strength_t": scanner.field_strength_t,
                "voxel_size_mm": [round(v, 2) for v in scanner.voxel_size_mm],
            }
        )
    return scanners


def make_split(
    config: RunConfig,
    folder: Path,
    pool_sites: Sequence[Path],
    *,
    pool_dir: Path | None = None,
    echo: Callable[[str], None] = print,
) -> SplitPlan:
    """Build (or rebuild, deterministically) the pool and the split plan; link the sites."""
    sim = config.simulation
    direction = Direction.parse(config.data.direction)
    scheme = sim.partition
    if scheme == "auto":
        scheme = "natural" if pool_sites else "counts"
    if pool_sites:
        pool = _real_pool(config, scheme, pool_sites)
    else:
        pool = _phantom_pool(config, scheme, direction, pool_dir or folder / "pool", echo)
    knob = {"ratios": "ratios", "dirichlet": "alpha", "power": "power_exponent"}.get(scheme)
    if knob is not None:
        pool.parameters[knob] = getattr(sim, knob)
    return plan_split(
        pool.groups,
        direction,
        scheme=scheme,
        parameters=pool.parameters,
        seed=sim.seed,
        pool=pool.name,
        holdout=sim.holdout_subjects,
        unpaired_fraction=sim.unpaired_fraction,
        misalignment=config.data.misalignment if sim.misalignment is None else sim.misalignment,
        missing=sim.missing_domain,
        scanners=pool.scanners,
    )


def count_slices(
    config: RunConfig, folders: Mapping[str, tuple[Path, Path | None]], cache: Path
) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """Model-scale training slices per site and domain (the preprocessing is cached for the
    runs); a site that cannot load (it lacks a domain, or holds unusable files with
    ``data.skip_bad`` off) counts zero.

    Returns:
        The counts, and per site with unusable files the reason it cannot train (in the
        federation it answers every round so; local and pooled training leave it out).
    """
    counts: dict[str, dict[str, int]] = {}
    unusable: dict[str, str] = {}
    for name, (train_dir, _) in folders.items():
        counts[name] = {"a": 0, "b": 0}
        try:
            site = load_site(train_dir, config.data, cache_dir=cache, seed=config.training.seed)
            counts[name] = {"a": site.slices_a, "b": site.slices_b}
        except BadScansError as exc:
            logger.warning("%s: %s", name, exc)
            unusable[name] = exc.summary
        except (ScanError, ValueError) as exc:
            logger.info("%s: %s", name, exc)
    return counts, unusable


def split_lines(sites: Sequence[Any]) -> list[str]:
    """The split as a table, one line per site, for the terminal."""
    lines = ["  site      train  A    B    slices A/B   test  misalign  note"]
    for s in sites:
        note = s.excluded or ""
        lines.append(
            f"  {s.site:<9} {s.train_subjects:<6} {s.subjects_a:<4} {s.subjects_b:<4} "
            f"{s.slices_a:>4}/{s.slices_b:<6}  {s.test_subjects:<5} {s.misalignment:<9} {note}"
        )
    return lines
