"""Checkpoints (safetensors + JSON, crash-safe) and whole-volume synthesis on the input grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedsynth.common.checkpoint import (
    METADATA_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointMetadata,
    OutputScale,
    load_checkpoint,
    load_into,
    save_checkpoint,
)
from fedsynth.common.config import DataConfig, ModelConfig
from fedsynth.common.modalities import Modality
from fedsynth.common.models import define_generator, init_weights
from fedsynth.common.synthesis import Synthesizer, guess_modality
from tests.conftest import head_volume, save_nifti, shared_site

TINY = ModelConfig(ngf=8, n_blocks=1, ndf=8, d_layers=1)
DATA = DataConfig(spacing_mm=(3.0, 3.0, 3.0), image_size=64, min_foreground=0.05)


def _checkpoint(
    folder: Path, direction: str = "T1w->T2w", scale: OutputScale | None = None
) -> Path:
    g_ab, g_ba = (init_weights(define_generator(TINY, 64), seed=s) for s in (1, 2))
    meta = CheckpointMetadata(
        kind="local", direction=direction, model=TINY, data=DATA, output_scale=scale, epoch=3
    )
    return save_checkpoint(folder, {"g_ab": g_ab, "g_ba": g_ba}, meta)


def test_round_trip(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == [METADATA_NAME, WEIGHTS_NAME]
    meta, nets = load_checkpoint(folder / WEIGHTS_NAME)  # either file names the checkpoint
    assert meta.direction == "T1w->T2w" and meta.epoch == 3 and meta.model == TINY
    fresh = define_generator(TINY, 64)
    load_into(fresh, nets["g_ab"], where="test")
    reference = init_weights(define_generator(TINY, 64), seed=1)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)


def test_metadata_is_plain_json_and_weights_are_not_pickled(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "ckpt")
    meta = json.loads((folder / METADATA_NAME).read_text())
    assert meta["data"]["image_size"] == 64 and meta["kind"] == "local"
    header_size = int.from_bytes((folder / WEIGHTS_NAME).read_bytes()[:8], "little")
    header = json.loads((folder / WEIGHTS_NAME).read_bytes()[8 : 8 + header_size])
    assert header["__metadata__"]["format"] == "fedsynth"
    assert all(k.startswith(("g_ab.", "g_ba.")) for k in header if k != "__metadata__")


def test_missing_or_damaged_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a fedsynth checkpoint"):
        load_checkpoint(tmp_path)
    folder = _checkpoint(tmp_path / "ckpt")
    (folder / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(folder)
    (folder / METADATA_NAME).write_text('{"kind": "local"}')
    with pytest.raises(CheckpointError, match="invalid metadata"):
        load_checkpoint(folder)


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    _, nets = load_checkpoint(_checkpoint(tmp_path / "ckpt"))
    wider = define_generator(TINY.model_copy(update={"ngf": 16}), 64)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_into(wider, nets["g_ab"], where="ckpt")
    deeper = define_generator(TINY.model_copy(update={"n_blocks": 2}), 64)
    with pytest.raises(CheckpointError, match="missing"):
        load_into(deeper, nets["g_ab"], where="ckpt")


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    class Exploding(torch.nn.Module):
        def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
            raise RuntimeError("disk full")

    meta = CheckpointMetadata(kind="local", direction="T1w->T2w", model=TINY, data=DATA)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(folder, {"g_ab": Exploding()}, meta)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_guess_modality() -> None:
    assert guess_modality(Path("sub-01_T1w.nii.gz")) is Modality.T1W
    assert guess_modality(Path("sub-01_ce-gd_T1w.nii.gz")) is Modality.T1W_CE
    assert guess_modality(Path("sub-01_ct.nii")) is Modality.CT
    assert guess_modality(Path("patient.nii.gz")) is None


def _lps_volume(tmp_path: Path) -> Path:
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    affine[:3, 3] = [40.0, 45.0, -30.0]
    return save_nifti(tmp_path / "sub-01_T1w.nii.gz", head_volume("T1w", (60, 64, 40)), affine)


def test_synthesized_volume_keeps_the_input_grid(tmp_path: Path) -> None:
    source = _lps_volume(tmp_path)
    ckpt = _checkpoint(
        tmp_path / "ckpt", scale=OutputScale(low=10.0, high=500.0, kind="percentile")
    )
    result = Synthesizer(ckpt, device="cpu").synthesize(source, tmp_path / "out.nii.gz")
    written, original = nib.load(result.output), nib.load(source)
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine)
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")
    data = np.asarray(written.dataobj)
    assert data.min() >= 10.0 - 1e-3 and data.max() <= 500.0 + 1e-3
    # Background (outside the head) is the low end of the scale; the head is not.
    assert data[0, 0, 0] == pytest.approx(10.0)
    head = head_volume("T1w", (60, 64, 40)) > 0
    assert np.abs(data[head] - 10.0).mean() > 1.0
    assert result.slices > 0


def test_synthesis_matches_the_generator_on_the_model_grid(tmp_path: Path) -> None:
    """Independent path: preprocess, run G_AB by hand, compare at the voxels of the model grid."""
    from fedsynth.common.data.preprocess import preprocess_volume

    # An input already on the model grid (RAS, 3 mm, 64x64 in-plane): resampling is the identity.
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    affine[:3, 3] = [-94.5, -94.5, -30.0]
    source = save_nifti(tmp_path / "sub-01_T1w.nii.gz", head_volume("T1w", (64, 64, 20)), affine)
    ckpt = _checkpoint(tmp_path / "ckpt", scale=OutputScale(low=-1.0, high=1.0, kind="percentile"))
    synth = Synthesizer(ckpt, device="cpu", batch_size=3)
    out = np.asarray(nib.load(synth.synthesize(source, tmp_path / "o.nii.gz").output).dataobj)
    pre = preprocess_volume(source, Modality.T1W, DATA)
    _, nets = load_checkpoint(ckpt)
    g = define_generator(TINY, 64)
    load_into(g, nets["g_ab"], where="test")
    g.eval()
    with torch.no_grad():
        expected = g(torch.from_numpy(np.moveaxis(pre.volume, 2, 0))[:, None])[:, 0].numpy()
    expected = np.moveaxis(expected, 0, 2)
    inside = pre.mask
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-4)
    assert np.all(out[~inside] == -1.0)


def test_wrong_input_modality_is_refused(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt")
    flair = save_nifti(tmp_path / "sub-01_FLAIR.nii.gz", head_volume("FLAIR"))
    with pytest.raises(ValueError, match=r"is FLAIR but the checkpoint translates T1w->T2w"):
        Synthesizer(ckpt, device="cpu").synthesize(flair, tmp_path / "o.nii.gz")
    assert not (tmp_path / "o.nii.gz").exists()
    # An unnamed file is accepted when the caller vouches for its modality.
    plain = save_nifti(tmp_path / "patient.nii.gz", head_volume("T1w"))
    Synthesizer(ckpt, device="cpu").synthesize(plain, tmp_path / "o.nii.gz", modality=Modality.T1W)


def test_ct_target_defaults_to_hounsfield_units(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", direction="T1w->ct")
    synth = Synthesizer(ckpt, device="cpu")
    assert (synth.output_scale.low, synth.output_scale.high) == DATA.ct_window_hu


@pytest.mark.realdata
def test_synthesize_real_site_d_keeps_its_affine(tmp_path: Path) -> None:
    source = shared_site("brain-mri", "site-d") / "sub-stroke01/anat/sub-stroke01_T1w.nii.gz"
    ckpt = _checkpoint(tmp_path / "ckpt")
    result = Synthesizer(ckpt, device="cpu").synthesize(source, tmp_path / "t2.nii.gz")
    written, original = nib.load(result.output), nib.load(source)
    assert written.shape == original.shape
    np.testing.assert_allclose(written.affine, original.affine)
    assert written.header["sform_code"] == original.header["sform_code"]


# bf16 autocast vs fp32, as fractions of the output range (documented in the README): the mean
# and the 99th percentile of |difference| are bounded; a few voxels may differ more.
BF16_MEAN_TOLERANCE = 0.005
BF16_P99_TOLERANCE = 0.02


def test_bf16_synthesis_stays_close_to_fp32_on_trained_weights(tmp_path: Path) -> None:
    from fedsynth.common.config import TrainingConfig
    from fedsynth.common.training.trainer import CycleGANTrainer

    trainer = CycleGANTrainer(TINY, TrainingConfig(device="cpu", batch_size=2), 64)
    source = head_volume("T1w", (64, 64, 20))
    slices = torch.from_numpy(np.moveaxis(source / source.max() * 2 - 1, 2, 0)[:4, None].copy())
    for _ in range(5):  # a few real updates: weights no longer at their initial values
        trainer.train_step({"a": slices, "b": -slices})
    meta = CheckpointMetadata(
        kind="local",
        direction="T1w->T2w",
        model=TINY,
        data=DATA,
        output_scale=OutputScale(low=0.0, high=1.0, kind="percentile"),
    )
    ckpt = save_checkpoint(tmp_path / "ckpt", trainer.generators(), meta)
    path = save_nifti(tmp_path / "sub-01_T1w.nii.gz", head_volume("T1w", (60, 64, 40)))
    fp32 = Synthesizer(ckpt, device="cpu").synthesize(path, tmp_path / "a.nii.gz").output
    bf16 = Synthesizer(ckpt, device="cpu", bf16=True).synthesize(path, tmp_path / "b.nii.gz").output
    a, b = (np.asarray(nib.load(p).dataobj) for p in (fp32, bf16))
    assert not np.array_equal(a, b)  # the fast path really ran in bfloat16
    diff = np.abs(a - b)  # the output scale is 0..1, so these are fractions of the range
    assert diff.mean() <= BF16_MEAN_TOLERANCE
    assert np.percentile(diff, 99) <= BF16_P99_TOLERANCE


@pytest.mark.parametrize("kind", ["bomb", "units50mm", "hugefov", "truncated"])
def test_synthesize_refuses_a_damaged_input_with_its_name_and_writes_nothing(
    tmp_path: Path, kind: str
) -> None:
    from typer.testing import CliRunner

    from fedsynth.cli.main import app
    from tests.intake import BAD_KINDS

    ckpt = _checkpoint(tmp_path / "ckpt")
    damaged = tmp_path / f"sub-01_T1w{BAD_KINDS[kind].suffix}"
    BAD_KINDS[kind].write(damaged)
    out = tmp_path / "out.nii.gz"
    args = ["synthesize", str(damaged), str(out), "--checkpoint", str(ckpt), "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert damaged.name in "".join(result.output.split())
    assert BAD_KINDS[kind].reason in said
    assert "Traceback" not in result.output
    assert set(tmp_path.iterdir()) == {tmp_path / "ckpt", damaged}  # no output, no temporary
