"""The phantom's public entry point: a consortium of BIDS sites, one subject after another."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedsynth.common.modalities import Modality
from fedsynth.common.phantom.anatomy import (
    FloatArray,
    _base_anatomy,
    _BaseAnatomy,
    _Grid,
    _grid_with_voxel,
    _resample_to_grid,
)
from fedsynth.common.phantom.bids import (
    _derivatives_dir,
    _ground_truth,
    _image_path,
    _json_bytes,
    _prepare_site_dir,
    _round,
    _sidecar,
    _write_site_metadata,
    _write_site_records,
    _Writer,
    subject_label,
)
from fedsynth.common.phantom.contrasts import _bias_field, _render_ct, _render_mr, _render_pet
from fedsynth.common.phantom.physics import TISSUES, TissueParams, tissue_table
from fedsynth.common.phantom.scanner import (
    SiteScanner,
    _noise_rng,
    _subject_rng,
    draw_site_scanner,
)
from fedsynth.common.phantom.subject import _make_subject, _Subject

logger = logging.getLogger(__name__)

DEFAULT_MODALITIES: Final[tuple[Modality, ...]] = (
    Modality.T1W,
    Modality.T2W,
    Modality.FLAIR,
    Modality.PD,
    Modality.CT,
    Modality.PET,
)


def generate_consortium(
    out_dir: Path,
    *,
    sites: int,
    subjects: Sequence[int],
    seed: int = 0,
    modalities: Sequence[Modality | str] = DEFAULT_MODALITIES,
    voxel_size: float = 1.0,
    lesions: bool = True,
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
    shared_scanner: bool = False,
) -> list[Path]:
    """Write one BIDS folder per simulated hospital and return their paths.

    Each site ``out_dir/site-k`` holds ``subjects[k-1]`` subjects with every requested modality,
    co-registered on the site's grid, plus the ground truth under ``derivatives/phantom``. The
    output is a pure function of the arguments: site ``k``'s scanner depends only on
    ``(seed, k)``, subject ``i``'s anatomy and noise only on ``(seed, k, i)`` (never on other
    sites or subject counts), and the same arguments write the same bytes.

    Args:
        out_dir: Folder to create the sites in.
        sites: Number of hospitals.
        subjects: Number of subjects at each site (one entry per site).
        seed: Consortium seed.
        modalities: Contrasts to write, as ``Modality`` or any spelling ``Modality.parse``
            accepts (``Modality.T1W_CE`` is available but not in the default).
        voxel_size: Base isotropic voxel size (mm) the anatomy is built on; sites may write
            larger voxels or thicker slices.
        lesions: Whether subjects get 1-3 ellipsoidal lesions.
        progress: Called with a short message after every subject.
        overwrite: Replace existing phantom sites in ``out_dir`` (anything else is never deleted).
        shared_scanner: Scan every site with site 1's scanner: no scanner effects between sites
            (the subjects still differ), the control for a heterogeneity experiment.

    Returns:
        ``[out_dir/site-1, ..., out_dir/site-N]``.

    Raises:
        ValueError: For mismatched ``sites``/``subjects`` or other invalid arguments.
        FileExistsError: When a site folder exists and may not be replaced.
    """
    chosen = _validate(sites, subjects, seed, voxel_size, modalities)
    out_dir = Path(out_dir)
    run = _Run(
        base=_base_anatomy(float(voxel_size)),
        seed=seed,
        modalities=chosen,
        voxel_size=voxel_size,
        lesions=lesions,
        shared_scanner=shared_scanner,
    )
    tally = _Progress(progress, total=sum(int(c) for c in subjects))
    site_dirs: list[Path] = []
    for site in range(1, sites + 1):
        site_dir = out_dir / f"site-{site}"
        _prepare_site_dir(site_dir, overwrite)
        _write_site(run, _open_site(run, site, site_dir, subjects[site - 1]), tally)
        site_dirs.append(site_dir)
    return site_dirs


@dataclass(frozen=True)
class _Run:
    """The arguments every site of one ``generate_consortium`` call is made with.

    ``voxel_size`` is kept as given: the ground truth records it so.
    """

    base: _BaseAnatomy
    seed: int
    modalities: tuple[Modality, ...]
    voxel_size: float
    lesions: bool
    shared_scanner: bool


@dataclass(frozen=True)
class _Site:
    """One site's folders, scanner, tissue table, grid and MR bias field (``None`` without MR)."""

    site: int
    site_dir: Path
    n_subjects: int
    scanner: SiteScanner
    tissues: dict[str, TissueParams]
    grid: _Grid
    bias: FloatArray | None

    @property
    def derivatives(self) -> Path:
        return _derivatives_dir(self.site_dir)


class _Progress:
    """Counts the subjects written and reports each one to the caller's ``progress``."""

    def __init__(self, callback: Callable[[str], None] | None, total: int) -> None:
        self._callback = callback
        self._total = total
        self._done = 0

    def subject_written(self, site: int, label: str) -> None:
        self._done += 1
        if self._callback is not None:
            self._callback(f"site-{site} sub-{label} ({self._done}/{self._total})")


def _open_site(run: _Run, site: int, site_dir: Path, n_subjects: int) -> _Site:
    """Draw the site's scanner (site 1's when shared) and lay out its grid and bias field."""
    scanner = draw_site_scanner(run.seed, 1 if run.shared_scanner else site, float(run.voxel_size))
    tissues = tissue_table(scanner.field_strength_t)
    site_grid = _grid_with_voxel(run.base.grid, scanner.voxel_size_mm)
    bias = _bias_field(scanner, site_grid) if any(m.is_mr for m in run.modalities) else None
    logger.info(
        "phantom site-%d: %d subjects, %.1f T, voxels %s mm, grid %s",
        site,
        n_subjects,
        scanner.field_strength_t,
        "x".join(f"{v:.2f}" for v in scanner.voxel_size_mm),
        site_grid.shape,
    )
    return _Site(site, site_dir, n_subjects, scanner, tissues, site_grid, bias)


def _write_site(run: _Run, site: _Site, tally: _Progress) -> None:
    """Make and write every subject of a site, then its participants and ground truth."""
    records: list[dict[str, Any]] = []
    with _Writer() as writer:
        _write_site_metadata(writer, site.site_dir, site.site, run.seed)
        for index in range(1, int(site.n_subjects) + 1):
            label = subject_label(site.site, index)
            subject = _make_subject(
                run.base,
                label,
                _subject_rng(run.seed, site.site, index),
                field_strength_t=site.scanner.field_strength_t,
                lesions=run.lesions,
            )
            records.append(subject.record)
            _write_subject(writer, run, site, subject, index)
            tally.subject_written(site.site, label)
        truth = _ground_truth(
            run.seed,
            site.site,
            run.voxel_size,
            run.lesions,
            run.modalities,
            site.scanner,
            site.tissues,
        )
        truth["grid"] = {"shape": list(site.grid.shape), "affine": site.grid.affine.tolist()}
        _write_site_records(writer, site.site_dir, records, truth)


def _write_subject(writer: _Writer, run: _Run, site: _Site, subject: _Subject, index: int) -> None:
    """Resample one subject's tissue maps to the site grid, render and write every file."""
    label = subject.label
    site_grid, scanner = site.grid, site.scanner
    fractions, bone_hu, lesion_total = _site_fractions(subject, run.base.grid, site_grid)
    lesion_names = [f"lesion-{k + 1}" for k in range(len(subject.lesions))]
    all_tissues = dict(site.tissues)
    for name, spec in zip(lesion_names, subject.lesions, strict=True):
        all_tissues[name] = spec.params
    mr_tissues = {name: all_tissues[name] for name in (*TISSUES, *lesion_names)}

    for modality in run.modalities:
        rng = _noise_rng(run.seed, site.site, index, modality)
        path = _image_path(site.site_dir, label, modality)
        path.parent.mkdir(parents=True, exist_ok=True)
        image: npt.NDArray[Any]
        if modality.is_mr:
            assert site.bias is not None
            image = _render_mr(modality, fractions, mr_tissues, scanner, site.bias, rng)
        elif modality is Modality.CT:
            image = _render_ct(fractions, mr_tissues, bone_hu, scanner, rng)
        else:
            pet_scale = float(subject.record["pet_scale"])
            image = _render_pet(fractions, mr_tissues, scanner, site_grid, pet_scale, rng)
        writer.nifti(path, image, site_grid.affine)
        sidecar = path.with_name(path.name.removesuffix(".nii.gz") + ".json")
        writer.raw(sidecar, _json_bytes(_round(_sidecar(modality, scanner))))

    probseg = np.stack(
        [fractions["air"], *(fractions[name] for name in TISSUES), lesion_total], axis=-1
    )
    dseg = np.argmax(probseg, axis=-1).astype(np.uint8)
    anat = site.derivatives / f"sub-{label}" / "anat"
    anat.mkdir(parents=True, exist_ok=True)
    writer.nifti(anat / f"sub-{label}_dseg.nii.gz", dseg, site_grid.affine)
    writer.nifti(anat / f"sub-{label}_probseg.nii.gz", probseg, site_grid.affine, np.uint8)
    mask = (lesion_total >= 0.5).astype(np.uint8)
    writer.nifti(anat / f"sub-{label}_label-lesion_mask.nii.gz", mask, site_grid.affine)


def _site_fractions(
    subject: _Subject, base_grid: _Grid, site_grid: _Grid
) -> tuple[dict[str, FloatArray], FloatArray, FloatArray]:
    """The subject's tissue maps on the site grid, with ``"air"`` filling up to one.

    Returns:
        Fractions by tissue and lesion name, bone fraction x CT number, and all lesions summed.
    """
    fractions = {
        name: _resample_to_grid(volume, base_grid, site_grid)
        for name, volume in subject.fractions.items()
    }
    bone_hu = _resample_to_grid(subject.bone_hu, base_grid, site_grid)
    lesion_total = np.zeros(site_grid.shape, dtype=np.float32)
    for k in range(len(subject.lesions)):
        lesion_total += fractions[f"lesion-{k + 1}"]
    matter = lesion_total.copy()
    for name in TISSUES:
        matter += fractions[name]
    fractions["air"] = np.clip(1.0 - matter, 0.0, 1.0).astype(np.float32)
    return fractions, bone_hu, lesion_total


def _validate(
    sites: int,
    subjects: Sequence[int],
    seed: int,
    voxel_size: float,
    modalities: Sequence[Modality | str],
) -> tuple[Modality, ...]:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(sites, bool) or not isinstance(sites, int | np.integer) or sites < 1:
        raise ValueError(f"sites must be a positive integer, got {sites!r}")
    if len(subjects) != sites:
        raise ValueError(
            f"subjects has {len(subjects)} entries but sites={sites}; give one subject count "
            "per site"
        )
    for site, count in enumerate(subjects, start=1):
        if isinstance(count, bool) or not isinstance(count, int | np.integer) or count < 1:
            raise ValueError(
                f"subjects[{site - 1}] (site-{site}) must be an integer >= 1, got {count!r}"
            )
    if not (math.isfinite(voxel_size) and 0.5 <= voxel_size <= 8.0):
        raise ValueError(f"voxel_size must be between 0.5 and 8.0 mm, got {voxel_size!r}")
    chosen: list[Modality] = []
    for entry in modalities:
        modality = Modality.parse(str(entry))
        if modality not in chosen:
            chosen.append(modality)
    if not chosen:
        raise ValueError("modalities is empty; name at least one, e.g. (Modality.T1W,)")
    return tuple(chosen)
