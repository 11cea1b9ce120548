"""train-local, synthesize and evaluate from the command line, on a small phantom."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fedsynth.cli.main import app

runner = CliRunner()
TINY = [
    "--preset",
    "cpu-small",
    "--set",
    "data.spacing_mm=[6, 6, 6]",
    "--set",
    "data.image_size=32",
    "--set",
    "model.ngf=8",
    "--set",
    "model.n_blocks=1",
    "--set",
    "model.ndf=8",
    "--set",
    "model.d_layers=1",
    "--set",
    "training.batch_size=4",
]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    result = runner.invoke(
        app,
        [
            "phantom",
            str(out),
            "--sites",
            "2",
            "--subjects",
            "2,1",
            "--voxel-mm",
            "4",
            "--modalities",
            "T1w,T2w",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_train_local_then_resume_then_synthesize_and_evaluate(
    phantom: Path, tmp_path: Path
) -> None:
    base = [*TINY, "--set", f"output_dir={tmp_path}", "--name", "local"]
    first = runner.invoke(
        app,
        [
            "train-local",
            "--site",
            str(phantom / "site-1"),
            "-d",
            "T1w:T2w",
            *base,
            "--set",
            "training.epochs=2",
            "--set",
            "training.decay_epochs=1",
        ],
    )
    assert first.exit_code == 0, first.output
    run = tmp_path / "local"
    assert (run / "checkpoint" / "generators.safetensors").exists()
    assert (run / "config.resolved.toml").exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1.0, 2.0]
    meta = json.loads((run / "checkpoint" / "checkpoint.json").read_text())
    assert meta["kind"] == "local" and meta["epoch"] == 2 and meta["direction"] == "T1w->T2w"
    assert "site-1/psnr_masked" in meta["metrics"]

    resumed = runner.invoke(
        app,
        [
            "train-local",
            "--site",
            str(phantom / "site-1"),
            "-d",
            "T1w->T2w",
            *base,
            "--resume",
            "--set",
            "training.epochs=3",
            "--set",
            "training.decay_epochs=1",
        ],
    )
    assert resumed.exit_code == 0, resumed.output
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1.0, 2.0, 3.0]

    source = next((phantom / "site-2").glob("sub-*/anat/*_T1w.nii.gz"))
    out = tmp_path / "synth_T2w.nii.gz"
    synth = runner.invoke(
        app,
        [
            "synthesize",
            str(source),
            str(out),
            "--checkpoint",
            str(run / "checkpoint"),
            "--device",
            "cpu",
        ],
    )
    assert synth.exit_code == 0, synth.output
    np.testing.assert_allclose(nib.load(out).affine, nib.load(source).affine)
    assert nib.load(out).shape == nib.load(source).shape

    wrong = runner.invoke(
        app,
        [
            "synthesize",
            str(source).replace("_T1w", "_T2w"),
            str(tmp_path / "x.nii.gz"),
            "--checkpoint",
            str(run / "checkpoint"),
        ],
    )
    assert wrong.exit_code == 1 and "is T2w but the checkpoint translates T1w->T2w" in wrong.output

    report_path = tmp_path / "eval.json"
    evaluation = runner.invoke(
        app,
        [
            "evaluate",
            "--checkpoint",
            str(run / "checkpoint"),
            "--site",
            str(phantom / "site-2"),
            "--out",
            str(report_path),
            "--device",
            "cpu",
        ],
    )
    assert evaluation.exit_code == 0, evaluation.output
    assert "PSNR fg" in evaluation.output and "sub-s2p001" in evaluation.output
    report = json.loads(report_path.read_text())
    assert report["site"] == "site-2" and len(report["subjects"]) == 1
    assert {"psnr_masked", "ssim_masked", "mae_masked", "kspace_high"} <= set(report["mean"])


def test_pooled_run_is_marked_pooled(phantom: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train-local",
            "--site",
            str(phantom / "site-1"),
            "--site",
            str(phantom / "site-2"),
            *TINY,
            "--set",
            f"output_dir={tmp_path}",
            "--name",
            "pooled",
            "--set",
            "training.epochs=1",
            "--set",
            "training.decay_epochs=0",
        ],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "pooled" / "checkpoint" / "checkpoint.json").read_text())
    assert meta["kind"] == "pooled" and meta["sites"] == ["site-1", "site-2"]


def test_train_local_missing_modality_is_a_clear_error(phantom: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "train-local",
            "--site",
            str(phantom / "site-1"),
            "-d",
            "T1w->FLAIR",
            *TINY,
            "--set",
            f"output_dir={tmp_path}",
        ],
    )
    assert result.exit_code == 1
    assert "needs FLAIR scans" in result.output


def test_phantom_sites_pass_inspection(phantom: Path) -> None:
    for site in ("site-1", "site-2"):
        result = runner.invoke(app, ["inspect", str(phantom / site), "-d", "T1w->T2w", *TINY])
        assert result.exit_code == 0, result.output
        assert "T1w -> T2w" in result.output
        assert "every one of them on pairs" in result.output
