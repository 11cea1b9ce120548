"""MRI -> CT: a T1w -> CT model on the pooled MRI and CT sites, and the Hounsfield units of
the tissues in its synthetic CT and in the real CT."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from benchmarks.study_real.settings import BONE_HU, HU_WINDOWS, TISSUES, Study, StudyError
from fedsynth.client.local import train_local
from fedsynth.common.data.discovery import discover_site
from fedsynth.common.modalities import Modality
from fedsynth.common.synthesis import Synthesizer


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target.resolve())


def ct_pool(study: Study) -> Path:
    """One BIDS folder with every MRI subject's T1w and the CT site's CT (links)."""
    assert study.ct_site is not None
    pool = study.out / "ct" / "pool"
    owner: dict[str, Path] = {}
    # The co-registered MRI sites' T1w (the raw clinical site keeps its skull and is not here).
    mri = [path for name, path in study.sites.items() if name not in study.scored]
    for site_dir in [*mri, study.ct_site]:
        for scan in discover_site(site_dir).scans:
            if scan.modality not in (Modality.T1W, Modality.CT):
                continue
            if owner.setdefault(scan.subject, site_dir) != site_dir:
                # One folder would make them one subject with both domains: a false pair.
                raise StudyError(
                    f"{scan.subject} is a subject of both {owner[scan.subject]} and {site_dir}: "
                    "the T1w -> CT pool needs distinct subject names"
                )
            _link(scan.path, pool / scan.path.relative_to(site_dir))
    return pool


def run_ct(study: Study) -> dict[str, Any]:
    """Train T1w -> CT, synthesize every MRI subject's CT, measure HU per tissue."""
    assert study.ct_site is not None
    folder = study.out / "ct"
    pool = ct_pool(study)
    base = study.config("T1w->CT", "ct")
    epochs = base.federation.rounds * base.federation.local_epochs
    decay = round(epochs * base.training.decay_epochs / max(base.training.epochs, 1))
    config = base.model_copy(
        update={
            "output_dir": folder,
            "name": "model",
            "training": base.training.model_copy(
                update={"epochs": epochs, "decay_epochs": decay, "registration": "off"}
            ),
            "data": base.data.model_copy(update={"cache_dir": study.cache, "misalignment": "none"}),
        }
    )
    checkpoint = config.run_dir / "checkpoint"
    if (checkpoint / "checkpoint.json").exists() and (folder / "trained").exists():
        study.echo("== T1w -> CT: trained earlier")
    else:
        trained_on = len(study.sites) - len(study.scored)
        study.echo(f"== T1w -> CT: {epochs} epochs on {trained_on} MRI sites' T1w + CT")
        config.run_dir.mkdir(parents=True, exist_ok=True)
        train_local([pool], config, resume=True, evaluate=False, progress=True)
        (folder / "trained").write_text("done\n", encoding="utf-8")
    synthesizer = Synthesizer(checkpoint, device="cpu")
    subjects = []
    for scan in sorted(discover_site(pool).scans, key=lambda s: s.subject):
        if scan.modality is not Modality.T1W:
            continue
        out = folder / "synthetic" / f"{scan.subject}_synthCT.nii.gz"
        synthesizer.synthesize(scan.path, out)
        t1 = _voxels(scan.path, np.float64)
        ct = _voxels(out, np.float64)
        stats = synthetic_tissue_hu(t1, ct)
        subjects.append(
            {"subject": scan.subject, "t1w": str(scan.path), "synthetic": str(out), **stats}
        )
    real_path = next(
        s.path for s in discover_site(study.ct_site).scans if s.modality is Modality.CT
    )
    real = real_ct_hu(_voxels(real_path, np.float64))
    return {"subjects": subjects, "real": {"path": str(real_path), **real}, "epochs": epochs}


def _voxels(path: str | Path, dtype: type[np.floating[Any]]) -> np.ndarray:
    image: Any = nib.load(path)
    return np.asarray(image.dataobj, dtype=dtype)


def brain_mask(t1: np.ndarray) -> np.ndarray:
    """The (skull-stripped) T1w's brain: above 5 % of its 99th percentile, holes filled, the
    two outermost voxels left out (resampling blurs the edge of the synthetic CT)."""
    positive = t1[t1 > 0]
    if positive.size == 0:
        return np.zeros(t1.shape, bool)
    mask = t1 > 0.05 * np.percentile(positive, 99)
    mask = ndimage.binary_fill_holes(mask)
    return ndimage.binary_erosion(mask, iterations=2)


def three_classes(values: np.ndarray, iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means with three classes (labels 0 < 1 < 2 by centre), started at the 10th, 50th
    and 90th percentiles: deterministic."""
    centres = np.percentile(values, [10, 50, 90]).astype(np.float64)
    labels = np.zeros(values.shape, dtype=np.int64)
    for _ in range(iterations):
        labels = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        updated = np.array(
            [values[labels == k].mean() if np.any(labels == k) else centres[k] for k in range(3)]
        )
        if np.allclose(updated, centres):
            break
        centres = updated
    order = np.argsort(centres)
    rank = np.empty(3, dtype=np.int64)
    rank[order] = np.arange(3)
    return rank[labels], centres[order]


def _describe(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"voxels": 0, "mean": math.nan, "sd": math.nan, "median": math.nan}
    return {
        "voxels": int(values.size),
        "mean": float(values.mean()),
        "sd": float(values.std()),
        "median": float(np.median(values)),
    }


def synthetic_tissue_hu(t1: np.ndarray, ct: np.ndarray) -> dict[str, Any]:
    """HU of the synthetic CT in each T1w tissue class, and how much of it reads as bone."""
    mask = brain_mask(t1)
    labels, centres = three_classes(t1[mask])
    values = ct[mask]
    tissues = {}
    for index, tissue in enumerate(TISSUES):
        selected = values[labels == index]
        entry = _describe(selected)
        low, high = HU_WINDOWS[tissue]
        entry["in_window"] = (
            float(np.mean((selected >= low) & (selected <= high))) if selected.size else math.nan
        )
        tissues[tissue] = entry
    return {
        "tissues": tissues,
        "t1w_centres": [float(c) for c in centres],
        "bone_fraction": float(np.mean(values > BONE_HU)) if values.size else math.nan,
    }


def intracranial(hu: np.ndarray) -> np.ndarray:
    """Inside the skull: per axial slice, the holes of the bone (> 300 HU) filled, minus the
    bone, the two outermost voxels left out."""
    bone = hu > BONE_HU
    filled = np.zeros_like(bone)
    for z in range(hu.shape[2]):
        filled[:, :, z] = ndimage.binary_fill_holes(bone[:, :, z])
    return ndimage.binary_erosion(filled & ~bone, iterations=2)


def real_ct_hu(hu: np.ndarray) -> dict[str, Any]:
    """The real CT: HU of the tissues by window inside the skull, the skull itself."""
    inside = intracranial(hu)
    values = hu[inside]
    tissues = {}
    for tissue in TISSUES:
        low, high = HU_WINDOWS[tissue]
        selected = values[(values >= low) & (values <= high)]
        entry = _describe(selected)
        entry["share"] = float(selected.size / values.size) if values.size else math.nan
        tissues[tissue] = entry
    return {
        "tissues": tissues,
        "intracranial": _describe(values),
        "bone": _describe(hu[hu > BONE_HU]),
    }
