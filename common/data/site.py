"""One hospital's training data: validated scans of a direction's two domains, as slice stacks.

:func:`load_site` is what a client calls at start-up. It refuses to start on unusable scans
(listing every one, with its reason) unless ``skip_bad`` is set, in which case each skipped file
is logged as a warning and the rest is used. It also decides which subjects feed which domain
(:func:`assign_domains`): in unpaired mode no subject feeds both domains when the site has two or
more subjects, so that nothing in training can rely on a hidden pairing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import DataConfig
from common.data.discovery import Scan, SiteInventory, discover_site
from common.data.errors import BadScansError, MissingModalityError, ScanError
from common.data.preprocess import SliceCache, SliceStack
from common.modalities import Direction, Modality

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Volume:
    """A usable scan and its slices."""

    scan: Scan
    stack: SliceStack


@dataclass
class SiteData:
    """The preprocessed volumes of a site for one direction.

    ``domain_a`` / ``domain_b`` are the volumes training draws from (subjects split per
    :func:`assign_domains` in unpaired mode); ``paired`` holds, per subject that has both
    modalities, its (source, target) volumes for paired evaluation.
    """

    name: str
    direction: Direction
    domain_a: list[Volume]
    domain_b: list[Volume]
    paired: list[tuple[Volume, Volume]]
    skipped: list[ScanError] = field(default_factory=list)

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


def _load_volumes(
    scans: Sequence[Scan],
    config: DataConfig,
    cache: SliceCache,
    errors: list[ScanError],
    progress: Callable[[Scan], None] | None,
) -> list[Volume]:
    volumes = []
    for scan in scans:
        if progress is not None:
            progress(scan)
        try:
            stack = cache.load(scan.path, scan.modality, config)
        except ScanError as exc:
            errors.append(exc)
            continue
        if len(stack) == 0:
            errors.append(
                ScanError(
                    scan.path,
                    f"no axial slice has {config.min_foreground:.0%} foreground at the model "
                    f"size ({config.image_size} px at {config.spacing_mm} mm)",
                )
            )
            continue
        volumes.append(Volume(scan, stack))
    return volumes


def load_site(
    root: Path,
    config: DataConfig,
    *,
    cache_dir: Path | None = None,
    seed: int = 0,
    progress: Callable[[Scan], None] | None = None,
) -> SiteData:
    """Discover, validate and preprocess the scans a site needs for ``config.direction``.

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
    wanted = [s for s in inventory.scans if s.modality in (direction.source, direction.target)]
    volumes = _load_volumes(wanted, config, cache, errors, progress)
    if errors:
        if not config.skip_bad:
            raise BadScansError(errors)
        for error in errors:
            logger.warning("skipping %s", error)

    by_modality: dict[Modality, list[Volume]] = {direction.source: [], direction.target: []}
    for volume in volumes:
        by_modality[volume.scan.modality].append(volume)
    for modality, found in by_modality.items():
        if not found:
            raise MissingModalityError(
                f"site {root}: every {modality.value} scan was unusable, so direction "
                f"{direction} cannot train ({len(errors)} file(s) skipped)"
            )

    sources, targets = by_modality[direction.source], by_modality[direction.target]
    paired = [
        (a, b)
        for a in sources
        for b in targets
        if a.scan.subject == b.scan.subject and a.scan.session == b.scan.session
    ]
    if config.paired:
        domain_a = [a for a, _ in paired]
        domain_b = [b for _, b in paired]
    else:
        side_a, side_b = assign_domains(
            [v.scan.subject for v in sources], [v.scan.subject for v in targets], seed
        )
        domain_a = [v for v in sources if v.scan.subject in side_a]
        domain_b = [v for v in targets if v.scan.subject in side_b]
    return SiteData(inventory.name, direction, domain_a, domain_b, paired, errors)
