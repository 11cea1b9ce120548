"""Shared test helpers: tiny synthetic NIfTI volumes and site folders made inside the test."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedsynth.common.config import RunConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Contrast of the synthetic "head": (background, outer shell, inner core) per modality.
CONTRASTS = {
    "T1w": (0.0, 300.0, 800.0),
    "T2w": (0.0, 900.0, 400.0),
    "FLAIR": (0.0, 500.0, 600.0),
    "PD": (0.0, 700.0, 650.0),
    "ct": (-1000.0, 1000.0, 35.0),
}


def head_volume(
    modality: str = "T1w", shape: Sequence[int] = (40, 44, 36), seed: int = 0
) -> np.ndarray:
    """An ellipsoidal 'head' with a shell and a core, plus mild noise; (x, y, z) float32."""
    background, shell, core = CONTRASTS[modality]
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, (0.8, 0.85, 0.8), strict=True)))
    volume = np.full(shape, background, dtype=np.float32)
    volume[radius < 1.0] = shell
    volume[radius < 0.8] = core
    rng = np.random.default_rng(seed)
    volume += rng.normal(0, 5.0, size=volume.shape).astype(np.float32) * (radius < 1.0)
    return volume


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) * [2, 2, 2, 1] if affine is None else affine), path)
    return path


SiteMaker = Callable[..., Path]


@pytest.fixture
def make_site(tmp_path: Path) -> SiteMaker:
    """Build a small BIDS site: ``make_site("site-x", {"sub-01": ["T1w", "T2w"], ...})``."""

    def build(
        name: str = "site-x",
        subjects: dict[str, list[str]] | None = None,
        shape: Sequence[int] = (40, 44, 36),
    ) -> Path:
        subjects = subjects or {"sub-01": ["T1w", "T2w"], "sub-02": ["T1w", "T2w"]}
        root = tmp_path / name
        for index, (subject, modalities) in enumerate(sorted(subjects.items())):
            for modality in modalities:
                stem = f"{subject}_{modality}"
                save_nifti(
                    root / subject / "anat" / f"{stem}.nii.gz",
                    head_volume(modality, shape, seed=index),
                )
        return root

    return build


def shared_site(*parts: str) -> Path:
    """A folder of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    return path


def training_patients(site: Path, config: RunConfig, cache: Path | None = None) -> int:
    """The patients a site samples under patient-level DP, counted from its volumes: the
    subjects with a weakly paired session in the training part (sessions of one subject are one
    patient; subjects with one modality only are left out)."""
    from fedsynth.common.data.site import load_site
    from fedsynth.common.data.validation import hold_out

    data = load_site(site, config.data, cache_dir=cache, seed=config.training.seed)
    data = hold_out(data, config.data.validation_fraction, config.training.seed)
    return len(
        {a.scan.subject for a, b in data.paired if len(np.intersect1d(a.stack.z, b.stack.z))}
    )


def training_examples(site: Path, config: RunConfig, cache: Path | None = None) -> int:
    """The examples a site trains on, counted from its volumes (independently of
    TrainingSlices): the slice positions of its training pairs (its validation part held out)
    plus the larger side of its unpaired slices."""
    from fedsynth.common.data.site import load_site
    from fedsynth.common.data.validation import hold_out

    data = load_site(site, config.data, cache_dir=cache, seed=config.training.seed)
    data = hold_out(data, config.data.validation_fraction, config.training.seed)
    paired = sum(len(np.intersect1d(a.stack.z, b.stack.z)) for a, b in data.paired)
    unpaired = max(
        sum(len(v.stack) for v in data.unpaired_a), sum(len(v.stack) for v in data.unpaired_b)
    )
    return paired + unpaired
