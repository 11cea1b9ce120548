"""Paired evaluation and the histogram-matching baseline, checked against direct computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedsynth.common.baselines import HistogramMatcher
from fedsynth.common.config import DataConfig
from fedsynth.common.evaluation import evaluate_pairs, site_pairs, subject_metrics
from tests.conftest import SiteMaker, head_volume, save_nifti

DATA = DataConfig(
    direction="T1w->T2w", spacing_mm=(2.0, 2.0, 2.0), image_size=48, min_foreground=0.05
)


def test_perfect_translation_scores_perfectly(make_site: SiteMaker) -> None:
    root = make_site(subjects={"sub-01": ["T1w"], "sub-02": ["T1w"]})
    for subject in ("sub-01", "sub-02"):  # the "T2w" is the T1w itself: G = identity is perfect
        source = root / subject / "anat" / f"{subject}_T1w.nii.gz"
        (root / subject / "anat" / f"{subject}_T2w.nii.gz").write_bytes(source.read_bytes())
    name, pairs = site_pairs(root, DATA)
    assert name == "site-x" and [s for s, _ in pairs] == ["sub-01", "sub-02"]
    report = evaluate_pairs(name, "T1w->T2w", pairs, lambda a: a)
    assert [s.slices for s in report.subjects] == [len(p) for _, p in pairs]
    for subject in report.subjects:
        assert math.isinf(subject.metrics["psnr_masked"]) and subject.metrics["mae"] == 0.0
        assert subject.metrics["ssim_masked"] == pytest.approx(1.0)
        assert subject.metrics["kspace_high"] == 0.0
    assert not any(k.endswith("_n") for k in report.mean)
    assert '"vol_psnr": "inf"' in report.to_json()


def test_subject_metrics_against_numpy() -> None:
    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, size=(4, 32, 32))
    predicted = np.clip(target + rng.normal(0, 0.1, size=target.shape), -1, 1)
    masks = np.zeros(target.shape, bool)
    masks[:, 8:24, 8:24] = True
    metrics = subject_metrics(predicted, target, masks)
    p, t = (predicted + 1) / 2, (target + 1) / 2
    per_slice = [
        10 * np.log10(1 / np.mean((p[i][masks[i]] - t[i][masks[i]]) ** 2)) for i in range(4)
    ]
    assert metrics["psnr_masked"] == pytest.approx(np.mean(per_slice), abs=1e-9)
    volume = 10 * np.log10(1 / np.mean((p[masks] - t[masks]) ** 2))
    assert metrics["vol_psnr_masked"] == pytest.approx(volume, abs=1e-9)
    assert metrics["vol_mae"] == pytest.approx(np.abs(p - t).mean(), abs=1e-12)
    assert metrics["vol_nmse"] == pytest.approx(((p - t) ** 2).sum() / (t**2).sum(), abs=1e-12)


def test_site_without_pairs_is_explained(make_site: SiteMaker) -> None:
    root = make_site(subjects={"sub-01": ["T1w"], "sub-02": ["T2w"]})
    with pytest.raises(ValueError, match="no subject with both T1w and T2w"):
        site_pairs(root, DATA)


def test_histogram_matching_transfers_the_distribution_and_keeps_order() -> None:
    rng = np.random.default_rng(1)
    reference = rng.gamma(2.0, 0.2, size=20_000) - 1.0
    source = rng.normal(0.0, 0.3, size=(64, 64))
    mask = np.zeros_like(source, bool)
    mask[8:56, 8:56] = True
    matched = HistogramMatcher(reference)(source, mask)
    inside = matched[mask]
    # Quantiles of the output equal the reference's (within the knot interpolation error).
    levels = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(
        np.quantile(inside, levels), np.quantile(reference, levels), atol=0.02
    )
    # Monotone: the map never reorders intensities.
    order = np.argsort(source[mask])
    assert np.all(np.diff(inside[order]) >= -1e-6)
    assert np.all(matched[~mask] == -1.0)


def test_histogram_matching_cannot_invert_contrast(tmp_path: Path) -> None:
    """Why learned models must beat it: T1w dark CSF stays dark after matching to T2w."""
    t1, t2 = head_volume("T1w"), head_volume("T2w")
    shell = (t1 > 200) & (t1 < 400)  # the outer shell: dark in T1w, bright in T2w
    core = t1 > 700
    matched = HistogramMatcher(t2[t2 > 0])(t1, t1 > 0, background=0.0)
    assert matched[shell].mean() < matched[core].mean()
    assert t2[shell].mean() > t2[core].mean()
    assert save_nifti(tmp_path / "x.nii.gz", matched).exists()


def test_lesion_metrics_come_from_the_derivatives_mask(tmp_path: Path) -> None:
    from fedsynth.common.data.discovery import find_lesion_mask
    from fedsynth.common.data.preprocess import preprocess_label
    from fedsynth.common.metrics import region_metrics, to_unit
    from fedsynth.common.phantom import generate_consortium

    (site,) = generate_consortium(
        tmp_path, sites=1, subjects=[1], seed=3, voxel_size=4.0, modalities=["T1w", "T2w"]
    )
    config = DATA.model_copy(update={"spacing_mm": (4.0, 4.0, 4.0), "image_size": 48})
    name, pairs = site_pairs(site, config)
    ((subject, paired),) = pairs
    mask_path = find_lesion_mask(site, subject)
    assert mask_path is not None and "label-lesion_mask" in mask_path.name
    assert paired.lesions is not None and paired.lesions.any()
    # The lesion slices are the mask preprocessed on the same grid, at the paired positions.
    volume = preprocess_label(mask_path, config)
    expected = np.stack([volume[:, :, z] for _, z in paired.positions])
    np.testing.assert_array_equal(paired.lesions, expected)

    def noisy(slices: np.ndarray) -> np.ndarray:
        return np.clip(slices + 0.05, -1.0, 1.0)

    report = evaluate_pairs(name, "T1w->T2w", pairs, noisy)
    metrics = report.subjects[0].metrics
    with_lesion = [i for i in range(len(paired)) if paired.lesions[i].any()]
    direct = [
        region_metrics(
            to_unit(noisy(paired.a[i : i + 1])[0]), to_unit(paired.b[i]), paired.lesions[i]
        )
        for i in with_lesion
    ]
    finite = [d["psnr"] for d in direct if np.isfinite(d["psnr"])]
    assert metrics["lesion_psnr"] == pytest.approx(np.mean(finite), abs=1e-9)
    assert metrics["lesion_mae"] == pytest.approx(np.mean([d["mae"] for d in direct]), abs=1e-9)


def test_no_lesion_mask_no_lesion_metrics(make_site: SiteMaker) -> None:
    root = make_site(subjects={"sub-01": ["T1w", "T2w"]})
    _, pairs = site_pairs(root, DATA)
    assert pairs[0][1].lesions is None
    report = evaluate_pairs("site-x", "T1w->T2w", pairs, lambda a: a)
    assert "lesion_psnr" not in report.subjects[0].metrics


def test_a_predictor_is_given_the_evaluation_mask_and_scored_like_a_model(
    make_site: SiteMaker,
) -> None:
    from fedsynth.common.evaluation import add_baselines, evaluate_predictor

    _, pairs = site_pairs(make_site(), DATA)
    seen: list[np.ndarray] = []

    def predict(source: np.ndarray, mask: np.ndarray) -> np.ndarray:
        seen.append(mask)
        return np.where(mask, source, -1.0)

    report = evaluate_predictor("site-x", "T1w->T2w", pairs, predict)
    assert len(seen) == len(pairs)
    for mask, (_, paired) in zip(seen, pairs, strict=True):
        np.testing.assert_array_equal(mask, paired.masks.astype(bool))
    # Inside the mask the prediction is the source, so the masked scores equal the model's.
    model = evaluate_pairs("site-x", "T1w->T2w", pairs, lambda a: a)
    assert report.mean["psnr_masked"] == pytest.approx(model.mean["psnr_masked"], abs=1e-9)
    add_baselines(model, pairs, {"masked identity": predict})
    scores = model.baselines["masked identity"]
    assert [s.subject for s in scores.subjects] == [s.subject for s in model.subjects]
    assert scores.mean == report.mean
    assert '"masked identity"' in model.to_json()


def test_evaluate_scores_the_checkpoints_baselines_on_the_same_subjects(
    make_site: SiteMaker, tmp_path: Path
) -> None:
    """`fedsynth evaluate` with a checkpoint whose metadata holds the training site's intensity
    statistics: the three baselines on the same subjects; the constant's masked MAE is checked
    against a direct computation."""
    import json

    from typer.testing import CliRunner

    from fedsynth.cli.main import app
    from fedsynth.common.baselines import BASELINE_NAMES, CONSTANT, baseline_statistics
    from fedsynth.common.checkpoint import CheckpointMetadata, save_checkpoint
    from fedsynth.common.config import ModelConfig
    from fedsynth.common.data.site import load_site
    from fedsynth.common.models import define_generator, init_weights

    data = DATA.model_copy(update={"cache_dir": tmp_path / "cache"})
    training = load_site(make_site("train"), data)
    evaluation_site = make_site("test", {"sub-07": ["T1w", "T2w"], "sub-08": ["T1w", "T2w"]})
    tiny = ModelConfig(ngf=8, n_blocks=1, ndf=8, d_layers=1)
    generators = {k: init_weights(define_generator(tiny, 48), seed=1) for k in ("g_ab", "g_ba")}
    statistics = baseline_statistics([training])
    checkpoint = save_checkpoint(
        tmp_path / "ckpt",
        generators,
        CheckpointMetadata(
            kind="local", direction="T1w->T2w", model=tiny, data=data, baselines=statistics
        ),
    )
    out = tmp_path / "eval.json"
    args = ["evaluate", "--checkpoint", str(checkpoint), "--site", str(evaluation_site)]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "lookup table (mean)" in result.output and "best naive baseline" in result.output
    report = json.loads(out.read_text())
    assert list(report["baselines"]) == list(BASELINE_NAMES)
    for scores in report["baselines"].values():
        assert [(s["subject"], s["slices"]) for s in scores["subjects"]] == [
            (s["subject"], s["slices"]) for s in report["subjects"]
        ]
        assert {"psnr_masked", "ssim_masked", "mae_masked"} <= set(scores["mean"])
    # The constant: the training site's mean T2w inside its masks, scored inside the mask.
    targets = {str(b.scan.path): b for _, b in training.paired}
    values = np.concatenate([v.stack.slices[v.stack.masks] for v in targets.values()])
    constant = (values.astype(np.float64).mean() + 1) / 2
    _, pairs = site_pairs(evaluation_site, data)
    for (_, paired), subject in zip(pairs, report["baselines"][CONSTANT]["subjects"], strict=True):
        per_slice = [
            np.abs(constant - (b[m] + 1) / 2).mean()
            for b, m in zip(paired.b, paired.masks.astype(bool), strict=True)
            if m.any()
        ]
        assert subject["metrics"]["mae_masked"] == pytest.approx(np.mean(per_slice), abs=1e-6)
    # A checkpoint without statistics (older ones) still evaluates, and says so.
    old = CheckpointMetadata(kind="local", direction="T1w->T2w", model=tiny, data=data)
    save_checkpoint(tmp_path / "old", generators, old)
    args = ["evaluate", "--checkpoint", str(tmp_path / "old"), "--site", str(evaluation_site)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "no naive baselines" in result.output
    written = json.loads((tmp_path / "old" / "evaluation-test.json").read_text())
    assert written["baselines"] == {} and written["subjects"]


def test_evaluate_names_a_damaged_scan_and_goes_on_with_skip_bad(
    make_site: SiteMaker, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from fedsynth.cli.main import app
    from fedsynth.common.checkpoint import CheckpointMetadata, save_checkpoint
    from fedsynth.common.config import ModelConfig
    from fedsynth.common.models import define_generator, init_weights
    from tests.intake import BAD_KINDS

    site = make_site("test", {"sub-07": ["T1w", "T2w"]})
    damaged = site / "sub-08" / "anat" / "sub-08_T2w.nii.gz"
    damaged.parent.mkdir(parents=True)
    BAD_KINDS["units50mm"].write(damaged)
    tiny = ModelConfig(ngf=8, n_blocks=1, ndf=8, d_layers=1)
    data = DataConfig(spacing_mm=(2.0, 2.0, 2.0), image_size=48, min_foreground=0.05)
    generators = {k: init_weights(define_generator(tiny, 48), seed=1) for k in ("g_ab", "g_ba")}
    meta = CheckpointMetadata(kind="local", direction="T1w->T2w", model=tiny, data=data)
    checkpoint = save_checkpoint(tmp_path / "ckpt", generators, meta)
    args = ["evaluate", "--checkpoint", str(checkpoint), "--site", str(site), "--device", "cpu"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1
    assert "sub-08_T2w.nii.gz" in "".join(refused.output.split())
    assert "outside 0.1-20 mm" in " ".join(refused.output.split())
    assert "Traceback" not in refused.output
    done = CliRunner().invoke(app, [*args, "--skip-bad"])
    assert done.exit_code == 0, done.output
    assert "sub-07" in done.output
