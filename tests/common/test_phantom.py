"""Tests for the built-in brain phantom: physics of the contrasts, layout, determinism."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from fedsynth.common.modalities import Modality
from fedsynth.common.phantom import (
    DEFAULT_MODALITIES,
    LABELS,
    SequenceParams,
    TissueParams,
    generate_consortium,
    inversion_recovery_signal,
    null_inversion_time,
    spin_echo_signal,
    tissue_signal,
    tissue_table,
)

VOXEL_MM = 3.0
SUBJECTS = [2, 1]
CSF, GM, WM, SOFT, BONE, LESION = 1, 2, 3, 4, 5, 6


# ----------------------------------------------------------------------------- helpers


def _load(path: Path) -> npt.NDArray[np.float64]:
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return np.asarray(image.get_fdata(), dtype=np.float64)


def _subjects(site: Path) -> list[str]:
    return sorted(p.name for p in site.glob("sub-*") if p.is_dir())


def _image(site: Path, sub: str, modality: Modality) -> Path:
    return site / sub / modality.bids_datatype / f"{sub}_{modality.bids_stem}.nii.gz"


def _derivative(site: Path, sub: str, suffix: str) -> Path:
    return site / "derivatives" / "phantom" / sub / "anat" / f"{sub}_{suffix}.nii.gz"


def _truth(site: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(
        (site / "derivatives" / "phantom" / "ground_truth.json").read_text()
    )
    return loaded


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _each_subject(sites: list[Path]) -> list[tuple[Path, str]]:
    return [(site, sub) for site in sites for sub in _subjects(site)]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("phantom")
    messages: list[str] = []
    sites = generate_consortium(
        out, sites=2, subjects=SUBJECTS, seed=0, voxel_size=VOXEL_MM, progress=messages.append
    )
    assert len(messages) == sum(SUBJECTS)
    return sites


@pytest.fixture(scope="module")
def consortium_again(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("phantom_again")
    return generate_consortium(out, sites=2, subjects=SUBJECTS, seed=0, voxel_size=VOXEL_MM)


# ----------------------------------------------------------------------------- signal equations


def test_spin_echo_matches_the_textbook_formula() -> None:
    pd, t1, t2, tr, te = 0.7, 800.0, 80.0, 500.0, 15.0
    expected = pd * (1 - math.exp(-tr / t1)) * math.exp(-te / t2)
    assert spin_echo_signal(pd, t1, t2, tr_ms=tr, te_ms=te) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("field", [1.5, 3.0])
@pytest.mark.parametrize("tr_ms", [6000.0, 9000.0, 11000.0])
def test_flair_inversion_time_nulls_csf_exactly(field: float, tr_ms: float) -> None:
    tissues = tissue_table(field)
    ti = null_inversion_time(tissues["csf"].t1_ms, tr_ms)
    csf = tissues["csf"]
    nulled = inversion_recovery_signal(
        csf.pd, csf.t1_ms, csf.t2_ms, tr_ms=tr_ms, te_ms=120.0, ti_ms=ti
    )
    gm = tissues["gm"]
    grey = inversion_recovery_signal(gm.pd, gm.t1_ms, gm.t2_ms, tr_ms=tr_ms, te_ms=120.0, ti_ms=ti)
    assert abs(nulled) < 1e-12
    assert grey > 0.05
    assert 1500.0 < ti < 3000.0  # clinical FLAIR inversion times


def test_tissue_tables_are_literature_like() -> None:
    low, high = tissue_table(1.5), tissue_table(3.0)
    for table in (low, high):
        assert table["wm"].t1_ms < table["gm"].t1_ms < table["csf"].t1_ms
        assert table["wm"].t2_ms < table["gm"].t2_ms < table["csf"].t2_ms
        assert table["soft_tissue"].t1_ms < table["wm"].t1_ms  # fat shortens T1
        assert table["bone"].pd < 0.1
        assert table["bone"].t2_ms < 2.0
        assert table["gm"].pet_uptake / table["wm"].pet_uptake == pytest.approx(3.0, rel=0.1)
    for name in ("csf", "gm", "wm"):
        assert high[name].t1_ms > low[name].t1_ms  # T1 lengthens with field strength
    assert 700.0 <= low["wm"].t1_ms <= 850.0
    assert 1000.0 <= low["gm"].t1_ms <= 1250.0
    with pytest.raises(ValueError, match=r"7\.0 T"):
        tissue_table(7.0)


def test_gadolinium_brightens_only_tissue_that_takes_it_up() -> None:
    t1w = SequenceParams("spin_echo", tr_ms=500.0, te_ms=15.0)
    ce = SequenceParams("spin_echo", tr_ms=500.0, te_ms=15.0, contrast_agent=True)
    enhancing = TissueParams(1400.0, 180.0, 0.9, 30.0, 3.0, gd_mmol=0.3)
    sealed = TissueParams(1400.0, 180.0, 0.9, 30.0, 3.0, gd_mmol=0.0)
    assert tissue_signal(enhancing, ce, 1.5) > 1.5 * tissue_signal(enhancing, t1w, 1.5)
    assert tissue_signal(sealed, ce, 1.5) == tissue_signal(sealed, t1w, 1.5)


# ----------------------------------------------------------------------------- arguments


def test_mismatched_sites_and_subjects_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"subjects has 3 entries but sites=2"):
        generate_consortium(tmp_path, sites=2, subjects=[1, 2, 3], voxel_size=VOXEL_MM)
    assert not any(tmp_path.iterdir())


def test_existing_site_is_not_overwritten_silently(consortium: list[Path], tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_consortium(
            consortium[0].parent, sites=1, subjects=[1], voxel_size=VOXEL_MM, seed=0
        )
    foreign = tmp_path / "site-1"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("not a phantom")
    with pytest.raises(FileExistsError, match="refusing to delete"):
        generate_consortium(tmp_path, sites=1, subjects=[1], voxel_size=VOXEL_MM, overwrite=True)
    assert (foreign / "precious.txt").is_file()


def test_overwrite_replaces_a_phantom_site(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"sites": 1, "voxel_size": VOXEL_MM, "modalities": ["T1w"]}
    (site,) = generate_consortium(tmp_path, subjects=[2], **kwargs)
    first = _image(site, "sub-s1p001", Modality.T1W).read_bytes()
    generate_consortium(tmp_path, subjects=[1], overwrite=True, **kwargs)
    assert _subjects(site) == ["sub-s1p001"]  # the stale second subject is gone
    assert _image(site, "sub-s1p001", Modality.T1W).read_bytes() == first


# ----------------------------------------------------------------------------- layout


def test_bids_layout_and_names(consortium: list[Path]) -> None:
    assert [p.name for p in consortium] == ["site-1", "site-2"]
    for site, count in zip(consortium, SUBJECTS, strict=True):
        description = json.loads((site / "dataset_description.json").read_text())
        assert description["DatasetType"] == "raw"
        assert description["BIDSVersion"]
        assert description["GeneratedBy"][0]["Name"] == "fedsynth phantom"
        subs = _subjects(site)
        assert len(subs) == count
        rows = (site / "participants.tsv").read_text().splitlines()
        assert rows[0].split("\t")[0] == "participant_id"
        assert [r.split("\t")[0] for r in rows[1:]] == subs
        for sub in subs:
            for modality in DEFAULT_MODALITIES:
                assert _image(site, sub, modality).is_file(), (site, sub, modality)
            assert (site / sub / "pet" / f"{sub}_pet.nii.gz").is_file()
            assert (site / sub / "anat" / f"{sub}_ct.nii.gz").is_file()
            assert _derivative(site, sub, "dseg").is_file()
            assert _derivative(site, sub, "label-lesion_mask").is_file()
        leftovers = [p for p in site.rglob("*") if p.name.startswith(".") or "tmp" in p.name]
        assert leftovers == []  # atomic writes leave no temporary files behind


def test_subject_ids_are_alphanumeric_and_unique(consortium: list[Path]) -> None:
    subs = [sub for _, sub in _each_subject(consortium)]
    assert len(subs) == len(set(subs)) == sum(SUBJECTS)
    assert all(re.fullmatch(r"sub-[A-Za-z0-9]+", s) for s in subs)


def test_images_share_the_subject_grid_and_the_site_voxel_size(consortium: list[Path]) -> None:
    for site, sub in _each_subject(consortium):
        voxel = _truth(site)["scanner"]["voxel_size_mm"]
        paths = [_image(site, sub, m) for m in DEFAULT_MODALITIES]
        paths += [_derivative(site, sub, s) for s in ("dseg", "label-lesion_mask", "probseg")]
        reference = nib.load(paths[0])
        assert isinstance(reference, nib.Nifti1Image)
        assert np.allclose(reference.header.get_zooms()[:3], voxel)
        assert np.allclose(np.abs(np.diag(reference.affine)[:3]), voxel)
        assert nib.aff2axcodes(reference.affine) == ("R", "A", "S")
        for path in paths[1:]:
            other = nib.load(path)
            assert isinstance(other, nib.Nifti1Image)
            assert other.shape[:3] == reference.shape, path
            assert np.allclose(other.affine, reference.affine), path


def test_dtypes_and_value_ranges(consortium: list[Path]) -> None:
    site, sub = consortium[0], _subjects(consortium[0])[0]
    for modality in DEFAULT_MODALITIES:
        image = nib.load(_image(site, sub, modality))
        assert isinstance(image, nib.Nifti1Image)
        data = np.asarray(image.dataobj)
        assert np.isfinite(data).all()
        if modality.is_mr:
            assert data.dtype == np.int16
            assert data.min() >= 0 and data.max() > 0
        if modality is Modality.CT:
            assert data.dtype == np.int16
            assert data.min() >= -1024 and data.max() > 500
        if modality is Modality.PET:
            assert data.dtype == np.float32 and data.min() >= 0.0
    dseg = nib.load(_derivative(site, sub, "dseg"))
    assert isinstance(dseg, nib.Nifti1Image)
    assert np.asarray(dseg.dataobj).dtype == np.uint8
    assert set(np.unique(np.asarray(dseg.dataobj)).tolist()) <= set(LABELS)
    probseg = _load(_derivative(site, sub, "probseg"))
    assert probseg.shape[-1] == len(LABELS)
    assert np.allclose(probseg.sum(axis=-1), 1.0, atol=0.03)
    # dseg is the argmax of the unquantised fractions; 8-bit storage only flips near-ties
    agreement = np.mean(np.argmax(probseg, axis=-1) == np.asarray(dseg.dataobj))
    assert agreement > 0.99


# ----------------------------------------------------------------------------- MR contrast


def _medians(site: Path, sub: str, modality: Modality) -> dict[int, float]:
    image = _load(_image(site, sub, modality))
    dseg = _load(_derivative(site, sub, "dseg")).astype(int)
    return {label: float(np.median(image[dseg == label])) for label in (CSF, GM, WM)}


def test_t1w_contrast_csf_dark_white_matter_brightest(consortium: list[Path]) -> None:
    for site, sub in _each_subject(consortium):
        m = _medians(site, sub, Modality.T1W)
        assert m[CSF] < m[GM] < m[WM], (site.name, sub, m)
        assert m[WM] > 1.08 * m[GM]


def test_t2w_contrast_csf_brightest_grey_above_white(consortium: list[Path]) -> None:
    for site, sub in _each_subject(consortium):
        m = _medians(site, sub, Modality.T2W)
        assert m[CSF] > m[GM] > m[WM], (site.name, sub, m)
        assert m[CSF] > 1.3 * m[GM]


def test_flair_nulls_csf(consortium: list[Path]) -> None:
    for site, sub in _each_subject(consortium):
        flair = _load(_image(site, sub, Modality.FLAIR))
        probseg = _load(_derivative(site, sub, "probseg"))
        floor = np.median(flair[probseg[..., 0] >= 0.99])  # air: scanner offset + noise floor
        csf = flair[probseg[..., CSF] >= 0.9] - floor
        gm = flair[probseg[..., GM] >= 0.9] - floor
        assert csf.size > 20 and gm.size > 20
        assert csf.mean() < 0.25 * gm.mean(), (site.name, sub, csf.mean(), gm.mean())
        # the same sequence without the null would make CSF the brightest tissue (T2w)
        t2w = _load(_image(site, sub, Modality.T2W))
        assert t2w[probseg[..., CSF] >= 0.9].mean() > t2w[probseg[..., GM] >= 0.9].mean()


def test_ground_truth_ti_is_the_csf_null(consortium: list[Path]) -> None:
    for site in consortium:
        truth = _truth(site)
        flair = truth["sequences"]["FLAIR"]
        csf_t1 = truth["tissues"]["csf"]["t1_ms"]
        assert flair["ti_ms"] == pytest.approx(null_inversion_time(csf_t1, flair["tr_ms"]), 1e-5)


# ----------------------------------------------------------------------------- CT and PET


def test_ct_numbers(consortium: list[Path]) -> None:
    for site, sub in _each_subject(consortium):
        ct = _load(_image(site, sub, Modality.CT))
        dseg = _load(_derivative(site, sub, "dseg")).astype(int)
        assert np.median(ct[dseg == BONE]) > 500.0
        brain = ct[(dseg == GM) | (dseg == WM)]
        assert 0.0 < np.median(brain) < 80.0
        assert np.median(ct[dseg == 0]) < -900.0
        assert np.median(ct[dseg == GM]) > np.median(ct[dseg == WM])


def test_pet_grey_to_white_uptake_ratio(consortium: list[Path]) -> None:
    """Geometric-transfer-matrix fit (Rousset 1998): PET = blur(fractions) @ uptake."""
    for site, sub in _each_subject(consortium):
        truth = _truth(site)
        pet_image = nib.load(_image(site, sub, Modality.PET))
        assert isinstance(pet_image, nib.Nifti1Image)
        pet = np.asarray(pet_image.get_fdata()).ravel()
        probseg = _load(_derivative(site, sub, "probseg"))
        fwhm = truth["scanner"]["pet_fwhm_mm"]
        sigmas = [fwhm / (2 * math.sqrt(2 * math.log(2))) / z for z in pet_image.header.get_zooms()]
        design = np.stack(
            [
                ndimage.gaussian_filter(probseg[..., k], sigmas, mode="constant").ravel()
                for k in range(probseg.shape[-1])
            ],
            axis=1,
        )
        uptake, *_ = np.linalg.lstsq(design, pet, rcond=None)
        assert 2.0 < uptake[GM] / uptake[WM] < 4.0, uptake
        assert uptake[CSF] < uptake[WM]


# ----------------------------------------------------------------------------- lesions


def test_lesions_lie_inside_the_intracranial_volume(consortium: list[Path]) -> None:
    seen = 0
    for site, sub in _each_subject(consortium):
        mask = _load(_derivative(site, sub, "label-lesion_mask")) > 0
        probseg = _load(_derivative(site, sub, "probseg"))
        intracranial = probseg[..., [CSF, GM, WM, LESION]].sum(axis=-1)
        assert (intracranial[mask] > 0.9).all()
        seen += int(mask.sum())
        record = next(s for s in _truth(site)["subjects"] if f"sub-{s['id']}" == sub)
        assert 1 <= len(record["lesions"]) <= 3
        image = nib.load(_derivative(site, sub, "dseg"))
        assert isinstance(image, nib.Nifti1Image)
        dseg = np.asarray(image.dataobj)
        for lesion in record["lesions"]:
            params = lesion["params"]
            assert params["t1_ms"] > _truth(site)["tissues"]["wm"]["t1_ms"]
            assert params["t2_ms"] > _truth(site)["tissues"]["wm"]["t2_ms"]
            ijk = np.linalg.solve(image.affine, [*lesion["centre_mm"], 1.0])[:3]
            label = dseg[tuple(np.clip(np.rint(ijk).astype(int), 0, np.array(dseg.shape) - 1))]
            assert label in (CSF, GM, WM, LESION)
    assert seen > 0


def test_no_lesions_when_disabled(tmp_path: Path) -> None:
    (site,) = generate_consortium(
        tmp_path, sites=1, subjects=[1], voxel_size=VOXEL_MM, lesions=False, modalities=["T1w"]
    )
    sub = _subjects(site)[0]
    assert not _load(_derivative(site, sub, "label-lesion_mask")).any()
    assert _truth(site)["subjects"][0]["lesions"] == []
    assert not (_load(_derivative(site, sub, "dseg")) == LESION).any()


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes(consortium: list[Path], consortium_again: list[Path]) -> None:
    first, second = _all_files(consortium[0].parent), _all_files(consortium_again[0].parent)
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert different == []


def test_different_seeds_differ(consortium: list[Path], tmp_path: Path) -> None:
    other = generate_consortium(
        tmp_path, sites=1, subjects=[1], seed=1, voxel_size=VOXEL_MM, modalities=["T1w"]
    )
    sub = _subjects(other[0])[0]
    a = _image(consortium[0], sub, Modality.T1W).read_bytes()
    b = _image(other[0], sub, Modality.T1W).read_bytes()
    assert a != b
    assert _truth(other[0])["scanner"] != _truth(consortium[0])["scanner"]


def test_a_site_does_not_depend_on_other_sites(consortium: list[Path], tmp_path: Path) -> None:
    changed = generate_consortium(
        tmp_path, sites=2, subjects=[1, 1], seed=0, voxel_size=VOXEL_MM, modalities=["T1w", "ct"]
    )
    sub = _subjects(changed[1])[0]
    for modality in (Modality.T1W, Modality.CT):
        assert (
            _image(changed[1], sub, modality).read_bytes()
            == _image(consortium[1], sub, modality).read_bytes()
        )
    assert (
        _derivative(changed[1], sub, "dseg").read_bytes()
        == _derivative(consortium[1], sub, "dseg").read_bytes()
    )


def test_sites_differ_in_scanner_parameters(consortium: list[Path]) -> None:
    one, two = (_truth(site)["scanner"] for site in consortium)
    assert one["field_strength_t"] != two["field_strength_t"]
    assert one["voxel_size_mm"][2] != two["voxel_size_mm"][2]
    assert one["mr_scale"] != two["mr_scale"]
    assert one["bias_coefficients"] != two["bias_coefficients"]
    t1w = [_truth(site)["sequences"]["T1w"] for site in consortium]
    assert t1w[0] != t1w[1]


def test_contrast_enhanced_t1w_is_written_when_asked(tmp_path: Path) -> None:
    (site,) = generate_consortium(
        tmp_path,
        sites=1,
        subjects=[1],
        voxel_size=VOXEL_MM,
        modalities=[Modality.T1W, Modality.T1W_CE],
    )
    sub = _subjects(site)[0]
    ce = _image(site, sub, Modality.T1W_CE)
    assert ce.name == f"{sub}_ce-gd_T1w.nii.gz"
    assert not _image(site, sub, Modality.T2W).exists()
    dseg = _load(_derivative(site, sub, "dseg")).astype(int)
    plain, enhanced = _load(_image(site, sub, Modality.T1W)), _load(ce)
    # scalp takes up gadolinium, white matter (intact blood-brain barrier) barely does
    ratio_plain = np.median(plain[dseg == SOFT]) / np.median(plain[dseg == WM])
    ratio_enhanced = np.median(enhanced[dseg == SOFT]) / np.median(enhanced[dseg == WM])
    assert ratio_enhanced > 1.03 * ratio_plain
    assert "T1w-ce" in _truth(site)["sequences"]
    assert _truth(site)["sequences"]["T1w-ce"]["contrast_agent"] is True


def test_phantom_exist_ok_keeps_matching_sites_and_refuses_others(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedsynth.cli.main import app

    runner = CliRunner()
    args = ["phantom", str(tmp_path / "p"), "--sites", "2", "--subjects", "1,1", "--voxel-mm",
            "6", "--modalities", "T1w,T2w", "--no-lesions"]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "p").rglob("*.nii.gz")}
    kept = runner.invoke(app, [*args, "--exist-ok"])
    assert kept.exit_code == 0 and "kept" in kept.output
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "p").rglob("*.nii.gz")} == stamp
    other = [*args[:5], "2,1", *args[6:], "--exist-ok"]
    refused = runner.invoke(app, other)
    assert refused.exit_code == 1 and "1,1 subjects, not 2,1" in refused.output
