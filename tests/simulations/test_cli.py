"""The ``fedsynth`` command: help everywhere, exit codes, and messages a user can act on."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsynth.cli.main import app
from tests.conftest import SiteMaker, shared_site

runner = CliRunner()
SMALL = ["--set", "data.spacing_mm=[2, 2, 2]", "--set", "data.image_size=48"]


def _commands() -> list[str]:
    return sorted(c.name for c in app.registered_commands if c.name)


def test_every_command_has_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in _commands():
        assert name in result.output
        sub = runner.invoke(app, [name, "--help"])
        assert sub.exit_code == 0, name
        assert "Usage" in sub.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("fedsynth ")


def test_inspect_good_site(make_site: SiteMaker) -> None:
    root = make_site(subjects={"sub-01": ["T1w", "T2w"], "sub-02": ["FLAIR"]})
    result = runner.invoke(app, ["inspect", str(root), *SMALL])
    assert result.exit_code == 0, result.output
    assert "sub-02" in result.output and "FLAIR" in result.output
    trainable, paired = result.output.split("and evaluate on true pairs:")
    assert "T1w -> T2w, FLAIR" in trainable
    # Only sub-01 has two modalities: FLAIR has no partner for paired evaluation.
    assert "T1w -> T2w\n" in paired and "FLAIR ->" not in paired


def test_inspect_bad_file_names_it_and_fails(make_site: SiteMaker) -> None:
    root = make_site(subjects={"sub-01": ["T1w", "T2w"], "sub-02": ["T1w", "T2w"]})
    bad = root / "sub-02/anat/sub-02_T2w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])
    result = runner.invoke(app, ["inspect", str(root), *SMALL])
    assert result.exit_code == 1
    assert str(bad) in result.output.replace("\n", "")
    assert "truncated gzip" in result.output
    skipped = runner.invoke(app, ["inspect", str(root), "--skip-bad", *SMALL])
    assert skipped.exit_code == 0
    assert "T1w -> T2w" in skipped.output


def test_inspect_direction_that_cannot_train(make_site: SiteMaker) -> None:
    root = make_site(subjects={"sub-01": ["T1w", "FLAIR"]})
    result = runner.invoke(app, ["inspect", str(root), "--direction", "T1w->T2w", *SMALL])
    assert result.exit_code == 1
    assert "cannot train T1w->T2w" in result.output
    assert "usable modalities are FLAIR, T1w" in result.output


def test_inspect_empty_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 1
    assert "no NIfTI scans found" in result.output


def test_invalid_override_exits_2_with_the_dotted_name(tmp_path: Path) -> None:
    result = runner.invoke(app, ["inspect", str(tmp_path), "--set", "data.image_size=-3"])
    assert result.exit_code == 2
    assert "data.image_size = -3" in result.output
    assert "greater than or equal to 16" in result.output


def test_config_prints_resolved_toml() -> None:
    result = runner.invoke(app, ["config", "--preset", "cpu-small", "--set", "federation.rounds=7"])
    assert result.exit_code == 0
    body = result.output.split("\n\n", 1)[1]
    parsed = tomllib.loads(body)
    assert parsed["federation"]["rounds"] == 7
    assert parsed["data"]["image_size"] == 64
    assert "federation.rounds = 7 (default 10; --set federation.rounds=7)" in result.output
    presets = runner.invoke(app, ["config", "--presets"])
    assert presets.output.split() == ["cpu-small", "gpu-paper"]


@pytest.mark.realdata
@pytest.mark.parametrize("site", ["site-a", "site-b", "site-c", "site-d"])
def test_inspect_real_sites(site: str) -> None:
    root = shared_site("brain-mri", site)
    result = runner.invoke(app, ["inspect", str(root), "--preset", "cpu-small"])
    assert result.exit_code == 0, result.output
    assert "T1w -> " in result.output and "T2w" in result.output
    assert "every one of them on pairs" in result.output
    assert "weakly paired (1 session)" in result.output  # the example counts per direction


@pytest.mark.realdata
def test_inspect_real_ct_site_cannot_train_alone() -> None:
    root = shared_site("brain-ct", "site-ct")
    result = runner.invoke(app, ["inspect", str(root), "--preset", "cpu-small"])
    assert result.exit_code == 0  # the file is fine; the site just has one modality
    assert "cannot train any direction" in result.output
    assert "-1024..2" in result.output  # Hounsfield range read from the file
