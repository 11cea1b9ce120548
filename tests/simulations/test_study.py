"""The real-MRI quality study (benchmarks/study_real/) on a tiny setting: phantom hospitals laid
out like ../shared/data, a tiny network, one round, the in-process federation. What is checked:
every arm on every fold, the table against the folds' own results, the naive baselines (lookup
table, histogram matching, constant) against a direct computation from the training sites' data,
the goal against the best of them, the DP budget, the CT statistics against the real CT read
with nibabel, resuming, and refusing to mix settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks import study_real
from fedsynth.common.baselines import CONSTANT, HISTOGRAM, LOOKUP_TABLE, HistogramMatcher
from fedsynth.common.data.datasets import PairedSlices
from fedsynth.common.data.site import load_site
from fedsynth.common.evaluation import site_pairs
from fedsynth.common.phantom import generate_consortium
from fedsynth.simulations.engines.inprocess import TINY, tiny_config
from fedsynth.simulations.errors import ExperimentError
from fedsynth.simulations.experiment import run_experiment
from fedsynth.simulations.results import FEDERATED, POOLED, ExperimentResults

SETTINGS = [
    *TINY,
    "simulation.engine=inprocess",
    "federation.rounds=1",
    "federation.local_epochs=1",
    # Calibrating the DP variant's noise with RDP takes a fraction of PRV's time; PRV
    # calibration has its own tests (tests/client/test_privacy.py).
    "privacy.accountant=rdp",
]
FOLDS = ("site-a", "site-b", "site-e")
SCORED_AS = {"site-a": "unseen-site-a", "site-b": "unseen-site-b", "site-e": "unseen-site-e-coreg"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``brain-mri/site-{a,b}``, the clinical ``brain-mri-clinical/site-e`` with its copy
    ``site-e-coreg`` (one subject each, T1w and T2w), and ``brain-ct/site-ct``."""
    root = tmp_path_factory.mktemp("data")
    mri = root / "brain-mri"
    generate_consortium(
        mri, sites=3, subjects=[1, 1, 1], seed=0, modalities=["T1w", "T2w"], voxel_size=4
    )
    for index, fold in enumerate(FOLDS[:2], start=1):
        (mri / f"site-{index}").rename(mri / fold)
    clinical = root / "brain-mri-clinical"
    clinical.mkdir()
    (mri / "site-3").rename(clinical / "site-e")
    shutil.copytree(clinical / "site-e", clinical / "site-e-coreg")
    ct = root / "brain-ct"
    generate_consortium(ct, sites=1, subjects=[1], seed=7, modalities=["ct"], voxel_size=4)
    # Another person than the MRI subjects (the phantom names subjects by site number).
    site = ct / "site-1"
    shutil.rmtree(site / "derivatives")
    for path in sorted(site.rglob("sub-s1p001*"), key=lambda p: -len(p.parts)):
        path.rename(path.with_name(path.name.replace("s1p001", "ct01")))
    site.rename(ct / "site-ct")
    return root


def _run(data: Path, out: Path, *extra: str) -> int:
    args = ["--out", str(out), "--data", str(data), "--directions", "T1w->T2w"]
    for setting in SETTINGS:
        args += ["--set", setting]
    return study_real.main([*args, *extra])


def _unit_psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray) -> float:
    error = (np.clip((pred + 1) / 2, 0, 1) - np.clip((target + 1) / 2, 0, 1))[mask]
    return float(10 * np.log10(1.0 / np.mean(error**2)))


@pytest.mark.slow
def test_study_runs_every_arm_resumes_and_refuses_other_settings(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    assert _run(data, out) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    entry = results["directions"]["T1w->T2w"]
    assert entry["folds"] == list(FOLDS)
    summary = entry["summary"]

    # Every arm on every fold; the variants on the first fold only.
    for fold in FOLDS:
        rows = entry["per_fold"][fold]
        expected = {
            FEDERATED, POOLED, "untrained", study_real.LOCAL_MEAN, HISTOGRAM, LOOKUP_TABLE,
            CONSTANT,
        }  # fmt: skip
        assert expected <= set(rows), fold
        assert len(rows[study_real.LOCAL_MEAN]["models"]) == 2  # the two training sites
        assert {m["site"] for m in rows[study_real.LOCAL_MEAN]["models"]} == set(FOLDS) - {fold}
    assert set(summary[study_real.VARIANT_LABELS["dp"]]["psnr_masked"]["folds"]) == {"site-a"}

    # The table is the folds' own results: each experiment evaluated on the site it left out.
    for arm in (FEDERATED, POOLED):
        values = []
        for fold in FOLDS:
            folder = out / "T1w-to-T2w" / f"fold-{fold}"
            model = ExperimentResults.read(folder).model(arm)
            assert model is not None
            # No training site is scored; the clinical site is scored on its co-registered copy.
            assert set(model.per_site) == {SCORED_AS[fold]}
            values.append(model.per_site[SCORED_AS[fold]]["psnr_masked"])
        cell = summary[arm]["psnr_masked"]
        assert cell["mean"] == pytest.approx(np.mean(values))
        assert cell["sd"] == pytest.approx(np.std(values, ddof=1))
    site_a = entry["per_fold"]["site-a"]
    locals_ = [m["metrics"]["mae_masked"] for m in site_a[study_real.LOCAL_MEAN]["models"]]
    assert site_a[study_real.LOCAL_MEAN]["metrics"]["mae_masked"] == pytest.approx(np.mean(locals_))

    # The naive baselines, computed here from the training sites' data (site-a left out): the
    # lookup table and the histogram from np.histogram, the constant from the target voxels.
    config = tiny_config(*SETTINGS[len(TINY) :], *study_real.COMMON)
    train = sorted((out / "T1w-to-T2w" / "fold-site-a" / "split" / "train").iterdir())
    assert len(train) == 2  # the two training sites, never the left-out one
    sites = [load_site(d, config.data) for d in train]
    paired = [PairedSlices([pair]) for site in sites for pair in site.paired]
    source = np.concatenate([p.a[p.masks] for p in paired])
    target = np.concatenate([p.b[p.masks] for p in paired])
    edges = np.linspace(-1, 1, 257)
    counts, _ = np.histogram(source, bins=edges)
    sums, _ = np.histogram(source, bins=edges, weights=target)
    centres = (edges[:-1] + edges[1:]) / 2
    filled = counts > 0
    table = np.interp(centres, centres[filled], sums[filled] / counts[filled])
    volumes = {str(v.scan.path): v for s in sites for v in [*s.domain_b, *(b for _, b in s.paired)]}
    reference = np.concatenate([v.stack.slices[v.stack.masks] for v in volumes.values()])
    matcher = HistogramMatcher.from_histogram(np.histogram(reference, bins=edges)[0])
    constant = reference.astype(np.float64).mean()
    _, pairs = site_pairs(data / "brain-mri" / "site-a", config.data)
    (_, left_out), *_ = pairs
    masks = left_out.masks.astype(bool)
    predictions = {
        LOOKUP_TABLE: np.where(masks, np.interp(left_out.a, centres, table), -1.0),
        HISTOGRAM: matcher(left_out.a, masks),  # the subject's quantiles, in the scored mask
        CONSTANT: np.where(masks, constant, -1.0),
    }
    for arm, predicted in predictions.items():
        psnrs = [
            _unit_psnr(p, b, m)
            for p, b, m in zip(predicted, left_out.b, masks, strict=True)
            if m.any()
        ]
        measured = site_a[arm]["metrics"]["psnr_masked"]
        assert measured == pytest.approx(np.mean(psnrs), abs=1e-4), arm

    # DP: each site's cumulative epsilon reached, and did not pass, the budget of 8.
    epsilon = site_a[study_real.VARIANT_LABELS["dp"]]["epsilon"]
    assert len(epsilon) == 2
    assert all(0 < e <= 8.0 + 1e-6 for e in epsilon.values())

    # The per-round curve ends at the table's federated model.
    curve = entry["rounds"][FEDERATED]["site-b"]
    assert len(curve) == 2  # round 0 (untrained) and round 1
    assert curve[-1] == entry["per_fold"]["site-b"][FEDERATED]["metrics"]["psnr_masked"]
    assert curve[0] == entry["per_fold"]["site-b"]["untrained"]["metrics"]["psnr_masked"]

    # Goals are the differences of the table's means, judged against their thresholds.
    goal = next(g for g in entry["goals"] if g["goal"].startswith("federated within"))
    gap = summary[FEDERATED]["psnr_masked"]["mean"] - summary[POOLED]["psnr_masked"]["mean"]
    assert goal["value"] == pytest.approx(gap)
    assert goal["met"] == (gap >= -0.5)
    # Against the best naive baseline, per metric, in the mean and per fold; 3 folds < 4 needed.
    naive = next(g for g in entry["goals"] if "best naive baseline" in g["goal"])
    for key, field in (("psnr_masked", "value"), ("ssim_masked", "ssim_value")):
        best = max(summary[arm][key]["mean"] for arm in (LOOKUP_TABLE, HISTOGRAM, CONSTANT))
        assert naive[field] == pytest.approx(summary[FEDERATED][key]["mean"] - best)
    for fold in FOLDS:
        best = max(summary[a]["psnr_masked"]["folds"][fold] for a in (LOOKUP_TABLE, HISTOGRAM))
        best = max(best, summary[CONSTANT]["psnr_masked"]["folds"][fold])
        gap = summary[FEDERATED]["psnr_masked"]["folds"][fold] - best
        assert naive["per_fold"][fold]["psnr"] == pytest.approx(gap)
    assert naive["met"] is False and "of 3 folds, 4 needed" in naive["verdict"]

    # MRI -> CT: one synthetic CT per MRI subject, on its T1w's grid; the real CT's figures.
    ct = results["ct"]
    assert len(ct["subjects"]) == 2  # the co-registered MRI sites' subjects (not the clinical)
    for subject in ct["subjects"]:
        t1 = nib.load(subject["t1w"])
        synthetic = nib.load(subject["synthetic"])
        assert synthetic.shape == t1.shape
        np.testing.assert_allclose(synthetic.affine, t1.affine, atol=1e-5)
        assert set(subject["tissues"]) == set(study_real.TISSUES)
    real_hu = np.asarray(nib.load(ct["real"]["path"]).dataobj, dtype=np.float64)
    skull = real_hu[real_hu > 300]
    assert ct["real"]["bone"]["voxels"] == skull.size > 0
    assert ct["real"]["bone"]["median"] == pytest.approx(np.median(skull))
    for tissue, (low, high) in study_real.HU_WINDOWS.items():
        figures = ct["real"]["tissues"][tissue]
        if figures["voxels"]:
            assert low <= figures["mean"] <= high

    report = (out / "report.md").read_text(encoding="utf-8")
    federated_row = next(line for line in report.splitlines() if line.startswith("| federated |"))
    assert f"{summary[FEDERATED]['psnr_masked']['mean']:.2f} ± " in federated_row
    table_row = next(line for line in report.splitlines() if line.startswith("| lookup table |"))
    assert f"{summary[LOOKUP_TABLE]['psnr_masked']['mean']:.2f} ± " in table_row
    assert naive["goal"] in report and naive["verdict"] in report
    for figure in ("T1w-to-T2w.png", "T1w-to-T2w-variants.png", "t1w-to-ct.png"):
        assert (out / "figures" / figure).read_bytes().startswith(b"\x89PNG")
        assert f"figures/{figure}" in report

    # Interrupted in the last fold's evaluation: the same command finishes only what is missing.
    (out / "T1w-to-T2w" / "fold-site-e" / "results.json").unlink()
    capsys.readouterr()
    assert _run(data, out) == 0
    printed = capsys.readouterr().out
    assert "site-a left out: finished earlier" in printed
    assert "site-a left out, dp: finished earlier" in printed
    assert "[federated] done earlier" in printed  # site-e: trained models kept
    assert "T1w -> CT: trained earlier" in printed
    again = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert again["directions"]["T1w->T2w"]["summary"] == summary

    # Other settings in the same folder: refused, naming what changed.
    assert _run(data, out, "--set", "federation.rounds=2") == 2
    assert "overrides" in capsys.readouterr().err


def test_unseen_site_must_not_be_a_training_site(data: Path, tmp_path: Path) -> None:
    site = data / "brain-mri" / "site-a"
    with pytest.raises(ExperimentError, match="also a training --site"):
        run_experiment(
            tiny_config(),
            folder=tmp_path / "x",
            pool_sites=[site, data / "brain-mri" / "site-b"],
            eval_sites=[site],
        )
    assert not (tmp_path / "x").exists()


def test_study_refuses_missing_data_and_unknown_folds(data: Path, tmp_path: Path) -> None:
    assert study_real.main(["--out", str(tmp_path / "s"), "--data", str(tmp_path)]) == 2
    assert _run(data, tmp_path / "s", "--folds", "site-z") == 2
    assert not (tmp_path / "s").exists()


def test_simulate_refuses_an_eval_site_it_also_trains_on(data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedsynth.cli.main import app

    site = data / "brain-mri" / "site-a"
    result = CliRunner().invoke(
        app,
        ["simulate", "--site", str(site), "--site", str(data / "brain-mri" / "site-b"),
         "--eval-site", str(site), "--run-dir", str(tmp_path / "x")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "is also a training --site" in result.output
