"""One hospital's training data: validated scans of a direction's two domains, as slice stacks.

:func:`load_site` is what a client calls at start-up. It refuses to start on unusable scans
(listing every one, with its reason) unless ``skip_bad`` is set, in which case each skipped file is
logged as a warning and the rest is used. Sessions that hold both modalities become weakly paired
examples, the target brought onto the source's grid (:mod:`fedsynth.common.data.pairing`); the rest
is unpaired. ``data.pairing = "unpaired"`` instead trains as plain CycleGAN did
(:func:`assign_domains`: no subject feeds both domains when the site has two or more subjects), for
comparison; evaluation uses the pairs either way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsynth.common.config import DataConfig
from fedsynth.common.data.discovery import Scan, SiteInventory, discover_site
from fedsynth.common.data.errors import BadScansError, MissingModalityError, ScanError
from fedsynth.common.data.pairing import match_sessions
from fedsynth.common.data.preprocess import GridReference, SliceCache, SliceStack
from fedsynth.common.modalities import Direction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Volume:
    """A usable scan and its slices."""

    scan: Scan
    stack: SliceStack


@dataclass
class SiteData:
    """The preprocessed volumes of a site for one direction.

    ``paired`` holds, per session with both modalities, its (source, target) volumes, the target
    on the source's grid; ``unpaired_a`` / ``unpaired_b`` the volumes of sessions with one of
    them. ``domain_a`` / ``domain_b`` are every source / target volume in weakly paired mode,
    and the subject split of :func:`assign_domains` in unpaired mode. ``validation`` holds the
    (source, target) volumes or sub-stacks held out of training to choose models on (empty as
    loaded; filled by :func:`fedsynth.common.data.validation.hold_out`, which removes them from
    ``paired``).
    """

    name: str
    direction: Direction
    paired: list[tuple[Volume, Volume]]
    unpaired_a: list[Volume] = field(default_factory=list)
    unpaired_b: list[Volume] = field(default_factory=list)
    pairing: str = "weak"
    seed: int = 0
    skipped: list[ScanError] = field(default_factory=list)
    validation: list[tuple[Volume, Volume]] = field(default_factory=list)

    @property
    def domain_a(self) -> list[Volume]:
        return self._domains()[0]

    @property
    def domain_b(self) -> list[Volume]:
        return self._domains()[1]

    def _domains(self) -> tuple[list[Volume], list[Volume]]:
        """Every source and target volume (weak pairing), or the unpaired subject split."""
        if self.pairing != "weak":
            return self._split()
        sources = [a for a, _ in self.paired] + self.unpaired_a
        targets = [b for _, b in self.paired] + self.unpaired_b
        return sources, targets

    def _split(self) -> tuple[list[Volume], list[Volume]]:
        sources = [a for a, _ in self.paired] + self.unpaired_a
        targets = [b for _, b in self.paired] + self.unpaired_b
        side_a, side_b = assign_domains(
            [v.scan.subject for v in sources], [v.scan.subject for v in targets], self.seed
        )
        return (
            [v for v in sources if v.scan.subject in side_a],
            [v for v in targets if v.scan.subject in side_b],
        )

    @property
    def training_pairs(self) -> list[tuple[Volume, Volume]]:
        """The weakly paired volumes training uses (none in unpaired mode)."""
        return list(self.paired) if self.pairing == "weak" else []

    @property
    def training_unpaired(self) -> tuple[list[Volume], list[Volume]]:
        """The A and B volumes training draws unpaired examples from."""
        if self.pairing == "weak":
            return list(self.unpaired_a), list(self.unpaired_b)
        return self._split()

    @property
    def slices_a(self) -> int:
        return sum(len(v.stack) for v in self.domain_a)

    @property
    def slices_b(self) -> int:
        return sum(len(v.stack) for v in self.domain_b)


def assign_domains(
    subjects_a: Sequence[str], subjects_b: Sequence[str], seed: int
) -> tuple[list[str], list[str]]:
    """Split subjects between domain A and domain B for unpaired training.

    Subjects with only one modality go to that side; subjects with both are shuffled (seeded)
    and each joins the side with fewer subjects so far. With a single subject in total, that
    subject feeds both sides (the only way such a site can train; its slices are still drawn
    independently).

    Returns:
        (subjects for A, subjects for B), disjoint whenever two or more subjects exist.
    """
    set_a, set_b = set(subjects_a), set(subjects_b)
    everyone = set_a | set_b
    if len(everyone) == 1:
        return sorted(set_a), sorted(set_b)
    side_a = sorted(set_a - set_b)
    side_b = sorted(set_b - set_a)
    both = sorted(set_a & set_b)
    order = np.random.default_rng(seed).permutation(len(both))
    for index in order:
        subject = both[int(index)]
        (side_a if len(side_a) <= len(side_b) else side_b).append(subject)
    return sorted(side_a), sorted(side_b)


def _load_volume(
    scan: Scan,
    config: DataConfig,
    cache: SliceCache,
    errors: list[ScanError],
    progress: Callable[[Scan], None] | None,
    reference: GridReference | None = None,
) -> Volume | None:
    if progress is not None:
        progress(scan)
    try:
        stack = cache.load(scan.path, scan.modality, config, reference)
    except ScanError as exc:
        errors.append(exc)
        return None
    if len(stack) == 0:
        where = (
            "where it overlaps its session's source scan"
            if reference is not None
            else f"at the model size ({config.image_size} px at {config.spacing_mm} mm)"
        )
        errors.append(
            ScanError(
                scan.path,
                f"no axial slice has {config.min_foreground:.0%} foreground {where}",
            )
        )
        return None
    return Volume(scan, stack)


def load_site(
    root: Path,
    config: DataConfig,
    *,
    cache_dir: Path | None = None,
    seed: int = 0,
    progress: Callable[[Scan], None] | None = None,
) -> SiteData:
    """Discover, validate and preprocess the scans a site needs for ``config.direction``.

    Every source scan is preprocessed on its own grid; a target scan of the same session is
    brought onto that grid (weakly paired), any other target scan keeps its own.

    Raises:
        EmptySiteError: no scans in the folder.
        MissingModalityError: a modality of the direction is absent (or all its scans are bad).
        BadScansError: unusable scans and ``config.skip_bad`` is off.
    """
    direction = Direction.parse(config.direction)
    inventory: SiteInventory = discover_site(root)
    inventory.require(direction)
    cache = SliceCache(cache_dir if cache_dir is not None else config.cache_dir)
    errors: list[ScanError] = []
    match = match_sessions(
        [s for s in inventory.scans if s.modality is direction.source],
        [s for s in inventory.scans if s.modality is direction.target],
    )
    paired: list[tuple[Volume, Volume]] = []
    unpaired_a: list[Volume] = []
    unpaired_b: list[Volume] = []
    references: dict[Path, tuple[Volume, GridReference]] = {}
    for source in sorted({a for a, _ in match.pairs} | set(match.unpaired_sources), key=_path):
        volume = _load_volume(source, config, cache, errors, progress)
        if volume is None:
            continue
        key = cache.key(source.path, source.modality, config)
        references[source.path] = (volume, GridReference.of(volume.stack, key))
    paired_sources: set[Path] = set()
    for source, target in match.pairs:
        found = references.get(source.path)
        reference = found[1] if found is not None else None  # a bad source: target on its own
        volume = _load_volume(target, config, cache, errors, progress, reference)
        if volume is None:
            continue
        if found is None:
            unpaired_b.append(volume)
        else:
            paired.append((found[0], volume))
            paired_sources.add(source.path)
    unpaired_a = [v for path, (v, _) in sorted(references.items()) if path not in paired_sources]
    for target in match.unpaired_targets:
        volume = _load_volume(target, config, cache, errors, progress)
        if volume is not None:
            unpaired_b.append(volume)
    errors.sort(key=lambda e: str(e.path))
    if errors:
        if not config.skip_bad:
            raise BadScansError(errors)
        for error in errors:
            logger.warning("skipping %s", error)

    for modality, found_any in (
        (direction.source, bool(paired or unpaired_a)),
        (direction.target, bool(paired or unpaired_b)),
    ):
        if not found_any:
            raise MissingModalityError(
                f"site {root}: every {modality.value} scan was unusable, so direction "
                f"{direction} cannot train ({len(errors)} file(s) skipped)"
            )
    return SiteData(
        inventory.name,
        direction,
        paired,
        unpaired_a,
        unpaired_b,
        pairing=config.pairing,
        seed=seed,
        skipped=errors,
    )


def _path(scan: Scan) -> str:
    return str(scan.path)
