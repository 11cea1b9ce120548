"""Masks and intensity standardisation on the real sites (issue 16): before and after.

Run from the project root:

    .venv/bin/python -m benchmarks.bench_masks [--spacing 3] [--png-dir /tmp/bench-masks]

Every scan of ../shared/data is reoriented to RAS and resampled (bilinear, as ``Spacingd`` in the
recipe) to ``--spacing`` mm. *Before* is the recipe as it was: no pre-filter, the old mask (half
of Otsu's threshold on the non-minimum voxels, opened, largest component, filled) and the mask's
0.5 / 99.5 percentiles mapped to -1 / 1. *After* is :mod:`fedsynth.common.data.masks`: Gaussian
pre-filter, :func:`subject_mask`, :func:`standardisation_range`. Prints Markdown tables (copy
them to BENCHMARKS.md); ``--png-dir`` also writes middle slices of the raw site-e scans with both
masks' contours (before red, after green).

White matter, the tissue reference: voxels at least 10 mm inside the T1w's mask (25 mm for a
head with skull), brighter than Otsu's threshold of those voxels on the T1w, applied to every
contrast of the subject. Site-e's standardisation is measured on site-e-coreg (T1w and T2w
resampled onto each session's FLAIR grid), where one T1w's white matter applies to all three.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacingd
from scipy import ndimage

from fedsynth.common.data.masks import (
    TISSUE_PERCENTILE,
    antialias,
    dark_interior_fraction,
    is_skull_stripped,
    otsu_threshold,
    standardisation_range,
    subject_mask,
)
from fedsynth.common.modalities import Modality

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PERCENTILES = (0.5, 99.5)
CONTRASTS = ("T1w", "ce-gd_T1w", "T2w", "FLAIR")


def model_grid(
    path: Path, spacing: float, *, pre_filter: bool, indicator: bool = False
) -> np.ndarray:
    """A scan (or, with ``indicator``, its non-zero region as 0/1) on the RAS ``spacing`` grid."""
    image = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(image.dataobj, dtype=np.float32)
    if indicator:
        data = (data != 0).astype(np.float32)
    zooms = np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))
    target = (spacing, spacing, spacing)
    if pre_filter:
        data = antialias(data, tuple(float(z) for z in zooms), target)
    tensor = MetaTensor(torch.from_numpy(data)[None], affine=torch.from_numpy(image.affine))
    resample = Spacingd(keys="image", pixdim=target, mode="bilinear", padding_mode="border")
    return np.asarray(resample({"image": tensor})["image"][0].numpy(), dtype=np.float32)


# ------------------------------------------------------------- the recipe before issue 16


def previous_mask(volume: np.ndarray) -> np.ndarray:
    """MR mask before issue 16: half of Otsu on the non-minimum voxels, opened, filled."""
    mask = volume > 0.5 * otsu_threshold(volume[volume > volume.min()])
    mask = ndimage.binary_opening(mask, iterations=1)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    mask = ndimage.binary_fill_holes(mask)
    for z in range(mask.shape[2]):
        mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return np.asarray(mask, dtype=bool)


def previous_range(volume: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    low, high = (float(v) for v in np.percentile(volume[mask], PERCENTILES))
    return low, high


# ------------------------------------------------------------- measurements


def to_model(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return (np.clip(values, low, high) - low) / (high - low) * 2.0 - 1.0


def quartiles(values: np.ndarray) -> tuple[float, float, float]:
    q25, q50, q75 = (float(v) for v in np.percentile(values, (25, 50, 75)))
    return q25, q50, q75


def modality_of(path: Path) -> Modality:
    name = path.name
    if name.endswith("_ct.nii.gz"):
        return Modality.CT
    if "ce-gd_T1w" in name:
        return Modality.T1W_CE
    return Modality.parse(name.rsplit("_", 1)[1].removesuffix(".nii.gz"))


def site_of(path: Path) -> str:
    return next(p for p in path.parts if p.startswith("site-")).removeprefix("site-")


def mask_table(spacing: float, png_dir: Path | None) -> list[str]:
    """Per scan: skull-stripped?, dark interior fraction, brain coverage before / after."""
    scans = sorted(SHARED.glob("brain-mri/site-*/sub-*/anat/*.nii.gz"))
    scans += sorted(SHARED.glob("brain-mri-clinical/site-e/sub-*/ses-*/anat/*.nii.gz"))
    scans += sorted(SHARED.glob("brain-ct/site-*/sub-*/anat/*.nii.gz"))
    lines = [
        "| site | scan | skull-stripped | dark interior | brain in mask, before | after "
        "| mask outside the brain, after | mask / volume, before | after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in scans:
        modality = modality_of(path)
        after_volume = model_grid(path, spacing, pre_filter=True)
        before_volume = model_grid(path, spacing, pre_filter=False)
        stripped = is_skull_stripped(after_volume)
        dark = dark_interior_fraction(after_volume)
        after = subject_mask(after_volume, modality)
        # CT kept its logic (> -500 HU); only the pre-filter differs before / after.
        before = subject_mask(before_volume, modality) if modality is Modality.CT else None
        before = previous_mask(before_volume) if before is None else before
        cells = ["", "", "", ""]
        if "brain-mri/" in path.as_posix():
            brain = model_grid(path, spacing, pre_filter=False, indicator=True) > 0.5
            cells[0] = f"{before[brain].mean():.1%}"
            cells[1] = f"{after[brain].mean():.1%}"
            cells[2] = f"{(after & ~brain).sum() / brain.sum():.1%}"
        cells[3] = f"{before.mean():.1%} | {after.mean():.1%}"
        lines.append(
            f"| {site_of(path)} | {path.name.removesuffix('.nii.gz')} "
            f"| {'yes' if stripped else 'no'} | {dark:.2%} | {' | '.join(cells)} |"
        )
        if png_dir is not None and "/site-e/" in path.as_posix():
            save_png(png_dir, path, after_volume, before, after)
    return lines


def save_png(
    folder: Path, path: Path, volume: np.ndarray, before: np.ndarray, after: np.ndarray
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    depth = volume.shape[2]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for axis, z in zip(axes, (depth // 4, depth // 2, 3 * depth // 4), strict=True):
        image = volume[:, :, z].T
        axis.imshow(image, cmap="gray", origin="lower", vmax=float(np.percentile(image, 99.5)))
        axis.contour(before[:, :, z].T, levels=[0.5], colors="red", linewidths=1.0)
        axis.contour(after[:, :, z].T, levels=[0.5], colors="lime", linewidths=1.0)
        axis.set_title(f"z = {z}", fontsize=9)
        axis.set_axis_off()
    fig.suptitle(f"{path.name}: before (red), after (green)", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / f"{path.name.removesuffix('.nii.gz')}.png", dpi=80)
    plt.close(fig)


@dataclass
class Standardised:
    site: str
    scan: str
    contrast: str
    before: tuple[float, float, float]  # mask quartiles on the model scale
    after: tuple[float, float, float]
    wm_before: float  # white-matter median on the model scale
    wm_after: float
    ratio_after: float  # (wm - low) / (p75 - low), after
    ratio_p995_new: float  # (wm - low) / (p99.5 - low), new mask
    ratio_p995_old: float  # the same with the old mask
    top_ratio: float  # (brain p99.5 - low) / (p75 - low)
    clipped: float  # fraction of the mask at +1 after
    bright: float  # fraction of the mask above low + 1.8 (p75 - low)
    other_anchors: dict[str, float]  # (wm - low) / (anchor - low) for the anchors not chosen


def sessions() -> list[tuple[str, dict[str, Path]]]:
    found: list[tuple[str, dict[str, Path]]] = []
    folders = sorted(SHARED.glob("brain-mri/site-*/sub-*/anat"))
    folders += sorted(SHARED.glob("brain-mri-clinical/site-e-coreg/sub-*/ses-*/anat"))
    for folder in folders:
        files: dict[str, Path] = {}
        for contrast in CONTRASTS:
            hits = [
                p
                for p in sorted(folder.glob(f"*_{contrast}.nii.gz"))
                if contrast != "T1w" or "ce-gd" not in p.name
            ]
            if hits:
                files[contrast] = hits[0]
        if "T1w" in files:
            found.append((site_of(folder).replace("e-coreg", "e"), files))
    return found


def standardisation_rows(spacing: float) -> list[Standardised]:
    rows = []
    for site, files in sessions():
        t1w = model_grid(files["T1w"], spacing, pre_filter=True)
        t1w_mask = subject_mask(t1w, Modality.T1W)
        depth = ndimage.distance_transform_edt(t1w_mask, sampling=(spacing,) * 3)
        deep = depth >= (25.0 if site == "e" else 10.0)
        white = deep & (t1w > otsu_threshold(t1w[deep]))
        for contrast, path in files.items():
            modality = modality_of(path)
            after_volume = model_grid(path, spacing, pre_filter=True)
            before_volume = model_grid(path, spacing, pre_filter=False)
            mask = subject_mask(after_volume, modality)
            low, high = standardisation_range(after_volume, mask, modality, PERCENTILES)
            old_mask = previous_mask(before_volume)
            old_low, old_high = previous_range(before_volume, old_mask)
            values = after_volume[mask]
            anchor = float(np.percentile(values, TISSUE_PERCENTILE))
            p995 = float(np.percentile(values, 99.5))
            wm = float(np.median(after_volume[white]))
            wm_old = float(np.median(before_volume[white]))
            brain = (
                mask
                if site != "e"
                else ndimage.distance_transform_edt(mask, sampling=(spacing,) * 3) >= 20.0
            )
            top = float(np.percentile(after_volume[brain], 99.5))
            rows.append(
                Standardised(
                    site=site,
                    scan=path.name.removesuffix(".nii.gz"),
                    contrast=contrast,
                    before=quartiles(to_model(before_volume[old_mask], old_low, old_high)),
                    after=quartiles(to_model(values, low, high)),
                    wm_before=float(to_model(np.array([wm_old]), old_low, old_high)[0]),
                    wm_after=float(to_model(np.array([wm]), low, high)[0]),
                    ratio_after=(wm - low) / (anchor - low),
                    ratio_p995_new=(wm - low) / (p995 - low),
                    ratio_p995_old=(wm_old - old_low) / (old_high - old_low),
                    top_ratio=(top - low) / (anchor - low),
                    clipped=float(np.mean(values >= high)),
                    bright=float(np.mean(values > low + 1.8 * (anchor - low))),
                    other_anchors={
                        name: (wm - low) / (value - low)
                        for name, value in other_anchors(after_volume, mask, low).items()
                    },
                )
            )
    return rows


def other_anchors(volume: np.ndarray, mask: np.ndarray, low: float) -> dict[str, float]:
    """Tissue statistics tried as the anchor instead of the mask's 75th percentile."""
    values = volume[mask]
    found = {f"p{q}": float(np.percentile(values, q)) for q in (50, 60, 70, 80)}
    # the histogram's mode above the darkest tenth of the range (air, bone, background rim)
    top = float(np.percentile(values, 99))
    upper = values[values > low + 0.1 * (top - low)]
    lo, hi = np.percentile(upper, (2, 98))
    counts, edges = np.histogram(upper, bins=128, range=(float(lo), float(hi)))
    peak = int(np.argmax(ndimage.gaussian_filter1d(counts.astype(np.float64), 2.0)))
    found["mode"] = float((edges[peak] + edges[peak + 1]) / 2)
    # the median of the deep core: at least half the mask's largest depth (voxels)
    depth = ndimage.distance_transform_edt(mask)
    found["core median"] = float(np.median(volume[depth >= 0.5 * depth.max()]))
    return found


def cv_across_sites(rows: list[Standardised], field: str) -> float:
    by_site: dict[str, list[float]] = {}
    for row in rows:
        value = row.other_anchors[field] if field in row.other_anchors else getattr(row, field)
        by_site.setdefault(row.site, []).append(float(value))
    means = [statistics.fmean(v) for v in by_site.values()]
    return statistics.pstdev(means) / statistics.fmean(means)


def standardisation_tables(rows: list[Standardised]) -> list[str]:
    lines = [
        "| contrast | site | scans | mask median [p25, p75], before | after "
        "| white matter, before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    spread: list[str] = []
    for contrast in CONTRASTS:
        chosen = [r for r in rows if r.contrast == contrast]
        if not chosen:
            continue
        site_medians: dict[str, tuple[float, float, float, float]] = {}
        for site in sorted({r.site for r in chosen}):
            mine = [r for r in chosen if r.site == site]
            before = [statistics.median(r.before[i] for r in mine) for i in range(3)]
            after = [statistics.median(r.after[i] for r in mine) for i in range(3)]
            wm_before = statistics.median(r.wm_before for r in mine)
            wm_after = statistics.median(r.wm_after for r in mine)
            site_medians[site] = (before[1], after[1], wm_before, wm_after)
            lines.append(
                f"| {contrast} | {site} | {len(mine)} "
                f"| {before[1]:+.2f} [{before[0]:+.2f}, {before[2]:+.2f}] "
                f"| {after[1]:+.2f} [{after[0]:+.2f}, {after[2]:+.2f}] "
                f"| {wm_before:+.2f} | {wm_after:+.2f} |"
            )
        columns = list(zip(*site_medians.values(), strict=True))
        ranges = [max(c) - min(c) for c in columns]
        spread.append(
            f"| {contrast} | {len(site_medians)} | {ranges[0]:.2f} | {ranges[1]:.2f} "
            f"| {ranges[2]:.2f} | {ranges[3]:.2f} "
            f"| {cv_across_sites(chosen, 'ratio_p995_old'):.3f} "
            f"| {cv_across_sites(chosen, 'ratio_p995_new'):.3f} "
            f"| {cv_across_sites(chosen, 'ratio_after'):.3f} "
            f"| {max(r.top_ratio for r in chosen):.2f} | {max(r.clipped for r in chosen):.2%} |"
        )
    names = list(rows[0].other_anchors)
    anchors = [
        "",
        "| contrast | CV of WM / (anchor - low) across sites: "
        + " | ".join(names)
        + " | p75 (chosen) | share of the mask above low + 1.8 (p75 - low) |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for contrast in CONTRASTS:
        chosen = [r for r in rows if r.contrast == contrast]
        if chosen:
            cvs = " | ".join(f"{cv_across_sites(chosen, name):.3f}" for name in names)
            share = f"{min(r.bright for r in chosen):.1%}-{max(r.bright for r in chosen):.1%}"
            anchors.append(
                f"| {contrast} | {cvs} | {cv_across_sites(chosen, 'ratio_after'):.3f} | {share} |"
            )
    lines += [
        "",
        "| contrast | sites | spread of the site medians (max - min): mask, before | after "
        "| white matter, before | after | CV of WM / scale: old mask p99.5 | new mask p99.5 "
        "| new mask p75 (after) | max brain p99.5 / p75 | max mask clipped at +1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *spread,
        *anchors,
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=float, default=3.0, help="model grid (mm)")
    parser.add_argument("--png-dir", type=Path, default=None)
    args = parser.parse_args()
    if not SHARED.exists():
        print(f"real data not available at {SHARED}: nothing to measure")
        return
    start = time.perf_counter()
    lines = [f"Model grid {args.spacing:g} mm.", "", *mask_table(args.spacing, args.png_dir), ""]
    lines += standardisation_tables(standardisation_rows(args.spacing))
    print("\n".join(lines))
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
