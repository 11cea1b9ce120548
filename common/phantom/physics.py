"""Tissue physics of the phantom: T1, T2, PD, CT and PET tables per tissue, MR signal equations."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

LABELS: Final[dict[int, str]] = {
    0: "background",
    1: "csf",
    2: "gm",
    3: "wm",
    4: "soft_tissue",
    5: "bone",
    6: "lesion",
}
TISSUES: Final[tuple[str, ...]] = ("csf", "gm", "wm", "soft_tissue", "bone")
FIELD_STRENGTHS_T: Final[tuple[float, ...]] = (1.5, 3.0)


@dataclass(frozen=True)
class TissueParams:
    """Physical parameters of one tissue at one field strength.

    Attributes:
        t1_ms: Longitudinal relaxation time (ms).
        t2_ms: Transverse relaxation time (ms).
        pd: Proton density relative to pure water (0..1).
        ct_hu: CT number (Hounsfield units).
        pet_uptake: FDG-PET-like uptake (SUV-like units, g/mL).
        gd_mmol: Gadolinium concentration after contrast injection (mmol/L); shortens T1 in
            ``T1w-ce`` images only.
    """

    t1_ms: float
    t2_ms: float
    pd: float
    ct_hu: float
    pet_uptake: float
    gd_mmol: float = 0.0


# (T1 ms, T2 ms, PD) per tissue. Brain values lie in the ranges reported by Stanisz et al.,
# "T1, T2 relaxation and magnetization transfer in tissue at 3T", MRM 54:507 (2005) and the
# 1.5 T literature it reviews; scalp is a fat/muscle mix (short T1); cortical bone has almost no
# MR-visible water and a sub-millisecond T2.
_MR_TABLE: Final[dict[float, dict[str, tuple[float, float, float]]]] = {
    1.5: {
        "csf": (4000.0, 2000.0, 1.00),
        "gm": (1180.0, 95.0, 0.80),
        "wm": (760.0, 80.0, 0.70),
        "soft_tissue": (400.0, 65.0, 0.85),
        "bone": (300.0, 1.0, 0.05),
    },
    3.0: {
        "csf": (4300.0, 1800.0, 1.00),
        "gm": (1820.0, 99.0, 0.80),
        "wm": (1080.0, 70.0, 0.70),
        "soft_tissue": (500.0, 60.0, 0.85),
        "bone": (350.0, 0.8, 0.05),
    },
}
_CT_HU: Final[dict[str, float]] = {
    "csf": 15.0,
    "gm": 40.0,
    "wm": 27.0,
    "soft_tissue": 35.0,
    "bone": 1100.0,  # nominal; each subject draws its own mean and the shell has a profile
}
_AIR_HU: Final = -1000.0
_PET_UPTAKE: Final[dict[str, float]] = {
    "csf": 0.3,
    "gm": 8.0,
    "wm": 2.7,
    "soft_tissue": 1.0,
    "bone": 0.6,
}
# Gadolinium reaching each tissue after injection: the blood-brain barrier keeps it in the
# vessels of normal brain; scalp and muscle take it up.
_GD_MMOL: Final[dict[str, float]] = {
    "csf": 0.0,
    "gm": 0.02,
    "wm": 0.01,
    "soft_tissue": 0.15,
    "bone": 0.0,
}
# T1 relaxivity of a gadolinium chelate (L/mmol/s) by field strength.
_GD_R1: Final[dict[float, float]] = {1.5: 4.5, 3.0: 4.2}


def tissue_table(field_strength_t: float) -> dict[str, TissueParams]:
    """Return the parameters of every tissue at a field strength.

    Args:
        field_strength_t: 1.5 or 3.0 (tesla).

    Returns:
        Tissue name (see ``TISSUES``) -> parameters.

    Raises:
        ValueError: For a field strength without a table.
    """
    if field_strength_t not in _MR_TABLE:
        allowed = ", ".join(str(b) for b in _MR_TABLE)
        raise ValueError(f"no tissue table for {field_strength_t} T; allowed: {allowed}")
    return {
        name: TissueParams(
            t1_ms=t1,
            t2_ms=t2,
            pd=pd,
            ct_hu=_CT_HU[name],
            pet_uptake=_PET_UPTAKE[name],
            gd_mmol=_GD_MMOL[name],
        )
        for name, (t1, t2, pd) in _MR_TABLE[field_strength_t].items()
    }


@dataclass(frozen=True)
class SequenceParams:
    """Timing of one MR sequence.

    Attributes:
        kind: ``"spin_echo"`` or ``"inversion_recovery"``.
        tr_ms: Repetition time (ms).
        te_ms: Echo time (ms).
        ti_ms: Inversion time (ms), inversion recovery only.
        contrast_agent: Whether the image is acquired after gadolinium injection.
    """

    kind: str
    tr_ms: float
    te_ms: float
    ti_ms: float | None = None
    contrast_agent: bool = False


def spin_echo_signal(pd: float, t1_ms: float, t2_ms: float, *, tr_ms: float, te_ms: float) -> float:
    """Spin-echo magnitude ``PD (1 - exp(-TR/T1)) exp(-TE/T2)``.

    Args:
        pd: Proton density.
        t1_ms: T1 (ms).
        t2_ms: T2 (ms).
        tr_ms: Repetition time (ms).
        te_ms: Echo time (ms).

    Returns:
        The signal, in units of the fully relaxed magnetisation of water.
    """
    return pd * (1.0 - math.exp(-tr_ms / t1_ms)) * math.exp(-te_ms / t2_ms)


def inversion_recovery_signal(
    pd: float, t1_ms: float, t2_ms: float, *, tr_ms: float, te_ms: float, ti_ms: float
) -> float:
    """Magnitude inversion-recovery signal ``PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)``.

    Args:
        pd: Proton density.
        t1_ms: T1 (ms).
        t2_ms: T2 (ms).
        tr_ms: Repetition time (ms).
        te_ms: Echo time (ms).
        ti_ms: Inversion time (ms).

    Returns:
        The signal, in units of the fully relaxed magnetisation of water.
    """
    mz = 1.0 - 2.0 * math.exp(-ti_ms / t1_ms) + math.exp(-tr_ms / t1_ms)
    return pd * abs(mz) * math.exp(-te_ms / t2_ms)


def null_inversion_time(t1_ms: float, tr_ms: float) -> float:
    """Inversion time that nulls a tissue: ``T1 ln(2 / (1 + exp(-TR/T1)))``.

    Args:
        t1_ms: T1 of the tissue to null (ms), e.g. CSF for FLAIR.
        tr_ms: Repetition time (ms).

    Returns:
        TI (ms) at which ``1 - 2 exp(-TI/T1) + exp(-TR/T1) = 0``.
    """
    return t1_ms * math.log(2.0 / (1.0 + math.exp(-tr_ms / t1_ms)))


def tissue_signal(tissue: TissueParams, sequence: SequenceParams, field_strength_t: float) -> float:
    """Noise-free MR signal of a pure tissue for a sequence.

    After contrast, T1 is shortened by the gadolinium present: ``1/T1' = 1/T1 + r1 [Gd]``.

    Args:
        tissue: The tissue's parameters.
        sequence: The sequence timing.
        field_strength_t: Field strength (sets the gadolinium relaxivity).

    Returns:
        The signal, in units of the fully relaxed magnetisation of water.
    """
    t1 = tissue.t1_ms
    if sequence.contrast_agent and tissue.gd_mmol > 0.0:
        r1_per_ms = _GD_R1[field_strength_t] / 1000.0
        t1 = 1.0 / (1.0 / t1 + r1_per_ms * tissue.gd_mmol)
    if sequence.kind == "spin_echo":
        return spin_echo_signal(
            tissue.pd, t1, tissue.t2_ms, tr_ms=sequence.tr_ms, te_ms=sequence.te_ms
        )
    if sequence.kind == "inversion_recovery" and sequence.ti_ms is not None:
        return inversion_recovery_signal(
            tissue.pd,
            t1,
            tissue.t2_ms,
            tr_ms=sequence.tr_ms,
            te_ms=sequence.te_ms,
            ti_ms=sequence.ti_ms,
        )
    raise ValueError(f"unknown sequence kind {sequence.kind!r} (or inversion time missing)")
