"""A site's own validation data: part of its weakly paired sessions, held out of training.

Models are chosen on the sites' own validation data, never on a test site (DESIGN.md, data flow 4).
:func:`hold_out` splits a loaded site (:func:`fedsynth.common.data.site.load_site`) into what trains
and what validates, in one of two units:

* **subjects**, when the site has at least :data:`MIN_SUBJECTS` subjects with a paired session:
  ``max(1, round(fraction * subjects))`` subjects (seeded draw) give all their paired sessions
  to validation, and nothing of theirs trains (their unpaired volumes are dropped too, so no
  scan of a validation patient is ever seen in training);
* **slices** otherwise (a site of one to three paired subjects cannot spare a whole one): in
  every paired session, the axial positions usable in both images are cut into contiguous blocks
  of :data:`BLOCK_SLICES` and every k-th block (``k = max(2, round(1 / fraction))``, from an
  offset drawn per session from the seed and the session's file name) validates; its slices
  leave both images' training stacks. Blocks keep neighbouring slices on one side except at
  block borders. A session with fewer than two blocks is not split (it trains whole).

The held-out sub-stacks keep their ``z`` indices, so
:class:`fedsynth.common.data.datasets.PairedSlices` pairs them as it pairs whole volumes. The split
is a function of the site's volumes, ``fraction`` and ``seed`` only. Evaluation of an unseen test
site (:func:`fedsynth.common.evaluation.site_pairs`) never splits anything: callers apply
:func:`hold_out` to training sites only.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from collections.abc import Sequence

import numpy as np

from fedsynth.common.data.datasets import PairedSlices
from fedsynth.common.data.site import SiteData, Volume

logger = logging.getLogger(__name__)

MIN_SUBJECTS = 4  # a site needs this many paired subjects to hold out whole ones
BLOCK_SLICES = 4  # contiguous axial slices per validation block (slice-level split)
_SALT = 0x5EED_0FF  # keeps this module's draws apart from other users of the run's seed


def split_unit(site: SiteData) -> str | None:
    """``"subjects"`` or ``"slices"``: how :func:`hold_out` splits ``site``; None without pairs."""
    if not site.paired:
        return None
    subjects = {a.scan.subject for a, _ in site.paired}
    return "subjects" if len(subjects) >= MIN_SUBJECTS else "slices"


def hold_out(site: SiteData, fraction: float, seed: int) -> SiteData:
    """The site with a validation part of its weakly paired data moved out of ``paired``.

    Args:
        site: a loaded site (its ``validation`` empty).
        fraction: share of the paired data to validate on, in [0, 1); 0 holds nothing out
            (``data.validation_fraction``).
        seed: the run's seed (``training.seed``); the same seed gives the same split.

    Returns:
        A new :class:`SiteData` whose ``paired`` (and, with subject-level splits,
        ``unpaired_a`` / ``unpaired_b``) hold the training part and whose ``validation`` holds
        the (source, target) volumes or sub-stacks to validate on. A site without pairs, or with
        ``fraction`` 0, comes back with no validation. A site already split comes back as it is.

    Raises:
        ValueError: ``fraction`` outside [0, 1).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), found {fraction}")
    if site.validation:
        return site
    unit = split_unit(site)
    if fraction == 0.0 or unit is None:
        return dataclasses.replace(site, validation=[])
    if unit == "subjects":
        held = _by_subject(site, fraction, seed)
    else:
        held = _by_slices(site, fraction, seed)
    logger.info(
        "%s: validating on %d paired position(s) held out by %s (%d of %d session(s) touched), "
        "training on the rest",
        site.name,
        validation_slices(held),
        unit,
        len(held.validation),
        len(site.paired),
    )
    return held


def _by_subject(site: SiteData, fraction: float, seed: int) -> SiteData:
    subjects = sorted({a.scan.subject for a, _ in site.paired})
    count = min(max(1, round(fraction * len(subjects))), len(subjects) - 1)
    order = np.random.default_rng([seed, _SALT, 0]).permutation(len(subjects))
    chosen = {subjects[int(i)] for i in order[:count]}
    return dataclasses.replace(
        site,
        paired=[(a, b) for a, b in site.paired if a.scan.subject not in chosen],
        unpaired_a=[v for v in site.unpaired_a if v.scan.subject not in chosen],
        unpaired_b=[v for v in site.unpaired_b if v.scan.subject not in chosen],
        validation=[(a, b) for a, b in site.paired if a.scan.subject in chosen],
    )


def _by_slices(site: SiteData, fraction: float, seed: int) -> SiteData:
    every = max(2, round(1.0 / fraction))
    training: list[tuple[Volume, Volume]] = []
    validation: list[tuple[Volume, Volume]] = []
    for a, b in site.paired:
        common = np.intersect1d(a.stack.z, b.stack.z)
        if len(common) == 0:
            training.append((a, b))
            continue
        start = int(common.min())
        blocks = np.unique((common - start) // BLOCK_SLICES)
        if len(blocks) < 2:
            training.append((a, b))
            continue
        # One draw per session, keyed by its file: the same session splits the same way
        # whatever else the site holds.
        rng = np.random.default_rng([seed, _SALT, 1, zlib.crc32(a.scan.path.name.encode())])
        offset = int(rng.integers(min(every, len(blocks))))
        held_blocks = blocks[offset::every]
        held_a, held_b = (_in_blocks(v, start, held_blocks) for v in (a, b))
        training.append((_take(a, ~held_a), _take(b, ~held_b)))
        validation.append((_take(a, held_a), _take(b, held_b)))
    return dataclasses.replace(site, paired=training, validation=validation)


def _in_blocks(volume: Volume, start: int, blocks: np.ndarray) -> np.ndarray:
    """Which of the volume's slices fall in the given blocks (counted from ``start``)."""
    z = np.asarray(volume.stack.z)
    return (z >= start) & np.isin((z - start) // BLOCK_SLICES, blocks)


def _take(volume: Volume, keep: np.ndarray) -> Volume:
    """The volume with only the slices where ``keep`` is True (their z indices unchanged)."""
    stack = volume.stack
    sub = dataclasses.replace(
        stack,
        slices=np.ascontiguousarray(stack.slices[keep]),
        masks=np.ascontiguousarray(stack.masks[keep]),
        z=np.asarray(stack.z)[keep],
    )
    return dataclasses.replace(volume, stack=sub)


def validation_pairs(site: SiteData) -> list[tuple[str, PairedSlices]]:
    """The site's validation part grouped per session, as
    :func:`fedsynth.common.evaluation.site_pairs` groups a site's pairs (for
    :func:`fedsynth.common.evaluation.evaluate_pairs`); empty without
    any."""
    grouped = []
    for a, b in site.validation:
        label = a.scan.subject + (f" {a.scan.session}" if a.scan.session else "")
        try:
            grouped.append((label, PairedSlices([(a, b)])))
        except ValueError:  # no slice position usable in both images of this session
            continue
    return grouped


def validation_slices(site: SiteData) -> int:
    """How many paired slice positions the site validates on."""
    return _positions(site.validation)


def _positions(pairs: Sequence[tuple[Volume, Volume]]) -> int:
    return sum(len(np.intersect1d(a.stack.z, b.stack.z)) for a, b in pairs)
