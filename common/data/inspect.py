"""``fedsynth inspect``: what a site folder holds and which synthesis directions it can train.

For every scan: shape, spacing, orientation codes, intensity range, and how many axial slices
survive preprocessing at the configured spacing and model size. Unusable files are listed with
the reason. The verdict names the directions the site can train (both modalities usable) and
those it can also evaluate with true pairs (a subject with both). Per direction it counts the
training examples: weakly paired (a session's two contrasts at one slice position, the target
brought onto the source's grid, :mod:`fedsynth.common.data.pairing`) and unpaired.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsynth.common.config import DataConfig
from fedsynth.common.data.discovery import Scan, discover_site
from fedsynth.common.data.errors import ScanError, scan_failures
from fedsynth.common.data.loading import ScanLimits, read_scan
from fedsynth.common.data.pairing import match_sessions
from fedsynth.common.data.preprocess import GridReference, SliceStack, preprocess_scan
from fedsynth.common.modalities import Direction, Modality

CLIP_WARNING = 0.02  # warn when more foreground than this falls outside the model's view


@dataclass
class ScanReport:
    """What inspection found for one scan; ``error`` is set when it is unusable."""

    scan: Scan
    shape: tuple[int, ...] | None = None
    spacing: tuple[float, float, float] | None = None
    axcodes: str | None = None
    intensity: tuple[float, float, float, float] | None = None  # min, p1, p99, max
    usable_slices: int | None = None
    foreground_clipped: float | None = None
    error: str | None = None
    hint: str | None = None
    stack: SliceStack | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.usable_slices)


@dataclass(frozen=True)
class DirectionExamples:
    """What one direction would train on at this site (see :class:`TrainingSlices`)."""

    direction: Direction
    paired_sessions: int
    paired_examples: int
    unpaired_examples: int


@dataclass
class SiteReport:
    root: Path
    layout: str
    scans: list[ScanReport]
    directions: list[Direction] = field(default_factory=list)
    paired_directions: list[Direction] = field(default_factory=list)
    examples: list[DirectionExamples] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def bad(self) -> list[ScanReport]:
        return [r for r in self.scans if r.error is not None]

    @property
    def subjects(self) -> list[str]:
        return sorted({r.scan.subject for r in self.scans})


def inspect_scan(scan: Scan, config: DataConfig) -> ScanReport:
    """Read, check and preprocess one scan; any failure is this scan's verdict, never raised."""
    report = ScanReport(scan)
    try:
        with scan_failures(scan.path, "inspecting"):
            _inspect(scan, config, report)
    except ScanError as exc:
        report.error, report.hint = exc.reason, exc.hint
        report.stack = None
    return report


def _inspect(scan: Scan, config: DataConfig, report: ScanReport) -> None:
    loaded = read_scan(scan.path, ScanLimits.of(config), config.spacing_mm)
    data = loaded.data
    report.shape = tuple(int(n) for n in data.shape)
    report.spacing = loaded.zooms
    report.axcodes = loaded.axcodes
    p1, p99 = (float(v) for v in np.percentile(data, [1, 99]))
    report.intensity = (float(data.min()), p1, p99, float(data.max()))
    del data
    stack = preprocess_scan(loaded, scan.modality, config)
    del loaded  # one volume at a time: only the model-sized slices stay
    report.stack = stack
    report.usable_slices = len(stack)
    report.foreground_clipped = stack.foreground_clipped
    if len(stack) == 0:
        report.error = (
            f"no axial slice has {config.min_foreground:.0%} foreground at "
            f"{config.image_size} px and {config.spacing_mm} mm"
        )


def inspect_site(
    root: Path, config: DataConfig, progress: Callable[[Scan], None] | None = None
) -> SiteReport:
    """Inspect every scan of a site folder.

    Raises:
        EmptySiteError: the folder holds no scans.
    """
    inventory = discover_site(root)
    reports = []
    for scan in inventory.scans:
        if progress is not None:
            progress(scan)
        reports.append(inspect_scan(scan, config))
    site = SiteReport(inventory.root, inventory.layout, reports)

    usable: dict[Modality, set[tuple[str, str | None]]] = {}
    for r in reports:
        if r.ok:
            usable.setdefault(r.scan.modality, set()).add((r.scan.subject, r.scan.session))
    for source, target in itertools.permutations([m for m in Modality if m in usable], 2):
        direction = Direction(source, target)
        site.directions.append(direction)
        if usable[source] & usable[target]:
            site.paired_directions.append(direction)
        site.examples.append(count_examples(direction, reports, config))

    if len(site.subjects) == 1:
        site.warnings.append(
            "one subject only: in unpaired training both domains come from it "
            "(slices are still drawn independently)"
        )
    for r in reports:
        if r.foreground_clipped is not None and r.foreground_clipped > CLIP_WARNING:
            site.warnings.append(
                f"{r.scan.path.name}: {r.foreground_clipped:.1%} of the foreground lies outside "
                "the "
                f"model's {config.image_size} px x {config.spacing_mm[0]:g} mm field of view"
            )
    return site


def count_examples(
    direction: Direction, reports: list[ScanReport], config: DataConfig
) -> DirectionExamples:
    """Weakly paired and unpaired training examples of ``direction`` over the usable scans.

    A pair's examples are the slice positions usable in both the source and the target brought
    onto the source's grid (the target is preprocessed again for that).
    """
    ok = [r for r in reports if r.ok and r.stack is not None]
    stacks = {r.scan.path: r.stack for r in ok}
    match = match_sessions(
        [r.scan for r in ok if r.scan.modality is direction.source],
        [r.scan for r in ok if r.scan.modality is direction.target],
    )
    paired = 0
    for source, target in match.pairs:
        source_stack = stacks[source.path]
        assert source_stack is not None
        reference = GridReference.of(source_stack, key=str(source.path))
        try:
            onto = preprocess_scan(target.path, target.modality, config, reference)
        except ScanError:
            continue
        paired += len(np.intersect1d(source_stack.z, onto.z))

    def slices(scans: list[Scan]) -> int:
        return sum(len(stack) for s in scans if (stack := stacks[s.path]) is not None)

    unpaired = max(slices(match.unpaired_sources), slices(match.unpaired_targets))
    return DirectionExamples(direction, len(match.pairs), paired, unpaired)
