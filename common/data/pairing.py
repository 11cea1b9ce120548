"""Which scans of a site form weakly paired examples, and which stay unpaired.

A hospital mostly holds several contrasts of one session: the same head, minutes apart, each
contrast on its own grid and moved a little between sequences. Those are *weakly paired*: the
same anatomy at the same world position, up to that head motion. This is the case RegGAN
(Kong et al., NeurIPS 2021) and FedMed-ATL were built for, and the strongest signal a site has.
A subject (or session) that misses a modality is *unpaired*, the case CycleGAN is for. A site can
hold both (FedMed-GAN's "mixed" mode).

Pairing comes from the data, never from a flag: a source scan and a target scan pair when they share
subject and session. The target is then brought onto the source's model grid through the two scanner
affines (:class:`fedsynth.common.data.preprocess.GridReference`; no registration step), and takes
the source's mask, so their slice indices name the same world position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fedsynth.common.data.discovery import Scan

__all__ = ["SessionMatch", "match_sessions"]


@dataclass(frozen=True)
class SessionMatch:
    """The scans of one direction at a site, matched by (subject, session).

    Attributes:
        pairs: (source, target) scans of the same session: weakly paired examples.
        unpaired_sources: source scans whose session has no target scan.
        unpaired_targets: target scans whose session has no source scan.
    """

    pairs: list[tuple[Scan, Scan]] = field(default_factory=list)
    unpaired_sources: list[Scan] = field(default_factory=list)
    unpaired_targets: list[Scan] = field(default_factory=list)


def match_sessions(sources: Sequence[Scan], targets: Sequence[Scan]) -> SessionMatch:
    """Pair every target scan with the source scan of its session.

    A session with several source scans (two T1w runs) uses the first by path as its reference;
    the others are unpaired sources. Every target scan of a session with a source pairs with that
    reference. The result's lists are sorted by path, so the pairing is deterministic.
    """
    reference: dict[tuple[str, str | None], Scan] = {}
    extra: list[Scan] = []
    for scan in sorted(sources, key=lambda s: str(s.path)):
        key = (scan.subject, scan.session)
        if key in reference:
            extra.append(scan)
        else:
            reference[key] = scan
    match = SessionMatch(unpaired_sources=extra)
    matched: set[tuple[str, str | None]] = set()
    for scan in sorted(targets, key=lambda s: str(s.path)):
        key = (scan.subject, scan.session)
        if key in reference:
            match.pairs.append((reference[key], scan))
            matched.add(key)
        else:
            match.unpaired_targets.append(scan)
    match.unpaired_sources.extend(s for k, s in reference.items() if k not in matched)
    match.unpaired_sources.sort(key=lambda s: str(s.path))
    return match
