"""Find a hospital's scans: BIDS (``sub-*/[ses-*/]anat/sub-*_<suffix>.nii[.gz]``) or plain folders.

Two layouts are understood:

* BIDS: ``sub-<label>/[ses-<label>/]{anat,pet}/sub-<label>[_<key>-<value>...]_<suffix>.nii[.gz]``
  with suffixes ``T1w``, ``T2w``, ``FLAIR``, ``PD``, ``ct`` and ``pet``; a ``ce-<agent>`` entity
  marks a contrast-enhanced T1w. ``derivatives/`` and other suffixes (masks, segmentations) are
  ignored.
* plain: ``<MODALITY>/<subject>.nii[.gz]`` (``T1w/p01.nii.gz``, ``T2w/p01.nii.gz``); the same file
  stem under two modality folders is the same subject.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedsynth.common.data.errors import EmptySiteError, MissingModalityError
from fedsynth.common.modalities import Direction, Modality

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
BIDS_SUFFIXES = {
    "T1w": Modality.T1W,
    "T2w": Modality.T2W,
    "FLAIR": Modality.FLAIR,
    "PD": Modality.PD,
    "PDw": Modality.PD,
    "ct": Modality.CT,
    "CT": Modality.CT,
    "pet": Modality.PET,
}


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


@dataclass(frozen=True)
class Scan:
    """One image file of one subject in one modality."""

    path: Path
    subject: str
    modality: Modality
    session: str | None = None
    entities: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """Short human name: ``sub-01 ses-1 T1w``."""
        parts = [self.subject]
        if self.session:
            parts.append(self.session)
        parts.append(self.modality.value)
        return " ".join(parts)


@dataclass
class SiteInventory:
    """Every scan found in one hospital's folder."""

    root: Path
    layout: str
    scans: list[Scan] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.root.name

    def modalities(self) -> list[Modality]:
        present = {s.modality for s in self.scans}
        return [m for m in Modality if m in present]

    def subjects(self) -> list[str]:
        return sorted({s.subject for s in self.scans})

    def scans_of(self, modality: Modality) -> list[Scan]:
        return [s for s in self.scans if s.modality is modality]

    def by_subject(self) -> dict[str, dict[Modality, list[Scan]]]:
        table: dict[str, dict[Modality, list[Scan]]] = defaultdict(lambda: defaultdict(list))
        for scan in self.scans:
            table[scan.subject][scan.modality].append(scan)
        return {k: dict(v) for k, v in sorted(table.items())}

    def require(self, direction: Direction) -> None:
        """Raise :class:`MissingModalityError` unless both modalities of ``direction`` exist."""
        present = self.modalities()
        missing = [m for m in (direction.source, direction.target) if m not in present]
        if missing:
            found = ", ".join(m.value for m in present) or "nothing"
            names = " and ".join(m.value for m in missing)
            raise MissingModalityError(
                f"site {self.root}: direction {direction} needs {names} scans, "
                f"but the site has none (found: {found})"
            )


def bids_modality(suffix: str, entity_keys: Iterable[str] = ()) -> Modality | None:
    """The modality a BIDS suffix names; a ``ce-`` entity turns T1w into contrast-enhanced T1w."""
    modality = BIDS_SUFFIXES.get(suffix)
    if modality is Modality.T1W and "ce" in set(entity_keys):
        return Modality.T1W_CE
    return modality


def _parse_bids_name(path: Path) -> tuple[dict[str, str], str] | None:
    parts = nifti_stem(path).split("_")
    if len(parts) < 2 or not parts[0].startswith("sub-"):
        return None
    entities: dict[str, str] = {}
    for part in parts[:-1]:
        key, sep, value = part.partition("-")
        if not sep:
            return None
        entities[key] = value
    return entities, parts[-1]


def _bids_scans(root: Path) -> list[Scan]:
    scans: list[Scan] = []
    for subject_dir in sorted(p for p in root.glob("sub-*") if p.is_dir()):
        datatype_dirs = [*subject_dir.glob("anat"), *subject_dir.glob("pet")]
        datatype_dirs += [*subject_dir.glob("ses-*/anat"), *subject_dir.glob("ses-*/pet")]
        for folder in sorted(datatype_dirs):
            for path in sorted(p for p in folder.iterdir() if is_nifti(p)):
                parsed = _parse_bids_name(path)
                if parsed is None:
                    logger.warning(
                        "ignoring %s: not a BIDS file name (sub-<label>_..._<suffix>)", path
                    )
                    continue
                entities, suffix = parsed
                modality = bids_modality(suffix, entities)
                if modality is None:
                    logger.debug("ignoring %s: suffix %r is not an imaging modality", path, suffix)
                    continue
                subject = f"sub-{entities['sub']}"
                if subject != subject_dir.name:
                    logger.warning(
                        "ignoring %s: its name says %s but it sits in %s",
                        path,
                        subject,
                        subject_dir.name,
                    )
                    continue
                session = f"ses-{entities['ses']}" if "ses" in entities else None
                extra = tuple(
                    sorted((k, v) for k, v in entities.items() if k not in ("sub", "ses"))
                )
                scans.append(Scan(path, subject, modality, session, extra))
    return scans


def _plain_scans(root: Path) -> list[Scan]:
    scans: list[Scan] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            modality = Modality.parse(folder.name)
        except ValueError:
            continue
        for path in sorted(p for p in folder.iterdir() if is_nifti(p)):
            scans.append(Scan(path, nifti_stem(path), modality))
    return scans


def find_lesion_mask(root: Path, subject: str, session: str | None = None) -> Path | None:
    """A subject's lesion mask in the site's BIDS derivatives, if there is one.

    Looks for ``derivatives/<pipeline>/<subject>/[<session>/]anat/`` then
    ``<subject>*_label-lesion_mask.nii[.gz]`` (the phantom's layout, BIDS' convention for masks).
    """
    folder = f"{subject}/{session}/anat" if session else f"{subject}/anat"
    found = sorted(Path(root).glob(f"derivatives/*/{folder}/{subject}*_label-lesion_mask.nii*"))
    return found[0] if found else None


def discover_site(root: Path) -> SiteInventory:
    """List every scan of a site folder.

    Raises:
        EmptySiteError: the folder is missing, not a folder, or holds no scans in either layout.
    """
    root = Path(root)
    if not root.exists():
        raise EmptySiteError(f"site folder {root} does not exist")
    if not root.is_dir():
        raise EmptySiteError(f"site folder {root} is not a folder")
    if any(p.is_dir() for p in root.glob("sub-*")):
        inventory = SiteInventory(root, "bids", _bids_scans(root))
    else:
        inventory = SiteInventory(root, "plain", _plain_scans(root))
    if not inventory.scans:
        raise EmptySiteError(
            f"no NIfTI scans found in {root}: expected BIDS "
            "(sub-*/[ses-*/]anat/sub-*_T1w.nii.gz, _T2w, _FLAIR, _PD, _ct; "
            "sub-*/pet/sub-*_pet.nii.gz) "
            "or plain modality folders (T1w/*.nii.gz, T2w/*.nii.gz, ...)"
        )
    return inventory
