"""Imaging modalities, their BIDS names, and synthesis directions (``T1w->T2w``)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Modality(StrEnum):
    """A contrast a site can hold. The value is the BIDS suffix (plus entity where needed)."""

    T1W = "T1w"
    T1W_CE = "T1w-ce"  # contrast-enhanced T1w: BIDS ``sub-X_ce-gd_T1w``
    T2W = "T2w"
    FLAIR = "FLAIR"
    PD = "PD"
    CT = "ct"
    PET = "pet"

    @property
    def is_mr(self) -> bool:
        return self not in (Modality.CT, Modality.PET)

    @property
    def bids_datatype(self) -> str:
        """BIDS folder the modality lives in (``anat`` or ``pet``)."""
        return "pet" if self is Modality.PET else "anat"

    @property
    def bids_stem(self) -> str:
        """File-name tail after ``sub-X_`` (without extension), e.g. ``ce-gd_T1w``."""
        return "ce-gd_T1w" if self is Modality.T1W_CE else self.value

    @classmethod
    def parse(cls, text: str) -> Modality:
        """Case-insensitive lookup that accepts common spellings (``t1``, ``T1c``, ``CT``)."""
        key = text.strip().lower().replace("_", "-")
        aliases = {
            "t1": cls.T1W,
            "t1w": cls.T1W,
            "t1c": cls.T1W_CE,
            "t1ce": cls.T1W_CE,
            "t1w-ce": cls.T1W_CE,
            "ce-gd-t1w": cls.T1W_CE,
            "t1gd": cls.T1W_CE,
            "t2": cls.T2W,
            "t2w": cls.T2W,
            "flair": cls.FLAIR,
            "pd": cls.PD,
            "pdw": cls.PD,
            "ct": cls.CT,
            "pet": cls.PET,
        }
        if key not in aliases:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown modality {text!r}; allowed: {allowed}")
        return aliases[key]


@dataclass(frozen=True)
class Direction:
    """A synthesis direction: domain A (source) -> domain B (target)."""

    source: Modality
    target: Modality

    @classmethod
    def parse(cls, text: str) -> Direction:
        """Parse ``"T1w->T2w"`` (also ``T1w:T2w``, ``T1w2T2w`` is not accepted: ambiguous)."""
        for sep in ("->", ":", ","):
            if sep in text:
                left, right = text.split(sep, 1)
                break
        else:
            raise ValueError(f"direction {text!r} must look like 'T1w->T2w'")
        source, target = Modality.parse(left), Modality.parse(right)
        if source is target:
            raise ValueError(f"direction {text!r} maps a modality onto itself")
        return cls(source, target)

    def __str__(self) -> str:
        return f"{self.source.value}->{self.target.value}"
